"""Training data for the three stages on Grain: random-access sources, per-host streams and
decode workers (the offline text-embedding cache is text_cache.py's).

Saharia et al. 2022, §4.1 trains on ~860M image-text pairs (internal data + LAION-400M); the
super-resolution models get their low-resolution input by down-sampling, and the 256->1024
model trains on "64 x 64 -> 256 x 256 crops of the 1024 x 1024 image" (§2.5; preprocess). The
frozen encoder's embeddings are "computed and stored offline" (App. D.3): text_cache.py.
Sources (random access: example i in O(1)):
  - WebDataset .tar shards as img2dataset writes them (NNNN.jpg + NNNN.txt), through a
    per-shard index of member offsets built once, in parallel, and kept beside the shards (or
    in --index-dir); rebuilt when a shard's size or time changes;
  - a folder of images with same-named .txt captions (a.jpg + a.txt), searched recursively;
  - "shapes": the built-in synthetic captioned-shapes dataset of the demo (shapes.py).

The stream: position n of the global stream is example order[n], a Grain index shuffle of
epoch n // len (a new one each epoch, O(1) per example, nothing materialised); shapes are read
in order. It is cut into global batches; host h of P reads block h of every one (stream_index),
so P hosts together read what one process would. A host's state is one number, how many
examples it has read: resuming from it repeats an uninterrupted run with any number of decode
workers. An unreadable image (corrupt, truncated, missing caption) is replaced by the next
readable example in index order and counted, so every batch is full and deterministic.

  python data.py --data /data/laion --stage base --batch-size 256 --batches 20 --data-workers 2
"""

import argparse
import collections
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor

import grain
from absl import flags  # comes with grain
import numpy as np
from PIL import Image

import cli
import imagen
import shapes

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MAX_OPEN_SHARDS = 64  # per process: open files are bounded
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, SyntaxError, UnicodeDecodeError)
MAX_SKIPPED = 100  # unreadable examples in a row replaced before the data is refused


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

class ShapesSource:
    """The demo's synthetic shapes: unbounded, example i drawn from (seed, i)."""
    kind = "shapes"

    def __init__(self, seed=0):
        self.seed = seed

    def __len__(self):
        return 2 ** 31 - 1

    def caption(self, i):
        return shapes.make_example(self.seed, i)[1]

    def caption_set(self):
        """Every caption it can draw (the grammar's, held-out ones excluded): a small finite set,
        so the text encoder runs on each once (text_cache.CaptionTable), not once per example."""
        return shapes.training_captions()

    def load(self, i):
        return shapes.make_example(self.seed, i)[:2]

    def name(self, i):
        return f"shapes example {i}"

    def fingerprint(self):
        return f"shapes:{self.seed}"


class FolderSource:
    """a.jpg + a.txt pairs under a folder (listed once at start-up: for folders, not LAION)."""
    kind = "folder"

    def __init__(self, items):
        self.items = items  # (image path, caption path)

    def __len__(self):
        return len(self.items)

    def name(self, i):
        return self.items[i % len(self)][0]

    def caption(self, i, errors="replace"):
        with open(self.items[i][1], encoding="utf-8", errors=errors) as f:
            return f.read().strip()

    def load(self, i):
        """-> (PIL RGB image, caption), or (None, None) if either cannot be read."""
        try:
            img = to_rgb(Image.open(self.items[i][0]))  # decodes: a truncated file fails here
            return img, self.caption(i, errors="strict")
        except DECODE_ERRORS:
            return None, None

    def caption_set(self):
        return None  # open-ended: each example's caption is encoded when it is drawn

    def fingerprint(self):
        return hashlib.sha256("\0".join(p for p, _ in self.items).encode()).hexdigest()


def _scan_shard(tar_path) -> np.ndarray:
    """One shard's index: (n, 4) int64 rows [image offset, image size, caption offset, caption
    size] of every image member, in name order; -1, -1 where its same-stem .txt is missing (an
    unreadable example, replaced when read). A truncated shard keeps the members before the
    damage; one cut inside its data reads short, and is unreadable too."""
    members = {}
    try:
        with tarfile.open(tar_path) as tf:
            for m in tf:
                if m.isfile():
                    members[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError):
        pass
    rows = [members[name] + members.get(os.path.splitext(name)[0] + ".txt", (-1, -1)) for name in sorted(members)
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS]
    return np.array(rows, np.int64).reshape(-1, 4)


def _index_path(index_dir, tar_path):
    digest = hashlib.sha1(os.path.abspath(tar_path).encode()).hexdigest()[:10]
    return os.path.join(index_dir, f"{os.path.basename(tar_path)}.{digest}.index.npy")


