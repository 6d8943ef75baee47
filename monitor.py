"""Watching a long run (train.py): a held-out loss by noise level, samples of fixed prompts with
fixed noise, and TensorBoard.

A paper stage trains for days (§4.1: 2.5M steps); a run that "only produces noise" shows in
samples long before it shows in the loss. So, while it trains:
- every eval_every steps, the EMA weights' loss on a held-out set (examples never trained on),
  in buckets of noise level with the same draws each time (heldout_loss_fn);
- every sample_every steps, the EMA weights sample the held-out set's first prompts (a
  super-resolution stage: upsamples their real low-res images) with fixed noise, into
  WORKDIR/samples/step_NNNNNNN.png, so a change between two grids is the model's;
- both, and the training scalars, to metrics.jsonl and to TensorBoard (WORKDIR/tensorboard,
  through tensorboardX: a pure-Python writer of TensorBoard's event files, no TensorFlow).

The held-out set is made once per workdir (WORKDIR/heldout.npz: images, low-res inputs, caption
embeddings), so a resumed run measures the same examples without loading the text encoder.
"""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

import data
import diffusion
import imagen
import shapes
import t5_encoder
import text_encoders

HELDOUT_BUCKETS = 8  # paper: not specified (it reports no held-out loss); t in 8 equal slices
HELDOUT_SIZE = 64  # held-out examples (the loss); the first SAMPLE_COUNT are also sampled
SAMPLE_COUNT = 8
# bf16 dense peak TFLOP/s per chip (vendor datasheets), for the MFU of a run in bfloat16
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "TPU v4": 275, "TPU v5p": 459, "TPU v5 lite": 197}
HELDOUT_SEED = 2000  # the shapes dataset's held-out captions, drawn with seeds no run trains on


# ---------------------------------------------------------------------------------------------
# The held-out loss
# ---------------------------------------------------------------------------------------------

def heldout_loss_fn(stage, tcfg, buckets=HELDOUT_BUCKETS, seed=0):
    """-> a jitted (params, batch) -> (buckets,) held-out loss: the batch (image, text_emb,
    text_mask, and lowres for a super-resolution stage) at `buckets` noise levels, t in equal
    slices [k/K, (k+1)/K) of [0, 1] (so each a range of log-SNR: the loss differs by orders of
    magnitude across them), the text always kept. Every call draws the same times and noise,
    so two calls differ only by the weights."""
    graphdef, _ = nnx.split(imagen.abstract_network(stage))
    log_snr_fn = diffusion.SCHEDULES[stage.schedule]

    def f(params, batch):
        model = nnx.merge(graphdef, params)
        B = batch["image"].shape[0]
        lowres = batch["lowres"] if stage.lowres_side else None

        def at(k):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), k)
            t_B = (k + jax.random.uniform(key, (B,))) / buckets
            keys = jax.random.split(jax.random.fold_in(key, 1), B)
            return diffusion.diffusion_loss(model, batch["image"], batch["text_emb"], batch["text_mask"], keys,
                                            log_snr_fn, 0.0, lowres, tcfg.max_aug_level, stage.prediction, t_B)
        return jax.lax.map(at, jnp.arange(buckets))  # one network in the program, run K times
    return jax.jit(f)


def bucket_log_snrs(stage, buckets=HELDOUT_BUCKETS):
    """The log-SNR at the middle of each held-out bucket (its label), highest (least noise) first."""
    log_snr_fn = diffusion.SCHEDULES[stage.schedule]
    return [round(float(log_snr_fn(jnp.float32((k + 0.5) / buckets))), 2) for k in range(buckets)]


# ---------------------------------------------------------------------------------------------
# The held-out set
# ---------------------------------------------------------------------------------------------

def open_heldout_data(workdir, heldout_spec, index_dir=None):
    """--heldout-data opened, and so checked, before a run writes anything; None where none is
    given or WORKDIR/heldout.npz holds the held-out set already (a resumed run reads only that)."""
    if heldout_spec and not os.path.exists(os.path.join(workdir, "heldout.npz")):
        return data.open_source(heldout_spec, index_dir=index_dir, flag="--heldout-data")
    return None


def heldout_examples(data_spec, heldout_source=None, n=HELDOUT_SIZE, side=128):
    """[(PIL image, caption)] never trained on: the first n readable examples of heldout_source
    (open_heldout_data's), else for the shapes dataset its held-out captions (shapes.is_heldout);
    None for another dataset without a held-out one."""
    if heldout_source is not None:
        pairs = (heldout_source.load(i) for i in range(len(heldout_source)))
        return list(itertools.islice(((img, cap) for img, cap in pairs if img is not None), n))
    if data_spec == "shapes":
        return [shapes.make_example(HELDOUT_SEED, i, side, split="heldout")[:2] for i in range(n)]
    return None


