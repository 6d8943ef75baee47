"""Imagen's findings (§4.4, Fig. 4; App. D), reproduced in miniature on the demo's data.

  python findings.py NAME [--seeds 2] [--updates N] [--workdir runs/findings]

NAME is one of FINDINGS. Each arm of a finding is one of the demo's stages (imagen.PRESETS["demo"])
with one thing changed, trained for --updates on the shapes dataset with each seed, then sampled
on the held-out captions at every guidance weight of demo.SWEEP: the base alone at 32x32, or the
32->64 stage upsampling the demo base's samples of the same captions (that base trained once per
seed, shared with the base findings), at each sampling aug level. Alignment: the mean of the
detector's colour / count / position accuracy (demo.alignment), in the place of the paper's CLIP
score; fidelity: palette purity (demo.purity), in the place of FID. The figure plots one curve
per arm on those axes, like the paper's Pareto curves (Fig. 4, A.5-A.13); `efficient-unet`
plots the held-out loss against training time instead, like Fig. A.14.

A trained arm lives in WORKDIR/stages/STAGE-HASH-sSEED, HASH the digest of its stage and training
config (config.json inside): a finding whose arm another finding trained reuses it, an
interrupted run resumes, and a changed config never reuses old weights.

The verdict compares the arms in the order the claim states, by their best alignment over the
sweep (mean over seeds), or for `efficient-unet` their held-out loss at the same training time:
"holds" where each step of that order is larger than the spread between seeds of both arms,
"does not hold" where a step goes the other way by more than that, else "inconclusive".
"""

import argparse
import dataclasses
import hashlib
import json
import os
import time

import numpy as np

import checkpoints
import cli
import demo
import imagen
import monitor
import text_encoders
import train
from unet import UNetConfig

_same = lambda x: x  # noqa: E731


def _encoder(name):
    """The demo base conditioned on text encoder `name` (its width as the U-Net's text_dim)."""
    return lambda s: demo.with_text_encoder({"base": s}, name)["base"]


def _unet(**kw):
    return lambda s: dataclasses.replace(s, unet=dataclasses.replace(s.unet, **kw))


def _sampling(**kw):
    return lambda st: dataclasses.replace(st, **kw)


def _aug(level):
    return lambda t: dataclasses.replace(t, max_aug_level=level)


def _full_images_f2(s):
    """The 32->64 stage as the paper's 64->256 model is trained: on whole images (no crops), with
    F.2's self-attention (and the text in its keys and values) in the last block."""
    n = len(s.unet.block_channels)
    return dataclasses.replace(s, train_side=s.side, unet=dataclasses.replace(
        s.unet, block_self_attn=(False,) * (n - 1) + (True,), block_cross_attn=(False,) * n))


def _plain_unet(s):
    """The same stage on the base's network (ADM's U-Net, F.1: BigGAN up/down-sampling residual
    blocks, self-attention with the text at the lowest side, and in the middle), as many levels
    as the Efficient U-Net has blocks, widths (c, ..., c, 2c): within 4% of its parameters (1.43M
    against 1.38M for the demo's). paper: not specified which U-Net App. D.3.2 compares with."""
    e, n = s.unet, len(s.unet.block_channels)
    low = s.train_side // 2 ** (n - 1)
    return dataclasses.replace(s, unet=UNetConfig(
        lowres_cond=True, channels=e.block_channels[0], channel_mult=(1,) * (n - 1) + (2,), num_res_blocks=1,
        attn_resolutions=(low,), text_cross_attn_res=(low,), per_head_channels=e.block_channels[-1] // e.num_heads,
        num_heads=e.num_heads, text_dim=e.text_dim, norm_groups=e.norm_groups, emb_mult=e.emb_mult))


@dataclasses.dataclass(frozen=True)
class Arm:
    stage: object = _same  # StageConfig -> StageConfig
    sampling: object = _same  # SampleSettings -> SampleSettings
    train: object = _same  # TrainConfig -> TrainConfig


@dataclasses.dataclass(frozen=True)
class Finding:
    claim: str  # the paper's claim, as a reviewer would check it
    section: str  # where the paper makes it
    arms: dict  # label -> Arm
    # what the claim expects: the arms in order, worst first (each step up), or (worse, better)
    # pairs where the claim orders only those
    order: tuple
    stage: str = "base"  # the stage the arms change: "base", or "sr1" (32 -> 64)
    common: object = _same  # StageConfig -> StageConfig: the finding's stage, before any arm's change
    updates: int = 1000  # default updates per arm and seed
    aug_levels: tuple = (0.0,)  # sampling aug levels swept (a super-resolution stage)
    measure: str = "alignment"  # the verdict's: best alignment, or "heldout" loss at equal training time


