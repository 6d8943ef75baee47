"""Imagen: the three-stage cascade, its stage configs, and text -> image.

Saharia et al. 2022, §2 and Fig. A.4: text -> frozen T5-XXL -> 64x64 base model ->
64->256 super-resolution -> 256->1024 super-resolution, each a diffusion model with
classifier-free guidance (§2.2), dynamic thresholding (§2.3) and, for the super-resolution
stages, noise conditioning augmentation (§2.4).

What each setting is, and where it lives:
  StageConfig     what a stage is: its network, image sides, schedule, target (PRESETS)
  SampleSettings  how a stage is sampled: guidance, steps, sampler, thresholding (SAMPLING)
  train.TrainConfig  how a stage is trained: optimizer, learning rate, batch, steps
  Backend         how the networks run on this JAX backend (compute dtype, attention kernel)

`python imagen.py` prints, for each stage of the paper preset, the paper's parameter count,
ours, the resolution and the FLOPs of one forward pass at batch 1.
"""

import argparse
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import cli
import diffusion
import sharding
import t5_encoder
from demo_unet import DemoUNet, DemoUNetConfig
from efficient_unet import EfficientUNet, EfficientUNetConfig
from unet import UNet, UNetConfig


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One diffusion model of the cascade: what is trained (and recorded in its checkpoint).

    Image sides: `side` is the side of the images the stage makes (64, 256, 1024); `lowres_side`
    the side of its conditioning image (0 for the base model); `train_side` the side it trains
    on, equal to `side` except for a stage trained on random crops (the 256->1024 model trains
    on 256x256 crops of the 1024 images, §2.5, and runs on the whole image at inference)."""
    preset: str  # "paper" or "demo": which PRESETS entry (picks the default SampleSettings)
    name: str  # "base", "sr1", "sr2"
    section: str  # where the paper gives this stage
    unet: UNetConfig | EfficientUNetConfig
    side: int
    lowres_side: int
    train_side: int
    schedule: str  # "cosine" (F.1, F.2) or "linear" (F.3); see diffusion.SCHEDULES
    paper_params: float  # the paper's parameter count (§4.1: 2B, 600M, 400M; 0 for the demo)
    prediction: str = "eps"  # the network's target: eps (App. A); "v" only in the demo
    text_encoder: str = "t5-v1_1-xxl"  # §2.1; see text_encoders.load_text_encoder
    text_length: int = t5_encoder.MAX_LENGTH  # paper: not specified; 128 T5 tokens

    def __post_init__(self):
        assert bool(self.lowres_side) == self.unet.lowres_cond, "a stage with a low-res input has lowres_cond"

    @property
    def train_lowres_side(self) -> int:
        """The side of the low-res input of a training example (a crop's, for a cropped stage)."""
        return self.train_side * self.lowres_side // self.side


_F2 = EfficientUNetConfig(block_channels=(128, 256, 512, 1024), block_res_blocks=(2, 4, 8, 8),
                          block_self_attn=(False, False, False, True),
                          block_cross_attn=(False, False, False, False), num_heads=8,
                          feature_pooling="attention", use_scale_shift_norm=True, dropout=0.0)  # the F.2 listing
# F.3: "as F.2" but without self-attention: explicit text cross-attention instead
_F3 = dataclasses.replace(_F2, block_self_attn=(False, False, False, False),
                          block_cross_attn=(False, False, False, True))
# demo: a T5 v1.1 pretrained on text only (encoders/t5-wordnet-base, 4.7M parameters, made by
# pretrain_t5.py), its output whitened on the training captions; 256 wide (its d_model); 16 of its
# tokens fit every caption (at most 11); see docs/text_encoder.md
DEMO_TEXT_ENCODER, DEMO_TEXT_DIM, DEMO_TEXT_LENGTH = "whitened:t5-wordnet-base", 256, 16

# demo: both super-resolution stages train on crops, so both have F.3's layout (text
# cross-attention in the last block, no self-attention: a self-attention layer trained on a crop's
# few positions shifts on the whole image); the first block keeps the full side, not F.2's stride
# 2; see docs/demo_experiments.md#the-super-resolution-stages
_demo_sr = EfficientUNetConfig(block_channels=(32, 64, 64), block_res_blocks=(1, 1, 2),
                               block_self_attn=(False, False, False), block_cross_attn=(False, False, True),
                               num_heads=4, text_dim=DEMO_TEXT_DIM, norm_groups=8, emb_mult=4,
                               block_strides=(1, 2, 2))

PRESETS = {
    "paper": {
        "base": StageConfig(
            preset="paper", name="base", section="§2.5, App. F.1", side=64, lowres_side=0, train_side=64,
            schedule="cosine", paper_params=2.0e9,
            unet=UNetConfig(channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                            attn_resolutions=(32, 16, 8), text_cross_attn_res=(32, 16, 8),
                            per_head_channels=64, feature_pooling="attention",
                            use_scale_shift_norm=True, dropout=0.0,  # the F.1 listing
                            # where F.1 is open, the reading of the stated 2B (§4.1): NVIDIA
                            # Rosetta's imagen_base_2B.gin (attn_cond_dim 2048, 8 heads of 64)
                            text_cond_dim=2048, num_heads=8)),
        "sr1": StageConfig(
            preset="paper", name="sr1", section="App. B.1, F.2", side=256, lowres_side=64, train_side=256,
            schedule="cosine", paper_params=600e6, unet=_F2),
        "sr2": StageConfig(
            # trained on 256x256 crops of the 1024 images (§2.5)
            preset="paper", name="sr2", section="App. B.1, F.3", side=1024, lowres_side=256, train_side=256,
            schedule="linear", paper_params=400e6, unet=_F3),
    },
    # The demo (demo.py): a cascade 32 -> 64 -> 128 trained in minutes on 2 CPU cores on a small
    # T5 pretrained on text only. Every choice that is not the paper's is marked and links its evidence
    # in docs/demo_experiments.md.
    "demo": {
        "base": StageConfig(
            preset="demo", name="base", section="demo of App. F.1", side=32, lowres_side=0, train_side=32,
            schedule="cosine", paper_params=0, text_encoder=DEMO_TEXT_ENCODER, text_length=DEMO_TEXT_LENGTH,
            prediction="v",  # demo: v, not eps; see docs/demo_experiments.md#why-v-prediction
            unet=DemoUNetConfig(
                channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, per_head_channels=16,
                text_dim=DEMO_TEXT_DIM, norm_groups=8, emb_mult=4,
                # demo: three levels (32, 64, 128 channels at 16x16, 8x8, 4x4), self-attention
                # with the text only at 8x8, text-only attention at 16x16 and 4x4, a 2x2 patch and
                # parameter-free resampling, for speed on CPU; see
                # docs/demo_experiments.md#the-demos-time-on-2-avx2-cores
                attn_resolutions=(8,), text_cross_attn_res=(16, 8, 4), patch_size=2,
                resblock_updown=False)),
        "sr1": StageConfig(
            # demo: trains on 32x32 crops of its 64x64 outputs, like F.3 (§2.5); see
            # docs/demo_experiments.md#the-super-resolution-stages
            preset="demo", name="sr1", section="demo of App. F.2", side=64, lowres_side=32, train_side=32,
            schedule="cosine", paper_params=0, text_encoder=DEMO_TEXT_ENCODER, text_length=DEMO_TEXT_LENGTH, prediction="v",
            unet=_demo_sr),
        "sr2": StageConfig(
            # demo: 32x32 crops; the cosine schedule, not F.3's linear one; see
            # docs/demo_experiments.md#the-super-resolution-stages
            preset="demo", name="sr2", section="demo of App. F.3", side=128, lowres_side=64, train_side=32,
            schedule="cosine", paper_params=0, text_encoder=DEMO_TEXT_ENCODER, text_length=DEMO_TEXT_LENGTH, prediction="v",
            unet=_demo_sr),
    },
}
STAGE_NAMES = ("base", "sr1", "sr2")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How one stage is sampled (App. A, §2.2-2.4). Defaults: those of the paper's sample
    figures (w = 5 in Fig. A.10, aug level 0.3 of App. D.2's "best samples" and Fig. A.12)."""
    guidance: float = 5.0  # w, §2.2; Fig. A.10: "a guidance weight of 5 for both" (two models)
    steps: int = 100  # paper: not specified; DeepFloyd IF's 100 (base) and 50 (super-resolution)
    sampler: str = "ddpm"  # "ddpm" (ancestral) or "ddim", App. A
    gamma: float = 0.0  # ancestral variance interpolation (App. A); paper: not specified; 0
    threshold: str = "dynamic"  # "none" | "static" | "dynamic", §2.3
    p: float = 99.5  # dynamic thresholding percentile, Fig. A.10 "(p = 99.5)"
    # super-resolution stages only (§2.4). App. D.2: "for our best samples, we generally use
    # aug_level in [0.1, 0.3]"; Fig. A.12: "aug_level = 0.3 for both super-res models"
    aug_level: float = 0.3


_demo_sr_sampling = SampleSettings(guidance=1.0, steps=6, threshold="static", aug_level=0.0)
SAMPLING = {
    # the paper's sample figures: w = 5 (Fig. A.10: "a guidance weight of 5 for both", two
    # models; paper: not specified for a third stage, 256->1024: w = 5 there too), aug level 0.3
    # (App. D.2's "best samples", Fig. A.12), dynamic thresholding at p = 99.5 (§2.3, Fig. A.10)
    "paper-best": {"base": SampleSettings(steps=100), "sr1": SampleSettings(steps=50),
                   "sr2": SampleSettings(steps=50)},
    # Table 1, COCO 256x256 FID-30K, two stages: "a guidance weight of 1.35 for our 64 × 64
    # model, and a guidance weight of 8.0 for our super-resolution model"; paper: not specified
    # which aug level: 0, as App. D.2's "aug_level = 0 gives the best FID score for all values
    # of guidance weight" (the Fig. A.11 sweep)
    "coco-fid": {"base": SampleSettings(guidance=1.35, steps=100),
                 "sr1": SampleSettings(guidance=8.0, steps=50, aug_level=0.0)},
    # demo: static thresholding (docs/demo_experiments.md#why-static-thresholding); base w = 3
    # (#the-demo-bases-optimizer-and-guidance) in 20 DDIM steps (#cutting-what-is-not-the-base);
    # SR stages unguided, no augmentation, 6 steps (#the-super-resolution-stages)
    "demo": {"base": SampleSettings(guidance=3.0, steps=20, sampler="ddim", threshold="static"),
             "sr1": _demo_sr_sampling, "sr2": _demo_sr_sampling},
}


def default_sampling(stage: StageConfig) -> SampleSettings:
    """The settings a stage is sampled with unless told otherwise: "paper-best" for the paper
    presets, "demo" for the demo's."""
    return SAMPLING["demo" if stage.preset == "demo" else "paper-best"][stage.name]


# ---------------------------------------------------------------------------------------------
# How the networks run on this backend
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Backend:
    dtype: str  # compute dtype of the networks (parameters stay float32)
    attention: str  # jax.nn.dot_product_attention implementation
    unroll_micro_batches: bool  # gradient accumulation as an unrolled loop (else lax.scan)


def backend(dtype: str | None = None, attention: str | None = None) -> Backend:
    """The policy for the current JAX backend: bfloat16 compute on accelerators, float32 on CPU
    (paper: not specified: the paper states no precision; bfloat16 is what TPUs and GPUs
    compute fastest); cuDNN's fused attention on GPUs in 16-bit, XLA's elsewhere; micro-batches
    unrolled on CPU, whose backend runs convolutions inside a while loop slowly (measurements:
    docs/performance.md)."""
    cpu = jax.default_backend() == "cpu"
    dtype = dtype or ("float32" if cpu else "bfloat16")
    fused = jax.default_backend() == "gpu" and dtype in ("bfloat16", "float16")
    return Backend(dtype, attention or ("cudnn" if fused else "xla"), cpu)


def with_backend(stage: StageConfig, b: Backend, remat: bool = False) -> StageConfig:
    return dataclasses.replace(stage, unet=dataclasses.replace(stage.unet, dtype=b.dtype, attention=b.attention,
                                                               remat=remat))


# ---------------------------------------------------------------------------------------------
# A stage's network, its size and cost
# ---------------------------------------------------------------------------------------------

def network(stage: StageConfig, rngs: nnx.Rngs):
    if stage.unet.dropout:
        raise NotImplementedError("dropout > 0: every stage of the paper uses 0 (App. F); not built")
    if isinstance(stage.unet, DemoUNetConfig):
        return DemoUNet(stage.unet, stage.train_side, rngs)
    if isinstance(stage.unet, UNetConfig):
        return UNet(stage.unet, stage.train_side, rngs)
    return EfficientUNet(stage.unet, rngs)


def abstract_network(stage: StageConfig):
    """The network with ShapeDtypeStructs for parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: network(stage, nnx.Rngs(0)))


def init_network(stage: StageConfig, seed: int = 0):
    """The network, initialised under one jit: one compiled program instead of hundreds of eager
    initialisers (compiled once per stage config, for any seed)."""
    graphdef, _ = nnx.split(abstract_network(stage))
    return nnx.merge(graphdef, _jitted_init(stage)(jax.random.key(seed)))


@functools.lru_cache(maxsize=16)
def _jitted_init(stage):
    # it runs once per model, so XLA's slow optimisation passes are not worth their time
    return jax.jit(lambda key: nnx.split(network(stage, nnx.Rngs(key)))[1], compiler_options={
        "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def count_params(stage: StageConfig) -> int:
    """Parameters of a stage's network, from jax.eval_shape (nothing is allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_network(stage), nnx.Param)))


def abstract_inputs(stage: StageConfig, batch: int, side: int | None = None):
    """ShapeDtypeStructs of one network call at `side` (default: the training side)."""
    side, text_len = side or stage.train_side, stage.text_length
    c, f32 = stage.unet.in_channels, jnp.float32
    img = jax.ShapeDtypeStruct((batch, side, side, c), f32)
    vec = jax.ShapeDtypeStruct((batch,), f32)
    lowres = (img, vec) if stage.unet.lowres_cond else (None, None)
    return (img, vec, jax.ShapeDtypeStruct((batch, text_len, stage.unet.text_dim), f32),
            jax.ShapeDtypeStruct((batch, text_len), jnp.bool_)) + lowres


def forward_flops(stage: StageConfig, batch: int = 1, side: int | None = None, compile: bool = True) -> float:
    """FLOPs of one forward pass, from XLA's cost analysis of the compiled function (compile=False:
    of the lowered program, in a fraction of the time, for estimates)."""
    graphdef, state = nnx.split(abstract_network(stage))
    fwd = lambda state, *inputs: nnx.merge(graphdef, state)(*inputs)
    lowered = jax.jit(fwd).lower(state, *abstract_inputs(stage, batch, side))
    return float((lowered.compile() if compile else lowered).cost_analysis()["flops"])


# ---------------------------------------------------------------------------------------------
# A stage config as JSON, as checkpoints.py records it in every checkpoint
# ---------------------------------------------------------------------------------------------

_RUNTIME_FIELDS = ("dtype", "attention", "remat")  # how a network runs, not what it is


def config_dict(stage: StageConfig) -> dict:
    """A stage config as JSON (what a checkpoint records), without the runtime fields."""
    d = dataclasses.asdict(stage)
    d["unet"] = {"kind": type(stage.unet).__name__,
                 **{k: v for k, v in d["unet"].items() if k not in _RUNTIME_FIELDS}}
    return json.loads(json.dumps(d))  # tuples -> lists, as they come back from JSON


def stage_from_dict(d: dict) -> StageConfig:
    """The inverse of config_dict; a field added to the code since takes its default."""
    u = dict(d["unet"])
    if "kind" not in u:
        raise ValueError("a checkpoint from an older layout of this code (its network config has no "
                         "'kind'): train it again, or sample it with the code that made it")
    cls = {"UNetConfig": UNetConfig, "DemoUNetConfig": DemoUNetConfig, "EfficientUNetConfig": EfficientUNetConfig}[u.pop("kind")]
    names = {f.name for f in dataclasses.fields(cls)}
    unet = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in u.items() if k in names})
    names = {f.name for f in dataclasses.fields(StageConfig)}
    return StageConfig(**{k: v for k, v in d.items() if k in names and k != "unet"}, unet=unet)


