"""The text encoder a stage config names, loaded: a T5 v1.1 checkpoint directory (§2.1, the
paper's T5-XXL; t5_encoder.load_t5), an encoder this project pretrained on text only
(pretrain_t5.py, in encoders/NAME: the demo's), "random:NAME" (the same architecture
untrained, the baseline of an encoder that learnt nothing from text), or "whitened:NAME" (the
demo's: NAME with its output whitened on the demo's training captions).
"""

import functools
import hashlib
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

import shapes
import t5_encoder


# demo: the demo's text encoder is one this project pretrained on text only (pretrain_t5.py,
# encoders/), its output whitened on the demo's training captions ("whitened:NAME"), eps = 1e-3
# of the largest eigenvalue: on t5-wordnet-small unwhitened the base put the named colour on the
# named side 58% of the time and on the other 42%, whitened 97% and 3%; see
# docs/text_encoder.md#whitening-the-pretrained-encoders-output
DEMO_WHITENING_EPS = 1e-3


class WhitenedT5Encoder(t5_encoder.T5Encoder):
    """A T5Encoder followed by a fixed affine map of each token's features,
    (x - white_mean) @ white_matrix (fitted by `whiten`; frozen, not an nnx.Param)."""

    def __init__(self, cfg: t5_encoder.T5Config, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        super().__init__(cfg, dtype, rngs)
        self.white_mean = nnx.Variable(jnp.zeros((cfg.d_model,), jnp.float32))
        self.white_matrix = nnx.Variable(jnp.eye(cfg.d_model, dtype=jnp.float32))

    def __call__(self, ids_BL, mask_BL):
        x = super().__call__(ids_BL, mask_BL).astype(jnp.float32)
        return (x - self.white_mean[...]) @ self.white_matrix[...]


def whiten(encoder: WhitenedT5Encoder, tokenizer, texts, length: int, name: str) -> WhitenedT5Encoder:
    """Sets the encoder's output map to (x - mean) @ V diag(lambda + eps)^-1/2 V^T, from the
    eigendecomposition of the covariance of its token features over `texts` (read up to `length`
    tokens), eps = DEMO_WHITENING_EPS of the largest eigenvalue. Fitted once per process, encoder
    `name`, dtype and set of texts (about a second)."""
    key = (name, encoder.embed.embedding[...].dtype.name, _texts_digest(texts))
    if key not in _WHITENING:
        encoder.white_mean.set_value(jnp.zeros_like(encoder.white_mean[...]))
        encoder.white_matrix.set_value(jnp.eye(encoder.cfg.d_model, dtype=jnp.float32))
        emb, mask = t5_encoder.encode(encoder, tokenizer, list(texts), length)
        x = np.asarray(emb, np.float64)[mask]
        lam, V = np.linalg.eigh(np.cov(x.T))
        _WHITENING[key] = x.mean(0), (V / np.sqrt(lam + DEMO_WHITENING_EPS * lam.max())) @ V.T
    mean, W = _WHITENING[key]
    encoder.white_mean.set_value(jnp.asarray(mean, jnp.float32))
    encoder.white_matrix.set_value(jnp.asarray(W, jnp.float32))
    return encoder


_WHITENING = {}  # (name, dtype, digest of the texts) -> (mean, W)


def _texts_digest(texts) -> str:
    h = hashlib.sha256()
    for c in texts:
        h.update(c.encode("utf-8") + b"\0")
    return h.hexdigest()


# Encoders this project pretrains (pretrain_t5.py) live in encoders/NAME and load by NAME.
ENCODERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "encoders")
RANDOM_PREFIX = "random:"  # "random:NAME": NAME's architecture and tokenizer, at T5's initialisation
WHITENED_PREFIX = "whitened:"  # "whitened:NAME": NAME, its output whitened on the given texts (whiten)