FINDINGS = {
    "text-encoder-scale": Finding(
        "a larger frozen text encoder improves alignment and fidelity", "§4.4, Fig. 4a; App. D.1, Fig. A.5a",
        {"untrained": Arm(_encoder("whitened:random:t5-wordnet-base")),
         "tiny": Arm(_encoder("whitened:t5-wordnet-tiny")),
         "small": Arm(_encoder("whitened:t5-wordnet-small")),
         "base": Arm(_encoder("whitened:t5-wordnet-base"))},
        ("untrained", "tiny", "small", "base")),
    "unet-scale": Finding(
        "a larger U-Net helps, less than a larger text encoder", "§4.4, Fig. 4b; App. D.3, Fig. A.13b",
        {"16 channels": Arm(_unet(channels=16)), "32 channels": Arm(), "64 channels": Arm(_unet(channels=64))},
        ("16 channels", "32 channels", "64 channels")),
    "thresholding": Finding(
        "dynamic thresholding beats static and none, most at large guidance", "§4.4, Fig. 4c; App. D.2, Figs. A.8-A.9",
        {"none": Arm(sampling=_sampling(threshold="none")), "static": Arm(sampling=_sampling(threshold="static")),
         "dynamic": Arm(sampling=_sampling(threshold="dynamic"))},
        ("none", "static", "dynamic")),
    "text-conditioning": Finding(
        "cross-attention on the text sequence beats mean and attention pooling", "§4.4; App. D.3.1, Fig. A.13a",
        {"mean pooling": Arm(_unet(feature_pooling="mean", text_cross_attn=False)),
         "attention pooling": Arm(_unet(feature_pooling="attention", text_cross_attn=False)),
         "cross-attention": Arm()},
        (("mean pooling", "cross-attention"), ("attention pooling", "cross-attention"))),
    # the demo's 32->64 stage as the demo trains it (32x32 crops, 200 updates), its training aug
    # levels U(0, m): none, the demo's m = 0.1 and the paper's m = 1 (§2.4, Fig. A.32)
    "noise-augmentation": Finding(
        "a super-resolution model trained with noise conditioning augmentation scores better, and leans "
        "more on the text (more change across w)", "§4.4; App. D.2, Fig. A.11b",
        {"none": Arm(train=_aug(0.0)), "U(0, 0.1)": Arm(train=_aug(0.1)), "U(0, 1)": Arm(train=_aug(1.0))},
        ("none", "U(0, 1)"), stage="sr1", updates=200, aug_levels=(0.0, 0.1, 0.3)),
    "efficient-unet": Finding(
        "the Efficient U-Net converges faster than a U-Net, and samples 2-3x faster", "§4.4; App. D.3.2, Fig. A.14",
        {"U-Net": Arm(_plain_unet), "Efficient U-Net": Arm()},
        ("U-Net", "Efficient U-Net"), stage="sr1", common=_full_images_f2, updates=400, measure="heldout"),
}
EVAL_POINTS = 10  # held-out loss evaluations over a run (efficient-unet)


def arm_dir(workdir, stage, tcfg, seed, create=True):
    """WORKDIR/stages/STAGE-HASH-sSEED for this stage and training config; config.json inside."""
    cfg = {"stage": imagen.config_dict(stage), "train": dataclasses.asdict(tcfg)}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = os.path.join(workdir, "stages", f"{stage.name}-{digest}-s{seed}")
    if not create:
        return path
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1, default=str)
    return path


