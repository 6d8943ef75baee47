"""The Efficient U-Net of Imagen's super-resolution stages (64->256 and 256->1024).

Saharia et al. 2022, App. B.1 and Figs. A.27-A.30: compared with a plain U-Net it (1) moves
parameters to the low resolutions by using more residual blocks there, (2) scales the skip
connections by 1/sqrt(2), and (3) reverses the order of down-sampling and convolution: a
DBlock down-samples first, then convolves; a UBlock convolves first, then up-samples.
  App. F.2   the 64->256 model: self-attention (with the text tokens) in the last block
  App. F.3   the 256->1024 model: explicit text cross-attention there instead, trained on
             256x256 crops and run on the whole image (fully convolutional apart from it)
The layers (ResBlock, Attention, the conditioning embedding) are the base U-Net's, in unet.py;
the call signature is the same.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unet import (Attention, Conditioning, GroupNorm, ResBlock, NetworkConfig, check_inputs, compute_dtype,
                  maybe_remat, conv, resample, text_width)


@dataclasses.dataclass(frozen=True)
class EfficientUNetConfig(NetworkConfig):
    """The Efficient U-Net (App. B.1); defaults are the 64->256 model's F.2 listing and the
    layers of Figs. A.27-A.29. One entry per DBlock (and its mirror UBlock), from the highest
    resolution to the lowest."""
    lowres_cond: bool = True
    block_channels: tuple = (128, 256, 512, 1024)  # F.2
    block_res_blocks: tuple = (2, 4, 8, 8)  # F.2
    # F.2 / F.3: "strides": (2, 2) in every block: each DBlock halves the side first, each
    # UBlock doubles it last (256 -> 128 -> 64 -> 32 -> 16 and back). A stride of 1 keeps the
    # side (no paper model has one; the demo's first block does)
    block_strides: tuple = (2, 2, 2, 2)
    block_self_attn: tuple = (False, False, False, True)  # F.2: self-attention + text tokens in k/v
    block_cross_attn: tuple = (False, False, False, False)  # F.3: explicit text cross-attention
    num_heads: int = 8  # F.2: "num_attention_heads": 8; Fig. A.28: "attention_heads=8"
    attn_hidden_mult: int = 2  # Fig. A.28: "hidden_size=2×channels output_size=channels"
    conv_shortcut: bool = True  # Fig. A.27: a 1x1 conv on every ResNetBlock's shortcut (False: ADM's)
    # App. B.1: "scaling the skip connections by 1/√2 similar to [66, 59]" (score-SDE, SR3);
    # paper: not specified which sums. "residual": every residual sum is (x + h)/sqrt(2) (ResNetBlocks and
    # attention), as score-SDE's skip_rescale; "shortcut": h + shortcut(x)/sqrt(2) in the
    # ResNetBlocks (NVIDIA Rosetta's and NeMo's Efficient U-Nets); "unet": the DBlock output a
    # UBlock takes is scaled (imagen-pytorch). See docs/parameter_counts.md#the-sqrt2-scaling.
    sqrt2_scaling: str = "residual"
    # paper: not specified how a UBlock takes its DBlock's output; "concat": [x, skip] on
    # channels (imagen-pytorch, Rosetta), "add": x + skip (NeMo)
    skip_combine: str = "concat"


def _block_attention(ch, self_attn, cross_attn, cfg, rngs):
    """A DBlock's / UBlock's attention layer: self-attention with the text tokens in its keys and
    values (F.2), explicit text cross-attention (F.3), or none."""
    text = text_width(cfg) if cfg.text_cross_attn else 0
    if self_attn or (cross_attn and text):
        return Attention(ch, cfg.num_heads, text, self_attn, cfg, rngs, hidden=cfg.attn_hidden_mult * ch,
                         out_scale=_residual_scale(cfg))
    return None


def _residual_scale(cfg):
    return 2 ** -0.5 if cfg.sqrt2_scaling == "residual" else 1.0


def _res_block(i, o, emb_dim, cfg, rngs):
    return ResBlock(i, o, emb_dim, cfg, rngs, conv_shortcut=cfg.conv_shortcut, out_scale=_residual_scale(cfg),
                    shortcut_scale=2 ** -0.5 if cfg.sqrt2_scaling == "shortcut" else 1.0)


class DBlock(nnx.Module):
    """App. B.1, Fig. A.28: conv3x3 with the block's stride (down-sampling first) -> ResNetBlocks
    -> attention. The conditioning embedding (Fig. A.28's CombineEmbs: time + pooled text, and
    the aug level) enters every ResNetBlock by scale-shift norm (F.2's use_scale_shift_norm);
    paper: not specified where CombineEmbs acts (Fig. A.27's ResNetBlock takes no embedding):
    docs/parameter_counts.md#the-embeddings-combineembs-and-scale-shift-norm."""

    def __init__(self, i, o, n, self_attn, cross_attn, emb_dim, cfg, rngs, stride):
        self.down = conv(i, o, rngs, compute_dtype(cfg), stride=stride)
        self.res = nnx.List([_res_block(o, o, emb_dim, cfg, rngs) for _ in range(n)])
        self.attn = _block_attention(o, self_attn, cross_attn, cfg, rngs)

    def __call__(self, x_BHWC, emb_BE, txt_BLD, mask_BL, cfg):
        x = self.down(x_BHWC)
        for r in self.res:
            x = maybe_remat(cfg, r, x, emb_BE)
        return self.attn(x, txt_BLD, mask_BL) if self.attn is not None else x


class UBlock(nnx.Module):
    """App. B.1, Fig. A.29: [x, skip] -> ResNetBlocks -> attention -> conv3x3 with the block's
    stride, up-sampling last (paper: not specified which op; nearest 2x, then the conv3x3).
    Fig. A.29's last conv keeps the block's width ("channels=channels"); paper: not specified
    where the width then changes to the next UBlock's; here that conv maps C[k] -> C[k-1]
    (imagen-pytorch's reading), so the next UBlock's skip and input share a width."""

    def __init__(self, i, o, n, self_attn, cross_attn, emb_dim, cfg, rngs, stride):
        first_in = 2 * i if cfg.skip_combine == "concat" else i
        self.res = nnx.List([_res_block(first_in if j == 0 else i, i, emb_dim, cfg, rngs) for j in range(n)])
        self.attn = _block_attention(i, self_attn, cross_attn, cfg, rngs)
        self.up = conv(i, o, rngs, compute_dtype(cfg))
        self.upsample = stride == 2

    def __call__(self, x_BHWC, skip_BHWC, emb_BE, txt_BLD, mask_BL, cfg):
        s = 2 ** -0.5 if cfg.sqrt2_scaling == "unet" else 1.0  # "unet": [x, skip/sqrt(2)] or (x + skip)/sqrt(2)
        if cfg.skip_combine == "concat":
            x = jnp.concatenate([x_BHWC, skip_BHWC * s], -1)
        else:
            x = (x_BHWC + skip_BHWC) * s
        for r in self.res:
            x = maybe_remat(cfg, r, x, emb_BE)
        x = self.attn(x, txt_BLD, mask_BL) if self.attn is not None else x
        return self.up(resample(x, "up") if self.upsample else x)


class EfficientUNet(nnx.Module):
    """The Efficient U-Net of App. B.1 (64->256: F.2, 256->1024: F.3). Fully convolutional
    apart from attention to the text, so the 256->1024 model trained on 256x256 crops runs
    on the full 1024x1024 image at inference."""

    def __init__(self, cfg: EfficientUNetConfig, rngs: nnx.Rngs):
        assert cfg.skip_combine in ("add", "concat"), cfg.skip_combine
        assert cfg.sqrt2_scaling in ("residual", "shortcut", "unet"), cfg.sqrt2_scaling
        assert set(cfg.block_strides) <= {1, 2}, cfg.block_strides
        n = len(cfg.block_channels)
        assert all(len(t) == n for t in (cfg.block_res_blocks, cfg.block_strides, cfg.block_self_attn,
                                         cfg.block_cross_attn)), "one entry per block in every block_* field"
        self.cfg = cfg
        dt, C = compute_dtype(cfg), cfg.block_channels
        emb_dim = cfg.emb_mult * C[0]
        self.cond = Conditioning(C[0], emb_dim, cfg, rngs)
        in_ch = cfg.in_channels * (2 if cfg.lowres_cond else 1)
        self.conv_in = conv(in_ch, C[0], rngs, dt)
        prev = [C[0]] + list(C[:-1])  # block k maps prev[k] -> C[k] (down) and C[k] -> prev[k] (up)
        spec = list(zip(prev, C, cfg.block_res_blocks, cfg.block_self_attn, cfg.block_cross_attn,
                        cfg.block_strides))
        self.down = nnx.List([DBlock(p, c, n, sa, ca, emb_dim, cfg, rngs, s) for p, c, n, sa, ca, s in spec])
        self.up = nnx.List([UBlock(c, p, n, sa, ca, emb_dim, cfg, rngs, s) for p, c, n, sa, ca, s in reversed(spec)])
        self.norm_out = GroupNorm(C[0], cfg.norm_groups, dt)
        self.conv_out = conv(C[0], cfg.in_channels, rngs, dt)

    def __call__(self, z_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC=None, aug_log_snr_B=None):
        cfg = self.cfg
        check_inputs(cfg, z_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC, aug_log_snr_B)
        assert z_BHWC.shape[1] % math.prod(cfg.block_strides) == 0, "side must divide by the product of the strides"
        emb_BE, txt_BLD = self.cond(log_snr_B, txt_BLD.astype(compute_dtype(cfg)), mask_BL, aug_log_snr_B)
        x = jnp.concatenate([z_BHWC, lowres_BHWC], -1) if cfg.lowres_cond else z_BHWC
        h = self.conv_in(x.astype(compute_dtype(cfg)))
        skips = []
        for block in self.down:  # the side divides by each block's stride at its start
            h = block(h, emb_BE, txt_BLD, mask_BL, cfg)
            skips.append(h)
        for block in self.up:  # and multiplies by it at the end of the mirror UBlock
            h = block(h, skips.pop(), emb_BE, txt_BLD, mask_BL, cfg)
        eps_BHWC = self.conv_out(jax.nn.silu(self.norm_out(h)))
        assert eps_BHWC.shape == z_BHWC.shape
        return eps_BHWC.astype(jnp.float32)