def resolve(name: str) -> str:
    """A text encoder's name -> its checkpoint directory: a directory as given, or NAME in
    ENCODERS_DIR (e.g. "t5-wordnet-base", the demo's). Anything else is returned unchanged."""
    name = name.removeprefix(WHITENED_PREFIX).removeprefix(RANDOM_PREFIX)
    if not os.path.isdir(name) and os.path.isdir(os.path.join(ENCODERS_DIR, name)):
        return os.path.join(ENCODERS_DIR, name)
    return name


def same_encoder(a: str, b: str) -> bool:
    """Whether two names load the same encoder: equal once each directory is resolved to its
    real path ("encoders/X", "X" and "./encoders/X/" are one), with the same random: or whitened:."""
    def key(name):
        prefix = name[:len(name) - len(name.removeprefix(WHITENED_PREFIX).removeprefix(RANDOM_PREFIX))]
        path = resolve(name)
        return prefix, os.path.realpath(path) if os.path.isdir(path) else path.rstrip("/")
    return key(a) == key(b)


def load_text_encoder(name: str, dtype=jnp.float32, whitening_texts=None):
    """The text encoder a stage config names -> (encoder, tokenizer): t5_encoder.load_t5 of
    resolve(name); "random:NAME": NAME's config and tokenizer at T5's initialisation
    (t5_initialise, seed 0), frozen, the baseline of an encoder that learnt nothing from text;
    "whitened:NAME": NAME as a WhitenedT5Encoder, its output whitened on `whitening_texts`
    (default: the demo dataset's training captions, the shapes grammar's without the held-out
    ones). The last one loaded with the default texts is kept: the demo's three stages and its
    evaluation share one load (frozen, so nothing changes it)."""
    if whitening_texts is None:
        return _load_kept(name, jnp.dtype(dtype))
    return _load(name, dtype, whitening_texts)


@functools.lru_cache(maxsize=1)
def _load_kept(name, dtype):
    return _load(name, dtype, shapes.training_captions() if name.startswith(WHITENED_PREFIX) else None)


def _load(name, dtype, whitening_texts):
    if name.startswith(WHITENED_PREFIX):
        encoder, tokenizer = _load(name.removeprefix(WHITENED_PREFIX), dtype, None)
        white = WhitenedT5Encoder(encoder.cfg, dtype)
        nnx.update(white, nnx.state(encoder))
        length = max(map(len, tokenizer(list(whitening_texts))["input_ids"]))
        return whiten(white, tokenizer, whitening_texts, length, name), tokenizer
    if name.startswith(RANDOM_PREFIX):
        ckpt = resolve(name)
        encoder = t5_encoder.T5Encoder(t5_encoder.config_from_hf(ckpt), dtype)
        t5_encoder.t5_initialise(encoder, 0)
        return encoder, t5_encoder.load_tokenizer(ckpt)
    return t5_encoder.load_t5(resolve(name), dtype)


def abstract_encoder(name: str, dtype=jnp.float32) -> t5_encoder.T5Encoder:
    """The encoder `name` (as load_text_encoder reads it) as ShapeDtypeStructs, allocating and
    reading nothing but config.json: a checkpoint directory, a name in ENCODERS_DIR, a
    T5_PRESETS name (the directory's basename too, e.g. ckpt/t5-v1_1-xxl), with random: or whitened:."""
    path = resolve(name)
    kind = WhitenedT5Encoder if name.startswith(WHITENED_PREFIX) else t5_encoder.T5Encoder
    cfg = (t5_encoder.config_from_hf(path) if os.path.isdir(path) else
           t5_encoder.T5_PRESETS.get(os.path.basename(path.rstrip("/")).removeprefix("google/")))
    if cfg is None:
        raise FileNotFoundError(f"text encoder {name!r}: not a checkpoint directory, nor one of "
                                f"{sorted(t5_encoder.T5_PRESETS)} or {sorted(os.listdir(ENCODERS_DIR))}")
    return nnx.eval_shape(lambda: kind(cfg, dtype))