# ---------------------------------------------------------------------------------------------
# The cascade: text -> 64 -> 256 -> 1024 (§2, Fig. A.4)
# ---------------------------------------------------------------------------------------------

def check_text_width(stages, encoder):
    for s in stages:
        if s.config.unet.text_dim != encoder.cfg.d_model:
            raise cli.UserError(f"the {s.config.name} stage was trained on text of width "
                                f"{s.config.unet.text_dim}, the text encoder gives {encoder.cfg.d_model}: "
                                f"use the encoder it was trained with ({s.config.text_encoder!r})")


SAMPLE_CHUNK = 16  # sampling steps per compiled call: Ctrl-C waits for at most this many


@functools.lru_cache(maxsize=32)
def _sampler(graphdef, schedule, prediction, shape, guided, steps, sampler, gamma, threshold, p):
    """One stage's sampling loop, jitted: compiled once per shape and settings; the guidance
    weight, the aug level and the span of steps are arguments, so a sweep compiles once. It runs
    SAMPLE_CHUNK steps per call, so an interrupt is seen between chunks."""
    @jax.jit
    def run(state, key, txt_BLD, mask_BL, lowres_BHWC, w, aug_level, start, stop, carry):
        return diffusion.sample(nnx.merge(graphdef, state), key, shape, txt_BLD, mask_BL,
                                diffusion.SCHEDULES[schedule], steps=steps, guided=guided, w=w, sampler=sampler,
                                gamma=gamma, threshold=threshold, p=p, lowres_BHWC=lowres_BHWC,
                                aug_level=aug_level, prediction=prediction, span=(start, stop), carry=carry)

    def chunked(state, key, txt_BLD, mask_BL, lowres_BHWC, w, aug_level):
        """The loop in chunks of SAMPLE_CHUNK steps, each awaited before the next is sent: the
        result of one call, and Ctrl-C (KeyboardInterrupt) stops within a chunk."""
        carry = _initial_carry(key, shape)
        for start in range(0, steps, SAMPLE_CHUNK):
            stop = jnp.int32(min(start + SAMPLE_CHUNK, steps))
            carry = jax.block_until_ready(run(state, key, txt_BLD, mask_BL, lowres_BHWC, w, aug_level,
                                              jnp.int32(start), stop, carry))
        return carry[1]
    return chunked


