"""Training data for the three stages: image-caption sources, preprocessing, host batches.

Saharia et al. 2022, §4.1 trains on ~860M image-text pairs (internal data + LAION-400M); the
super-resolution models get their low-resolution input by down-sampling, and the 256->1024
model trains on 64->256 random crops of the 1024 images (§2.5). Sources:
  - a folder of images with same-named .txt captions (a.jpg + a.txt), searched recursively;
  - WebDataset-style .tar shards (what img2dataset writes for LAION: NNNN.jpg + NNNN.txt),
    read with the standard library's tarfile;
  - "shapes": the built-in synthetic captioned-shapes dataset of the demo (shapes.py).
An unreadable or corrupt image is skipped and counted, never fatal. In a multi-host run each
host reads only its own share: block h of every global batch (h = jax.process_index()).
"""

import dataclasses
import glob
import io
import os
import tarfile

import numpy as np
from PIL import Image

import shapes
import t5_encoder

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclasses.dataclass
class Source:
    """An indexable list of examples: kind "folder" | "tar" | "shapes"."""
    kind: str
    items: list  # folder: (image path, caption path); tar: (tar path, image member, caption member)
    seed: int = 0  # shapes: the dataset seed

    def __len__(self):
        return len(self.items) if self.kind != "shapes" else 2 ** 31 - 1  # shapes: unbounded

    def caption(self, i: int) -> str:
        if self.kind == "shapes":
            return shapes.make_example(self.seed, i)[1]
        if self.kind == "folder":
            with open(self.items[i][1], encoding="utf-8") as f:
                return f.read().strip()
        tar_path, _, txt = self.items[i]
        with tarfile.open(tar_path) as tf:
            return tf.extractfile(txt).read().decode("utf-8").strip()

    def load(self, i: int):
        """-> (PIL RGB image or None if it cannot be decoded, caption)."""
        if self.kind == "shapes":
            img, caption, _, _ = shapes.make_example(self.seed, i)
            return img, caption
        try:
            if self.kind == "folder":
                img, caption = Image.open(self.items[i][0]), self.caption(i)
            else:  # one open of the shard for both members
                tar_path, member, txt = self.items[i]
                with tarfile.open(tar_path) as tf:
                    img = Image.open(io.BytesIO(tf.extractfile(member).read()))
                    caption = tf.extractfile(txt).read().decode("utf-8").strip()
            img = img.convert("RGB")  # forces decoding: a truncated file fails here
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return None, None
        return img, caption


def open_source(data: str, seed: int = 0) -> Source:
    """--data PATH -> a Source: "shapes", a folder, a .tar file, or a folder/glob of .tar files."""
    if data == "shapes":
        return Source("shapes", [], seed)
    tars = (sorted(glob.glob(data)) if any(c in data for c in "*?[") else [data] if data.endswith(".tar")
            else sorted(glob.glob(os.path.join(data, "**", "*.tar"), recursive=True)) if os.path.isdir(data) else [])
    if tars:
        items = []
        for tar_path in tars:
            with tarfile.open(tar_path) as tf:
                names = {m.name for m in tf.getmembers() if m.isfile()}
            for name in sorted(names):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTS and stem + ".txt" in names:
                    items.append((tar_path, name, stem + ".txt"))
        kind = "tar"
    elif os.path.isdir(data):
        items = []
        for path in sorted(glob.glob(os.path.join(data, "**", "*"), recursive=True)):
            stem, ext = os.path.splitext(path)
            if ext.lower() in IMAGE_EXTS and os.path.exists(stem + ".txt"):
                items.append((path, stem + ".txt"))
        kind = "folder"
    else:
        raise FileNotFoundError(f"--data {data!r}: not 'shapes', a folder of images with .txt "
                                f"captions, or .tar shards")
    if not items:
        raise FileNotFoundError(f"--data {data!r}: no image with a same-named .txt caption found")
    return Source(kind, items)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shortest side to `size`, then crop the centre square."""
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

    The image is brought to the stage's output side (shortest side + centre crop). A stage
    that trains on crops (256->1024, §2.5) takes a random train_side crop; the low-res input
    is that crop down-sampled by side / lowres_side (bicubic, antialiased by PIL)."""
    img = center_crop(img, stage.side)
    if stage.train_side < stage.side:
        x, y = rng.integers(0, stage.side - stage.train_side + 1, 2)
        img = img.crop((x, y, x + stage.train_side, y + stage.train_side))
    lowres = None
    if stage.lowres_side:
        low = stage.train_lowres_side
        lowres = to_array(img.resize((low, low), Image.BICUBIC))
    return to_array(img), lowres


def stream_index(k: int, batch: int, process_index: int, process_count: int) -> int:
    """The k-th example of this host's share of the stream. The stream is cut into global
    batches of batch x process_count examples; host h reads the h-th block of `batch` in each,
    so P hosts together read exactly what one process holding all devices would."""
    step, j = divmod(k, batch)
    return (step * process_count + process_index) * batch + j


def example_index(source: Source, n: int, seed: int) -> int:
    """Position n of the stream -> example index: a new permutation each epoch (shapes: n)."""
    if source.kind == "shapes":
        return n
    epoch, i = divmod(n, len(source))
    return int(np.random.default_rng([seed, epoch]).permutation(len(source))[i])


def host_batch(source: Source, stage, batch: int, position: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    """This host's `batch` examples, read from its share of the stream starting at its
    `position`. Corrupt images are skipped (and counted). Returns (images, lowres or None,
    captions, example indices, new position, number skipped)."""
    images, lows, captions, indices, skipped = [], [], [], [], 0
    while len(images) < batch:
        i = example_index(source, stream_index(position, batch, process_index, process_count), seed)
        position += 1
        img, caption = source.load(i)
        if img is None:
            skipped += 1
            if skipped > 100 + 10 * batch:
                raise RuntimeError(f"more than {skipped} unreadable images in a row: check --data")
            continue
        x0, low = preprocess(img, stage, np.random.default_rng([seed, i, position]))
        images.append(x0), lows.append(low), captions.append(caption), indices.append(i)
    lowres = np.stack(lows) if stage.lowres_side else None
    return np.stack(images), lowres, captions, np.array(indices), position, skipped


def load_text_encoder(name: str):
    """The text encoder a stage config names -> (encoder, tokenizer): a T5 v1.1 checkpoint
    directory (t5_encoder.load_t5), or "demo-t5", the demo's random encoder, whose output
    whitening is fitted on the demo dataset's training captions (the shapes grammar's, held-out
    ones excluded)."""
    texts = [c for c in shapes.all_captions() if not shapes.is_heldout(c)] if name == "demo-t5" else None
    return t5_encoder.load_text_encoder(name, whitening_texts=texts)
