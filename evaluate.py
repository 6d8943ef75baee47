"""Evaluate a cascade as the paper does: zero-shot COCO FID and CLIP score per guidance weight
(the Pareto curves), and DrawBench grids. The metrics themselves are metrics.py's.

Saharia et al. 2022, §3 / Table 1: zero-shot FID-30K on COCO at 256x256, "30K prompts are drawn
randomly from the validation set, and the model samples generated on these prompts are compared
with reference images from the full validation set", w = 1.35 (64x64) / 8.0 (super-resolution);
§3, Figs. A.8, A.11, A.13: CLIP score against FID-10K over the guidance weights PAPER_GUIDANCE
(one list for the base, another for the 64->256 model); §3 / App. C: DrawBench is judged by
human raters, out of scope here: the grids are for people, the CLIP score per category a proxy.
Each protocol is a preset (PROTOCOLS), and states its side:

  python evaluate.py --workdir runs/paper --coco data/coco --clip ckpt/clip-vit-large-patch14
      # --protocol table-1 (the default): FID-30K at 256x256, w = 1.35 / 8.0
  python evaluate.py ... --protocol fig-a13   # Figs. A.8 / A.13: the 64x64 base alone, FID-10K at 64x64
  python evaluate.py ... --protocol fig-a11   # Fig. A.11: 64->256's w swept, FID-10K at 256x256
  python evaluate.py --compare runs/a/eval/metrics.json runs/b/eval/metrics.json --out cmp
  python evaluate.py --workdir runs/demo --drawbench [--clip DIR]

--stages, --num, --sweep-stage and --guidance change a protocol (metrics.json then says which);
FID above 256x256 is refused: the paper reports none, and Inception would take 1024 -> 299
without antialiasing. Writes OUT/<stage>_w<guidance>_<key>/NNNNN.png, key a digest of
everything that decides the images (settings.json inside: checkpoint steps, prompts, settings,
seed, batch size; existing images of the same key are kept: an interrupted run resumes; any
change gives a new folder), OUT/metrics.json, OUT/pareto.png and OUT/report.md (another
evaluation's, found there, are kept as metrics.N.json, pareto.N.png, report.N.md); the reference
statistics go to --stats-cache (shared by every run).
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

import checkpoints
import cli
import imagen
import metrics
import sample
import text_encoders

MAX_FID_SIDE = 256  # Table 1's side; the paper reports no FID of 1024x1024 samples
TABLE_1_FID = 7.27  # Table 1: Imagen's zero-shot FID-30K on COCO, 256x256
PAPER_GUIDANCE = {"base": (1, 1.25, 1.5, 1.75, 2, 3, 4, 5, 6, 7, 8, 9, 10),  # Figs. A.8, A.13 (64x64)
                  "sr1": (1, 3, 5, 7, 8, 10, 12, 15, 18)}  # Fig. A.11 (64->256)
# paper: not specified which COCO release ("the validation set", §3); COCO 2014 val, as GLIDE and
# DALL-E 2 report. paper: not specified which CLIP computes the CLIP score (§3 cites CLIPScore
# and CLIP); ViT-L/14, torchmetrics' default. paper: not specified which FID code; torch-fidelity.


@dataclasses.dataclass(frozen=True)
class Protocol:
    figure: str       # what it reproduces, and at what side
    stages: int       # 1: the 64x64 base alone; 2: 64 -> 256 (the FID's side is the last stage's)
    sweep_stage: str  # the stage whose guidance weight is swept; the other keeps coco-fid's
    guidance: tuple   # the swept weights
    num: int          # captions (and samples) per weight


PROTOCOLS = {
    "table-1": Protocol("Table 1: zero-shot FID-30K on COCO at 256x256, w = 1.35 (64x64) and 8.0 (64->256)",
                        2, "base", (1.35,), 30000),
    "fig-a13": Protocol("Figs. A.8 / A.13: CLIP score vs FID-10K of the 64x64 base alone, at 64x64",
                        1, "base", PAPER_GUIDANCE["base"], 10000),
    # paper: not specified at which w the base is sampled for Fig. A.11; Table 1's 1.35
    "fig-a11": Protocol("Fig. A.11: CLIP score vs FID-10K of 64->256 at 256x256, over its w; the base at w = 1.35",
                        2, "sr1", PAPER_GUIDANCE["sr1"], 10000),
}
SAMPLING = "coco-fid"  # every protocol's settings (imagen.SAMPLING): Table 1's w, aug level 0


# ---------------------------------------------------------------------------------------------
# Prompts, sampling, plots
# ---------------------------------------------------------------------------------------------

def coco_captions(coco_dir, num, seed):
    """`num` captions drawn at random (seeded, without replacement) from COCO val 2014's, and their
    annotation ids (metrics.json records them)."""
    path = os.path.join(coco_dir, "annotations", "captions_val2014.json")
    if not os.path.exists(path):
        raise metrics.missing("coco", path)
    try:
        with open(path) as f:
            anns = sorted(json.load(f)["annotations"], key=lambda a: a["id"])
        if not all(isinstance(a["caption"], str) for a in anns):
            raise ValueError("a caption that is not text")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:120]}"
        raise cli.UserError(f"{path} is not COCO's caption annotations ({what}): unzip "
                            f"annotations_trainval2014.json again:\n  {metrics.DOWNLOADS['coco']}") from None
    if num > len(anns):
        raise cli.UserError(f"--num {num}: {path} has {len(anns)} captions")
    pick = np.random.default_rng(seed).choice(len(anns), num, replace=False)
    captions = [anns[i]["caption"].strip() for i in pick]
    return captions, [anns[i]["id"] for i in pick]


def coco_images(coco_dir):
    paths = sorted(glob.glob(os.path.join(coco_dir, "val2014", "*.jpg")))
    if not paths:
        raise metrics.missing("coco", os.path.join(coco_dir, "val2014"))
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
    pareto_plot({"": points}, path, xlabel, ylabel, table_1=False)


def pareto_plot(curves, path, xlabel="CLIP score", ylabel="FID", table_1=True):
    """One labelled curve per {name: [(x, y, point label)]}; with table_1, the paper's Table 1
    FID-30K as a dashed line (Table 1 gives no CLIP score)."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name or None)
        for i, (x, y, label) in enumerate(points):  # alternate sides so neighbouring labels do not overlap
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, -12 if i % 2 else 6), fontsize=8)
    if table_1:
        ax.axhline(TABLE_1_FID, ls="--", c="gray", lw=1, label=f"Imagen, Table 1: FID-30K {TABLE_1_FID} (256x256)")
    if table_1 or len(curves) > 1:
        ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fid_label(n):
    return f"FID-{n // 1000}K" if n >= 1000 and n % 1000 == 0 else f"FID ({n} images)"