def heldout_set(stage, examples, encoder, tokenizer):
    """Held-out examples -> the batch heldout_loss_fn takes (each image cut as the stage trains:
    a fixed crop where it trains on crops, and its low-res input), its captions, and for the
    samples the whole low-res images (a super-resolution stage upsamples those)."""
    rng = np.random.default_rng(0)
    examples = [(data.to_rgb(img), cap) for img, cap in examples]
    pairs = [data.preprocess(img, stage, rng) for img, _ in examples]
    captions = [cap for _, cap in examples]
    emb, mask = t5_encoder.encode(encoder, tokenizer, captions, stage.text_length, warn=False)
    out = {"image": np.stack([x for x, _ in pairs]), "text_emb": np.asarray(emb, np.float32),
           "text_mask": np.asarray(mask), "caption": np.array(captions)}
    if stage.lowres_side:
        low = stage.lowres_side
        out["lowres"] = np.stack([lo for _, lo in pairs])
        whole = [data.center_crop(img, stage.side).resize((low, low), Image.BICUBIC) for img, _ in examples[:SAMPLE_COUNT]]
        out["sample_lowres"] = np.stack([data.to_array(img) for img in whole])
    return out


def load_heldout(workdir, stage, data_spec, heldout_source=None, n=HELDOUT_SIZE):
    """WORKDIR/heldout.npz, made the first time (the text encoder loaded for it then only);
    None where the dataset has no held-out examples and none is given."""
    path = os.path.join(workdir, "heldout.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return dict(f)
    examples = heldout_examples(data_spec, heldout_source, n, stage.side)
    if not examples:
        return None
    encoder, tokenizer = text_encoders.load_text_encoder(stage.text_encoder)
    out = heldout_set(stage, examples, encoder, tokenizer)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **out)
        os.replace(tmp, path)
    return out


def loss_batch(heldout):
    """The arrays heldout_loss_fn reads."""
    return {k: v for k, v in heldout.items() if k in ("image", "text_emb", "text_mask", "lowres")}


# ---------------------------------------------------------------------------------------------
# Samples with fixed noise
# ---------------------------------------------------------------------------------------------

def sampler(stage, heldout, settings=None, seed=0):
    """-> (params -> uint8 images (SAMPLE_COUNT, side, side, 3)): the stage's default sampling
    (imagen.default_sampling) of the held-out set's first prompts, with the same noise at every
    call; one compiled loop (imagen's), run wherever the weights are (the training mesh)."""
    s = settings or imagen.default_sampling(stage)
    n = min(SAMPLE_COUNT, len(heldout["caption"]))
    txt, mask = jnp.asarray(heldout["text_emb"][:n]), jnp.asarray(heldout["text_mask"][:n])
    lowres = jnp.asarray(heldout["sample_lowres"][:n]) if stage.lowres_side else None
    graphdef, _ = nnx.split(imagen.abstract_network(stage))
    shape = (n, stage.side, stage.side, stage.unet.in_channels)
    run = imagen._sampler(graphdef, stage.schedule, stage.prediction, shape, s.guidance != 1.0, s.steps, s.sampler,
                          s.gamma, s.threshold, s.p)
    key = jax.random.PRNGKey(seed)
    return lambda params: imagen.to_uint8(jnp.clip(run(params, key, txt, mask, lowres, jnp.float32(s.guidance),
                                                       jnp.float32(s.aug_level)), -1.0, 1.0))


def save_grid(workdir, step, images):
    """The images in one row, WORKDIR/samples/step_NNNNNNN.png (written whole, then renamed) -> its path."""
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    Image.fromarray(np.concatenate(list(images), axis=1)).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    return path


def peak_tflops(stage):
    """The devices' summed peak where known (a bfloat16 run on a listed chip), else None."""
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    return peak * jax.device_count() if peak and stage.unet.dtype == "bfloat16" else None


def train_seconds(workdir, step):
    """The seconds spent training up to `step` by earlier runs on workdir (from metrics.jsonl)."""
    seconds = 0.0
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if rec.get("step", step + 1) <= step and "train_seconds" in rec:
                    seconds = max(seconds, rec["train_seconds"])
    except FileNotFoundError:
        pass
    return seconds


# ---------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------

def open_writer(workdir, start_step):
    """A TensorBoard writer on WORKDIR/tensorboard (process 0 only; None elsewhere, or without
    tensorboardX, said once). A resumed run purges what was logged after its checkpoint, so
    TensorBoard shows each step once."""
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional)
    except ImportError:
        print("TensorBoard logging is off: tensorboardX is not installed (pip install tensorboardX); "
              "metrics.jsonl and WORKDIR/samples have every number and image")
        return None
    return SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None)


def write(writer, rec, images=None):
    """A metrics.jsonl record's numbers (and a sample grid) to TensorBoard at its step."""
    if writer is None:
        return
    step = rec["step"]
    for k, v in rec.items():
        if k == "heldout_by_log_snr":
            for snr, loss in v.items():
                writer.add_scalar(f"heldout_loss/log_snr_{snr}", loss, step)
        elif k != "step" and isinstance(v, (int, float)):
            writer.add_scalar(k if k.startswith("heldout") else f"train/{k}", v, step)
    if images is not None:
        writer.add_image("samples", np.concatenate(list(images), axis=1), step, dataformats="HWC")
    writer.flush()
