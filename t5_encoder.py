"""The frozen T5 text encoder of Imagen, in Flax NNX, loading Hugging Face T5 v1.1 checkpoints.

Saharia et al. 2022, §2.1 and App. D.1: Imagen conditions on the contextual embeddings of a
frozen, text-only language model, T5-XXL's encoder ("T5-XXL (4.6B parameters)", §4.4); the
embeddings can be computed offline. The paper's ablation also uses T5 small / base / large / XL.

The architecture is T5 v1.1 (Raffel et al. 2020; the google/t5-v1_1-* checkpoints):
  token embedding (no scaling) -> N x [RMSNorm -> self-attention with a relative position bias
  (bidirectional buckets, computed once from the first layer's table and shared by all layers,
  no 1/sqrt(d) scaling of the logits) -> residual; RMSNorm -> gated-GELU feed-forward ->
  residual] -> final RMSNorm. No biases anywhere.
paper: not specified which T5 release; we use v1.1, the public T5-XXL encoder.

transformers 5 has no Flax models: this file is ours; transformers gives the tokenizer and
the config. Weights are read with safetensors' numpy loader, one tensor at a time, straight
into an abstract (unallocated) model, so T5-XXL never exists twice in host memory.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download  # comes with transformers
from safetensors import safe_open
from transformers import AutoTokenizer

from cli import UserError


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder sizes; defaults are google/t5-v1_1-xxl's config.json."""
    vocab_size: int = 32128
    d_model: int = 4096  # width of the text embeddings the U-Nets attend to
    d_kv: int = 64  # per-head width
    d_ff: int = 10240  # gated-GELU hidden width
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


