"""The offline text-embedding cache: the frozen encoder's embeddings "computed and stored
offline" (App. D.3; §2.1), once per caption, where training reads each of its 860M pairs about 6 times (2.5M
steps x 2048 examples, §4.1).

Built by every host in parallel, each its own share, resumable; read by example index. Also
what a training run does for its text: read the cache, encode a dataset's small finite set of
captions once into memory (the demo's shapes), or run the encoder inside the step.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

import cli
import sharding
import t5_encoder
import text_encoders

# Layout: host h of P encodes examples [n h / P, n (h + 1) / P) into three files of its own,
#   emb_HHH.bin   its captions' tokens, float16 (T_h, D), each caption unpadded, appended
#   rows_HHH.npy  (n_h, 2) int64: [first token, length] per example (a memmap)
#   done_HHH.json how many of its examples are committed (after their tokens and rows)
# and meta.json. A few large files per host, not one per batch: 860M captions are 3 x P files,
# and reading example i is two memmap lookups (bounded memory, 2 P open files). .npy / raw
# blocks, not ArrayRecord or zarr: the rows are fixed-width, the tokens one flat array, so
# numpy's memmap reads them with no further dependency. Trimmed to each caption's own length:
# D x 2 bytes per token (T5-XXL: 8 KiB; 1 MiB per caption at 128 tokens).

def _host_range(n, h, P):
    return n * h // P, n * (h + 1) // P


def _damaged(out_dir, name, why, h=None):
    """A cache file cut short or overwritten -> the fault that names it and what rebuilds it: a
    host's share is encoded afresh once its done_HHH.json is gone (build_text_cache)."""
    whole = f"{out_dir} to build the cache again"
    fix = whole if h is None else f"{os.path.join(out_dir, f'done_{h:03d}.json')} to encode that share again, or " + whole
    return cli.UserError(f"{os.path.join(out_dir, name)} is damaged ({why}): delete {fix}; then run the same "
                         "command again")


def _read_json(out_dir, name, h=None):
    """meta.json, or host h's done_HHH.json -> its dict; None where it is not written yet."""
    try:
        with open(os.path.join(out_dir, name)) as f:
            d = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _damaged(out_dir, name, e, h) from None
    keys = ("n", "hosts", "max_length", "dim") if h is None else ("done",)
    if not isinstance(d, dict) or not all(isinstance(d.get(k), int) for k in keys):
        raise _damaged(out_dir, name, f"no {', '.join(keys)}", h)
    return d


def _open_shard(out_dir, h, n_h, D, done, built):
    """Host h's rows (a memmap) and committed token count, the files' sizes checked against
    what done_HHH.json and meta.json say, so that a file cut short is named here, not met as a
    wrong shape steps later. built: emb_HHH.bin holds exactly the committed tokens (while
    building it may hold more: what an interrupted chunk wrote, dropped on resume)."""
    if not 0 <= done <= n_h:
        raise _damaged(out_dir, f"done_{h:03d}.json", f"{done} of {n_h} examples done", h)
    try:
        rows = np.load(os.path.join(out_dir, f"rows_{h:03d}.npy"), mmap_mode="r")
    except (FileNotFoundError, ValueError, EOFError) as e:  # a cut .npy: "mmap length is greater than file size"
        raise _damaged(out_dir, f"rows_{h:03d}.npy", e, h) from None
    if rows.shape != (n_h, 2) or rows.dtype != np.int64:
        raise _damaged(out_dir, f"rows_{h:03d}.npy", f"{rows.dtype} {rows.shape}, not int64 {(n_h, 2)}", h)
    tokens = int(rows[done - 1].sum()) if done else 0
    emb_path = os.path.join(out_dir, f"emb_{h:03d}.bin")
    size = os.path.getsize(emb_path) if os.path.exists(emb_path) else 0
    want = tokens * D * np.dtype(np.float16).itemsize
    if size < want or (built and size != want):
        raise _damaged(out_dir, f"emb_{h:03d}.bin", f"{size} bytes, the rows say {want}", h)
    return rows, tokens


