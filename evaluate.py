"""Evaluate a cascade as the paper does: zero-shot COCO FID and CLIP score per guidance weight
(the Pareto curves), and DrawBench grids.

Saharia et al. 2022, §3 / Table 1: zero-shot FID-30K on COCO at 256x256, "30K prompts are drawn
randomly from the validation set, and the model samples generated on these prompts are compared
with reference images from the full validation set", w = 1.35 (64x64) / 8.0 (super-resolution);
§3, Figs. A.8, A.11, A.13: CLIP score against FID-10K over the guidance weights PAPER_GUIDANCE
(one list for the base, another for the 64->256 model); §3 / App. C: DrawBench is judged by
human raters, out of scope here: the grids are for people, the CLIP score per category a proxy.

  python evaluate.py --workdir runs/paper --coco data/coco --inception ckpt/pt_inception-2015-12-05-6726825d.pth \
      --clip ckpt/clip-vit-large-patch14 --out runs/paper/eval                 # Table 1: FID-30K
  python evaluate.py --workdir runs/paper --coco data/coco ... --stages 1 --num 10000 --guidance paper
      # Figs. A.8 / A.13: the 64x64 base alone, FID-10K at 64x64
  python evaluate.py --workdir runs/paper --coco data/coco ... --stages 2 --sweep-stage sr1 --num 10000 \
      --guidance paper                                                     # Fig. A.11: 64->256, at 256x256
  python evaluate.py --workdir runs/demo --drawbench [--clip DIR]

Metrics come from the field's standard code: FID from torch-fidelity (its TF-ported Inception-v3,
features of the 2048-d pool layer, its Frechet distance), the CLIP score as GLIDE and torchmetrics
compute it, 100 x cos(image, text) per pair, its mean clamped at 0, with transformers' CLIP. One image
pipeline for both sides: decoded to RGB, the shortest side resized (PIL bicubic, antialiased)
and centre-cropped to the samples' side, kept as uint8 (samples are written as PNG, lossless);
the extractors then apply their own resize (Inception: TF1-style bilinear to 299).
Writes OUT/<stage>_w<guidance>_<key>/NNNNN.png, key a digest of everything that decides the
images (settings.json inside: checkpoint steps, prompts, settings, seed, batch size; existing
images of the same key are kept: an interrupted run resumes; any change gives a new folder),
OUT/metrics.json, OUT/pareto.png and OUT/report.md.
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

import checkpoints
import cli
import data
import imagen
import sample

MAX_FID_SIDE = 256  # Table 1's side; the paper reports no FID of 1024x1024 samples
PAPER_GUIDANCE = {"base": (1, 1.25, 1.5, 1.75, 2, 3, 4, 5, 6, 7, 8, 9, 10),  # Figs. A.8, A.13 (64x64)
                  "sr1": (1, 3, 5, 7, 8, 10, 12, 15, 18)}  # Fig. A.11 (64->256)
# paper: not specified which COCO release ("the validation set", §3); COCO 2014 val, as GLIDE and
# DALL-E 2 report. paper: not specified which CLIP computes the CLIP score (§3 cites CLIPScore
# and CLIP); ViT-L/14, torchmetrics' default. paper: not specified which FID code; torch-fidelity.
DOWNLOADS = {
    "inception": "curl -L -o ckpt/pt_inception-2015-12-05-6726825d.pth "
                 "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "clip": "hf download openai/clip-vit-large-patch14 --local-dir ckpt/clip-vit-large-patch14",
    "coco": "curl -LO http://images.cocodataset.org/zips/val2014.zip && curl -LO "
            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip (unzip both into DIR)",
}


def _missing(what, path):
    name = {"inception": "the Inception-v3 weights", "clip": "the CLIP model", "coco": "COCO 2014 val"}[what]
    return SystemExit(f"{path} is missing: {name} are read from local files (nothing downloads at run "
                      f"time). Get them once, on a machine with network:\n  {DOWNLOADS[what]}")


# ---------------------------------------------------------------------------------------------
# One image pipeline
# ---------------------------------------------------------------------------------------------

def to_side(img: Image.Image, side: int) -> np.ndarray:
    """An image -> uint8 (side, side, 3): RGB, shortest side to `side`, centre crop."""
    return np.asarray(data.center_crop(data.to_rgb(img), side), np.uint8)


def read_images(paths, side):
    return np.stack([to_side(Image.open(p), side) for p in paths])


# ---------------------------------------------------------------------------------------------
# FID (torch-fidelity) and CLIP score (transformers)
# ---------------------------------------------------------------------------------------------

# the SHA-256 of torch-fidelity's published file; its first 8 digits are the 6726825d in the
# file's name (torch.hub's convention for checking a download)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


def load_inception(path):
    """torch-fidelity's Inception-v3 ("inception-v3-compat", the TF graph's weights) from a file.

    The file is read as tensors only (torch.load(weights_only=True): a file that would run code
    when unpickled is refused, not run) and handed to torch-fidelity re-saved from those tensors,
    as its own loader unpickles whatever it is given. A file that is not the published one
    (another SHA-256) still loads if it holds the weights, with a warning that its FID is not
    comparable with published ones."""
    if not path or not os.path.exists(path):
        raise _missing("inception", path or "--inception")
    import tempfile  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: PLC0415
    digest = sha256_file(path)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ValueError("not a state dict of tensors")
    except Exception as e:  # pickles that are not plain tensors, random bytes: torch raises many kinds
        raise cli.UserError(f"{path} is not the Inception-v3 weights file (not a state dict of tensors: "
                            f"{type(e).__name__}); nothing in it was run. Get the published file once, on a "
                            f"machine with network:\n  {DOWNLOADS['inception']}") from None
    if digest != INCEPTION_SHA256:
        print(f"warning: {path} is not torch-fidelity's published Inception-v3 file (SHA-256 {digest[:16]}...): "
              "its FID is not comparable with published FIDs", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        safe = os.path.join(tmp, "inception.pth")
        torch.save(weights, safe)
        try:
            return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=safe)
        except RuntimeError as e:  # load_state_dict: missing or mis-shaped tensors
            raise cli.UserError(f"{path} holds tensors, but not Inception-v3's ({str(e).splitlines()[0][:120]}): "
                                f"get the published file:\n  {DOWNLOADS['inception']}") from None


def inception_features(extractor, images_uint8, batch=64):
    """uint8 (N, H, W, 3) -> float32 (N, 2048) torch features of the pool layer."""
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(images_uint8), batch):
            x = torch.from_numpy(np.ascontiguousarray(images_uint8[i:i + batch].transpose(0, 3, 1, 2)))
            out.append(extractor(x)[0])
    return torch.cat(out)


def fid_statistics(features):
    from torch_fidelity.metric_fid import fid_features_to_statistics
    return fid_features_to_statistics(features)


def fid(stats_a, stats_b) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    return float(fid_statistics_to_metric(stats_a, stats_b, False)[KEY_METRIC_FID])


def reference_statistics(extractor, weights_path, paths, side, cache_dir):
    """FID statistics of the reference images, computed once and cached in cache_dir, keyed by
    the image set (names and sizes), the side and the extractor's weights file."""
    h = hashlib.sha256(json.dumps([side, os.path.basename(weights_path), os.path.getsize(weights_path)] +
                                  [[os.path.basename(p), os.path.getsize(p)] for p in paths]).encode())
    path = os.path.join(cache_dir, f"fid_reference_{h.hexdigest()[:16]}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return {"mu": z["mu"], "sigma": z["sigma"]}
    feats = []
    for i in tqdm(range(0, len(paths), 256), desc="reference images", unit="batch"):
        feats.append(inception_features(extractor, read_images(paths[i:i + 256], side)))
    import torch
    stats = fid_statistics(torch.cat(feats))
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path, **stats)
    return stats


