"""Imagen: the three-stage cascade, its stage configs, and text -> image generation.

Saharia et al. 2022, §2 and Fig. A.4: text -> frozen T5-XXL -> 64x64 base model ->
64->256 super-resolution -> 256->1024 super-resolution, each a diffusion model with
classifier-free guidance (§2.2), dynamic thresholding (§2.3) and, for the super-resolution
stages, noise conditioning augmentation (§2.4).

`python imagen.py` prints, for each stage of the paper preset, the paper's parameter count,
ours, the resolution and the FLOPs of one forward pass at batch 1.
"""

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import diffusion
from unet import UNetConfig, abstract_unet, resize_lowres


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
    prediction: str = "eps"  # the network's target: eps (App. A); "v" only in the demo


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

# The demo (demo.py): sizes for 30 minutes on 2 CPU cores. Both super-resolution stages train
# on 32x32 crops (the paper trains only its 256->1024 model on crops, 1/4 of the side, §2.5;
# our 64->128 stage uses the same 1/4, the 32->64 stage 1/2) with 32 channels at full
# resolution: with 16, the 32->64 stage's loss was twice as high after 400 steps.
_demo_unet = dict(text_dim=256, norm_groups=8, emb_mult=4)  # t5_encoder.DEMO_T5
# Not the paper's: the demo networks predict v = alpha_t eps - sigma_t x instead of eps (App. A).
# Measured (32->64 stage, 350 updates, 32 held-out captions from real 32x32 inputs): eps
# prediction drew noise blobs (colour 19%, palette purity 0.06; its x0 error at t = 0.9 was 0.28,
# 28x that of just copying the low-res input), v prediction drew the shapes (colour 94%, count
# and position 100%, purity 0.98). An eps network's x0 = (z_t - sigma_t eps_hat) / alpha_t
# divides its error by alpha_t, so at high noise it needs a precision that a few hundred
# updates do not buy; with v the x0 error stays bounded. The paper presets keep eps.
# Static, not dynamic thresholding by default (§2.3; the report still compares the three): on
# white backgrounds, which sit at +1, any overshoot makes the 99.5th percentile s > 1, and
# dividing by s every step greys the image and leaves grain. Measured on the demo cascade (16
# held-out captions, the SR stages from real 32x32 inputs, w = 5): palette purity 0.04 dynamic,
# 0.87 static; colour 12% vs 50%. Base alone, 64 captions: static purity 0.94 at w = 5.
_demo_stage = dict(text_encoder="demo-t5", text_length=64, prediction="v", threshold="static")
# The demo's super-resolution stages sample unguided (w = 1) without augmentation (aug level 0,
# as the paper's COCO setting, Table 1), not at the "best samples" w = 5, aug 0.3: measured on 64
# held-out captions from the same 32x32 base samples (colour 81% there), the 128x128 outputs kept
# colour 78% at w = 1 / aug 0 and 62% at w = 5 / aug 0.3 (75% at w = 1 / aug 0.3). Guidance on
# these small stages pushes their own reading of the caption onto the base's layout. w = 1 also
# halves their sampling cost (one network pass per step).
_demo_sr_sampling = dict(guidance=1.0, aug_level=0.0)

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
        # Attention (self + text) only at 8x8, where F.1 also has it at 32 and 16 (of 64): on
        # this CPU attention over 16x16 cost 40% of the step (30 -> 50 img/s without it). The
        # time buys more updates and 128 channels (not 64) at 8x8. Measured at equal training time
        # (~15 min; 64 held-out captions, base alone, w = 5): (16, 8) attention and mult
        # (1, 2, 2), 950 updates: colour 55%, count 49%, position 10%; this, 1136 updates:
        # 62%, 40%, 10% (training captions: colour 73% -> 86%, position 24% -> 28%).
        # A 2x2 space-to-depth patch in and out, so the first level runs at 16x16, and
        # parameter-free resampling between levels: 87 img/s on this CPU against 40 with a
        # 32x32 level and BigGAN up/down blocks (channel_mult (1, 2, 4)), about as good per
        # example (base alone, 256 held-out captions, w = 3; README "The demo"), so the demo's
        # 15 minutes of base training give 2400 updates instead of 1100.
        # At 16x16 attention to the text alone (queries from the image, keys and values from
        # the text, as F.3's cross-attention), not F.1's self-attention + text there: with text
        # only at 8x8 the base drew held-out counts in a wrong colour and swapped positions.
        # Measured (2400 updates, base alone, 256 held-out captions, w = 3, the committed
        # encoder draw): colour 89.8 -> 98.0%, count 79.2 -> 97.6%, position 89.6 -> 93.4%,
        # at 71 img/s instead of 85 on this CPU, so the demo trains it 2200 updates, not 2400
        # (demo.STEPS), to stay within its 30 minutes (27.6 min, README "The demo").
        "base": StageConfig("base", "demo of App. F.1", UNetConfig(
            arch="unet", image_size=32, channels=32, channel_mult=(2, 4), num_res_blocks=1,
            attn_resolutions=(8,), text_cross_attn_res=(16, 8), per_head_channels=16, patch_size=2,
            resblock_updown=False, **_demo_unet),
            # Adam, not Adafactor (§4.1), and guidance 3, not 5: measured on the base alone
            # after 1100 updates (the demo encoder's first draw, 64 held-out captions, w = 5):
            # colour 81% with Adam (lr 2e-3) vs 61% with Adafactor (1e-2); with this encoder
            # (256 held-out captions) count 54% at w = 3 vs 34% at w = 5, colour 76% and
            # position 14-17% at both: stronger guidance merges repeated shapes.
            32, 0, 32, "cosine", "adam", 0, steps=50, **_demo_stage, guidance=3.0),
        "sr1": StageConfig("sr1", "demo of App. F.2", UNetConfig(
            arch="efficient", image_size=32, lowres_cond=True, block_channels=(32, 64, 64),
            block_res_blocks=(1, 1, 2), block_self_attn=(False, False, True),
            block_cross_attn=(False, False, False), num_heads=4, skip_combine="concat", **_demo_unet),
            64, 32, 32, "cosine", "adam", 0, steps=15, **_demo_stage, **_demo_sr_sampling),
        "sr2": StageConfig("sr2", "demo of App. F.3", UNetConfig(
            arch="efficient", image_size=32, lowres_cond=True, block_channels=(32, 64, 64),
            block_res_blocks=(1, 1, 2), block_self_attn=(False, False, False),
            block_cross_attn=(False, False, True), num_heads=4, skip_combine="concat", **_demo_unet),
            # cosine, not F.3's linear schedule: measured (300 updates; 32 held-out captions from
            # real 64x64 inputs, w = 1, aug 0): linear colour 53% with 15 sampling steps, 62% with
            # 50, grainy and hue-shifted; cosine 100%. The linear schedule's log-SNR is below -2.5
            # for half of t (cosine's: below 0), so training and 15 uniform sampling steps spend
            # little time at the low noise levels where a super-resolution stage draws detail.
            128, 64, 32, "cosine", "adam", 0, steps=15, **_demo_stage, **_demo_sr_sampling),
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


