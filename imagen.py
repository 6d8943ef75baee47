"""Imagen: the three-stage cascade, its stage configs, and text -> image generation.

Saharia et al. 2022, §2 and Fig. A.4: text -> frozen T5-XXL -> 64x64 base model ->
64->256 super-resolution -> 256->1024 super-resolution, each a diffusion model with
classifier-free guidance (§2.2), dynamic thresholding (§2.3) and, for the super-resolution
stages, noise conditioning augmentation (§2.4).

`python imagen.py` prints, for each stage of the paper preset, the paper's parameter count,
ours, the resolution and the FLOPs of one forward pass at batch 1.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unet import UNetConfig, abstract_unet


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One diffusion model of the cascade and how it is trained and sampled."""
    name: str  # "base", "sr1", "sr2"
    section: str  # where the paper gives this stage
    unet: UNetConfig
    resolution: int  # output side at inference: 64, 256, 1024
    lowres: int  # side of the conditioning image (0 for the base model)
    train_size: int  # side of the training images (the 256->1024 model trains on 256 crops, §2.5)
    schedule: str  # "cosine" (F.1, F.2) or "linear" (F.3); see diffusion.SCHEDULES
    optimizer: str  # "adafactor" (base) or "adam" (super-resolution), §4.1 / App. F
    paper_params: float  # the paper's parameter count (§2.5, App. B.1)
    text_encoder: str = "t5-v1_1-xxl"  # §2.1; a checkpoint directory, or "demo-t5"
    text_length: int = 128  # paper: not specified; 128 T5 tokens (t5_encoder.MAX_LENGTH)
    # sampling defaults: guidance 5 and aug level 0.3 give the paper's "best samples"
    # (App. D.2, Figs. A.10-A.12); step counts: paper: not specified; ours (DeepFloyd IF's 100 / 50)
    guidance: float = 5.0
    aug_level: float = 0.3
    steps: int = 100
    sampler: str = "ddpm"
    threshold: str = "dynamic"  # §2.3, p = 99.5 (Fig. A.10)


_paper_base = UNetConfig(
    # App. F.1, verbatim: channels 512, channel_mult [1, 2, 3, 4], num_res_blocks 3,
    # attn_resolutions [32, 16, 8], per_head_channels 64, dropout 0, text_cross_attn_res
    # [32, 16, 8], feature_pooling "attention", use_scale_shift_norm True.
    arch="unet", image_size=64, channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
    attn_resolutions=(32, 16, 8), text_cross_attn_res=(32, 16, 8), per_head_channels=64,
    feature_pooling="attention", use_scale_shift_norm=True, dropout=0.0)
_paper_sr1 = UNetConfig(
    # App. F.2: DBlocks/UBlocks of 128, 256, 512, 1024 channels with 2, 4, 8, 8 residual
    # blocks; self-attention (with the text tokens, "text cross attention") in the last one
    # only; 8 heads; dropout 0; attention pooling; scale-shift norm.
    arch="efficient", image_size=256, lowres_cond=True, block_channels=(128, 256, 512, 1024),
    block_res_blocks=(2, 4, 8, 8), block_self_attn=(False, False, False, True),
    block_cross_attn=(False, False, False, False), num_heads=8, skip_combine="concat",
    feature_pooling="attention", use_scale_shift_norm=True, dropout=0.0)
_paper_sr2 = dataclasses.replace(
    # App. F.3: as F.2 but without self-attention: explicit text cross-attention instead.
    _paper_sr1, block_self_attn=(False, False, False, False), block_cross_attn=(False, False, False, True))

_demo_unet = dict(text_dim=64, norm_groups=8, emb_mult=4)  # demo sizes: see the demo issue