def load_clip(path):
    if not path or not os.path.isdir(path):
        raise _missing("clip", path or "--clip")
    from transformers import CLIPModel, CLIPProcessor
    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)


def clip_scores(clip, images_uint8, captions, batch=32) -> np.ndarray:
    """Per image: 100 x cos(E_image, E_text) of CLIP's projected embeddings, unclamped (GLIDE's
    and torchmetrics' CLIPScore per pair); clip_score() averages them. Not Hessel et al.'s
    CLIPScore (2.5 x max(cos, 0), ViT-B/32, the prefix "A photo depicts"), which §3 cites."""
    import torch
    model, processor = clip
    out = []
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            inputs = processor(text=list(captions[i:i + batch]), images=list(images_uint8[i:i + batch]),
                               return_tensors="pt", padding=True, truncation=True)
            out_ = model(**inputs)  # the projected embeddings (transformers' CLIPModel.forward)
            img, txt = out_.image_embeds, out_.text_embeds
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            out.append((100 * cos).numpy())
    return np.concatenate(out)


def clip_score(per_image) -> float:
    """The CLIP score of a set: the mean of 100 x cos, clamped at 0 after the mean (torchmetrics'
    CLIPScore: max(mean, 0)). paper: not specified beyond "CLIP score" (§3)."""
    return max(float(np.mean(per_image)), 0.0)


