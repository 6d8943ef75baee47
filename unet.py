"""The denoising network of Imagen's base 64x64 stage, and the layers the Efficient U-Net shares.

Saharia et al. 2022, §2.5: the base network is adapted from the U-Net of Nichol & Dhariwal
2021 (improved DDPM); App. F.1 lists it as ADM's (Dhariwal & Nichol 2021) with BigGAN-style
residual blocks that also up/down-sample ("res_block_type": "biggan"), scale-shift norm,
attention at 32, 16, 8 with the text tokens concatenated to its keys and values (App. D.3.1),
and an attention-pooled text vector added to the time embedding (§2.5). The Efficient U-Net of
the super-resolution stages (App. B.1) is in efficient_unet.py and uses the layers here.
Both networks share one call signature,
    model(z_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC=None, aug_log_snr_B=None) -> eps_BHWC,
with the suffixes naming the axes (B batch, H W C image, L text tokens, D text width, E the
conditioning embedding); mask_BL is bool. lowres_BHWC is the previous stage's image, noise-augmented
and resized to z's size (diffusion.noise_augment, §2.4). Parameters are float32; `dtype` is the compute
dtype (bfloat16 on accelerators); norms and softmax statistics stay in float32.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The fields of both networks (UNetConfig here, efficient_unet.EfficientUNetConfig);
    names follow the App. F listings where they have them."""
    in_channels: int = 3
    lowres_cond: bool = False  # super-resolution stage: concat the low-res image, embed aug level
    text_dim: int = 4096  # width of the T5 embeddings (T5-XXL, §2.1)
    feature_pooling: str = "attention"  # F.1-F.3 "attention" (§2.5); "mean": ablation, App. D.3.1
    text_cross_attn: bool = True  # False: no text in attention at all (ablation)
    # paper: not specified; 0 = every attention layer projects the T5 width itself (GLIDE's
    # encoder_kv); > 0 = the text is projected once to this width first (NeMo's cond_dim,
    # Rosetta's attn_cond_dim: 2048 for their 2B base)
    text_cond_dim: int = 0
    use_scale_shift_norm: bool = True  # F.1-F.3
    dropout: float = 0.0  # F.1-F.3: 0 for every stage; other values are refused (not built)
    # paper: not specified; time-embedding width = 4 x first channels (ADM; 2048 for the base,
    # as NeMo's and Rosetta's 2B configs)
    emb_mult: int = 4
    norm_groups: int = 32  # paper: not specified; GroupNorm(32) as in ADM
    # how it runs, not what it is (set by imagen.backend; checkpoints ignore them):
    dtype: str = "float32"  # compute dtype; "bfloat16" on accelerators
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" | "cudnn"
    remat: bool = False  # rematerialise residual blocks in the backward pass (memory)


@dataclasses.dataclass(frozen=True)
class UNetConfig(NetworkConfig):
    """The base 64x64 model; defaults are the App. F.1 listing."""
    channels: int = 512  # F.1 "embed_dim": the width of the first level
    channel_mult: tuple = (1, 2, 3, 4)  # F.1
    num_res_blocks: int = 3  # F.1
    attn_resolutions: tuple = (32, 16, 8)  # F.1: self-attention (+ text tokens) at these sides
    # F.1: text tokens concatenated to the attention's keys and values at these sides (of those
    # with self-attention; demo_unet.DemoUNet also attends to the text alone elsewhere)
    text_cross_attn_res: tuple = (32, 16, 8)
    per_head_channels: int = 64  # F.1
    # paper: not specified how many heads (F.1 gives per_head_channels only). 0: channels /
    # per_head_channels, so attention is as wide as its level (ADM's num_head_channels); n > 0:
    # n heads, n x per_head_channels wide at every level (NVIDIA Rosetta's imagen_base_2B.gin:
    # 8 heads of 64), the reading that gives the stated 2B (docs/parameter_counts.md)
    num_heads: int = 0


