"""The denoising networks of Imagen: the 64x64 base U-Net and the Efficient U-Net.

Saharia et al. 2022:
  §2.5, App. F.1    base 64x64 model, "adapted from" ADM (Dhariwal & Nichol 2021): BigGAN-style
                    residual blocks that also up/down-sample, scale-shift norm, attention at
                    32, 16, 8 with the text tokens concatenated to its keys and values
                    (App. D.3.1), attention-pooled text added to the time embedding (§2.5)
  App. B.1, F.2-3   Efficient U-Net for 64->256 and 256->1024: more residual blocks at low
                    resolution, skip connections scaled by 1/sqrt(2), DBlock = downsample then
                    convolve, UBlock = convolve then upsample (Figs. A.27-A.30)
Both networks share one call signature,
    model(z_t, log_snr, text_emb, text_mask, lowres=None, aug_log_snr=None) -> eps_hat,
images (B, H, W, C), log_snr (B,), text (B, L, D) with mask (B, L) bool. lowres is the
previous stage's image already resized to z_t's size (and noise-augmented, §2.4).
Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators); norms and
softmax statistics stay in float32.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """One stage's network. Field names follow the paper's App. F listings where it has them."""
    arch: str = "unet"  # "unet": ADM-style base model (F.1); "efficient": Efficient U-Net (B.1)
    image_size: int = 64  # training resolution (the 256->1024 model trains on 256 crops, F.3)
    in_channels: int = 3
    lowres_cond: bool = False  # super-resolution stage: concat the low-res image, embed aug level
    text_dim: int = 4096  # width of the T5 embeddings (T5-XXL, §2.1)
    # --- arch == "unet" (App. F.1 listing) ---
    channels: int = 512
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attn_resolutions: tuple = (32, 16, 8)
    # text tokens concatenated to the attention k/v; at a resolution without self-attention,
    # a cross-attention layer to the text alone (not in F.1; the demo base)
    text_cross_attn_res: tuple = (32, 16, 8)
    per_head_channels: int = 64
    # --- arch == "efficient" (App. F.2 / F.3 listings) ---
    block_channels: tuple = (128, 256, 512, 1024)
    block_res_blocks: tuple = (2, 4, 8, 8)
    block_self_attn: tuple = (False, False, False, True)  # self-attention (+ text tokens in k/v)
    block_cross_attn: tuple = (False, False, False, False)  # explicit text cross-attention (F.3)
    num_heads: int = 8  # App. B.1: 8 attention heads in the Efficient U-Net
    # paper: not specified; "add" = (x + skip) / sqrt(2) (score-SDE style), "concat" =
    # [x, skip / sqrt(2)] (imagen-pytorch). See the README for the counts of each.
    skip_combine: str = "add"
    # --- both ---
    feature_pooling: str = "attention"  # "attention" (§2.5) or "mean" (ablation, App. D.3.1)
    text_cross_attn: bool = True  # False: no text in attention at all (ablation)
    # paper: not specified; 0 = every attention layer projects the T5 width itself (GLIDE's
    # encoder_kv); > 0 = the text is projected once to this width first (NeMo's cond_dim).
    text_cond_dim: int = 0
    use_scale_shift_norm: bool = True
    dropout: float = 0.0  # F.1-F.3: 0 for every stage; other values are refused (not built)
    emb_mult: int = 4  # paper: not specified; time-embedding width = 4 x first channels (ADM)
    norm_groups: int = 32  # paper: not specified; GroupNorm(32) as in ADM
    # Not the paper's (F.1 has BigGAN blocks at full resolution), demo base only: patch_size p > 1
    # folds p x p pixels into channels before conv_in and back after conv_out (space-to-depth), so
    # the first level runs at 1/p of the side; resblock_updown False resamples between levels
    # without parameters (2x2 average pool, nearest 2x) instead of with residual blocks.
    patch_size: int = 1
    resblock_updown: bool = True
    dtype: str = "float32"  # compute dtype; "bfloat16" on accelerators
    remat: bool = False  # rematerialise residual blocks in the backward pass (memory)


def _dtype(cfg):
    return jnp.dtype(cfg.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm with float32 statistics; returns the compute dtype."""

    def __init__(self, ch: int, groups: int, dtype):
        self.scale, self.bias = nnx.Param(jnp.ones((ch,))), nnx.Param(jnp.zeros((ch,)))
        self.groups, self.dtype = min(groups, ch), dtype

    def __call__(self, x):
        B, H, W, C = x.shape
        xg = x.astype(jnp.float32).reshape(B, H, W, self.groups, C // self.groups)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        xg = (xg - mean) * jax.lax.rsqrt(var + 1e-5)
        return (xg.reshape(B, H, W, C) * self.scale[...] + self.bias[...]).astype(self.dtype)


# LeCun-normal without truncation: the same variance as nnx's default, and plain normals
# compile faster when a model's initialisers are jitted together. paper: not specified; no
# zero-initialised output layers (ADM's zero_module): with Adafactor's relative step sizes
# (optax's default multiply_by_parameter_scale, §4.1 base model) a zero parameter moves by only
# lr x 1e-3 per step, which stalled training in our tests.
_fan_in_normal = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def conv(i, o, rngs, dtype, k=3, stride=1):
    return nnx.Conv(i, o, (k, k), strides=stride, padding="SAME", dtype=dtype,
                    kernel_init=_fan_in_normal, rngs=rngs)


def dense(i, o, rngs, dtype, bias=True):
    return nnx.Linear(i, o, use_bias=bias, dtype=dtype, kernel_init=_fan_in_normal, rngs=rngs)


def sinusoidal_embedding(x, dim: int, max_period: float = 10000.0):
    """Transformer-style sinusoidal features of a per-example scalar (B,) -> (B, dim).
    paper: not specified; we embed the log-SNR itself (the network is conditioned on
    lambda_t, App. A), scaled by 1000 / 40 so that its [-20, 20] range spans the same
    1000 units as ADM's integer timesteps."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (x.astype(jnp.float32) * 25.0)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class NoiseLevelEmbed(nnx.Module):
    """lambda (B,) -> sinusoidal -> MLP -> (B, emb_dim) (ADM's time embedding)."""

    def __init__(self, ch: int, emb_dim: int, rngs, dtype):
        self.ch = ch
        self.fc1, self.fc2 = dense(ch, emb_dim, rngs, dtype), dense(emb_dim, emb_dim, rngs, dtype)

    def __call__(self, log_snr):
        return self.fc2(jax.nn.silu(self.fc1(sinusoidal_embedding(log_snr, self.ch))))


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with float32 statistics (for the text embeddings, §2.5)."""

    def __init__(self, dim: int, dtype):
        self.scale, self.bias = nnx.Param(jnp.ones((dim,))), nnx.Param(jnp.zeros((dim,)))
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
        return (x * self.scale[...] + self.bias[...]).astype(self.dtype)


class TextPooling(nnx.Module):
    """§2.5: "a pooled embedding vector, added to the diffusion timestep embedding".

    "attention": one multi-head attention layer (heads of 64) over the layer-normed text tokens,
    whose query is their masked mean (CLIP's attention pooling); "mean": the masked mean.
    paper: not specified beyond "attention pooling"; this form is CLIP's AttentionPool2d.
    An all-masked (dropped, §4.1) text pools to zero.
    """

    def __init__(self, text_dim: int, emb_dim: int, kind: str, rngs, dtype):
        self.kind, self.heads = kind, max(text_dim // 64, 1)
        self.norm = LayerNorm(text_dim, dtype)
        if kind == "attention":
            self.q, self.o = dense(text_dim, text_dim, rngs, dtype), dense(text_dim, text_dim, rngs, dtype)
            # no key/value biases: softmax ignores a key bias, and a value bias is a constant
            # that the output bias already provides (their gradients are exactly zero / redundant)
            self.k, self.v = (dense(text_dim, text_dim, rngs, dtype, bias=False) for _ in range(2))
        self.proj = dense(text_dim, emb_dim, rngs, dtype)

    def __call__(self, txt_BLD, mask_BL):
        x = self.norm(txt_BLD)
        m = mask_BL.astype(x.dtype)[..., None]
        mean = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)  # (B, D)
        if self.kind == "attention":
            B, L, D = x.shape
            h = lambda y, n: y.reshape(B, n, self.heads, D // self.heads)
            out = jax.nn.dot_product_attention(h(self.q(mean), 1), h(self.k(x), L), h(self.v(x), L),
                                               mask=mask_BL[:, None, None, :])
            mean = self.o(out.reshape(B, D))
        has_text = mask_BL.any(axis=1, keepdims=True).astype(x.dtype)
        return self.proj(mean) * has_text


def resample(x, kind):
    """x (B, H, W, C) -> "down": 2x2 average pool, "up": nearest 2x, None: x."""
    B, H, W, C = x.shape
    if kind == "down":
        return x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
    if kind == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x


def space_to_depth(x, p):
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch becomes one position's channels."""
    B, H, W, C = x.shape
    return x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, H // p, W // p, p * p * C)


def depth_to_space(x, p):
    """The inverse of space_to_depth."""
    B, H, W, C = x.shape
    return x.reshape(B, H, W, p, p, C // (p * p)).transpose(0, 1, 3, 2, 4, 5).reshape(B, H * p, W * p, C // (p * p))


class Resample(nnx.Module):
    """Parameter-free resampling between levels (resblock_updown False), called like a ResBlock."""

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, x, emb):
        return resample(x, self.kind)


class ResBlock(nnx.Module):
    """ADM residual block (GroupNorm, SiLU, conv3x3, GroupNorm with scale-shift from the
    conditioning embedding, SiLU, conv3x3; no dropout: 0 in every stage, App. F) with an optional BigGAN-style resample
    ("down": 2x2 average pool, "up": nearest 2x) of both paths before the first conv. `skip_scale` = 1/sqrt(2) scales the residual sum
    (score-SDE); 1 in the base model."""

    def __init__(self, i, o, emb_dim, cfg, rngs, resample=None, skip_scale=1.0):
        dt = _dtype(cfg)
        self.norm1, self.conv1 = GroupNorm(i, cfg.norm_groups, dt), conv(i, o, rngs, dt)
        self.emb = dense(emb_dim, 2 * o if cfg.use_scale_shift_norm else o, rngs, dt)
        self.norm2, self.conv2 = GroupNorm(o, cfg.norm_groups, dt), conv(o, o, rngs, dt)
        self.shortcut = conv(i, o, rngs, dt, k=1) if i != o else None
        self.resample, self.skip_scale, self.scale_shift = resample, skip_scale, cfg.use_scale_shift_norm

    def __call__(self, x, emb):
        h = jax.nn.silu(self.norm1(x))
        h, x = resample(h, self.resample), resample(x, self.resample)
        h = self.conv1(h)
        e = self.emb(jax.nn.silu(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(jax.nn.silu(h))
        x = self.shortcut(x) if self.shortcut is not None else x
        return (x + h) * self.skip_scale


# Which jax.nn.dot_product_attention runs the U-Nets' attention: None picks cuDNN's fused
# (flash) attention on GPUs in bf16/fp16 (2.6x XLA's on an H100, issue 8) and XLA elsewhere;
# "xla" or "cudnn" forces one (bench.py --attention).
ATTENTION = None


def attention_implementation(dtype):
    if ATTENTION is not None:
        return ATTENTION
    fused = jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if fused else "xla"


class Attention(nnx.Module):
    """Multi-head attention over the image positions of x (B, H, W, C).

    self_attn: self-attention; with text_dim, the layer-normed text tokens are projected and
      concatenated to its keys and values (App. D.3.1, GLIDE's encoder_kv), masked by the text
      mask: the base model's and the 64->256 model's "text cross attention".
    not self_attn: explicit cross-attention, queries from the image, keys and values from the
      text only (the 256->1024 model, F.3); an all-masked text contributes nothing.
    """

    def __init__(self, ch, heads, text_dim, self_attn, cfg, rngs):
        dt = _dtype(cfg)
        self.heads, self.self_attn = heads, self_attn
        self.norm = GroupNorm(ch, cfg.norm_groups, dt)
        self.q = dense(ch, ch, rngs, dt)
        # no key/value biases (see TextPooling)
        self.kv = dense(ch, 2 * ch, rngs, dt, bias=False) if self_attn else None
        self.text_norm = LayerNorm(text_dim, dt) if text_dim else None  # §2.5
        self.text_kv = dense(text_dim, 2 * ch, rngs, dt, bias=False) if text_dim else None
        self.o = dense(ch, ch, rngs, dt)

    def __call__(self, x, txt_BLD, mask_BL):
        B, H, W, C = x.shape
        split = lambda y: y.reshape(B, -1, self.heads, C // self.heads)
        h = self.norm(x).reshape(B, H * W, C)
        q = split(self.q(h))
        ks, vs, n_keys = [], [], jnp.zeros((B,), jnp.int32)
        if self.self_attn:
            k, v = jnp.split(self.kv(h), 2, axis=-1)
            ks.append(split(k)), vs.append(split(v))
            n_keys += H * W
        if self.text_kv is not None:
            k, v = jnp.split(self.text_kv(self.text_norm(txt_BLD)), 2, axis=-1)
            ks.append(split(k)), vs.append(split(v))
            n_keys += mask_BL.sum(axis=1, dtype=jnp.int32)
        k, v = (jnp.concatenate(a, axis=1) for a in (ks, vs))
        # Text masks are prefixes (the tokenizer pads at the end; dropped text is all False), so
        # the keys to attend to are the first n_keys: a length, which cuDNN's fused attention
        # takes directly. At least one key, so an all-masked text gives finite values.
        out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.maximum(n_keys, 1),
                                           implementation=attention_implementation(q.dtype))
        out = self.o(out.reshape(B, H * W, C))
        if not self.self_attn:  # no text tokens at all: no update (not a mean of masked values)
            out = out * mask_BL.any(axis=1)[:, None, None].astype(out.dtype)
        return x + out.reshape(B, H, W, C)


class Conditioning(nnx.Module):
    """The conditioning embedding: noise level, plus the aug level of super-resolution stages
    (§2.4), plus the pooled text (§2.5). paper: not specified how the aug level enters; like
    the time: sinusoidal -> MLP, added."""

    def __init__(self, ch, emb_dim, cfg, rngs):
        dt = _dtype(cfg)
        self.time = NoiseLevelEmbed(ch, emb_dim, rngs, dt)
        self.aug = NoiseLevelEmbed(ch, emb_dim, rngs, dt) if cfg.lowres_cond else None
        self.text_proj = (nnx.Sequential(LayerNorm(cfg.text_dim, dt), dense(cfg.text_dim, cfg.text_cond_dim, rngs, dt))
                          if cfg.text_cond_dim else None)
        self.pool = TextPooling(text_width(cfg), emb_dim, cfg.feature_pooling, rngs, dt)

    def __call__(self, log_snr, txt, mask, aug_log_snr):
        """-> (emb (B, emb_dim), text tokens (B, L, text_width) for the attention layers)."""
        txt = self.text_proj(txt) if self.text_proj is not None else txt
        emb = self.time(log_snr) + self.pool(txt, mask)
        if self.aug is not None:
            emb = emb + self.aug(aug_log_snr)
        return emb, txt


def text_width(cfg):
    """Width of the text tokens inside the network."""
    return cfg.text_cond_dim or cfg.text_dim


def _check_inputs(cfg, z_t, log_snr, txt, mask, lowres, aug_log_snr):
    B = z_t.shape[0]
    assert z_t.ndim == 4 and z_t.shape[-1] == cfg.in_channels, z_t.shape
    assert log_snr.shape == (B,) and txt.shape[0] == B and txt.shape[-1] == cfg.text_dim, (
        log_snr.shape, txt.shape)
    assert mask.shape == txt.shape[:2] and mask.dtype == jnp.bool_, (mask.shape, mask.dtype)
    if cfg.lowres_cond:
        assert lowres is not None and lowres.shape == z_t.shape, "lowres: resized to z_t's size"
        assert aug_log_snr is not None and aug_log_snr.shape == (B,)


def _maybe_remat(cfg, block, *args):
    return nnx.remat(lambda b, *a: b(*a))(block, *args) if cfg.remat else block(*args)


class UNet(nnx.Module):
    """The base 64x64 model (App. F.1), ADM with BigGAN up/down-sampling residual blocks."""

    def __init__(self, cfg: UNetConfig, rngs: nnx.Rngs):
        assert cfg.arch == "unet"
        self.cfg = cfg
        dt, ch = _dtype(cfg), cfg.channels
        emb_dim = cfg.emb_mult * ch
        self.cond = Conditioning(ch, emb_dim, cfg, rngs)
        in_ch = cfg.in_channels * (2 if cfg.lowres_cond else 1)
        p = cfg.patch_size
        self.conv_in = conv(in_ch * p * p, ch, rngs, dt)

        def attn(c, res):
            text = text_width(cfg) if cfg.text_cross_attn and res in cfg.text_cross_attn_res else 0
            # text but no self-attention at this resolution: attend to the text alone (F.1 has
            # text wherever it has attention; the demo base adds this at 16x16, imagen.py)
            self_attn = res in cfg.attn_resolutions
            return Attention(c, c // cfg.per_head_channels, text, self_attn, cfg, rngs) if self_attn or text else None

        # down path: (ResBlock, Attention | None) pairs, then a down-sampling ResBlock per level
        updown = lambda c, kind: ResBlock(c, c, emb_dim, cfg, rngs, kind) if cfg.resblock_updown else Resample(kind)
        self.down, skip_ch, c, res = nnx.List(), [ch], ch, cfg.image_size // p
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(nnx.List([ResBlock(c, mult * ch, emb_dim, cfg, rngs), attn(mult * ch, res)]))
                c = mult * ch
                skip_ch.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nnx.List([updown(c, "down"), None]))
                skip_ch.append(c)
                res //= 2
        self.mid = nnx.List([ResBlock(c, c, emb_dim, cfg, rngs), Attention(c, c // cfg.per_head_channels,
                             text_width(cfg) if cfg.text_cross_attn else 0, True, cfg, rngs),
                             ResBlock(c, c, emb_dim, cfg, rngs)])
        # up path: num_res_blocks + 1 ResBlocks per level on [h, skip], then an up-sampling one
        self.up = nnx.List()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(c + skip_ch.pop(), mult * ch, emb_dim, cfg, rngs), attn(mult * ch, res)]
                c = mult * ch
                if level and i == cfg.num_res_blocks:
                    blocks.append(updown(c, "up"))
                    res *= 2
                self.up.append(nnx.List(blocks))
        self.norm_out = GroupNorm(c, cfg.norm_groups, dt)
        self.conv_out = conv(c, cfg.in_channels * p * p, rngs, dt)

    def __call__(self, z_t, log_snr, text_emb, text_mask, lowres=None, aug_log_snr=None):
        cfg = self.cfg
        _check_inputs(cfg, z_t, log_snr, text_emb, text_mask, lowres, aug_log_snr)
        dt = _dtype(cfg)
        txt = text_emb.astype(dt)
        emb, txt = self.cond(log_snr, txt, text_mask, aug_log_snr)
        x = jnp.concatenate([z_t, lowres], -1) if cfg.lowres_cond else z_t
        h = self.conv_in(space_to_depth(x, cfg.patch_size).astype(dt))  # (B, H/p, W/p, ch)
        hs = [h]
        for res_block, attn in self.down:
            h = _maybe_remat(cfg, res_block, h, emb)
            h = attn(h, txt, text_mask) if attn is not None else h
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h, txt, text_mask)
        h = self.mid[2](h, emb)
        for res_block, attn, *upsample in self.up:
            h = _maybe_remat(cfg, res_block, jnp.concatenate([h, hs.pop()], -1), emb)
            h = attn(h, txt, text_mask) if attn is not None else h
            h = _maybe_remat(cfg, upsample[0], h, emb) if upsample else h
        eps_hat = depth_to_space(self.conv_out(jax.nn.silu(self.norm_out(h))), cfg.patch_size)
        assert eps_hat.shape == z_t.shape
        return eps_hat.astype(jnp.float32)


class DBlock(nnx.Module):
    """App. B.1, Fig. A.28: conv, strided to downsample first (all but the first block) ->
    ResBlocks -> attention."""

    def __init__(self, i, o, n, self_attn, cross_attn, emb_dim, cfg, rngs, stride=2):
        dt, text = _dtype(cfg), text_width(cfg) if cfg.text_cross_attn else 0
        self.down = conv(i, o, rngs, dt, stride=stride)
        self.res = nnx.List([ResBlock(o, o, emb_dim, cfg, rngs) for _ in range(n)])
        self.attn = (Attention(o, cfg.num_heads, text, True, cfg, rngs) if self_attn else
                     Attention(o, cfg.num_heads, text, False, cfg, rngs) if cross_attn and text else None)

    def __call__(self, x, emb, txt, mask, cfg):
        x = self.down(x)
        for r in self.res:
            x = _maybe_remat(cfg, r, x, emb)
        return self.attn(x, txt, mask) if self.attn is not None else x


class UBlock(nnx.Module):
    """App. B.1, Fig. A.29: [x, skip] -> ResBlocks -> attention -> upsample last (nearest 2x
    then conv3x3; paper: not specified which up-sampling op; the last block only convolves)."""

    def __init__(self, i, o, n, self_attn, cross_attn, emb_dim, cfg, rngs, upsample=True):
        dt, text = _dtype(cfg), text_width(cfg) if cfg.text_cross_attn else 0
        first_in = 2 * i if cfg.skip_combine == "concat" else i
        self.res = nnx.List([ResBlock(first_in if j == 0 else i, i, emb_dim, cfg, rngs) for j in range(n)])
        self.attn = (Attention(i, cfg.num_heads, text, True, cfg, rngs) if self_attn else
                     Attention(i, cfg.num_heads, text, False, cfg, rngs) if cross_attn and text else None)
        self.up = conv(i, o, rngs, dt)
        self.upsample = upsample

    def __call__(self, x, skip, emb, txt, mask, cfg):
        # App. B.1: skip connections scaled by 1/sqrt(2)
        if cfg.skip_combine == "concat":
            x = jnp.concatenate([x, skip * (2 ** -0.5)], -1)
        else:
            x = (x + skip) * (2 ** -0.5)
        for r in self.res:
            x = _maybe_remat(cfg, r, x, emb)
        x = self.attn(x, txt, mask) if self.attn is not None else x
        if self.upsample:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.up(x)


class EfficientUNet(nnx.Module):
    """The Efficient U-Net of App. B.1 (64->256: F.2, 256->1024: F.3). Fully convolutional
    apart from attention to the text, so the 256->1024 model trained on 256x256 crops runs
    on the full 1024x1024 image at inference."""

    def __init__(self, cfg: UNetConfig, rngs: nnx.Rngs):
        assert cfg.arch == "efficient" and cfg.skip_combine in ("add", "concat")
        self.cfg = cfg
        dt, C = _dtype(cfg), cfg.block_channels
        emb_dim = cfg.emb_mult * C[0]
        self.cond = Conditioning(C[0], emb_dim, cfg, rngs)
        in_ch = cfg.in_channels * (2 if cfg.lowres_cond else 1)
        self.conv_in = conv(in_ch, C[0], rngs, dt)
        prev = [C[0]] + list(C[:-1])  # block k maps prev[k] -> C[k] (down) and C[k] -> prev[k] (up)
        spec = list(zip(prev, C, cfg.block_res_blocks, cfg.block_self_attn, cfg.block_cross_attn))
        # paper: not specified which blocks resample; the first DBlock keeps the full resolution
        # and the last UBlock does not up-sample, so the output has a full-resolution path (an
        # eps-prediction must reproduce z_t's pixel-level noise; without it our SR stages only
        # produced noise). Every other DBlock halves, every other UBlock doubles.
        self.down = nnx.List([DBlock(p, c, n, sa, ca, emb_dim, cfg, rngs, stride=1 if k == 0 else 2)
                              for k, (p, c, n, sa, ca) in enumerate(spec)])
        self.up = nnx.List([UBlock(c, p, n, sa, ca, emb_dim, cfg, rngs, upsample=k > 0)
                            for k, (p, c, n, sa, ca) in reversed(list(enumerate(spec)))])
        self.norm_out = GroupNorm(C[0], cfg.norm_groups, dt)
        self.conv_out = conv(C[0], cfg.in_channels, rngs, dt)

    def __call__(self, z_t, log_snr, text_emb, text_mask, lowres=None, aug_log_snr=None):
        cfg = self.cfg
        _check_inputs(cfg, z_t, log_snr, text_emb, text_mask, lowres, aug_log_snr)
        assert z_t.shape[1] % 2 ** (len(cfg.block_channels) - 1) == 0, "side must divide by 2^(blocks-1)"
        dt = _dtype(cfg)
        txt = text_emb.astype(dt)
        emb, txt = self.cond(log_snr, txt, text_mask, aug_log_snr)
        x = jnp.concatenate([z_t, lowres], -1) if cfg.lowres_cond else z_t
        h = self.conv_in(x.astype(dt))
        skips = []
        for block in self.down:  # resolution halves at the start of every DBlock but the first
            h = block(h, emb, txt, text_mask, cfg)
            skips.append(h)
        for block in self.up:  # and doubles at the end of every UBlock but the last
            h = block(h, skips.pop(), emb, txt, text_mask, cfg)
        eps_hat = self.conv_out(jax.nn.silu(self.norm_out(h)))
        assert eps_hat.shape == z_t.shape
        return eps_hat.astype(jnp.float32)


def abstract_unet(cfg: UNetConfig):
    """The network of a config with ShapeDtypeStructs for parameters (nothing allocated)."""
    if cfg.dropout:
        raise NotImplementedError("dropout > 0: every stage of the paper uses 0 (App. F); not built")
    cls = {"unet": UNet, "efficient": EfficientUNet}[cfg.arch]
    return nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0)))


def make_unet(cfg: UNetConfig, seed: int = 0):
    """The network of a stage config ("unet" or "efficient"), initialised."""
    cls = {"unet": UNet, "efficient": EfficientUNet}[cfg.arch]
    # initialise under one jit: one compiled program instead of hundreds of eager initialisers;
    # it runs once, so XLA's slow optimisation passes are not worth their compile time
    graphdef, _ = nnx.split(abstract_unet(cfg))
    state = jax.jit(lambda: nnx.split(cls(cfg, nnx.Rngs(seed)))[1], compiler_options={
        "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})()
    return nnx.merge(graphdef, state)


def resize_lowres(x, size: int):
    """The previous stage's image (B, h, w, C) resized to (B, size, size, C) for conditioning.
    paper: not specified; bicubic (SR3 and imagen-pytorch use bicubic/bilinear up-sampling)."""
    B, _, _, C = x.shape
    return jax.image.resize(x.astype(jnp.float32), (B, size, size, C), "bicubic")