def build_text_cache(encoder, tokenizer, source, out_dir, *, encoder_name, max_length=t5_encoder.MAX_LENGTH,
                     process_index=0, process_count=1, chunk=64, progress=True):
    """Encode this host's share of the source's captions into out_dir (see above); resumable:
    a re-run continues after the last committed chunk. A directory made for another dataset,
    encoder or length, or half built by another number of hosts, is refused. Reads only this
    host's captions."""
    if source.kind == "shapes":
        raise cli.UserError("--text-cache: the shapes dataset needs no cache: its captions are encoded once "
                         "when training starts (CaptionTable). Drop --text-cache.")
    h, P, n = process_index, process_count, len(source)
    meta = {"n": n, "hosts": P, "max_length": max_length, "dim": encoder.cfg.d_model, "encoder": encoder_name,
            "source": source.fingerprint()}
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    old = _read_json(out_dir, "meta.json")
    if old is not None:
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if set(diff) <= {"hosts"} and TextCache.complete(out_dir):  # finished, by any number of hosts
            return out_dir
        if diff:
            raise cli.UserError(f"{out_dir} holds a text cache made with other settings (then, now): {diff}. "
                             f"Use another --text-cache directory, or delete it.")
    else:
        with open(meta_path + f".tmp{h}", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(meta_path + f".tmp{h}", meta_path)
    lo, hi = _host_range(n, h, P)
    paths = [os.path.join(out_dir, f"{name}_{h:03d}.{ext}") for name, ext in (("emb", "bin"), ("rows", "npy"), ("done", "json"))]
    emb_path, rows_path, done_path = paths
    done = (_read_json(out_dir, os.path.basename(done_path), h) or {"done": 0})["done"]
    D, itemsize = encoder.cfg.d_model, np.dtype(np.float16).itemsize
    tokens = _open_shard(out_dir, h, hi - lo, D, done, built=False)[1] if done else 0
    rows = (np.lib.format.open_memmap(rows_path, "r+") if done else
            np.lib.format.open_memmap(rows_path, "w+", np.int64, (hi - lo, 2)))
    with open(emb_path, "r+b" if done else "wb") as f:
        f.truncate(tokens * D * itemsize)  # drop what an interrupted chunk wrote after the last commit
        f.seek(0, os.SEEK_END)
        bar = tqdm(total=hi - lo, initial=done, desc=f"T5 embeddings (host {h})", unit="caption", disable=not progress)
        for start in range(lo + done, hi, chunk):
            idx = range(start, min(start + chunk, hi))
            emb, mask = t5_encoder.encode(encoder, tokenizer, [source.caption(i) for i in idx], max_length)
            emb, lengths = np.asarray(emb, np.float16), mask.sum(1)
            for e, L in zip(emb, lengths):
                f.write(e[:L].tobytes())
            rows[start - lo:start - lo + len(idx)] = np.stack([tokens + np.cumsum(lengths) - lengths, lengths], 1)
            tokens += int(lengths.sum())
            f.flush(), os.fsync(f.fileno()), rows.flush()
            with open(done_path + ".tmp", "w") as d:
                json.dump({"done": start - lo + len(idx)}, d)
            os.replace(done_path + ".tmp", done_path)
            bar.update(len(idx))
        bar.close()
    return out_dir


class TextCache:
    """Reads what build_text_cache wrote, by example index: cache[indices] -> (emb (n, L, D)
    float32 zero-padded, mask (n, L) bool), L = its max_length."""

    def __init__(self, out_dir, expect=None):
        """expect: meta.json values the cache must have (all but the number of hosts that built it)."""
        if not self.complete(out_dir):
            raise cli.UserError(f"{out_dir} is not a complete text cache: run the same training command (or "
                             f"text_cache.build_text_cache) on every host to finish it.")
        self.meta = _read_json(out_dir, "meta.json")
        diff = {k: (self.meta.get(k), v) for k, v in (expect or {}).items() if self.meta.get(k) != v}
        if diff:
            raise cli.UserError(f"{out_dir} holds a text cache made with other settings (then, now): {diff}. "
                             f"Use another --text-cache directory, or delete it.")
        n, P, D = self.meta["n"], self.meta["hosts"], self.meta["dim"]
        self.bounds = np.array([_host_range(n, h, P)[0] for h in range(P + 1)])
        sizes = np.diff(self.bounds).tolist()
        self.rows = [_open_shard(out_dir, h, sizes[h], D, sizes[h], built=True)[0] for h in range(P)]
        self.emb = [np.memmap(os.path.join(out_dir, f"emb_{h:03d}.bin"), np.float16, "r").reshape(-1, D)
                    if os.path.getsize(os.path.join(out_dir, f"emb_{h:03d}.bin")) else np.zeros((0, D), np.float16)
                    for h in range(P)]

    @staticmethod
    def complete(out_dir):
        """Whether every host's share is committed; a damaged meta.json or done file is a fault."""
        meta = _read_json(out_dir, "meta.json")
        return meta is not None and all(
            (_read_json(out_dir, f"done_{h:03d}.json", h) or {"done": -1})["done"] ==
            np.subtract(*_host_range(meta["n"], h, meta["hosts"])[::-1]) for h in range(meta["hosts"]))

    def __len__(self):
        return self.meta["n"]

    def __getitem__(self, indices):
        indices = np.atleast_1d(indices)
        emb = np.zeros((len(indices), self.meta["max_length"], self.meta["dim"]), np.float32)
        mask = np.zeros(emb.shape[:2], bool)
        for j, i in enumerate(indices):
            h = int(np.searchsorted(self.bounds, i, "right")) - 1
            first, L = self.rows[h][i - self.bounds[h]]
            emb[j, :L], mask[j, :L] = self.emb[h][first:first + L], True
        return emb, mask

    def embeddings(self, batch):
        """A data.host_stream batch's (emb, mask), by its example indices."""
        return self[batch["index"]]


class CaptionTable:
    """The embeddings of every caption a dataset can draw, encoded once up front and kept in
    memory: the offline computation of §2.1 for a dataset whose captions come from a small
    finite set (the demo's shapes grammar: 1009 training captions, 66 MB at 64 tokens x 256).
    table.embeddings(batch) -> (emb (n, L, D) float32 zero-padded, mask (n, L) bool), by caption."""

    def __init__(self, encoder, tokenizer, captions, max_length, chunk=128):
        self.row = {c: i for i, c in enumerate(captions)}
        parts = []
        for start in range(0, len(captions), chunk):  # every chunk padded to one shape: one compile
            texts = captions[start:start + chunk]
            emb, mask = t5_encoder.encode(encoder, tokenizer, texts + [""] * (chunk - len(texts)), max_length)
            parts.append((np.asarray(emb)[:len(texts)], mask[:len(texts)]))
        self.emb, self.mask = (np.concatenate(a) for a in zip(*parts))

    def embeddings(self, batch):
        try:
            rows = [self.row[c] for c in batch["caption"]]
        except KeyError as e:
            raise ValueError(f"caption {e.args[0]!r} is not one of the dataset's captions") from None
        return self.emb[rows], self.mask[rows]


# ---------------------------------------------------------------------------------------------
# A training run's text: the offline cache, or the frozen encoder inside the step
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A frozen encoder's structure, hashable: what compile_step needs to compile the step with
    the encoder inside (its weights are the step's third argument)."""
    graphdef: Any
    treedef: Any
    leaves: tuple  # the weights' jax.ShapeDtypeStructs

    def abstract_weights(self):
        return self.treedef.unflatten(self.leaves)


def encoder_spec(encoder) -> EncoderSpec:
    """A frozen encoder (module or abstract) -> its EncoderSpec."""
    graphdef, weights = nnx.split(encoder)
    leaves, treedef = jax.tree.flatten(weights)
    return EncoderSpec(graphdef, treedef, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves))


@dataclasses.dataclass
class TrainText:
    """How a training run gets its text (§2.1): offline embeddings (a TextCache, or a
    CaptionTable for a dataset with a small finite set of captions), or the frozen encoder
    inside the step (its spec and its weights, sharded over the mesh) with the tokenizer."""
    tokenizer: Any = None    # None when a finished cache is read (nothing to tokenize)
    offline: Any = None      # TextCache or CaptionTable: .embeddings(batch) -> (emb, mask)
    spec: EncoderSpec | None = None
    weights: Any = None


def open_text(stage, text_cache, source, mesh) -> TrainText:
    """A training run's TrainText. A finished cache is read without loading the encoder."""
    if text_cache and TextCache.complete(text_cache):
        expect = {"n": len(source), "max_length": stage.text_length, "dim": stage.unet.text_dim,
                  "encoder": stage.text_encoder, "source": source.fingerprint()}
        return TrainText(offline=TextCache(text_cache, expect))
    encoder, tokenizer = text_encoders.load_text_encoder(stage.text_encoder, stage.unet.dtype)
    if encoder.cfg.d_model != stage.unet.text_dim:
        raise cli.UserError(f"text encoder {stage.text_encoder!r} has width {encoder.cfg.d_model}, the "
                            f"{stage.name} network expects {stage.unet.text_dim}")
    if text_cache:  # this host's share first, then every host reads all of it
        build_text_cache(encoder, tokenizer, source, text_cache, encoder_name=stage.text_encoder,
                         max_length=stage.text_length, process_index=jax.process_index(),
                         process_count=jax.process_count(), progress=False)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("text cache built")
        return TrainText(tokenizer, TextCache(text_cache))
    captions = source.caption_set()
    if captions is not None:  # a few captions, each drawn many times: encoded once, here
        return TrainText(tokenizer, CaptionTable(encoder, tokenizer, captions, stage.text_length))
    weights = nnx.state(encoder)
    return TrainText(tokenizer, spec=encoder_spec(encoder),
                     weights=jax.device_put(weights, sharding.state_shardings(mesh, weights)))