_initial_carry = jax.jit(diffusion.initial_carry, static_argnums=1)


def sample_stage(stage, key, txt_BLD, mask_BL, settings: SampleSettings, prev_BHWC=None):
    """One stage for one batch: (B, side, side, 3) in [-1, 1]. prev_BHWC: the previous stage's
    output, noise-augmented at settings.aug_level and resized to this stage's side (§2.4)."""
    cfg = stage.config
    B, side = txt_BLD.shape[0], cfg.side
    graphdef, state = nnx.split(stage.model)
    s = settings
    run = _sampler(graphdef, cfg.schedule, cfg.prediction, (B, side, side, cfg.unet.in_channels),
                   s.guidance != 1.0, s.steps, s.sampler, s.gamma, s.threshold, s.p)
    x_BHWC = run(state, key, txt_BLD, mask_BL, prev_BHWC, jnp.float32(s.guidance), jnp.float32(s.aug_level))
    return jnp.clip(x_BHWC, -1.0, 1.0)


def to_uint8(x):
    return np.asarray(jnp.round((x + 1) * 127.5), np.uint8)


def encode_prompts(encoder, tokenizer, prompts, text_length):
    """Prompts -> the conditioning every stage samples with: (txt (B, L, D) float32, mask (B, L)
    bool). An empty or whitespace-only prompt is the unconditional one: training's null condition
    (diffusion.drop_text: zero embeddings, no text tokens), which guidance's unconditional pass
    also uses, not the encoding of an end-of-sequence token."""
    txt_BLD, mask_BL = t5_encoder.encode(encoder, tokenizer, list(prompts), text_length, warn=False)
    null_B = jnp.asarray([not p.strip() for p in prompts])
    return diffusion.drop_text(txt_BLD, jnp.asarray(mask_BL), null_B)