# The public google/t5-v1_1-* configs (their config.json files). App. D.1 compares these sizes.
T5_PRESETS = {
    "t5-v1_1-small": T5Config(d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "t5-v1_1-base": T5Config(d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "t5-v1_1-large": T5Config(d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "t5-v1_1-xl": T5Config(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "t5-v1_1-xxl": T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}

# paper: not specified; 128 tokens (NeMo's Imagen also uses 128, imagen-pytorch 256).
MAX_LENGTH = 128


class RMSNorm(nnx.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(self.weight.dtype)


def relative_position_bucket(relative_position, num_buckets, max_distance, bidirectional=True):
    """T5's buckets (Raffel et al. 2020, §2.1; HF `_relative_position_bucket`): bidirectional
    (the encoder), half the buckets per direction; or, for a decoder's causal self-attention,
    all of them for keys before the query. Exact for |d| < buckets / 2 per direction,
    logarithmic up to max_distance."""
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).astype(jnp.int32) * num_buckets
        d = jnp.abs(relative_position)
    else:
        bucket, d = 0, jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(d, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = jnp.minimum(max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(d < max_exact, d, large)


class SelfAttention(nnx.Module):
    """T5 attention: self-attention, or attention to `kv_BKD` (a decoder's cross-attention)."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool, dtype, rngs: nnx.Rngs, bidirectional: bool = True):
        inner = cfg.num_heads * cfg.d_kv
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q, self.k, self.v = lin(cfg.d_model, inner), lin(cfg.d_model, inner), lin(cfg.d_model, inner)
        self.o = lin(inner, cfg.d_model)
        self.cfg, self.bidirectional = cfg, bidirectional
        if has_relative_bias:  # only the first layer holds the table; its bias is shared
            self.relative_attention_bias = nnx.Embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=dtype, rngs=rngs)

    def position_bias(self, L):
        pos = jnp.arange(L)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None],  # key - query
                                           self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance, self.bidirectional)
        return self.relative_attention_bias(buckets).astype(jnp.float32).transpose(2, 0, 1)[None]  # (1, N, L, L)

    def __call__(self, x_BLD, bias_BNLK, kv_BKD=None):
        B, L, _ = x_BLD.shape
        kv_BKD = x_BLD if kv_BKD is None else kv_BKD
        heads = lambda y: y.reshape(B, y.shape[1], self.cfg.num_heads, self.cfg.d_kv)
        q, k, v = heads(self.q(x_BLD)), heads(self.k(kv_BKD)), heads(self.v(kv_BKD))
        # T5 does not scale the logits by 1/sqrt(d_kv); softmax in float32 as in HF T5
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) + bias_BNLK
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknh->bqnh", attn, v).reshape(B, L, -1)
        return self.o(out)


class GatedGeluFF(nnx.Module):
    """T5 v1.1 feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config, dtype, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.wi_0, self.wi_1, self.wo = lin(cfg.d_model, cfg.d_ff), lin(cfg.d_model, cfg.d_ff), lin(cfg.d_ff, cfg.d_model)

    def __call__(self, x):
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.attn = SelfAttention(cfg, has_relative_bias, dtype, rngs)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.ff = GatedGeluFF(cfg, dtype, rngs)

    def __call__(self, x, bias):
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder: token ids (B, L) int, mask (B, L) bool -> hidden states (B, L, D).
    Flax's default initialisers; t5_initialise redraws the weights as T5 does."""

    def __init__(self, cfg: T5Config, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i == 0, dtype, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)

    def __call__(self, ids_BL, mask_BL):
        x = self.embed(ids_BL)
        L = ids_BL.shape[1]
        # relative position bias from layer 0, shared by all layers; padded keys masked out
        bias = self.blocks[0].attn.position_bias(L) + jnp.where(mask_BL[:, None, None, :], 0.0, -1e9)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)


def count_t5_params(cfg: T5Config) -> int:
    """Parameters of the encoder (token embedding included), allocating nothing."""
    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, jnp.bfloat16))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def t5_initialise(module: nnx.Module, seed: int = 0):
    """Redraw every weight of a T5 module (an encoder, or pretrain_t5's encoder-decoder) as T5
    does (Mesh TensorFlow; HF `T5PreTrainedModel._init_weights`): token embedding N(0, 1); q
    N(0, 1 / (d_model d_kv)) (the 1 / sqrt(d_kv) T5 leaves out of its logits); k, v, wi, the
    relative-position bias and an output layer N(0, 1 / d_model); o N(0, 1 / (heads d_kv)); wo
    N(0, 1 / d_ff); norm scales 1."""
    cfg = next(m.cfg for _, m in nnx.iter_graph(module) if isinstance(m, T5Encoder))
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, (path, var) in zip(keys, flat):
        x = var.get_value()
        if path[-1] == "weight":  # RMSNorm scales
            continue
        name = path[-2]  # the layer of a kernel (in, out) or an embedding table
        std = (1.0 if name == "embed" else cfg.d_model ** -0.5 if name == "relative_attention_bias"
               else (cfg.d_model * cfg.d_kv) ** -0.5 if name == "q" else x.shape[0] ** -0.5)
        var.set_value(std * jax.random.normal(key, x.shape, x.dtype))
    nnx.update(module, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints
# ---------------------------------------------------------------------------------------------

def _hf_name(path) -> tuple[str, bool]:
    """Our parameter path -> (the Hugging Face T5EncoderModel tensor name, transpose?)."""
    if path[0] == "embed":
        return "shared.weight", False
    if path[0] == "final_norm":
        return "encoder.final_layer_norm.weight", False
    _, i, sub, *rest = path
    p = f"encoder.block.{i}."
    if sub == "attn_norm":
        return p + "layer.0.layer_norm.weight", False
    if sub == "ff_norm":
        return p + "layer.1.layer_norm.weight", False
    if sub == "attn" and rest[0] == "relative_attention_bias":
        return p + "layer.0.SelfAttention.relative_attention_bias.weight", False
    if sub == "attn":  # torch Linear weights are (out, in); ours (in, out)
        return p + f"layer.0.SelfAttention.{rest[0]}.weight", True
    return p + f"layer.1.DenseReluDense.{rest[0]}.weight", True


def _resolve_checkpoint(name_or_path: str, download: bool) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path
    if not download:
        raise FileNotFoundError(
            f"T5 checkpoint {name_or_path!r} is not a local directory. Download it once on a "
            f"machine with network:\n  hf download {name_or_path} --include '*.json' "
            f"'*.safetensors' 'spiece.model' --local-dir DIR\nand pass DIR, or call "
            f"load_t5({name_or_path!r}, download=True).")
    return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model"])


def _tensor_files(ckpt: str) -> dict[str, str]:
    """Tensor name -> safetensors file, for one file or a sharded checkpoint with its index."""
    index = os.path.join(ckpt, "model.safetensors.index.json")
    single = os.path.join(ckpt, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e}): download it again") from None
        return {k: os.path.join(ckpt, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        try:
            with safe_open(single, "np") as f:
                return {k: single for k in f.keys()}
        except Exception as e:  # safetensors' errors of a damaged file have no common class
            raise UserError(f"{single} cannot be read ({type(e).__name__}: {str(e)[:160]}): the file is "
                            f"damaged or cut short; download it again") from None
    hint = (" It has pytorch_model.bin only: convert it once with transformers and torch, "
            "T5EncoderModel.from_pretrained(DIR).save_pretrained(DIR2), and load DIR2."
            if os.path.exists(os.path.join(ckpt, "pytorch_model.bin")) else "")
    raise FileNotFoundError(f"{ckpt} has neither model.safetensors nor "
                            f"model.safetensors.index.json.{hint}")


def config_from_hf(ckpt: str) -> T5Config:
    path = os.path.join(ckpt, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: a T5 checkpoint directory needs the "
                                f"config.json of its Hugging Face repository.")
    fix = "put the config.json of the checkpoint's Hugging Face repository there"
    try:
        with open(path) as f:
            hf = json.load(f)
        if hf.get("feed_forward_proj") != "gated-gelu":  # the original T5 (v1.0) uses ReLU
            raise UserError(f"{path}: not a T5 v1.1 checkpoint (need feed_forward_proj "
                            f"'gated-gelu', as in google/t5-v1_1-*).")
        return T5Config(**{f.name: hf[f.name] for f in dataclasses.fields(T5Config)})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{path} is not a JSON object ({e}): {fix}") from None
    except KeyError as e:
        raise UserError(f"{path} has no {e}: {fix}") from None


def load_t5(name_or_path: str, dtype=jnp.bfloat16, download: bool = False):
    """Load a Hugging Face T5 v1.1 checkpoint -> (T5Encoder, tokenizer).

    name_or_path: a local directory with config.json, model.safetensors (or sharded
    safetensors with model.safetensors.index.json) and the tokenizer files; or a hub name such
    as "google/t5-v1_1-xxl", fetched only with download=True.
    Host memory: one copy of the encoder in `dtype` plus one tensor at a time (T5-XXL: about
    9.5 GB in bfloat16, 19 GB in float32).
    """

    ckpt = _resolve_checkpoint(name_or_path, download)
    cfg = config_from_hf(ckpt)
    files = _tensor_files(ckpt)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: T5Encoder(cfg, dtype)))
    handles = {}
    for path, var in nnx.to_flat_state(state):
        name, transpose = _hf_name(path)
        if name not in files and name == "shared.weight" and "encoder.embed_tokens.weight" in files:
            name = "encoder.embed_tokens.weight"
        if name not in files:
            raise UserError(f"{ckpt}: tensor {name!r} is missing; is this a T5 v1.1 checkpoint "
                            f"with the config.json beside it?")
        try:
            f = handles.get(files[name]) or handles.setdefault(files[name], safe_open(files[name], "np"))
            arr = f.get_tensor(name)
        except Exception as e:  # safetensors' errors of a damaged file have no common class
            raise UserError(f"{files[name]} cannot be read ({type(e).__name__}: {str(e)[:160]}): the file is "
                            f"damaged or cut short; download it again") from None
        arr = arr.T if transpose else arr
        if arr.shape != var.get_value().shape:
            raise UserError(f"{ckpt}: tensor {name!r} has shape {arr.shape}, config.json "
                            f"implies {var.get_value().shape}: the config.json is another model's.")
        var.set_value(jnp.asarray(arr, dtype))
        del arr
    tokenizer = load_tokenizer(ckpt)
    check_tokenizer(ckpt, tokenizer, cfg, handles.values())
    return nnx.merge(graphdef, state), tokenizer


def spiece_digest(ckpt: str) -> str | None:
    path = os.path.join(ckpt, "spiece.model")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_tokenizer(ckpt, tokenizer, cfg: T5Config, weight_files=()):
    """That the tokenizer beside the weights is theirs: its ids fit the embedding table, and the
    SentencePiece model is the one the weights were trained with where the weights record it
    (pretrain_t5.py writes its digest as "spiece_sha256" in model.safetensors' metadata)."""
    fix = "put the tokenizer files of the checkpoint the weights came from beside them"
    if len(tokenizer) > cfg.vocab_size:
        raise UserError(f"{ckpt}: the tokenizer has {len(tokenizer)} tokens, the encoder's embedding "
                        f"{cfg.vocab_size} rows: the tokenizer is another model's; {fix}.")
    recorded = {(f.metadata() or {}).get("spiece_sha256") for f in weight_files} - {None}
    if recorded and recorded != {spiece_digest(ckpt)}:
        raise UserError(f"{ckpt}: spiece.model is not the tokenizer the weights were trained with "
                        f"(its SHA-256 differs from the one in model.safetensors); {fix}.")


TOKENIZER_FILES = ("spiece.model", "tokenizer.json")  # SentencePiece model, or its fast-tokenizer form


def load_tokenizer(ckpt: str):
    """The checkpoint's own tokenizer, refused when it cannot be loaded or cannot tell two
    prompts apart: without its vocabulary file a T5 tokenizer still loads and maps every word
    to <unk>, and the model would train and sample with no text signal at all."""
    fix = (f"Fetch the tokenizer beside the weights, from the repository they came from, e.g.\n"
           f"  hf download google/t5-v1_1-xxl spiece.model --local-dir {ckpt}")
    if not any(os.path.exists(os.path.join(ckpt, f)) for f in TOKENIZER_FILES):
        fix = f"{ckpt} has no {' or '.join(TOKENIZER_FILES)}. " + fix
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except Exception as e:  # a damaged vocabulary file: sentencepiece and tokenizers raise their own kinds
        raise UserError(f"{ckpt}: the tokenizer cannot be loaded ({type(e).__name__}: {e}).\n{fix}") from None
    probe = ("a red circle", "two blue squares")
    ids = [tokenizer(t)["input_ids"] for t in probe]
    if ids[0] == ids[1]:
        raise UserError(f"{ckpt}: the tokenizer maps {probe[0]!r} and {probe[1]!r} to the same ids "
                        f"{ids[0]}: its vocabulary is missing.\n{fix}")
    return tokenizer


def embed(encoder, ids_BL, mask_BL):
    """The text embeddings (§2.1: the encoder's last hidden states) as float32, zero where padded."""
    emb = encoder(ids_BL, mask_BL).astype(jnp.float32)
    return jnp.where(mask_BL[..., None], emb, 0.0)


_forward = nnx.jit(embed)


def tokenize(tokenizer, texts, max_length: int = MAX_LENGTH):
    """Texts -> (ids (B, L) int32, mask (B, L) bool) as numpy, padded or cut to L = max_length."""
    tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(bool)


def warn_if_cut(tokenizer, texts, max_length: int = MAX_LENGTH, stacklevel: int = 3, plain: bool = False):
    """One warning naming how many of `texts` are longer than max_length tokens (they are cut):
    a Python UserWarning, or (plain: for a command line's user) one `warning: ...` line on stderr."""
    full = tokenizer(list(texts))["input_ids"]
    cut = [t for t, ids in zip(texts, full) if len(ids) > max_length]
    if cut:
        message = (f"{len(cut)} of {len(texts)} prompts are longer than {max_length} tokens "
                   f"and were cut, e.g. {cut[0][:60]!r}...")
        if plain:
            print(f"warning: {message}", file=sys.stderr)
        else:
            warnings.warn(message, stacklevel=stacklevel)


def encode(encoder, tokenizer, texts, max_length: int = MAX_LENGTH, warn: bool = True):
    """Prompts -> (emb (B, L, D) float32, mask (B, L) bool), padded or cut to L = max_length.

    §2.1: the encoder's last hidden states are the text embeddings. Padded positions are zero
    (and masked). The empty string is a valid prompt (it is just the end-of-sequence token;
    imagen.encode_prompts turns it into the unconditional null condition for sampling);
    prompts longer than max_length tokens are cut, with one warning per call (warn=False: the
    caller has warned).
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("encode() takes a non-empty list of prompts (the empty string is a "
                         "valid prompt; an empty list is not).")
    texts = list(texts)
    if warn:
        warn_if_cut(tokenizer, texts, max_length)
    ids, mask = tokenize(tokenizer, texts, max_length)
    return _forward(encoder, jnp.asarray(ids), jnp.asarray(mask)), mask


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Run as a script, it prints the parameter "
                            "counts of the public T5 v1.1 encoders (nothing is allocated).").parse_args()
    for name, cfg in T5_PRESETS.items():
        n = count_t5_params(cfg)
        emb = cfg.vocab_size * cfg.d_model
        print(f"{name:15s} d_model {cfg.d_model:5d}  encoder {n / 1e9:6.3f}B  "
              f"(without the token embedding {(n - emb) / 1e9:6.3f}B)")
