"""The demo's synthetic captioned-shapes dataset, and a deterministic detector that scores how
well an image matches its caption (colour, count, position), like DrawBench's skills
(Saharia et al. 2022, §3, App. C, Table A.1: DrawBench's Colors, Counting, Positional).

Images: white background, one to three non-overlapping solid shapes (circle, square,
triangle) in a palette of six colours. Captions: lower-case English from a small grammar:
  colour   "a red circle", "an orange square"
  count    "two blue squares", "three yellow triangles"
  position "a red circle on the left of a blue square" (also right of / above / below)
Layouts are near-fixed templates (every coordinate +- 1/32 of the side): position scenes
place the two objects at 1/4 and 3/4 of the side along the relation's axis; colour and count
scenes put one, two or three shapes in a row across the middle.
Every example is a pure function of (seed, index): the dataset is deterministic per seed.
One caption in ten (by a hash of its text) is held out of training and used only for
evaluation, so the demo's alignment is measured on prompts the model never saw.
"""

import zlib

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {  # RGB
    "red": (220, 40, 40), "green": (40, 160, 70), "blue": (40, 80, 220),
    "yellow": (230, 200, 40), "purple": (140, 60, 170), "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("on the left of", "on the right of", "above", "below")
OPPOSITE = {"on the left of": "on the right of", "on the right of": "on the left of",
            "above": "below", "below": "above"}
KINDS = ("colour", "count", "position")
# how often random_spec draws each kind: half the scenes are position scenes, the skill that
# needs the most examples; see docs/demo_experiments.md#layout-templates
KIND_WEIGHTS = (1 / 6, 1 / 3, 1 / 2)


def _plural(shape, n):
    return shape if n == 1 else shape + "s"


def _a(colour, shape):
    """ "a red circle", "an orange square": the article the colour word takes."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def caption_of(spec) -> str:
    """A scene spec -> its caption (the grammar of the module docstring)."""
    if spec["kind"] == "colour":
        (c, s), = spec["objects"]
        return _a(c, s)
    if spec["kind"] == "count":
        c, s = spec["objects"][0]
        return f"{NUMBERS[len(spec['objects'])]} {c} {_plural(s, len(spec['objects']))}"
    (c1, s1), (c2, s2) = spec["objects"]
    return f"{_a(c1, s1)} {spec['relation']} {_a(c2, s2)}"


def parse_caption(caption: str) -> dict:
    """A caption of this grammar -> its scene spec (the inverse of caption_of)."""
    words = caption.split()
    for rel in RELATIONS:
        if f" {rel} " in caption:
            left, right = caption.split(f" {rel} ")
            (_, c1, s1), (_, c2, s2) = left.split(), right.split()
            return {"kind": "position", "objects": [(c1, s1), (c2, s2)], "relation": rel}
    if words[0] in ("a", "an"):
        return {"kind": "colour", "objects": [(words[1], words[2])]}
    n = {v: k for k, v in NUMBERS.items()}[words[0]]
    return {"kind": "count", "objects": [(words[1], words[2].rstrip("s"))] * n}


def swap_relation(caption: str) -> str:
    """A position caption with the opposite relation: "a red circle above a blue square" ->
    "a red circle below a blue square" (the same objects, the other way round)."""
    spec = parse_caption(caption)
    return caption.replace(f" {spec['relation']} ", f" {OPPOSITE[spec['relation']]} ")


def all_captions() -> list[str]:
    """Every caption of the grammar, in a fixed order: 18 colour, 36 count and 1080 position
    captions (1134; random_spec draws each of them)."""
    colours, out = list(PALETTE), []
    for c in colours:
        for s in SHAPES:
            out += [_a(c, s)] + [f"{NUMBERS[n]} {c} {_plural(s, n)}" for n in (2, 3)]
    for c1 in colours:
        for c2 in colours:
            if c1 != c2:
                out += [f"{_a(c1, s1)} {rel} {_a(c2, s2)}" for s1 in SHAPES for s2 in SHAPES for rel in RELATIONS]
    return out


def random_spec(rng) -> dict:
    kind = KINDS[rng.choice(len(KINDS), p=KIND_WEIGHTS)]
    colours, shapes = list(PALETTE), list(SHAPES)
    if kind == "colour":
        return {"kind": kind, "objects": [(colours[rng.integers(6)], shapes[rng.integers(3)])]}
    if kind == "count":
        n = int(rng.integers(2, 4))
        return {"kind": kind, "objects": [(colours[rng.integers(6)], shapes[rng.integers(3)])] * n}
    c1, c2 = rng.choice(6, 2, replace=False)
    s1, s2 = rng.integers(3), rng.integers(3)
    return {"kind": kind, "objects": [(colours[c1], shapes[s1]), (colours[c2], shapes[s2])],
            "relation": RELATIONS[rng.integers(4)]}


def _boxes(spec, rng, size):
    """Non-overlapping square boxes (x0, y0, side), one per object, at near-fixed places: a
    template for each kind of caption, every coordinate moved by up to 1/32 of the side.
    Little jitter, so that the mean image of a caption is sharp and the demo learns
    its layout (with free layouts the base does not learn which colour goes on which side, nor
    two from three, in the demo's budget: docs/demo_experiments.md#layout-templates)."""
    side, j = size // 4, size // 32
    if spec["kind"] == "position":
        # along the relation's axis the first object's centre is at 1/4 or 3/4 of the side and
        # the second's at the other; across it both are at 1/2
        rel = spec["relation"]
        near, far, mid = size // 4, 3 * size // 4, size // 2
        a, b = (near, far) if rel in ("on the left of", "above") else (far, near)
        centres = [(a, mid), (b, mid)] if rel in ("on the left of", "on the right of") else [(mid, a), (mid, b)]
    else:
        # colour and count scenes: one, two or three shapes in a row across the middle (three
        # stay inside the image and leave a gap of at least 1/32 of the side between them)
        xs = {1: [size // 2], 2: [size // 4, 3 * size // 4],
              3: [side // 2 + j, size // 2, size - side // 2 - j]}[len(spec["objects"])]
        centres = [(x, size // 2) for x in xs]
    return [(x - side // 2 + int(rng.integers(-j, j + 1)), y - side // 2 + int(rng.integers(-j, j + 1)), side)
            for x, y in centres]


def draw(spec, boxes, size) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for (colour, shape), (x, y, s) in zip(spec["objects"], boxes):
        fill = PALETTE[colour]
        if shape == "circle":
            d.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
        elif shape == "square":
            d.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
        else:
            d.polygon([(x + s / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
    return img


def is_heldout(caption: str) -> bool:
    """The evaluation split: captions whose CRC-32 is divisible by 10 (never trained on)."""
    return zlib.crc32(caption.encode()) % 10 == 0


def training_captions() -> list[str]:
    """The captions make_example(split="train") draws: all_captions() but the held-out ones (1009)."""
    return [c for c in all_captions() if not is_heldout(c)]


def make_example(seed: int, index: int, size: int = 128, split: str = "train"):
    """Example `index` of the dataset of `seed`: (PIL image, caption, spec, boxes).
    split "train" never gives a held-out caption, split "heldout" only gives those."""
    rng = np.random.default_rng([seed, index])
    spec = random_spec(rng)
    while is_heldout(caption_of(spec)) != (split == "heldout"):
        spec = random_spec(rng)
    boxes = _boxes(spec, rng, size)
    return draw(spec, boxes, size), caption_of(spec), spec, boxes


# ---------------------------------------------------------------------------------------------
# The detector: pixel statistics and connected components
# ---------------------------------------------------------------------------------------------

def _components(mask):
    """4-connected components of a boolean mask -> list of (N, 2) arrays of (y, x)."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pix))
    return out


def detect(image) -> list[dict]:
    """Objects in an image: a pixel with chroma (max - min channel) below 60 is background
    (white, or the grey / tinted backgrounds of imperfect samples: every palette colour has
    chroma >= 110); every other pixel goes to the palette colour whose line from white passes
    nearest to it (an edge pixel is a shape's colour blended with the white background: half
    orange and half white is nearer to yellow than to orange, but on orange's line); connected
    components of at least 1% of the image are objects, with a colour, a centroid and a shape
    guessed from how much of its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5)."""
    x = np.asarray(image.convert("RGB"), np.float32) - 255.0  # relative to white
    H, W, _ = x.shape
    d = np.array(list(PALETTE.values()), np.float32) - 255.0  # white -> each palette colour
    a = np.maximum((x @ d.T) / (d * d).sum(-1), 0)  # how far along each line (1 = the colour)
    label = np.argmin(((x[:, :, None, :] - a[..., None] * d) ** 2).sum(-1), axis=-1) + 1
    label[x.max(-1) - x.min(-1) < 60] = 0  # 0 = background (chroma is the same relative to white)
    objects = []
    for k, name in enumerate(PALETTE, start=1):
        for pix in _components(label == k):
            if len(pix) < 0.01 * H * W:
                continue
            (y0, x0), (y1, x1) = pix.min(0), pix.max(0)
            fill = len(pix) / ((y1 - y0 + 1) * (x1 - x0 + 1))
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            objects.append({"colour": name, "shape": shape, "cy": pix[:, 0].mean() / H,
                            "cx": pix[:, 1].mean() / W, "area": len(pix) / (H * W)})
    return objects


def score(image, caption) -> dict:
    """Does the image show its caption? -> {"colour": bool, "count": bool | None,
    "position": bool | None}. colour: exactly the caption's colours are present; count (count
    captions): the number of objects of that colour equals the caption's number; position
    (position captions): the two objects' centroids are in the named relation."""
    spec = parse_caption(caption)
    objs = detect(image)
    wanted = {c for c, _ in spec["objects"]}
    result = {"colour": {o["colour"] for o in objs} == wanted, "count": None, "position": None}
    if spec["kind"] == "count":
        c = spec["objects"][0][0]
        result["count"] = sum(o["colour"] == c for o in objs) == len(spec["objects"])
    if spec["kind"] == "position":
        (c1, _), (c2, _) = spec["objects"]
        a = max((o for o in objs if o["colour"] == c1), key=lambda o: o["area"], default=None)
        b = max((o for o in objs if o["colour"] == c2), key=lambda o: o["area"], default=None)
        if a is None or b is None:
            result["position"] = False
        else:
            dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
            result["position"] = bool({"on the left of": dx < 0 and abs(dx) > abs(dy) * 0.5,
                                  "on the right of": dx > 0 and abs(dx) > abs(dy) * 0.5,
                                  "above": dy < 0 and abs(dy) > abs(dx) * 0.5,
                                  "below": dy > 0 and abs(dy) > abs(dx) * 0.5}[spec["relation"]])
    return result