def generate(stages, encoder, tokenizer, prompts, settings, seed=0, batch_size=8, text_length=None,
             progress=False, first_batch=0, lowres=None, callback=None):
    """Prompts -> uint8 images (N, side, side, 3) through the given stages (1, 2 or 3).
    lowres: uint8 images (N, h, w, 3) the first stage upsamples, when it is a super-resolution
    stage (the outputs of a base sampled before, or real low-resolution images).

    The prompts are encoded once per batch and the embeddings reused by every stage (§2); an
    empty or whitespace-only prompt is unconditional (encode_prompts).
    settings: one SampleSettings per stage. Batch b of stage s draws its noise from
    fold_in(fold_in(PRNGKey(seed), first_batch + b), s): the same seed and batch size give the
    same images, also when a long list is generated a part at a time. progress: a tqdm bar over
    the batches; callback: called after each batch with {"batch": b, "batches": n}."""
    check_text_width(stages, encoder)
    text_length = text_length or stages[0].config.text_length
    t5_encoder.warn_if_cut(tokenizer, prompts, text_length, plain=True)  # those given, not the padded batch
    # data-parallel over every device when the batch splits evenly (the weights replicated)
    mesh = sharding.make_mesh()
    split = mesh.size > 1 and batch_size % mesh.size == 0
    if split:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        stages = [dataclasses.replace(s, model=nnx.merge(g, jax.device_put(w, replicated)))
                  for s, (g, w) in ((s, nnx.split(s.model)) for s in stages)]
    out = []
    batches = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress)):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        chunk += [""] * (batch_size - n)  # pad the last batch: one compiled shape per stage
        txt_BLD, mask_BL = encode_prompts(encoder, tokenizer, chunk, text_length)
        if split:
            txt_BLD, mask_BL = jax.device_put((txt_BLD, mask_BL), jax.sharding.NamedSharding(mesh, sharding.BATCH))
        x = None
        if lowres is not None:
            x = jnp.asarray(np.concatenate([lowres[start:start + n], np.zeros_like(lowres[:batch_size - n])]),
                            jnp.float32) / 127.5 - 1.0
        for s, (stage, st) in enumerate(zip(stages, settings)):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), first_batch + b), s)
            x = sample_stage(stage, key, txt_BLD, mask_BL, st, x)
        out.append(to_uint8(x[:n]))  # memory: only uint8 images stay on the host
        if callback:
            callback({"batch": b + 1, "batches": len(batches)})
    return np.concatenate(out)


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(f"{'stage':6s} {'paper section':15s} {'paper params':>12s} {'ours':>8s} {'diff':>7s} "
          f"{'resolution':>14s} {'GFLOPs/fwd (B=1)':>17s}")
    for name, stage in PRESETS["paper"].items():
        n = count_params(stage)
        flops = forward_flops(stage, 1, stage.side)  # at inference: the full output side
        res = f"{stage.lowres_side}->{stage.side}" if stage.lowres_side else f"{stage.side}x{stage.side}"
        print(f"{name:6s} {stage.section:15s} {stage.paper_params / 1e9:11.2f}B {n / 1e9:7.3f}B "
              f"{(n / stage.paper_params - 1) * 100:+6.1f}% {res:>14s} {flops / 1e9:17.1f}")


if __name__ == "__main__":
    main()