def _train(stage, tcfg, workdir, seed, progress, heldout=None):
    """Train (or reuse, or resume) one arm with one seed -> its directory."""
    path = arm_dir(workdir, stage, tcfg, seed)
    train.train(stage, tcfg, path, seed=seed, log_every=max(1, tcfg.steps // 10),
                save_every=max(100, tcfg.steps // 3), progress=progress, heldout=heldout,
                eval_every=max(1, tcfg.steps // EVAL_POINTS) if heldout is not None else 0)
    return path


def curve(stage_dir):
    """[(seconds of training, held-out loss)] from a stage's metrics.jsonl."""
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if '"heldout_loss"' in line]
    by_step = {r["step"]: (r["train_seconds"], r["heldout_loss"]) for r in recs}  # a resumed run: the last
    return [by_step[k] for k in sorted(by_step)]


def run(name, workdir="runs/findings", seeds=(0, 1), updates=None, n_eval=64, sweep=demo.SWEEP,
        stages=None, tcfgs=None, base_updates=1000, batch_size=32, progress=True):
    """Train every arm of FINDINGS[name] with every seed (or reuse it), sweep w, score; ->
    result (also WORKDIR/NAME/result.json and NAME.png). stages, tcfgs: the demo's stage configs
    and training configs by name, which the arms change (default imagen.PRESETS["demo"],
    train.TRAIN_PRESETS["demo"]); updates: of the finding's stage (default its own), whose
    learning rate decays over them; base_updates: of the base whose samples a super-resolution
    finding upsamples."""
    finding = FINDINGS[name]
    stages = stages or {k: imagen.with_backend(v, imagen.backend()) for k, v in imagen.PRESETS["demo"].items()}
    tcfgs = tcfgs or train.TRAIN_PRESETS["demo"]
    updates = updates or finding.updates
    base_tcfg = dataclasses.replace(tcfgs["base"], steps=base_updates, decay_steps=base_updates)
    stage0 = finding.common(stages[finding.stage])
    tcfg0 = dataclasses.replace(tcfgs[finding.stage], steps=updates, decay_steps=updates)
    settings = imagen.SAMPLING["demo"][finding.stage]
    examples = demo.heldout_examples(n_eval, stage0.side)
    captions = [c for _, c, _, _ in examples]
    bs = min(batch_size, n_eval)
    out = os.path.join(workdir, name)
    os.makedirs(out, exist_ok=True)
    arms, curves, t0 = {}, {}, time.time()
    # the time left: arm-seeds still to train at the mean time of those trained so far, reused
    # ones at the mean time of their sweeps
    def trained(label, seed):
        arm = finding.arms[label]
        return os.path.isdir(os.path.join(arm_dir(workdir, arm.stage(stage0), arm.train(tcfg0), seed, create=False),
                                          "checkpoints"))
    todo = {(label, seed): trained(label, seed) for label in finding.arms for seed in seeds}
    spent = {True: [], False: []}  # reused?: minutes per arm-seed
    lowres = {}  # seed -> the base's samples the super-resolution arms upsample
    for label, arm in finding.arms.items():
        stage, tcfg, rows = arm.stage(stage0), arm.train(tcfg0), []
        for seed in seeds:
            t_arm = time.time()
            enc, tok = text_encoders.load_text_encoder(stage.text_encoder)
            if finding.stage != "base" and seed not in lowres:
                base_dir = _train(stages["base"], base_tcfg, workdir, seed, progress)
                lowres[seed] = imagen.generate([checkpoints.load_stage(base_dir)], enc, tok, captions,
                                               [imagen.SAMPLING["demo"]["base"]], demo.EVAL_SEED + seed, bs)
            held = (monitor.heldout_set(stage, [e[:2] for e in examples], enc, tok)
                    if finding.measure == "heldout" else None)
            path = _train(stage, tcfg, workdir, seed, progress, held)
            loaded = checkpoints.load_stage(path)
            for aug in finding.aug_levels:
                for w in sweep:
                    st = arm.sampling(dataclasses.replace(settings, guidance=w, aug_level=aug))
                    t = time.time()
                    imgs = imagen.generate([loaded], enc, tok, captions, [st], demo.EVAL_SEED + seed, bs,
                                           lowres=lowres.get(seed))
                    seconds = time.time() - t
                    acc = demo.alignment(imgs, captions)
                    rows.append({"seed": seed, "w": w, "aug_level": aug, "sample_seconds": seconds,
                                 "alignment": float(np.nanmean([v for v, _ in acc.values()])),
                                 "purity": demo.purity(imgs), **{k: v for k, (v, _) in acc.items()},
                                 "stage_dir": path})
            if held is not None:
                curves.setdefault(label, []).append(curve(path))
            spent[todo.pop((label, seed))].append((time.time() - t_arm) / 60)
            if progress:
                each = {k: np.mean(v or spent[not k] or [0.0]) for k, v in spent.items()}
                left = sum(each[reused] for reused in todo.values())
                print(f"{name}: {label}, seed {seed} done, {len(finding.arms) * len(seeds) - len(todo)}/"
                      f"{len(finding.arms) * len(seeds)}; {(time.time() - t0) / 60:.1f} min, about {left:.0f} min left",
                      flush=True)
        arms[label] = rows
    result = {"finding": name, "claim": finding.claim, "section": finding.section, "updates": updates,
              "seeds": list(seeds), "n_eval": n_eval, "sweep": list(sweep), "aug_levels": list(finding.aug_levels),
              "measure": finding.measure, "arms": arms, "minutes": (time.time() - t0) / 60,
              "params": {label: imagen.count_params(arm.stage(stage0)) for label, arm in finding.arms.items()}}
    if curves:
        result["curves"] = curves
    result.update(verdict(result, finding.order))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out, f"{name}.png"))
    return result


def best(rows):
    """An arm's best alignment over the sweep (w, aug level) of the mean over seeds, and the
    spread (max - min) between its seeds' best alignments."""
    key = lambda r: (r["w"], r.get("aug_level", 0.0))
    mean_at = {k: np.mean([r["alignment"] for r in rows if key(r) == k]) for k in {key(r) for r in rows}}
    per_seed = [max(r["alignment"] for r in rows if r["seed"] == s) for s in sorted({r["seed"] for r in rows})]
    return float(max(mean_at.values())), float(max(per_seed) - min(per_seed))


def common_time(result):
    """The training time every run of every arm reached (seconds): where held-out losses compare."""
    return min(c[-1][0] for runs in result["curves"].values() for c in runs)


def loss_at(result, label):
    """An arm's held-out loss at common_time (mean over seeds, interpolated), and its seeds' spread."""
    t = common_time(result)
    per_seed = [float(np.interp(t, *zip(*c))) for c in result["curves"][label]]
    return float(np.mean(per_seed)), float(max(per_seed) - min(per_seed))


def score(result, label):
    """(larger is better, seed spread): best alignment, or minus the held-out loss."""
    if result.get("measure") == "heldout":
        loss, spread = loss_at(result, label)
        return -loss, spread
    return best(result["arms"][label])


def verdict(result, order):
    """holds / does not hold / inconclusive: each step of `order` (a chain, or pairs) against
    both arms' seed spread."""
    steps = []
    for lo, hi in order if isinstance(order[0], tuple) else zip(order, order[1:]):
        (a, sa), (b, sb) = score(result, lo), score(result, hi)
        margin = max(sa, sb)
        steps.append("up" if b - a > margin else "down" if a - b > margin else "flat")
    word = ("holds" if all(s == "up" for s in steps) else
            "does not hold" if any(s == "down" for s in steps) else "inconclusive")
    sign = -1 if result.get("measure") == "heldout" else 1
    return {"verdict": word, "steps": steps,
            "best": {k: sign * score(result, k)[0] for k in result["arms"]},
            "seed_spread": {k: score(result, k)[1] for k in result["arms"]}}


def plot(result, path):
    """Alignment against fidelity, one curve per arm and aug level (mean over seeds; w marked),
    like Fig. 4; with held-out loss curves, also the loss against training time, like Fig. A.14."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = "curves" in result
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(10.4 if curves else 5.2, 3.8), squeeze=False)
    ax = axes[0, 0]
    augs = sorted({r.get("aug_level", 0.0) for rows in result["arms"].values() for r in rows})
    for i, (label, rows) in enumerate(result["arms"].items()):
        for j, aug in enumerate(augs):
            ws = sorted({r["w"] for r in rows if r.get("aug_level", 0.0) == aug})
            at = lambda w, k: np.mean([r[k] for r in rows if r["w"] == w and r.get("aug_level", 0.0) == aug])
            x, y = [at(w, "purity") for w in ws], [at(w, "alignment") for w in ws]
            ax.plot(x, y, marker="o", ms=3, color=f"C{i}", ls=("-", "--", ":", "-.")[j % 4],
                    label=label + (f", aug {aug:g}" if len(augs) > 1 else ""))
            ax.annotate(f"w={ws[-1]:g}", (x[-1], y[-1]), fontsize=7)
    ax.set(xlabel="fidelity (palette purity)", ylabel="alignment (mean detector accuracy)",
           title=f"{result['finding']}: {result['verdict']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if curves:
        ax = axes[0, 1]
        for i, (label, runs) in enumerate(result["curves"].items()):
            for k, c in enumerate(runs):
                ax.plot(*zip(*c), marker=".", color=f"C{i}", label=label if k == 0 else None)
        ax.axvline(common_time(result), color="grey", lw=0.8, ls=":")
        ax.set(xlabel="training time (s)", ylabel="held-out loss", title="convergence (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_row(result):
    """The finding's row of docs/findings.md."""
    heldout = result.get("measure") == "heldout"
    what = "held-out loss at equal training time" if heldout else "best alignment over the sweep"
    best_ = ", ".join(f"{k} {v:.3f} (seeds +- {result['seed_spread'][k] / 2:.3f})" for k, v in result["best"].items())
    return (f"| `{result['finding']}` | {result['claim']} ({result['section']}) | {what}: "
            f"{best_}; {len(result['seeds'])} seeds, {result['updates']} updates | {result['verdict']} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(FINDINGS))
    p.add_argument("--seeds", type=cli.positive_int, default=2, help="seeds per arm (0, 1, ...)")
    p.add_argument("--updates", type=cli.positive_int, default=None,
                   help="updates per arm and seed of the stage the finding trains (default: the finding's own, "
                        "1000 for the base, 200 / 400 for the 32->64 stage; the demo: 1500 and 200)")
    p.add_argument("--n-eval", type=cli.positive_int, default=64, help="held-out examples per w")
    p.add_argument("--workdir", default="runs/findings")
    args = p.parse_args(argv)
    cli.use_every_core()
    result = run(args.name, args.workdir, tuple(range(args.seeds)), args.updates, args.n_eval)
    print(f"wrote {os.path.join(args.workdir, args.name)}: {result['verdict']}")
    print(table_row(result))


if __name__ == "__main__":
    cli.run(main)