# ---------------------------------------------------------------------------------------------
# The cascade: text -> 64 -> 256 -> 1024 (§2, Fig. A.4)
# ---------------------------------------------------------------------------------------------

STAGE_NAMES = ("base", "sr1", "sr2")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How one stage is sampled. Defaults: the paper's "best samples" settings (App. D.2)."""
    guidance: float = 5.0  # w, §2.2 (Figs. A.10-A.12 use 5)
    steps: int = 100
    sampler: str = "ddpm"  # "ddpm" (ancestral) or "ddim", App. A
    threshold: str = "dynamic"  # "none" | "static" | "dynamic" (§2.3, p = 99.5)
    aug_level: float = 0.3  # super-resolution stages only (§2.4; Fig. A.12 uses 0.3)


def default_settings(stage: StageConfig, preset: str = "best") -> SampleSettings:
    """"best": guidance 5, aug level 0.3 (App. D.2, Figs. A.10, A.12); "coco-fid": the COCO
    FID-30K setting of Table 1: w = 1.35 (base) and 8.0 (super-resolution), aug level 0."""
    s = SampleSettings(stage.guidance, stage.steps, stage.sampler, stage.threshold, stage.aug_level)
    if preset == "coco-fid":
        s = dataclasses.replace(s, guidance=1.35 if stage.lowres == 0 else 8.0, aug_level=0.0)
    return s


def stage_from_dict(d: dict) -> StageConfig:
    """A StageConfig from its JSON form (as train.py records it in checkpoints)."""
    unet_fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unet = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["unet"].items() if k in unet_fields})
    return StageConfig(**{**d, "unet": unet})


@dataclasses.dataclass
class LoadedStage:
    config: StageConfig
    model: nnx.Module
    step: int  # the checkpoint's step