PRESETS = {
    "paper": {
        "base": StageConfig("base", "§2.5, App. F.1", _paper_base, 64, 0, 64, "cosine", "adafactor", 2.0e9,
                            steps=100),
        "sr1": StageConfig("sr1", "App. B.1, F.2", _paper_sr1, 256, 64, 256, "cosine", "adam", 600e6,
                           steps=50),
        "sr2": StageConfig("sr2", "App. B.1, F.3", _paper_sr2, 1024, 256, 256, "linear", "adam", 400e6,
                           steps=50),
    },
    "demo": {
        "base": StageConfig("base", "demo of App. F.1", UNetConfig(
            arch="unet", image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
            attn_resolutions=(16, 8), text_cross_attn_res=(16, 8), per_head_channels=16, **_demo_unet),
            32, 0, 32, "cosine", "adafactor", 0, text_encoder="demo-t5", text_length=64, steps=50),
        "sr1": StageConfig("sr1", "demo of App. F.2", UNetConfig(
            arch="efficient", image_size=64, lowres_cond=True, block_channels=(16, 32, 64),
            block_res_blocks=(1, 1, 2), block_self_attn=(False, False, True),
            block_cross_attn=(False, False, False), num_heads=4, skip_combine="concat", **_demo_unet),
            64, 32, 64, "cosine", "adam", 0, text_encoder="demo-t5", text_length=64, steps=25),
        "sr2": StageConfig("sr2", "demo of App. F.3", UNetConfig(
            arch="efficient", image_size=64, lowres_cond=True, block_channels=(16, 32, 64),
            block_res_blocks=(1, 1, 2), block_self_attn=(False, False, False),
            block_cross_attn=(False, False, True), num_heads=4, skip_combine="concat", **_demo_unet),
            128, 64, 64, "linear", "adam", 0, text_encoder="demo-t5", text_length=64, steps=25),
    },
}


def count_params(stage: StageConfig) -> int:
    """Parameters of a stage's network, from jax.eval_shape (nothing is allocated)."""
    abstract = abstract_unet(stage.unet)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def abstract_inputs(stage: StageConfig, batch: int, size: int | None = None, text_len: int = 128):
    """ShapeDtypeStructs of one network call at `size` (default: the training size)."""
    size = size or stage.train_size
    c, f32 = stage.unet.in_channels, jnp.float32
    img = jax.ShapeDtypeStruct((batch, size, size, c), f32)
    vec = jax.ShapeDtypeStruct((batch,), f32)
    lowres = (img, vec) if stage.unet.lowres_cond else (None, None)
    return (img, vec, jax.ShapeDtypeStruct((batch, text_len, stage.unet.text_dim), f32),
            jax.ShapeDtypeStruct((batch, text_len), jnp.bool_)) + lowres


def forward_flops(stage: StageConfig, batch: int = 1, size: int | None = None) -> float:
    """FLOPs of one forward pass, from XLA's cost analysis of the compiled function."""
    graphdef, state = nnx.split(abstract_unet(stage.unet))

    def fwd(state, *inputs):
        return nnx.merge(graphdef, state)(*inputs)

    compiled = jax.jit(fwd).lower(state, *abstract_inputs(stage, batch, size)).compile()
    return float(compiled.cost_analysis()["flops"])


def main():
    print(f"{'stage':6s} {'paper section':15s} {'paper params':>12s} {'ours':>8s} {'diff':>7s} "
          f"{'resolution':>14s} {'GFLOPs/fwd (B=1)':>17s}")
    for name, stage in PRESETS["paper"].items():
        n = count_params(stage)
        side = stage.resolution  # at inference: the full output size
        flops = forward_flops(stage, 1, side)
        res = f"{stage.lowres}->{side}" if stage.lowres else f"{side}x{side}"
        print(f"{name:6s} {stage.section:15s} {stage.paper_params / 1e9:11.2f}B {n / 1e9:7.3f}B "
              f"{(n / stage.paper_params - 1) * 100:+6.1f}% {res:>14s} {flops / 1e9:17.1f}")


if __name__ == "__main__":
    main()
