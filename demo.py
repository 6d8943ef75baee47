"""The demo: train the whole (small) cascade on a laptop CPU and measure its text alignment.

  python demo.py [--workdir DIR]        # default runs/demo; an interrupted run resumes

The "demo" preset of imagen.PRESETS: a base U-Net and two Efficient U-Net super-resolution
stages (32 -> 64 -> 128) with the paper's structure (classifier-free guidance training,
noise-conditioning augmentation, static and dynamic thresholding), trained by train.py on the
synthetic captioned shapes of shapes.py and conditioned on a small frozen T5 v1.1 encoder that
pretrain_t5.py pretrained on text only (§2.1; encoders/, loaded by text_encoders.py as a
real T5 checkpoint), its output whitened on the training captions. The base's network is
demo_unet.py's. Where the demo departs from the paper
(v-prediction, static thresholding, ...) imagen.py and train.py mark it and link the evidence
in docs/demo_experiments.md. Then it writes WORKDIR/report.md:
  - colour / count / position accuracy on held-out captions and new seeds, through the full
    cascade at sample.py's default settings, with the detector's score on real images as the
    ceiling (the skills of DrawBench, §3 and App. C);
  - a guidance sweep, alignment vs a fidelity proxy, like the paper's Pareto curves (Fig. 4);
  - none / static / dynamic thresholding at a high guidance weight side by side (Fig. A.9);
  - prompts outside the caption grammar (other words for the relations, digits, colour
    synonyms), scored by the same detector as the grammar captions they mean.

  python demo.py --text-encoder random:t5-wordnet-small --workdir runs/untrained
trains the same cascade on that encoder's architecture at T5's initialisation, the baseline of
an encoder that learnt nothing from text (NAME: another encoder in encoders/, unwhitened;
whitened:NAME: whitened).
"""

import argparse
import collections
import dataclasses
import json
import os
import time

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

import checkpoints
import cli as command_line
import imagen
import shapes
import text_encoders
import train
from evaluate import plot_curve
from sample import grid

# watching the stages train (monitor.py) within 5% of the demo's time: the base's held-out loss
# 3 times and its samples twice; one grid of each super-resolution stage, at its end
WATCH = {"base": lambda steps: {"eval_every": steps // 3, "sample_every": steps // 2},
         "sr1": lambda steps: {"eval_every": 0, "sample_every": steps},
         "sr2": lambda steps: {"eval_every": 0, "sample_every": steps}}
EVAL_SEED = 1000  # new seeds: the evaluation never shares an image with training
SWEEP = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0)  # guidance weights (the paper sweeps 1-10, App. D)
TARGETS = {"colour": 0.90, "position": 0.75, "count": 0.60}
EVAL_BATCH = 32  # captions per sampling batch
N_EVAL = 128  # held-out examples sampled through the cascade (125 held-out captions, new seeds)


# Prompts the caption grammar never has, each with the grammar caption that says the same and
# that the detector scores it by: what an encoder that learnt English from text can bring and
# a random one cannot. Reported, no target.
NEW_LANGUAGE = {
    "relation": [("a red circle to the left of a blue square", "a red circle on the left of a blue square"),
                 ("a green triangle to the right of a yellow circle", "a green triangle on the right of a yellow circle"),
                 ("a purple square over an orange triangle", "a purple square above an orange triangle"),
                 ("a blue circle beneath a red square", "a blue circle below a red square"),
                 ("a yellow square under a green circle", "a yellow square below a green circle"),
                 ("an orange circle on top of a blue triangle", "an orange circle above a blue triangle")],
    "digit": [("2 red squares", "two red squares"), ("3 green circles", "three green circles"),
              ("2 purple triangles", "two purple triangles"), ("3 orange squares", "three orange squares")],
    "colour synonym": [("a crimson circle", "a red circle"), ("a scarlet square", "a red square"),
                       ("a violet triangle", "a purple triangle"), ("an azure circle", "a blue circle"),
                       ("an emerald square", "a green square"), ("a golden triangle", "a yellow triangle"),
                       ("a lemon circle", "a yellow circle"), ("a tangerine square", "an orange square")],
}
NEW_LANGUAGE_SEEDS = 2  # samples per prompt