def curve(record):
    return [(r["clip_score"], r["fid"], f"w={r['guidance']:g}") for r in record["rows"]]


def read_metrics(path):
    """An evaluate.py metrics.json, its rows checked (at least one, each with its guidance, FID,
    CLIP score or null and sample count); anything else is refused, naming the file."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    try:
        with open(path) as f:
            record = json.load(f)
        rows = record["rows"]
        if not isinstance(rows, list) or not rows:
            raise ValueError("no rows of results")
        for r in rows:
            if not (isinstance(r, dict) and number(r["guidance"]) and number(r["fid"]) and number(r["num"])
                    and (r.get("clip_score") is None or number(r["clip_score"]))):
                raise ValueError(f"a row that is not a result: {json.dumps(r)[:60]}")
        if not isinstance(record.get("checkpoints", {}), dict):
            raise ValueError("checkpoints is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise cli.UserError(f"{path} is not an evaluate.py metrics.json ({type(e).__name__}: {e})") from None
    return record


def compare(paths, out):
    """pareto.png of several runs' metrics.json, one curve each (e.g. two checkpoints, two
    ablations), into OUT/pareto_compare.png."""
    curves = {}
    for p in paths:
        record = read_metrics(p)
        rows = record["rows"]
        if any(r.get("clip_score") is None for r in rows):
            raise cli.UserError(f"{p} has no CLIP scores: run its evaluation again with --clip DIR")
        steps = ", ".join(f"{k} {v}" for k, v in record.get("checkpoints", {}).items())
        curves[f"{os.path.basename(os.path.dirname(os.path.abspath(p)))} ({steps}; {fid_label(rows[0]['num'])}, "
               f"{record.get('side')}px)"] = curve(record)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "pareto_compare.png")
    pareto_plot(curves, path)
    print(f"wrote {path}: {len(curves)} curves")
    return path


RESULTS = ("metrics.json", "report.md", "pareto.png")  # one evaluation's files in OUT, written together


def keep_previous(out, record):
    """Before a run's results are written to OUT: another evaluation's files there (any result
    but the sampling times differs) are renamed metrics.N.json, report.N.md, pareto.N.png, N the
    first number free, so that none is lost and no plot is left beside results it does not
    show; -> the names they were given ([]: OUT held none, or these same results)."""
    present = [n for n in RESULTS if os.path.exists(os.path.join(out, n))]
    strip = lambda r: {**r, "rows": [{k: v for k, v in row.items() if k != "sample_s"} for row in r["rows"]]}
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            if strip(json.load(f)) == strip(json.loads(json.dumps(record))):
                return []  # the same evaluation again (a resumed run): replacing it loses nothing
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none, or not a record: whatever is there is kept
    name = lambda m, n: f"{os.path.splitext(m)[0]}.{n}{os.path.splitext(m)[1]}"
    n = 1
    while any(os.path.exists(os.path.join(out, name(m, n))) for m in RESULTS):
        n += 1
    for m in present:
        os.replace(os.path.join(out, m), os.path.join(out, name(m, n)))
    return [name(m, n) for m in present]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/paper", help="the cascade: base/, sr1/, sr2/")
    p.add_argument("--out", default=None, help="default WORKDIR/eval")
    p.add_argument("--coco", default=None, help="COCO dir: val2014/*.jpg, annotations/captions_val2014.json")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="table-1",
                   help="; ".join(f"{k}: {v.figure}" for k, v in PROTOCOLS.items()))
    p.add_argument("--num", type=cli.positive_int, default=None, help="captions (default: the protocol's)")
    p.add_argument("--guidance", default=None,
                   help="guidance weights of --sweep-stage, e.g. 1.35 or 1,2,5 (default: the protocol's)")
    p.add_argument("--sweep-stage", choices=["base", "sr1"], default=None, help="the stage --guidance sets")
    p.add_argument("--stages", type=int, choices=[1, 2, 3], default=None, help="default: the protocol's")
    p.add_argument("--inception", default="ckpt/pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--other-inception", action="store_true",
                   help="use an --inception file other than torch-fidelity's published one (FID not comparable)")
    p.add_argument("--stats-cache", default=None,
                   help="the reference statistics' cache, shared between runs (default: fid_stats/ beside --inception)")
    p.add_argument("--clip", default=None, help="a CLIP directory (transformers); e.g. ckpt/clip-vit-large-patch14")
    p.add_argument("--clip-convention", choices=list(metrics.CLIP_CONVENTIONS), default="100cos",
                   help="100cos: 100 x cos, the mean clamped at 0 (GLIDE, torchmetrics); hessel: Hessel et al.'s "
                        "CLIPScore, 2.5 x max(cos, 0) with the prefix 'A photo depicts'")
    p.add_argument("--drawbench", action="store_true", help="DrawBench grids (and CLIP scores with --clip)")
    p.add_argument("--per-prompt", type=cli.positive_int, default=8,
                   help="DrawBench samples per prompt (App. C: 8 random, non-cherry-picked, per prompt)")
    p.add_argument("--compare", nargs="+", default=None, metavar="METRICS_JSON",
                   help="overlay these runs' metrics.json in OUT/pareto_compare.png (nothing is sampled)")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    a = p.parse_args(argv)
    if a.guidance is not None:
        try:
            a.guidance = cli.per_stage(cli.finite_float)(a.guidance)
        except argparse.ArgumentTypeError as err:
            p.error(f"argument --guidance: {err}")
    if not a.drawbench and a.coco is None and a.compare is None:
        p.error("give --coco DIR (COCO FID and CLIP score), --drawbench or --compare; see --help")
    return a


def drawbench(a, out, stages, text, clip):
    """DrawBench (§3, App. C, Table A.1): --per-prompt samples of each prompt (App. C: "8
    random (non-cherry picked) generations"), one grid per category (a row per prompt), a CLIP
    score per category over all its samples. paper: not specified with which settings; those
    of the paper's sample figures (imagen.default_sampling: w = 5, aug level 0.3), as sample.py."""
    base = [imagen.default_sampling(s.config) for s in stages]
    bench, k = sample.read_drawbench(), a.per_prompt
    prompts = [p for p, _ in bench for _ in range(k)]  # prompt i's samples: k * i .. k * i + k - 1
    paths = sample_set(stages, text, prompts, base,
                       sample_dir(out, "drawbench", stages, prompts, base, a.seed, a.batch_size), a.seed, a.batch_size)
    images = np.stack([np.asarray(Image.open(p)) for p in paths])
    rows = {}
    for cat in sorted({c for _, c in bench}):
        idx = [k * i + j for i, (_, c) in enumerate(bench) if c == cat for j in range(k)]
        sample.grid(images[idx], cols=k).save(os.path.join(out, f"drawbench_{cat.replace(' ', '_')}.png"))
        if clip:
            scores = metrics.clip_scores(clip, images[idx], [prompts[i] for i in idx], a.clip_convention)
            rows[cat] = metrics.clip_score(scores, a.clip_convention)
    with open(os.path.join(out, "drawbench.json"), "w") as f:
        json.dump({"clip_score_per_category": rows, "clip_convention": a.clip_convention, "prompts": len(bench),
                   "per_prompt": k}, f, indent=1)
    print(f"wrote {len(prompts)} DrawBench samples ({k} per prompt) and one grid per category to {out}")
    return rows


def run(a):
    if a.compare:
        return compare(a.compare, a.out or os.path.dirname(os.path.abspath(a.compare[0])))
    out = a.out or os.path.join(a.workdir, "eval")
    proto = PROTOCOLS[a.protocol]
    given = {"stages": a.stages, "num": a.num, "sweep_stage": a.sweep_stage,
             "guidance": a.guidance and tuple(a.guidance)}  # the preset's weights are a tuple
    changed = {k: a.guidance if k == "guidance" else v for k, v in given.items()
               if v is not None and v != getattr(proto, k)}
    n_stages, num = a.stages or proto.stages, a.num or proto.num
    sweep_stage, weights = a.sweep_stage or proto.sweep_stage, a.guidance or list(proto.guidance)
    clip = metrics.load_clip(a.clip) if a.clip else None
    extractor = None if a.drawbench else metrics.load_inception(a.inception, a.other_inception)
    stages = checkpoints.load_cascade(a.workdir, n_stages)
    text = text_encoders.load_text_encoder(stages[0].config.text_encoder)
    os.makedirs(out, exist_ok=True)
    if a.drawbench:
        return drawbench(a, out, stages, text, clip)
    side = stages[-1].config.side
    if side > MAX_FID_SIDE:  # Inception would take 1024 -> 299 without antialiasing (clean-fid's pitfall)
        raise cli.UserError(f"FID at {side}x{side}: the paper's FIDs are at {MAX_FID_SIDE}x{MAX_FID_SIDE} and below "
                            f"(Table 1: 256; Figs. A.8, A.13: the 64x64 base; A.11: 64->256); give --stages 2 "
                            f"(or --protocol fig-a13 for the base alone)")
    k = ["base", "sr1"].index(sweep_stage)
    if k >= len(stages):
        raise cli.UserError(f"--sweep-stage {sweep_stage}: the cascade evaluated has {len(stages)} stage(s)")
    prompts, caption_ids = coco_captions(a.coco, num, a.seed)
    ref = metrics.reference_statistics(extractor, coco_images(a.coco), side,
                                       a.stats_cache or os.path.join(os.path.dirname(a.inception) or ".", "fid_stats"))
    named = imagen.SAMPLING[SAMPLING]
    base = [named.get(s.config.name, imagen.default_sampling(s.config)) for s in stages]
    what = proto.figure + (f"; changed: {json.dumps(changed)}" if changed else "")
    print(f"{a.protocol}: {what}; {len(stages)} stage(s), {side}x{side}")
    rows = []
    for w in weights:
        settings = [dataclasses.replace(s, guidance=w) if i == k else s for i, s in enumerate(base)]
        t = time.time()
        folder = sample_dir(out, f"{sweep_stage}_w{w:g}", stages, prompts, settings, a.seed, a.batch_size)
        paths = sample_set(stages, text, prompts, settings, folder, a.seed, a.batch_size)
        images = metrics.read_images(paths, side)
        feats = metrics.inception_features(extractor, images, desc=f"Inception, w = {w:g}")
        row = {"guidance": w, "stage": sweep_stage, "num": len(prompts), "samples": os.path.basename(folder),
               "fid": metrics.fid(metrics.fid_statistics(feats), ref),
               "settings": [dataclasses.asdict(s) for s in settings], "sample_s": round(time.time() - t, 1)}
        per_pair = metrics.clip_scores(clip, images, prompts, a.clip_convention, desc=f"CLIP, w = {w:g}") if clip else None
        row["clip_score"] = metrics.clip_score(per_pair, a.clip_convention) if clip else None
        row["clip_per_image"] = None if per_pair is None else [round(float(v), 4) for v in per_pair]
        rows.append(row)
        print(f"w = {w:g}: {fid_label(len(prompts))} {row['fid']:.3f}" +
              (f", CLIP score {row['clip_score']:.3f}" if clip else ""))
    record = {"protocol": a.protocol, "figure": proto.figure, "changed": changed, "workdir": a.workdir,
              "checkpoints": {s.config.name: s.step for s in stages}, "side": side, "seed": a.seed,
              "coco": a.coco, "caption_ids": caption_ids, "reference_stats": ref["key"],
              "inception": a.inception, "inception_sha256": extractor.sha256, "clip": a.clip,
              "clip_convention": a.clip_convention, "clip_sha256": metrics.clip_files_sha256(a.clip) if clip else None,
              "versions": metrics.versions(), "rows": rows}
    kept = keep_previous(out, record)
    if kept:
        print(f"{out} held another evaluation's results: kept as {', '.join(kept)}")
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(record, f, indent=1)
    if clip:
        pareto_plot({"": curve(record)}, os.path.join(out, "pareto.png"), ylabel=fid_label(num))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# {a.workdir}: zero-shot COCO, {len(prompts)} captions, {side}x{side}\n\n{what}\n\n"
                f"| w ({sweep_stage}) | {fid_label(num)} | CLIP score ({a.clip_convention}) |\n| --- | --- | --- |\n" +
                "".join(f"| {r['guidance']:g} | {r['fid']:.3f} | "
                        f"{'' if r['clip_score'] is None else format(r['clip_score'], '.3f')} |\n" for r in rows) +
                f"\nThe paper (Table 1): FID-30K {TABLE_1_FID} at 256x256, w = 1.35 / 8.0.\n")
    print(f"wrote metrics.json, report.md{', pareto.png' if clip else ''} to {out}")
    return record


def main(argv=None):
    # JAX takes 75% of an accelerator's memory when it starts; leave half to torch's Inception
    # and CLIP (read when JAX starts its backend, on the first array; a value set is kept)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    return cli.run(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