# ---------------------------------------------------------------------------------------------
# Prompts, sampling, report
# ---------------------------------------------------------------------------------------------

def coco_captions(coco_dir, num, seed, ids=False):
    """`num` captions drawn at random (seeded, without replacement) from COCO val 2014's (with
    ids=True: and their annotation ids, which metrics.json records)."""
    path = os.path.join(coco_dir, "annotations", "captions_val2014.json")
    if not os.path.exists(path):
        raise _missing("coco", path)
    try:
        with open(path) as f:
            anns = sorted(json.load(f)["annotations"], key=lambda a: a["id"])
        if not all(isinstance(a["caption"], str) for a in anns):
            raise ValueError("a caption that is not text")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:120]}"
        raise cli.UserError(f"{path} is not COCO's caption annotations ({what}): unzip "
                            f"annotations_trainval2014.json again:\n  {DOWNLOADS['coco']}") from None
    if num > len(anns):
        raise SystemExit(f"--num {num}: {path} has {len(anns)} captions")
    pick = np.random.default_rng(seed).choice(len(anns), num, replace=False)
    captions = [anns[i]["caption"].strip() for i in pick]
    return (captions, [anns[i]["id"] for i in pick]) if ids else captions


def versions():
    """The versions of the libraries that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415
    out = {}
    for name in ("jax", "flax", "torch", "torch-fidelity", "transformers", "pillow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def coco_images(coco_dir):
    paths = sorted(glob.glob(os.path.join(coco_dir, "val2014", "*.jpg")))
    if not paths:
        raise _missing("coco", os.path.join(coco_dir, "val2014"))
    return paths


def sample_dir(out, label, stages, prompts, settings, seed, batch_size):
    """OUT/<label>_<key>: key, a digest of everything that decides the images (the checkpoints
    and their steps, the prompts, every stage's sampling settings, the seed, the batch size,
    which sets each image's noise), written out in settings.json inside. Images made otherwise
    (more training, another seed, other stages or settings) are never read as these."""
    record = {"checkpoints": [[s.config.name, s.step, s.config.side] for s in stages],
              "prompts_sha256": hashlib.sha256("\0".join(prompts).encode()).hexdigest(), "num": len(prompts),
              "settings": [dataclasses.asdict(st) for st in settings], "seed": seed, "batch_size": batch_size}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(out, f"{label}_{key}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "settings.json"), "w") as f:
        json.dump(record, f, indent=1)
    return path


def sample_set(stages, text, prompts, settings, out_dir, seed, batch_size):
    """PNGs of the prompts through the cascade into out_dir (sample_dir's), batch by batch;
    batches whose images exist are skipped, so a resumed run writes what an uninterrupted one
    would."""
    os.makedirs(out_dir, exist_ok=True)
    name = lambda i: os.path.join(out_dir, f"{i:05d}.png")
    todo = [b for b in range(0, len(prompts), batch_size)
            if not all(os.path.exists(name(i)) for i in range(b, min(b + batch_size, len(prompts))))]
    for b in tqdm(todo, desc=os.path.basename(out_dir), unit="batch"):  # tqdm shows the ETA
        chunk = prompts[b:b + batch_size]
        images = imagen.generate(stages, *text, chunk, settings, seed, batch_size, first_batch=b // batch_size)
        for i, img in enumerate(images):
            Image.fromarray(img).save(name(b + i) + ".tmp", "PNG")
            os.replace(name(b + i) + ".tmp", name(b + i))
    return [name(i) for i in range(len(prompts))]


def plot_curve(points, path, xlabel, ylabel):
    """A line through points = [(x, y, label)], each labelled, saved to path (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    for i, (x, y, label) in enumerate(points):  # alternate sides so neighbouring labels do not overlap
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, -12 if i % 2 else 6), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pareto_plot(rows, path):
    """CLIP score against FID, one point per guidance weight (Figs. A.8, A.11, A.13)."""
    n = rows[0]["num"]
    plot_curve([(r["clip_score"], r["fid"], f"w={r['guidance']:g}") for r in rows], path, "CLIP score",
               f"FID-{n // 1000}K" if n >= 1000 and n % 1000 == 0 else f"FID ({n} images)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/paper", help="the cascade: base/, sr1/, sr2/")
    p.add_argument("--out", default=None, help="default WORKDIR/eval")
    p.add_argument("--coco", default=None, help="COCO dir: val2014/*.jpg, annotations/captions_val2014.json")
    p.add_argument("--num", type=cli.positive_int, default=30000, help="captions (Table 1: 30000; the sweeps: 10000)")
    p.add_argument("--guidance", default=None,
                   help="guidance weights of --sweep-stage, e.g. 1.35 or 1,2,5 or 'paper' (default: the sampling set's)")
    p.add_argument("--sweep-stage", choices=["base", "sr1"], default="base", help="the stage --guidance sets")
    p.add_argument("--sampling", choices=list(imagen.SAMPLING), default="coco-fid")
    p.add_argument("--stages", type=int, choices=[1, 2, 3], default=None, help="default: the sampling set's")
    p.add_argument("--inception", default="ckpt/pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--clip", default=None, help="a CLIP directory (transformers); e.g. ckpt/clip-vit-large-patch14")
    p.add_argument("--drawbench", action="store_true", help="DrawBench grids (and CLIP scores with --clip)")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    a = p.parse_args(argv)
    if a.guidance not in (None, "paper"):
        try:
            a.guidance = cli.per_stage(cli.finite_float)(a.guidance)
        except argparse.ArgumentTypeError as err:
            p.error(f"argument --guidance: {err}")
    if not a.drawbench and a.coco is None:
        p.error("give --coco DIR (COCO FID and CLIP score) or --drawbench; see --help")
    return a


def run(a):
    out = a.out or os.path.join(a.workdir, "eval")
    named = imagen.SAMPLING[a.sampling]
    n_stages = a.stages or len(named)
    clip = load_clip(a.clip) if a.clip else None
    extractor = None if a.drawbench else load_inception(a.inception)
    stages = checkpoints.load_cascade(a.workdir, n_stages)
    base = [named.get(s.config.name, imagen.default_sampling(s.config)) for s in stages]
    text = data.load_text_encoder(stages[0].config.text_encoder)
    if a.drawbench:
        bench = sample.read_drawbench()
        prompts = [p for p, _ in bench]
        paths = sample_set(stages, text, prompts, base,
                           sample_dir(out, "drawbench", stages, prompts, base, a.seed, a.batch_size), a.seed, a.batch_size)
        images = np.stack([np.asarray(Image.open(p)) for p in paths])
        rows = {}
        for cat in sorted({c for _, c in bench}):
            idx = [i for i, (_, c) in enumerate(bench) if c == cat]
            sample.grid(images[idx]).save(os.path.join(out, f"drawbench_{cat.replace(' ', '_')}.png"))
            if clip:
                rows[cat] = clip_score(clip_scores(clip, images[idx], [bench[i][0] for i in idx]))
        with open(os.path.join(out, "drawbench.json"), "w") as f:
            json.dump({"clip_score_per_category": rows, "n": len(bench)}, f, indent=1)
        print(f"wrote {len(bench)} DrawBench samples and one grid per category to {out}")
        return rows
    prompts, caption_ids = coco_captions(a.coco, a.num, a.seed, ids=True)
    side = stages[-1].config.side
    if side > MAX_FID_SIDE:  # Inception would take 1024 -> 299 without antialiasing (clean-fid's pitfall)
        raise cli.UserError(f"FID at {side}x{side}: the paper's FIDs are at {MAX_FID_SIDE}x{MAX_FID_SIDE} and below "
                            f"(Table 1: 256; Figs. A.8, A.13: the 64x64 base; A.11: 64->256); give --stages 2 "
                            f"(or --stages 1 for the base alone)")
    ref = reference_statistics(extractor, a.inception, coco_images(a.coco), side, out)
    k = ["base", "sr1"].index(a.sweep_stage)
    if k >= len(stages):
        raise SystemExit(f"--sweep-stage {a.sweep_stage}: the cascade evaluated has {len(stages)} stage(s)")
    weights = (PAPER_GUIDANCE[a.sweep_stage] if a.guidance == "paper" else
               a.guidance if a.guidance else [base[k].guidance])
    rows = []
    for w in weights:
        settings = [dataclasses.replace(s, guidance=w) if i == k else s for i, s in enumerate(base)]
        t = time.time()
        folder = sample_dir(out, f"{a.sweep_stage}_w{w:g}", stages, prompts, settings, a.seed, a.batch_size)
        paths = sample_set(stages, text, prompts, settings, folder, a.seed, a.batch_size)
        images = read_images(paths, side)
        row = {"guidance": w, "stage": a.sweep_stage, "num": len(prompts), "samples": os.path.basename(folder),
               "fid": fid(fid_statistics(inception_features(extractor, images)), ref),
               "settings": [dataclasses.asdict(s) for s in settings], "sample_s": round(time.time() - t, 1)}
        per_image = clip_scores(clip, images, prompts) if clip else None
        row["clip_score"] = clip_score(per_image) if clip else None
        row["clip_per_image"] = None if per_image is None else [round(float(v), 4) for v in per_image]
        rows.append(row)
        print(f"w = {w:g}: FID {row['fid']:.3f}" + (f", CLIP score {row['clip_score']:.3f}" if clip else ""))
    record = {"workdir": a.workdir, "checkpoints": {s.config.name: s.step for s in stages}, "seed": a.seed,
              "coco": a.coco, "caption_ids": caption_ids, "inception": a.inception,
              "inception_sha256": sha256_file(a.inception), "clip": a.clip, "side": side, "versions": versions(),
              "rows": rows}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(record, f, indent=1)
    if clip:
        pareto_plot(rows, os.path.join(out, "pareto.png"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# {a.workdir}: zero-shot COCO, {len(prompts)} captions, {side}x{side}\n\n"
                "| w | FID | CLIP score |\n| --- | --- | --- |\n" +
                "".join(f"| {r['guidance']:g} | {r['fid']:.3f} | "
                        f"{'' if r['clip_score'] is None else format(r['clip_score'], '.3f')} |\n" for r in rows) +
                "\nThe paper (Table 1): FID-30K 7.27 at w = 1.35 / 8.0.\n")
    print(f"wrote metrics.json, report.md{', pareto.png' if clip else ''} to {out}")
    return record


def main(argv=None):
    return cli.run(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