def compute_dtype(cfg):
    return jnp.dtype(cfg.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm with float32 statistics; returns the compute dtype."""

    def __init__(self, ch: int, groups: int, dtype):
        self.scale, self.bias = nnx.Param(jnp.ones((ch,))), nnx.Param(jnp.zeros((ch,)))
        self.groups, self.dtype = min(groups, ch), dtype

    def __call__(self, x_BHWC):
        B, H, W, C = x_BHWC.shape
        xg = x_BHWC.astype(jnp.float32).reshape(B, H, W, self.groups, C // self.groups)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        xg = (xg - mean) * jax.lax.rsqrt(var + 1e-5)
        return (xg.reshape(B, H, W, C) * self.scale[...] + self.bias[...]).astype(self.dtype)


# paper: not specified how layers are initialised; LeCun-normal without truncation (nnx's
# default variance; plain normals compile faster). No zero-initialised output layers (ADM's
# zero_module): with Adafactor's relative step sizes (optax's default
# multiply_by_parameter_scale, §4.1's base optimizer) a zero parameter moves by only lr x 1e-3
# per step.
_fan_in_normal = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def conv(i, o, rngs, dtype, k=3, stride=1):
    return nnx.Conv(i, o, (k, k), strides=stride, padding="SAME", dtype=dtype,
                    kernel_init=_fan_in_normal, rngs=rngs)


def dense(i, o, rngs, dtype, bias=True):
    return nnx.Linear(i, o, use_bias=bias, dtype=dtype, kernel_init=_fan_in_normal, rngs=rngs)


def sinusoidal_embedding(x_B, dim: int, max_period: float = 10000.0):
    """Transformer-style sinusoidal features of a per-example scalar (B,) -> (B, dim).
    paper: not specified; we embed the log-SNR itself (the network is conditioned on
    lambda_t, App. A), scaled by 1000 / 40 so that its [-20, 20] range spans the same
    1000 units as ADM's integer timesteps."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (x_B.astype(jnp.float32) * 25.0)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class NoiseLevelEmbed(nnx.Module):
    """lambda (B,) -> sinusoidal -> MLP -> (B, emb_dim) (ADM's time embedding)."""

    def __init__(self, ch: int, emb_dim: int, rngs, dtype):
        self.ch = ch
        self.fc1, self.fc2 = dense(ch, emb_dim, rngs, dtype), dense(emb_dim, emb_dim, rngs, dtype)

    def __call__(self, log_snr_B):
        return self.fc2(jax.nn.silu(self.fc1(sinusoidal_embedding(log_snr_B, self.ch))))


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
        mean_BD = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        if self.kind == "attention":
            B, L, D = x.shape
            h = lambda y, n: y.reshape(B, n, self.heads, D // self.heads)
            out = jax.nn.dot_product_attention(h(self.q(mean_BD), 1), h(self.k(x), L), h(self.v(x), L),
                                               mask=mask_BL[:, None, None, :])
            mean_BD = self.o(out.reshape(B, D))
        has_text = mask_BL.any(axis=1, keepdims=True).astype(x.dtype)
        return self.proj(mean_BD) * has_text


def resample(x_BHWC, kind):
    """x (B, H, W, C) -> "down": 2x2 average pool, "up": nearest 2x, None: x."""
    B, H, W, C = x_BHWC.shape
    if kind == "down":
        return x_BHWC.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
    if kind == "up":
        return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    return x_BHWC


class ResBlock(nnx.Module):
    """ADM residual block: GroupNorm, SiLU, conv3x3, GroupNorm with scale-shift from the
    conditioning embedding, SiLU, conv3x3 (no dropout: 0 in every stage, App. F), with an
    optional BigGAN-style resample ("down": 2x2 average pool, "up": nearest 2x) of both paths
    before the first conv. The shortcut is a 1x1 conv where the width changes (ADM), or always
    (conv_shortcut: the Efficient U-Net's ResNetBlock, Fig. A.27). out_scale scales the sum and
    shortcut_scale the shortcut (1, or 1/sqrt(2) for readings of App. B.1's scaling)."""

    def __init__(self, i, o, emb_dim, cfg, rngs, resample=None, conv_shortcut=False, out_scale=1.0,
                 shortcut_scale=1.0):
        dt = compute_dtype(cfg)
        self.norm1, self.conv1 = GroupNorm(i, cfg.norm_groups, dt), conv(i, o, rngs, dt)
        self.emb = dense(emb_dim, 2 * o if cfg.use_scale_shift_norm else o, rngs, dt)
        self.norm2, self.conv2 = GroupNorm(o, cfg.norm_groups, dt), conv(o, o, rngs, dt)
        self.shortcut = conv(i, o, rngs, dt, k=1) if conv_shortcut or i != o else None
        self.resample, self.scale_shift = resample, cfg.use_scale_shift_norm
        self.out_scale, self.shortcut_scale = out_scale, shortcut_scale

    def __call__(self, x_BHWC, emb_BE):
        h = jax.nn.silu(self.norm1(x_BHWC))
        h, x = resample(h, self.resample), resample(x_BHWC, self.resample)
        h = self.conv1(h)
        e = self.emb(jax.nn.silu(emb_BE))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(jax.nn.silu(h))
        x = self.shortcut(x) if self.shortcut is not None else x
        x = x * self.shortcut_scale if self.shortcut_scale != 1.0 else x
        return (x + h) * self.out_scale if self.out_scale != 1.0 else x + h


class Attention(nnx.Module):
    """Multi-head attention over the image positions of x (B, H, W, C).

    self_attn: self-attention; with text_dim, the layer-normed text tokens are projected and
      concatenated to its keys and values (App. D.3.1, GLIDE's encoder_kv), masked by the text
      mask: the base model's and the 64->256 model's "text cross attention".
    not self_attn: explicit cross-attention, queries from the image, keys and values from the
      text only (the 256->1024 model, F.3); an all-masked text adds nothing to x (the sum is
      still scaled by out_scale).
    hidden: the width of the queries, keys and values (default ch; the Efficient U-Net's is
    2 x ch, Fig. A.28); out_scale scales the residual sum as in ResBlock.
    """

    def __init__(self, ch, heads, text_dim, self_attn, cfg, rngs, hidden=None, out_scale=1.0):
        dt, hidden = compute_dtype(cfg), hidden or ch
        self.heads, self.self_attn, self.implementation = heads, self_attn, cfg.attention
        self.hidden, self.out_scale = hidden, out_scale
        self.norm = GroupNorm(ch, cfg.norm_groups, dt)
        self.q = dense(ch, hidden, rngs, dt)
        # no key/value biases (see TextPooling)
        self.kv = dense(ch, 2 * hidden, rngs, dt, bias=False) if self_attn else None
        self.text_norm = LayerNorm(text_dim, dt) if text_dim else None  # §2.5
        self.text_kv = dense(text_dim, 2 * hidden, rngs, dt, bias=False) if text_dim else None
        self.o = dense(hidden, ch, rngs, dt)

    def __call__(self, x_BHWC, txt_BLD, mask_BL):
        B, H, W, C = x_BHWC.shape
        split = lambda y: y.reshape(B, -1, self.heads, self.hidden // self.heads)
        h = self.norm(x_BHWC).reshape(B, H * W, C)
        q = split(self.q(h))
        ks, vs, n_keys_B = [], [], jnp.zeros((B,), jnp.int32)
        if self.self_attn:
            k, v = jnp.split(self.kv(h), 2, axis=-1)
            ks.append(split(k)), vs.append(split(v))
            n_keys_B += H * W
        if self.text_kv is not None:
            k, v = jnp.split(self.text_kv(self.text_norm(txt_BLD)), 2, axis=-1)
            ks.append(split(k)), vs.append(split(v))
            n_keys_B += mask_BL.sum(axis=1, dtype=jnp.int32)
        k, v = (jnp.concatenate(a, axis=1) for a in (ks, vs))
        # Text masks are prefixes (the tokenizer pads at the end; dropped text is all False), so
        # the keys to attend to are the first n_keys: a length, which cuDNN's fused attention
        # takes directly. At least one key, so an all-masked text gives finite values.
        out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.maximum(n_keys_B, 1),
                                           implementation=self.implementation)
        out = self.o(out.reshape(B, H * W, self.hidden))
        if not self.self_attn:  # no text tokens at all: no update (not a mean of masked values)
            out = out * mask_BL.any(axis=1)[:, None, None].astype(out.dtype)
        out = x_BHWC + out.reshape(B, H, W, C)
        return out * self.out_scale if self.out_scale != 1.0 else out


class Conditioning(nnx.Module):
    """The conditioning embedding: noise level, plus the aug level of super-resolution stages
    (§2.4), plus the pooled text (§2.5). paper: not specified how the aug level enters; like
    the time: sinusoidal -> MLP, added."""

    def __init__(self, ch, emb_dim, cfg, rngs):
        dt = compute_dtype(cfg)
        self.time = NoiseLevelEmbed(ch, emb_dim, rngs, dt)
        self.aug = NoiseLevelEmbed(ch, emb_dim, rngs, dt) if cfg.lowres_cond else None
        self.text_proj = (nnx.Sequential(LayerNorm(cfg.text_dim, dt), dense(cfg.text_dim, cfg.text_cond_dim, rngs, dt))
                          if cfg.text_cond_dim else None)
        self.pool = TextPooling(text_width(cfg), emb_dim, cfg.feature_pooling, rngs, dt)

    def __call__(self, log_snr_B, txt_BLD, mask_BL, aug_log_snr_B):
        """-> (emb (B, emb_dim), text tokens (B, L, text_width) for the attention layers)."""
        txt_BLD = self.text_proj(txt_BLD) if self.text_proj is not None else txt_BLD
        emb_BE = self.time(log_snr_B) + self.pool(txt_BLD, mask_BL)
        if self.aug is not None:
            emb_BE = emb_BE + self.aug(aug_log_snr_B)
        return emb_BE, txt_BLD


def text_width(cfg):
    """Width of the text tokens inside the network."""
    return cfg.text_cond_dim or cfg.text_dim


def check_inputs(cfg, z_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC, aug_log_snr_B):
    B = z_BHWC.shape[0]
    assert z_BHWC.ndim == 4 and z_BHWC.shape[-1] == cfg.in_channels, z_BHWC.shape
    assert log_snr_B.shape == (B,) and txt_BLD.shape[0] == B and txt_BLD.shape[-1] == cfg.text_dim, (
        log_snr_B.shape, txt_BLD.shape)
    assert mask_BL.shape == txt_BLD.shape[:2] and mask_BL.dtype == jnp.bool_, (mask_BL.shape, mask_BL.dtype)
    if cfg.lowres_cond:
        assert lowres_BHWC is not None and lowres_BHWC.shape == z_BHWC.shape, "lowres: resized to z's size"
        assert aug_log_snr_B is not None and aug_log_snr_B.shape == (B,)


def maybe_remat(cfg, block, *args):
    return nnx.remat(lambda b, *a: b(*a))(block, *args) if cfg.remat else block(*args)


class UNet(nnx.Module):
    """The base 64x64 model (App. F.1), ADM with BigGAN up/down-sampling residual blocks.
    side: the side of its input, which attn_resolutions refer to (F.1: 64)."""

    def __init__(self, cfg: UNetConfig, side: int, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, ch = compute_dtype(cfg), cfg.channels
        emb_dim = cfg.emb_mult * ch
        self.cond = Conditioning(ch, emb_dim, cfg, rngs)
        in_ch = cfg.in_channels * (2 if cfg.lowres_cond else 1)
        self.conv_in = conv(in_ch, ch, rngs, dt)
        attn = lambda c, res: self.attention(c, res, rngs)
        updown = lambda c, kind: self.resample_block(c, kind, emb_dim, rngs)
        # down path: (ResBlock, Attention | None) pairs, then a down-sampling ResBlock per level
        self.down, skip_ch, c, res = nnx.List(), [ch], ch, side
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(nnx.List([ResBlock(c, mult * ch, emb_dim, cfg, rngs), attn(mult * ch, res)]))
                c = mult * ch
                skip_ch.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nnx.List([updown(c, "down"), None]))
                skip_ch.append(c)
                res //= 2
        self.mid = nnx.List([ResBlock(c, c, emb_dim, cfg, rngs),
                             self.attention_layer(c, text_width(cfg) if cfg.text_cross_attn else 0, True, rngs),
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
        self.conv_out = conv(c, cfg.in_channels, rngs, dt)

    def attention_layer(self, c, text, self_attn, rngs):
        cfg = self.cfg
        heads = cfg.num_heads or c // cfg.per_head_channels
        return Attention(c, heads, text, self_attn, cfg, rngs, hidden=heads * cfg.per_head_channels)

    def attention(self, c, res, rngs):
        """F.1: self-attention at attn_resolutions, the text tokens joining its keys and values
        where text_cross_attn_res lists the side too; None elsewhere."""
        cfg = self.cfg
        if res not in cfg.attn_resolutions:
            return None
        text = text_width(cfg) if cfg.text_cross_attn and res in cfg.text_cross_attn_res else 0
        return self.attention_layer(c, text, True, rngs)

    def resample_block(self, c, kind, emb_dim, rngs):
        """F.1 "res_block_type": "biggan": a residual block that down- or up-samples."""
        return ResBlock(c, c, emb_dim, self.cfg, rngs, kind)

    def __call__(self, z_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC=None, aug_log_snr_B=None):
        cfg = self.cfg
        check_inputs(cfg, z_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC, aug_log_snr_B)
        emb_BE, txt_BLD = self.cond(log_snr_B, txt_BLD.astype(compute_dtype(cfg)), mask_BL, aug_log_snr_B)
        x = jnp.concatenate([z_BHWC, lowres_BHWC], -1) if cfg.lowres_cond else z_BHWC
        h = self.conv_in(x.astype(compute_dtype(cfg)))  # (B, H, W, ch)
        hs = [h]
        for res_block, attn in self.down:
            h = maybe_remat(cfg, res_block, h, emb_BE)
            h = attn(h, txt_BLD, mask_BL) if attn is not None else h
            hs.append(h)
        h = self.mid[0](h, emb_BE)
        h = self.mid[1](h, txt_BLD, mask_BL)
        h = self.mid[2](h, emb_BE)
        for res_block, attn, *upsample in self.up:
            h = maybe_remat(cfg, res_block, jnp.concatenate([h, hs.pop()], -1), emb_BE)
            h = attn(h, txt_BLD, mask_BL) if attn is not None else h
            h = maybe_remat(cfg, upsample[0], h, emb_BE) if upsample else h
        eps_BHWC = self.conv_out(jax.nn.silu(self.norm_out(h)))
        assert eps_BHWC.shape == z_BHWC.shape
        return eps_BHWC.astype(jnp.float32)