def _build_index(args):
    tar_path, path = args
    rows = _scan_shard(tar_path)
    with open(path + ".tmp", "wb") as f:
        np.save(f, rows)
    os.replace(path + ".tmp", path)
    return len(rows)


def index_shards(tars, index_dir=None, workers=None):
    """-> the example count of each shard, from the shard index in index_dir (default: beside
    the first shard): summary.json lists every shard's (size, mtime_ns, count); a shard that is
    new or changed is (re)scanned, in parallel, and the summary rewritten. Start-up then costs
    one stat per shard."""
    index_dir = index_dir or os.path.join(os.path.dirname(os.path.abspath(tars[0])), "_index")
    try:
        os.makedirs(index_dir, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f"cannot write the shard index to {index_dir} ({e}): pass --index-dir "
                            "a writable directory") from None
    summary_path = os.path.join(index_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    stats = {t: os.stat(t) for t in tars}
    key = lambda t: [stats[t].st_size, stats[t].st_mtime_ns]
    todo = [t for t in tars if summary.get(os.path.abspath(t), [None] * 3)[:2] != key(t)
            or not os.path.exists(_index_path(index_dir, t))]
    if todo:
        t0 = time.time()
        jobs = [(t, _index_path(index_dir, t)) for t in todo]
        if len(jobs) <= 4:
            counts = list(map(_build_index, jobs))
        else:  # spawned, not forked: this process runs JAX's threads
            with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
                counts = list(pool.map(_build_index, jobs, chunksize=16))
        for t, n in zip(todo, counts):
            summary[os.path.abspath(t)] = key(t) + [n]
        with open(summary_path + ".tmp", "w") as f:
            json.dump(summary, f)
        os.replace(summary_path + ".tmp", summary_path)
        print(f"indexed {len(todo)} shards in {time.time() - t0:.1f} s ({index_dir})", file=sys.stderr)
    return index_dir, [summary[os.path.abspath(t)][2] for t in tars]


class TarSource:
    """img2dataset .tar shards through their index: example i is a pread of two members. Open
    shards and loaded indices are kept in bounded LRU caches (per process: every decode worker
    opens its own)."""
    kind = "tar"

    def __init__(self, tars, index_dir=None):
        self.tars = tars
        self.index_dir, counts = index_shards(tars, index_dir)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._files, self._rows = collections.OrderedDict(), collections.OrderedDict()

    def __getstate__(self):  # a worker opens its own files
        return dict(self.__dict__, _files=collections.OrderedDict(), _rows=collections.OrderedDict())

    def __len__(self):
        return int(self.starts[-1])

    def _cached(self, cache, s, make):
        if s not in cache:
            if len(cache) >= MAX_OPEN_SHARDS:
                old = cache.popitem(last=False)[1]
                if hasattr(old, "close"):
                    old.close()
            cache[s] = make()
        cache.move_to_end(s)
        return cache[s]

    def _members(self, i):
        s = int(np.searchsorted(self.starts, i, "right")) - 1
        rows = self._cached(self._rows, s, lambda: np.load(_index_path(self.index_dir, self.tars[s]), mmap_mode="r"))
        f = self._cached(self._files, s, lambda: open(self.tars[s], "rb"))
        io_ = lambda off, size: os.pread(f.fileno(), int(size), int(off))
        img_off, img_size, txt_off, txt_size = rows[i - self.starts[s]]
        return io_(img_off, img_size), io_(txt_off, max(txt_size, 0)), img_size, txt_size

    def name(self, i):
        i %= len(self)
        s = int(np.searchsorted(self.starts, i, "right")) - 1
        return f"{self.tars[s]}: image {i - self.starts[s]} of the shard"

    def caption(self, i):
        return self._members(i)[1].decode("utf-8", "replace").strip()

    def load(self, i):
        try:
            img, txt, img_size, txt_size = self._members(i)
            if len(img) != img_size or len(txt) != txt_size:  # no caption, or the shard was cut short
                return None, None
            return to_rgb(Image.open(io.BytesIO(img))), txt.decode("utf-8").strip()
        except DECODE_ERRORS:
            return None, None

    caption_set = FolderSource.caption_set  # open-ended too

    def fingerprint(self):
        summary = json.load(open(os.path.join(self.index_dir, "summary.json")))
        return hashlib.sha256(json.dumps([summary[os.path.abspath(t)] + [t] for t in self.tars]).encode()).hexdigest()


def _files(root):
    """Every file under root, sorted, without entering a linked directory (a link to `.` or `..`
    would list the same files again, or forever); linked files are listed."""
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def open_source(data: str, seed: int = 0, index_dir=None, flag="--data"):
    """--data PATH -> a source: "shapes", a folder, a .tar file, or a folder/glob of .tar files;
    one whose first images cannot be read is refused here, before a run writes anything."""
    if data == "shapes":
        return ShapesSource(seed)
    tars = (sorted(glob.glob(data)) if any(c in data for c in "*?[") else [data] if data.endswith(".tar")
            else [p for p in _files(data) if p.endswith(".tar")] if os.path.isdir(data) else [])
    if tars:
        source = TarSource(tars, index_dir)
    elif os.path.isdir(data):
        pairs = [(p, os.path.splitext(p)[0] + ".txt") for p in _files(data) if os.path.splitext(p)[1].lower() in IMAGE_EXTS]
        source = FolderSource([(p, txt) for p, txt in pairs if os.path.exists(txt)])
    else:
        raise FileNotFoundError(f"{flag} {data!r}: not 'shapes', a folder of images with .txt captions, or .tar shards")
    if not len(source):
        raise FileNotFoundError(f"{flag} {data!r}: no image with a same-named .txt caption found")
    next_readable(source, 0, f"{flag} {data!r}")
    return source


def next_readable(source, i, where="--data"):
    """-> (image, caption, skipped): the first readable example from i in index order (the fixed
    replacement rule), after `skipped` unreadable ones; more than MAX_SKIPPED in a row: a fault."""
    for skipped in range(min(MAX_SKIPPED + 1, len(source))):
        img, caption = source.load((i + skipped) % len(source))
        if img is not None:
            return img, caption, skipped
    what = f"its {len(source)} images" if len(source) <= MAX_SKIPPED else f"{MAX_SKIPPED + 1} images in a row"
    raise cli.UserError(f"{where}: none of {what} can be read (the first: {source.name(i)}): check that they are "
                        "images with UTF-8 .txt captions; replace or remove them")


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; an image with transparency (RGBA, LA, a palette with a transparent colour) is
    composited on white, not left as whatever colour lies under its alpha.
    paper: not specified; white, the usual background of transparent product and clip-art images.
    16-bit grey (PNG's I;16, or I) keeps its top 8 bits: convert() would clip it at 255, to white."""
    img.load()
    if img.mode.startswith("I"):
        img = Image.fromarray((np.asarray(img).clip(0, 65535) >> 8).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shortest side to `size`, centre square (paper: not specified; improved-diffusion's)."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_array(img: Image.Image) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1], (H, W, 3)."""
    return np.asarray(img, np.float32) / 127.5 - 1.0


def preprocess(img: Image.Image, stage, rng: np.random.Generator):
    """An image -> (x0 at stage.train_side, low-res conditioning image or None).

    The image is brought to the stage's side (center_crop). A stage that trains on crops
    (256->1024, §2.5) takes a train_side crop (paper: not specified where: uniformly random);
    the low-res input is that crop down-sampled (paper: not specified how: PIL bicubic)."""
    img = center_crop(img, stage.side)
    if stage.train_side < stage.side:
        x, y = rng.integers(0, stage.side - stage.train_side + 1, 2)
        img = img.crop((x, y, x + stage.train_side, y + stage.train_side))
    lowres = None
    if stage.lowres_side:
        low = stage.train_lowres_side
        lowres = to_array(img.resize((low, low), Image.BICUBIC))
    return to_array(img), lowres


# ---------------------------------------------------------------------------------------------
# The per-host stream (Grain)
# ---------------------------------------------------------------------------------------------

def stream_index(k: int, batch: int, process_index: int, process_count: int) -> int:
    """The k-th example of this host's share of the stream. The stream is cut into global
    batches of batch x process_count examples; host h reads the h-th block of `batch` in each,
    so P hosts together read exactly what one process holding all devices would."""
    step, j = divmod(k, batch)
    return (step * process_count + process_index) * batch + j


@dataclasses.dataclass(frozen=True)
class _Example:
    """Host stream position k -> one preprocessed example (runs in the decode workers)."""
    source: object
    order: object  # global stream position -> example index (a Grain MapDataset)
    stage: object
    batch: int
    process_index: int
    process_count: int
    seed: int

    def __call__(self, k):
        i = int(self.order[stream_index(k, self.batch, self.process_index, self.process_count)])
        img, caption, skipped = next_readable(self.source, i)
        tried, i = i, (i + skipped) % len(self.source)
        x0, low = preprocess(img, self.stage, np.random.default_rng([self.seed, i, k + 1]))
        out = {"image": x0, "caption": caption, "index": i, "tried": tried, "skipped": skipped}
        return out | ({"lowres": low} if low is not None else {})


def _stack(examples):
    return {k: [e[k] for e in examples] if k == "caption" else np.stack([e[k] for e in examples]) for k in examples[0]}


def host_stream(source, stage, batch: int, position: int, seed: int, process_index: int = 0,
                process_count: int = 1, workers: int = 0, prefetch: bool = True):
    """An iterator of this host's batches from its `position` (examples read so far): dicts of
    image (B, s, s, 3), lowres, caption (a list), index, tried and skipped (the example tried
    first, and how many in a row from it were unreadable and replaced); each
    batch moves the position on by `batch`. workers > 0: decoding in that many processes;
    else in 2 threads of this one (prefetch=False: none, for a single batch)."""
    order = grain.MapDataset.range(len(source))
    order = (order if source.kind == "shapes" else order.shuffle(seed)).repeat()  # each epoch shuffled anew
    ds = grain.MapDataset.range(position, sys.maxsize).map(
        _Example(source, order, stage, batch, process_index, process_count, seed))
    threads = 1 if workers else 2 if prefetch else 0
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch if threads else 0))
    if workers:
        if not flags.FLAGS.is_parsed():  # Grain's worker start reads an absl flag: outside absl.app, defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=batch))
    return iter(it.batch(batch, batch_fn=_stack))


# ---------------------------------------------------------------------------------------------
# python data.py: time the loader alone; write a synthetic img2dataset-layout set
# ---------------------------------------------------------------------------------------------

def write_synthetic_shards(out_dir, entries: int, shards: int, side: int = 256, seed: int = 0):
    """img2dataset's layout (NNNNN.tar holding NNNNNNNNN.jpg + .txt) from the shapes dataset,
    for measuring the loader and for tests. One scene per shard (every entry is decoded anew)."""
    os.makedirs(out_dir, exist_ok=True)
    per = -(-entries // shards)
    for s in range(shards):
        img, caption, _, _ = shapes.make_example(seed, s, side)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        with tarfile.open(os.path.join(out_dir, f"{s:05d}.tar"), "w") as tf:
            for j in range(s * per, min(entries, (s + 1) * per)):
                for ext, payload in ((".jpg", buf.getvalue()), (".txt", f"{caption} #{j}".encode())):
                    info = tarfile.TarInfo(f"{j:09d}{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="'shapes', a folder of images + .txt, or .tar shards")
    p.add_argument("--preset", choices=list(imagen.PRESETS), default="paper")
    p.add_argument("--stage", choices=list(imagen.STAGE_NAMES), default="base")
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="this host's batch")
    p.add_argument("--batches", type=cli.positive_int, default=20)
    p.add_argument("--data-workers", type=cli.nonnegative_int, default=0)
    p.add_argument("--index-dir", default=None)
    p.add_argument("--write-synthetic", type=cli.nonnegative_int, default=0, metavar="ENTRIES",
                   help="first write ENTRIES synthetic examples to --data in --shards shards")
    p.add_argument("--shards", type=cli.positive_int, default=100)
    p.add_argument("--side", type=cli.positive_int, default=256, help="--write-synthetic: image side")
    a = p.parse_args(argv)
    if a.write_synthetic:
        t = time.time()
        write_synthetic_shards(a.data, a.write_synthetic, a.shards, a.side)
        print(f"wrote {a.write_synthetic} examples in {a.shards} shards to {a.data} in {time.time() - t:.1f} s")
    stage = imagen.PRESETS[a.preset][a.stage]
    t = time.time()
    source = open_source(a.data, 0, a.index_dir)
    startup = time.time() - t
    print(f"opened {len(source)} examples in {startup:.2f} s")
    stream = host_stream(source, stage, a.batch_size, 0, 0, workers=a.data_workers)
    next(stream)  # the workers' start-up and the first batch
    first = time.time() - t - startup
    t = time.time()
    skipped = sum(int(next(stream)["skipped"].sum()) for _ in range(a.batches))
    dt = time.time() - t
    stream.close()
    rec = {"examples": len(source), "stage": a.stage, "side": stage.train_side, "workers": a.data_workers,
           "batch": a.batch_size, "startup_s": round(startup, 3), "first_batch_s": round(first, 2),
           "img_per_s": round(a.batch_size * a.batches / dt, 1), "skipped": skipped}
    print(f"{rec['img_per_s']} images/s at {stage.train_side}x{stage.train_side} with {a.data_workers} workers")
    print(json.dumps(rec))


if __name__ == "__main__":
    cli.run(main)