def load_stage(stage_dir: str, ema: bool = True) -> LoadedStage:
    """A stage trained by train.py in stage_dir: its config and (EMA) weights."""
    import train  # train.py imports this module for the presets

    mngr = train.checkpoint_manager(stage_dir)
    if mngr.latest_step() is None:
        raise FileNotFoundError(stage_dir)
    meta = train.read_meta(mngr)
    config = stage_from_dict(meta["stage"])
    config = dataclasses.replace(config, text_encoder=meta["text_encoder"])
    if jax.default_backend() != "cpu":  # bf16 activations on accelerators
        config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, dtype="bfloat16"))
    graphdef, shapes = train.abstract_state(config, train.TrainConfig(**meta["train"]))
    state = train.restore(mngr, shapes)
    return LoadedStage(config, nnx.merge(graphdef, state["ema" if ema else "params"]), int(state["step"]))


def load_cascade(workdir: str, num_stages: int = 3, ema: bool = True):
    """workdir/base, workdir/sr1, workdir/sr2 (train.py workdirs) -> [LoadedStage], and the text
    encoder recorded in the base checkpoint. A missing stage is a FileNotFoundError naming the
    train.py command that makes it."""
    stages = []
    for name in STAGE_NAMES[:num_stages]:
        d = os.path.join(workdir, name)
        try:
            stages.append(load_stage(d, ema))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no trained {name} stage in {d}. Make it with\n  python train.py --stage {name} "
                f"--workdir {d} [--preset paper ...]\nor run `python train.py` for the demo cascade "
                f"(runs/demo).") from None
    return stages


def check_text_width(stages, encoder):
    for s in stages:
        if s.config.unet.text_dim != encoder.cfg.d_model:
            raise ValueError(f"the {s.config.name} stage was trained on text of width "
                             f"{s.config.unet.text_dim}, the text encoder gives {encoder.cfg.d_model}: "
                             f"use the encoder it was trained with ({s.config.text_encoder!r})")


@functools.lru_cache(maxsize=32)
def _sampler(graphdef, schedule, steps, guided, sampler, threshold, shape, prediction):
    """One stage's whole sampling loop, jitted: compiled once per (settings, shape)."""
    def run(state, key, text_emb, text_mask, w, lowres, aug_level):
        model = nnx.merge(graphdef, state)
        return diffusion.sample(model, key, shape, text_emb, text_mask, diffusion.SCHEDULES[schedule],
                                steps, w if guided else 1.0, sampler, threshold=threshold,
                                lowres=lowres, aug_level=aug_level, prediction=prediction)
    return jax.jit(run)


def sample_stage(stage: LoadedStage, key, text_emb, text_mask, settings: SampleSettings, prev=None):
    """One stage for one batch: (B, side, side, 3) in [-1, 1]. prev: the previous stage's output,
    which is resized to this stage's side and noise-augmented at settings.aug_level (§2.4)."""
    cfg = stage.config
    B = text_emb.shape[0]
    side = cfg.resolution
    lowres = None if prev is None else resize_lowres(prev, side)
    graphdef, state = nnx.split(stage.model)
    run = _sampler(graphdef, cfg.schedule, settings.steps, settings.guidance != 1.0, settings.sampler,
                   settings.threshold, (B, side, side, cfg.unet.in_channels), cfg.prediction)
    x = run(state, key, text_emb, text_mask, jnp.float32(settings.guidance), lowres,
            jnp.float32(settings.aug_level))
    return jnp.clip(x, -1.0, 1.0)


def to_uint8(x):
    return np.asarray(jnp.round((x + 1) * 127.5), np.uint8)


def generate(stages, encoder, tokenizer, prompts, settings, seed=0, batch_size=8, text_length=None,
             progress=False):
    """Prompts -> uint8 images (N, side, side, 3) through the given stages (1, 2 or 3).

    The prompts are encoded once per batch and the embeddings reused by every stage (§2).
    settings: one SampleSettings per stage. Batch b of stage s draws its noise from
    fold_in(fold_in(PRNGKey(seed), b), s): the same seed and batch size give the same images."""
    import t5_encoder
    from tqdm import tqdm

    check_text_width(stages, encoder)
    text_length = text_length or stages[0].config.text_length
    out = []
    batches = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress)):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        chunk += [""] * (batch_size - n)  # pad the last batch: one compiled shape per stage
        emb, mask = t5_encoder.encode(encoder, tokenizer, chunk, text_length)
        x = None
        for s, (stage, st) in enumerate(zip(stages, settings)):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), b), s)
            x = sample_stage(stage, key, emb, jnp.asarray(mask), st, x)
        out.append(to_uint8(x[:n]))  # memory: only uint8 images stay on the host
    return np.concatenate(out)


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
