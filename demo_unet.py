"""The demo base's network: the base U-Net of unet.py (App. F.1) with three changes, none of
them the paper's, that make it fast enough to train on 2 CPU cores
(docs/demo_experiments.md#the-faster-base):
  - patch_size p: p x p pixels folded into channels around the network (space-to-depth), so
    the first level runs at side / p;
  - resblock_updown False: parameter-free 2x2 average pooling / nearest 2x between levels in
    the place of F.1's BigGAN resampling blocks ("res_block_type": "biggan");
  - text_cross_attn_res beyond attn_resolutions: a layer that attends to the text alone at
    those sides (F.1 lists the same sides for both).
"""

import dataclasses

from flax import nnx

from unet import UNet, UNetConfig, resample, text_width


@dataclasses.dataclass(frozen=True)
class DemoUNetConfig(UNetConfig):
    patch_size: int = 2
    resblock_updown: bool = False


def space_to_depth(x_BHWC, p):
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch becomes one position's channels."""
    B, H, W, C = x_BHWC.shape
    return (x_BHWC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
            .reshape(B, H // p, W // p, p * p * C))


def depth_to_space(x_BHWC, p):
    """The inverse of space_to_depth."""
    B, H, W, C = x_BHWC.shape
    return (x_BHWC.reshape(B, H, W, p, p, C // (p * p)).transpose(0, 1, 3, 2, 4, 5)
            .reshape(B, H * p, W * p, C // (p * p)))


class Resample(nnx.Module):
    """Parameter-free resampling between levels, called like a ResBlock."""

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, x_BHWC, emb_BE):
        return resample(x_BHWC, self.kind)


class DemoUNet(UNet):
    """UNet on the p x p-folded image (its channels p*p times the image's); the same call."""

    def __init__(self, cfg: DemoUNetConfig, side: int, rngs: nnx.Rngs):
        assert not cfg.lowres_cond, "the demo base only: a low-res input would fold apart from z"
        self.patch = cfg.patch_size
        super().__init__(dataclasses.replace(cfg, in_channels=cfg.in_channels * cfg.patch_size ** 2),
                         side // cfg.patch_size, rngs)

    def attention(self, c, res, rngs):
        cfg = self.cfg
        if res in cfg.attn_resolutions or not (cfg.text_cross_attn and res in cfg.text_cross_attn_res):
            return super().attention(c, res, rngs)
        return self.attention_layer(c, text_width(cfg), False, rngs)  # the text alone

    def resample_block(self, c, kind, emb_dim, rngs):
        return super().resample_block(c, kind, emb_dim, rngs) if self.cfg.resblock_updown else Resample(kind)

    def __call__(self, z_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC=None, aug_log_snr_B=None):
        p = self.patch
        return depth_to_space(super().__call__(space_to_depth(z_BHWC, p), log_snr_B, txt_BLD, mask_BL), p)