def heldout_examples(n, size):
    return [shapes.make_example(EVAL_SEED, i, size, split="heldout") for i in range(n)]


def alignment(images, captions):
    """Mean accuracy of each skill over the captions it applies to."""
    hits = {"colour": [], "count": [], "position": []}
    for img, cap in zip(images, captions):
        for k, v in shapes.score(Image.fromarray(img) if isinstance(img, np.ndarray) else img, cap).items():
            if v is not None:
                hits[k].append(bool(v))
    return {k: (float(np.mean(v)) if v else float("nan"), len(v)) for k, v in hits.items()}


def misses(images, captions):
    """The samples that fail a skill: [{"caption", "failed": [skills], "drawn": "2 orange, 1 red"}]."""
    out = []
    for img, cap in zip(images, captions):
        img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
        failed = [k for k, v in shapes.score(img, cap).items() if v is False]
        if failed:
            drawn = collections.Counter(o["colour"] for o in shapes.detect(img))
            out.append({"caption": cap, "failed": failed,
                        "drawn": ", ".join(f"{n} {c}" for c, n in sorted(drawn.items())) or "nothing"})
    return out


def position_breakdown(images, captions):
    """Why position fails, from the position captions: the fraction whose image has both named
    colours, and of those the fraction in the named relation and in the opposite one. A model
    that draws the right layout axis but puts the colours on either side at random scores
    about the same on both (the real images: 100% and 0%)."""
    both = named = opposite = n = 0
    for img, cap in zip(images, captions):
        spec = shapes.parse_caption(cap)
        if spec["kind"] != "position":
            continue
        img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
        n += 1
        if not {c for c, _ in spec["objects"]} <= {o["colour"] for o in shapes.detect(img)}:
            continue
        both += 1
        named += shapes.score(img, cap)["position"]
        opposite += shapes.score(img, shapes.swap_relation(cap))["position"]
    nan = float("nan")
    return {"captions": n, "both_colours": both / n if n else nan,
            "named": named / both if both else nan, "opposite": opposite / both if both else nan}


def purity(images):
    """Fidelity proxy: the fraction of pixels within 60 (RGB distance) of white or a palette
    colour. Real dataset images score ~0.97 (only anti-aliased edges miss); noise, washed-out
    or over-saturated samples score lower."""
    refs = np.array([(255, 255, 255)] + list(shapes.PALETTE.values()), np.float32)
    x = np.asarray(images, np.float32)[..., None, :]
    return float((np.sqrt(((x - refs) ** 2).sum(-1)).min(-1) < 60).mean())


class Progress:
    """One progress line for the whole demo: what runs now (stage k of 3 and its step, or the
    evaluation's batch), a bar over the whole run and the time left for all of it. The parts
    are weighted by their FLOPs (XLA's count of each network's forward pass; a train step
    counted as 3 passes), so the rate measured so far predicts the rest; work done before a
    resume is skipped, not timed."""

    def __init__(self, stage_configs, tcfgs, sampling, n_eval, n_sweep, batch_size):
        fwd = lambda name, side, B, passes: passes * B * imagen.forward_flops(stage_configs[name], 1, side, compile=False) / 1e9
        guided = lambda name, st: 1 + (st.guidance != 1.0)
        self.units = {name: fwd(name, stage_configs[name].train_side, tcfgs[name].batch_size, 3)
                      for name in imagen.STAGE_NAMES}
        B = min(batch_size, n_eval)
        self.units["cascade"] = sum(fwd(n, stage_configs[n].side, B, guided(n, sampling[n]) * sampling[n].steps)
                                    for n in imagen.STAGE_NAMES)
        self.units["sweep"] = fwd("base", stage_configs["base"].side, min(batch_size, n_sweep), 2 * sampling["base"].steps)
        self.units["thresholding"] = fwd("base", stage_configs["base"].side, 8, 2 * sampling["base"].steps)
        self.units["language"] = self.units["cascade"]
        n_language = NEW_LANGUAGE_SEEDS * sum(map(len, NEW_LANGUAGE.values()))
        total = (sum(self.units[n] * tcfgs[n].steps for n in imagen.STAGE_NAMES)
                 + self.units["cascade"] * (-(-n_eval // B) + -(-n_language // B))
                 + self.units["sweep"] * len(SWEEP) * -(-n_sweep // min(batch_size, n_sweep)) + self.units["thresholding"] * 3)
        # smoothing=0: the mean rate so far (steps are queued in bursts, which a moving average over-weights)
        self.bar = tqdm(total=total, unit="GFLOP", dynamic_ncols=True, smoothing=0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} < {remaining} left for the whole demo")
        self.part, self.label = None, ""

    def start(self, part, label):
        self.part, self.label = part, label

    def advance(self, ticks, status, skipped=False):
        done = min(ticks * self.units[self.part], self.bar.total - self.bar.n)  # float sums: never past 100%
        if skipped:  # done before a resume: not part of the rate ((n - initial) / elapsed)
            self.bar.n += done
            self.bar.initial += done
            self.bar.last_print_n = self.bar.n
        else:
            self.bar.update(done)
        self.bar.set_description_str(f"demo {self.label}, {status}")

    def on_train_step(self, info):
        """train.train's callback."""
        self.advance(info["new_steps"], f"{info['stage']} step {info['step']}/{info['steps']}", skipped=info["resumed"])

    def on_batch(self, info):
        """imagen.generate's callback."""
        self.advance(1, f"sampling batch {info['batch']}/{info['batches']}")

    def close(self):
        self.bar.close()


def evaluate(workdir, sampling, n_eval=N_EVAL, n_sweep=32, batch_size=32, seed=0, progress=None):
    """Sample the trained cascade (sampling: SampleSettings by stage name); -> the numbers.
    progress: the demo's Progress line (else a bar per sampling call)."""
    batch_size = min(batch_size, n_eval)
    stages = checkpoints.load_cascade(workdir, 3)
    enc, tok = text_encoders.load_text_encoder(stages[0].config.text_encoder)
    settings = [sampling[s.config.name] for s in stages]
    final = stages[-1].config.side
    t = time.time()
    examples = heldout_examples(n_eval, final)
    captions = [c for _, c, _, _ in examples]
    start = progress.start if progress else lambda part, label: None
    shown = {"callback": progress.on_batch} if progress else {"progress": True}
    start("cascade", "evaluation")
    samples = imagen.generate(stages, enc, tok, captions, settings, seed, batch_size, **shown)
    t_cascade = time.time() - t
    result = {"cascade": alignment(samples, captions),
              "ceiling": alignment([img for img, _, _, _ in examples], captions),
              "position_breakdown": position_breakdown(samples, captions),
              "misses": misses(samples, captions),
              "purity": purity(samples), "purity_real": purity(np.stack([np.asarray(e[0]) for e in examples])),
              "seconds_sampling": t_cascade}
    grid(samples[:16], cols=8).save(os.path.join(workdir, "samples.png"))
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
        f.write("\n".join(captions[:16]) + "\n")

    # guidance sweep on the base stage (its 32x32 outputs): alignment vs fidelity, Fig. 4
    base = stages[:1]
    sweep = []
    for w in SWEEP:
        st = [dataclasses.replace(settings[0], guidance=w)]
        start("sweep", f"guidance sweep, w = {w:g}")
        imgs = imagen.generate(base, enc, tok, captions[:n_sweep], st, seed, min(batch_size, n_sweep), **shown)
        acc = alignment(imgs, captions[:n_sweep])
        mean_acc = float(np.nanmean([v for v, _ in acc.values()]))
        sweep.append({"w": w, "alignment": mean_acc, "purity": purity(imgs), **{k: v for k, (v, _) in acc.items()}})
    plot_curve([(s["purity"], s["alignment"], f"w={s['w']:g}") for s in sweep],
               os.path.join(workdir, "guidance_sweep.png"), "fidelity proxy (palette purity)",
               "alignment (mean accuracy)")
    result["sweep"] = sweep

    # thresholding at a high guidance weight, Fig. A.9
    rows, thresh = [], {}
    for mode in ("none", "static", "dynamic"):
        st = [dataclasses.replace(settings[0], guidance=10.0, threshold=mode)]
        start("thresholding", f"thresholding, {mode}")
        imgs = imagen.generate(base, enc, tok, captions[:8], st, seed, 8, **shown)
        rows.append(imgs)
        thresh[mode] = {"purity": purity(imgs), "mean_abs_saturation": float(np.mean((imgs == 0) | (imgs == 255)))}
    grid(np.concatenate(rows), cols=8).save(os.path.join(workdir, "thresholding.png"))
    result["thresholding"] = thresh

    # prompts outside the grammar, through the cascade, scored as the captions they mean
    pairs = [(g, p, c) for g, group in NEW_LANGUAGE.items() for p, c in group] * NEW_LANGUAGE_SEEDS
    start("language", "prompts outside the grammar")
    imgs = imagen.generate(stages, enc, tok, [p for _, p, _ in pairs], settings, seed + 1, batch_size, **shown)
    result["new_language"] = {g: alignment([i for i, (gg, _, _) in zip(imgs, pairs) if gg == g],
                                           [c for gg, _, c in pairs if gg == g]) for g in NEW_LANGUAGE}
    n = len(pairs) // NEW_LANGUAGE_SEEDS
    grid(imgs[:n], cols=6).save(os.path.join(workdir, "new_language.png"))
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result, settings, stages


def encoder_note(name):
    base = name.removeprefix(text_encoders.WHITENED_PREFIX)
    note = ("T5 v1.1 architecture at T5's random initialisation, frozen" if base.startswith(text_encoders.RANDOM_PREFIX)
            else "T5 v1.1 pretrained on text only by pretrain_t5.py, frozen")
    return note + (", its output whitened on the training captions" if base != name else "")


def write_report(workdir, result, settings, stages, train_seconds):
    c, ceil = result["cascade"], result["ceiling"]
    lines = ["# Demo report", "",
             f"Cascade: {' -> '.join(str(s.config.side) for s in stages)}; checkpoints at steps "
             f"{', '.join(f'{s.config.name} {s.step}' for s in stages)}; text encoder "
             f"{stages[0].config.text_encoder!r} ({encoder_note(stages[0].config.text_encoder)}).",
             f"Training time: {', '.join(f'{k} {v / 60:.1f} min' for k, v in train_seconds.items())}; "
             f"sampling the {result['cascade']['colour'][1]} held-out captions through the cascade: "
             f"{result['seconds_sampling'] / 60:.1f} min.",
             "", "## Text alignment on held-out captions (never trained on) and new seeds", "",
             "Full cascade at sample.py's defaults: " + "; ".join(
                 f"{s.config.name}: w={st.guidance:g}, {st.steps} {st.sampler} steps, {st.threshold} thresholding"
                 + (f", aug level {st.aug_level:g}" if s.config.lowres_side else "") for s, st in zip(stages, settings)) + ".",
             "", "| skill | samples | accuracy | target | detector on real images (ceiling) |", "| --- | --- | --- | --- | --- |"]
    for k in ("colour", "position", "count"):
        acc, n = c[k]
        lines.append(f"| {k} | {n} | {acc:.1%} | {TARGETS[k]:.0%} {'met' if acc >= TARGETS[k] else 'NOT met'} | {ceil[k][0]:.1%} |")
    pb = result["position_breakdown"]
    lines += ["", f"Position captions ({pb['captions']}): both named colours drawn in {pb['both_colours']:.0%}; "
              f"of those, in the named relation {pb['named']:.0%} and in the opposite one {pb['opposite']:.0%} "
              "(a model that puts the colours on either side at random scores about equal on both; "
              "real images 100% and 0%)."]
    lines += ["", "Detector (shapes.detect): pixels with chroma below 60 are background, the others take the "
              "palette colour whose line from white passes nearest (so edges blended with the white "
              "background keep their shape's colour); 4-connected components of at least 1% of the image are objects. "
              "colour: exactly the caption's colours are present; count: the number of objects of the "
              "caption's colour; position: the centroids of the two largest objects of the two colours.",
              "", f"Samples that miss a skill ({len(result['misses'])} of {c['colour'][1]}; objects as the "
              "detector sees them):", "", "| caption | missed | drawn |", "| --- | --- | --- |"]
    lines += [f"| {m['caption']} | {', '.join(m['failed'])} | {m['drawn']} |" for m in result["misses"]]
    lines += ["", f"Fidelity proxy (palette purity): samples {result['purity']:.3f}, real images {result['purity_real']:.3f}.",
              "", "![samples](samples.png)", "", "(captions in samples.txt)", "",
              "## Guidance sweep (base stage, 32x32), like Fig. 4", "",
              "| w | alignment | colour | count | position | purity |", "| --- | --- | --- | --- | --- | --- |"]
    for s in result["sweep"]:
        lines.append(f"| {s['w']:g} | {s['alignment']:.3f} | {s['colour']:.2f} | {s['count']:.2f} | "
                     f"{s['position']:.2f} | {s['purity']:.3f} |")
    lines += ["", "![guidance sweep](guidance_sweep.png)", "",
              "## Thresholding at w = 10 (base stage), like Fig. A.9", "",
              "Rows: none, static, dynamic (p = 99.5).", "", "![thresholding](thresholding.png)", "",
              "| thresholding | purity | fraction of saturated (0 or 255) values |", "| --- | --- | --- |"]
    for mode, v in result["thresholding"].items():
        lines.append(f"| {mode} | {v['purity']:.3f} | {v['mean_abs_saturation']:.3f} |")
    lines += ["", "## Prompts outside the caption grammar", "",
              "Other words for the relations, digits and colour synonyms, never in the training captions "
              f"(demo.NEW_LANGUAGE), {NEW_LANGUAGE_SEEDS} samples each through the cascade, scored as the "
              "grammar caption they mean. No target.", "",
              "| prompts | samples | colour | count | position |", "| --- | --- | --- | --- | --- |"]
    for group, acc in result["new_language"].items():
        cell = lambda k: f"{acc[k][0]:.0%}" if acc[k][1] else "-"
        lines.append(f"| {group} (e.g. \"{NEW_LANGUAGE[group][0][0]}\") | {acc['colour'][1]} | {cell('colour')} | "
                     f"{cell('count')} | {cell('position')} |")
    lines += ["", "![prompts outside the grammar, one sample each, in the order of demo.NEW_LANGUAGE](new_language.png)"]
    lines += ["", "## While training", "",
              "Each stage's EMA weights sampled the same held-out prompts with the same noise as it trained "
              "(monitor.py; the 32->64 and 64->128 stages upsample real low-res images), and the base's gave its "
              "loss on 64 held-out examples by noise level; all of it in each stage's metrics.jsonl and TensorBoard "
              f"(`tensorboard --logdir {workdir}`).", "",
              "| stage | held-out loss at each evaluation (step: loss) | sample grids |", "| --- | --- | --- |"]
    for name in imagen.STAGE_NAMES:
        evals = [r for r in read_metrics(os.path.join(workdir, name)) if "heldout_loss" in r]
        grids = sorted(os.listdir(os.path.join(workdir, name, "samples"))) if os.path.isdir(
            os.path.join(workdir, name, "samples")) else []
        losses = ", ".join(f"{r['step']}: {r['heldout_loss']:.4f}" for r in evals)
        links = ", ".join(f"[{int(g[5:12])}]({name}/samples/{g})" for g in grids)
        lines.append(f"| {name} | {losses} | {links} |")
    if os.path.exists(os.path.join(workdir, "training_samples.png")):
        lines += ["", "The base's samples over training (one row per sample step, the prompts of samples in "
                  "base/heldout.npz):", "", "![the base's samples over training](training_samples.png)"]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def read_metrics(stage_dir):
    """A stage's metrics.jsonl records ([] before it has any)."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def training_strip(stage_dir, path):
    """A stage's sample grids stacked, one row per sample step (the step written on each) -> path."""
    from PIL import ImageDraw  # noqa: PLC0415
    names = sorted(os.listdir(os.path.join(stage_dir, "samples")))
    grids = [Image.open(os.path.join(stage_dir, "samples", n)).convert("RGB") for n in names]
    w, h = grids[0].size
    out = Image.new("RGB", (w + 64, h * len(grids)), "white")
    for k, (n, g) in enumerate(zip(names, grids)):
        out.paste(g, (64, k * h))
        ImageDraw.Draw(out).text((4, k * h + h // 2 - 5), f"{int(n[5:12])}", fill="black")
    out.save(path)
    return path


def with_text_encoder(stage_configs, name):
    """The stages conditioned on another text encoder: its name, its width as the U-Nets'
    text_dim, and as text length the longest caption or NEW_LANGUAGE prompt in its tokens,
    rounded up to 8 (t5-wordnet-small: 11 -> 16)."""
    width = text_encoders.abstract_encoder(name).cfg.d_model
    _, tokenizer = text_encoders.load_text_encoder(name)
    texts = shapes.all_captions() + [p for group in NEW_LANGUAGE.values() for p, _ in group]
    length = -(-max(map(len, tokenizer(texts)["input_ids"])) // 8) * 8
    return {k: dataclasses.replace(c, text_encoder=name, text_length=length,
                                   unet=dataclasses.replace(c.unet, text_dim=width))
            for k, c in stage_configs.items()}


def main(workdir="runs/demo", stage_configs=None, tcfgs=None, sampling=None, n_eval=N_EVAL, n_sweep=32,
         keep_compiled=False, text_encoder=None):
    """Train the three demo stages (resuming if interrupted), evaluate, write the report.
    keep_compiled: JAX's compilation cache in WORKDIR/compiled, so that the 64->128 stage reads
    back the training step of the 32->64 stage (the same network on the same crops: the same
    program) instead of compiling it again, and a resumed run skips its compiles.
    text_encoder: another encoder than the preset's (a name in encoders/, random:NAME, a directory)."""
    command_line.check_folder(workdir, "--workdir")
    if keep_compiled:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(workdir, "compiled")))
    stage_configs = stage_configs or {k: imagen.with_backend(v, imagen.backend()) for k, v in imagen.PRESETS["demo"].items()}
    if text_encoder:
        stage_configs = with_text_encoder(stage_configs, text_encoder)
    tcfgs = tcfgs or train.TRAIN_PRESETS["demo"]
    sampling = sampling or imagen.SAMPLING["demo"]
    train_seconds = {}
    progress = Progress(stage_configs, tcfgs, sampling, n_eval, n_sweep, EVAL_BATCH)
    for k, name in enumerate(imagen.STAGE_NAMES):
        progress.start(name, f"stage {k + 1} of 3")
        t = time.time()
        seconds_file = os.path.join(workdir, name, "train_seconds.json")  # summed over resumes
        before = 0.0
        if os.path.exists(seconds_file):
            with open(seconds_file) as f:
                before = json.load(f)
        steps = tcfgs[name].steps
        train.train(stage_configs[name], tcfgs[name], os.path.join(workdir, name),
                    log_every=max(1, min(50, steps // 10)), save_every=max(100, steps // 3), progress=False,
                    callback=progress.on_train_step,
                    **WATCH[name](steps))
        train_seconds[name] = before + time.time() - t
        with open(seconds_file, "w") as f:
            json.dump(train_seconds[name], f)
    if os.path.isdir(os.path.join(workdir, "base", "samples")):
        training_strip(os.path.join(workdir, "base"), os.path.join(workdir, "training_samples.png"))
    result, settings, stages = evaluate(workdir, sampling, n_eval, n_sweep, EVAL_BATCH, progress=progress)
    progress.close()
    write_report(workdir, result, settings, stages, train_seconds)
    print(f"wrote {workdir}/report.md")
    for k in ("colour", "position", "count"):
        print(f"  {k:9s} {result['cascade'][k][0]:.1%} (target {TARGETS[k]:.0%}, ceiling {result['ceiling'][k][0]:.1%})")
    return result


def cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--text-encoder", default=None,
                   help=f"default {imagen.DEMO_TEXT_ENCODER}; a name in encoders/ (t5-wordnet-small) or a "
                        f"T5 v1.1 checkpoint directory; random:NAME for its architecture untrained; "
                        f"whitened:NAME for its output whitened on the training captions")
    args = p.parse_args(argv)
    command_line.use_every_core()
    return main(args.workdir, keep_compiled=True, text_encoder=args.text_encoder)


if __name__ == "__main__":
    command_line.run(cli)
