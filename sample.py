"""Sample images from a trained cascade: prompts in, PNGs out.

  python sample.py --workdir runs/demo "a red circle on the left of a blue square"
  python sample.py --workdir runs/demo --prompts drawbench           # one grid per category
  python sample.py --workdir runs/demo --sweep guidance=1,3,5,7 "two blue squares"
  python sample.py --workdir runs/demo --settings runs/demo/samples/settings.json   # reproduce

Writes OUT/grid.png, OUT/NNNN.png (one per prompt, in order), OUT/settings.json (everything
needed to reproduce the images exactly). Settings come from a named set of imagen.SAMPLING
(--sampling; default: "paper-best" for a cascade of the paper presets, the paper's "best
samples": guidance 5, aug level 0.3, dynamic thresholding p = 99.5, App. D.2, Figs. A.10-A.12;
"demo" for the demo cascade), then the flags below; "coco-fid" is Table 1's w = 1.35 (base) /
8.0 (super-resolution) with aug level 0.
Saharia et al. 2022, §2 (the cascade), §2.2 (guidance), §2.3 (thresholding), §2.4 (aug level).
"""

import argparse
import csv
import dataclasses
import json
import os
import sys

import numpy as np
from PIL import Image

import data
import imagen

DRAWBENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drawbench.csv")


def read_drawbench():
    """The 200 DrawBench prompts (§4.4): [(prompt, category)]."""
    with open(DRAWBENCH, encoding="utf-8-sig", newline="") as f:
        return [(r["Prompt"], r["Category"]) for r in csv.DictReader(f)]


def grid(images, cols=None, labels=None):
    """uint8 images (N, H, W, 3) -> one PIL image, `cols` per row."""
    n, h, w, _ = images.shape
    cols = cols or min(n, 8)
    rows = -(-n // cols)
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return Image.fromarray(canvas)


def per_stage(value, n, cast):
    """'5' or '5,8,8' -> a list of n values (one per stage)."""
    parts = [cast(v) for v in str(value).split(",")]
    if len(parts) not in (1, n):
        raise SystemExit(f"give one value or one per stage ({n}): {value!r}")
    return parts * n if len(parts) == 1 else parts


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="text prompts (the empty string is unconditional)")
    p.add_argument("--workdir", default="runs/demo", help="holds base/, sr1/, sr2/ from train.py")
    p.add_argument("--out", default=None, help="default WORKDIR/samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", type=int, choices=[1, 2, 3], default=None,
                   help="how many stages to run (default: those of --sampling: 3, or 2 for coco-fid)")
    p.add_argument("--sampling", choices=list(imagen.SAMPLING), default=None,
                   help="named settings (default: the cascade's preset's: paper-best or demo)")
    p.add_argument("--guidance", default=None, help="w, one value or one per stage: 5 or 5,8,8")
    p.add_argument("--aug-level", default=None, help="super-resolution aug level(s), e.g. 0.3")
    p.add_argument("--threshold", choices=["none", "static", "dynamic"], default=None)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None)
    p.add_argument("--steps", default=None, help="steps, one value or one per stage: 100,50,50")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompts", dest="prompt_set", choices=["drawbench"], default=None)
    p.add_argument("--sweep", default=None, help="guidance=1,3,5,7 | aug_level=0,0.3,0.6 | threshold=none,static,dynamic")
    p.add_argument("--settings", default=None, help="settings.json of an earlier run: reproduce it")
    return p.parse_args(argv)


def resolve_settings(args, stages):
    """Per-stage SampleSettings: the named set, then the command line's overrides."""
    n = len(stages)
    settings = [imagen.SAMPLING[args.sampling][s.config.name] if args.sampling else
                imagen.default_sampling(s.config) for s in stages]
    overrides = {"guidance": (args.guidance, float), "aug_level": (args.aug_level, float),
                 "steps": (args.steps, int), "threshold": (args.threshold, str), "sampler": (args.sampler, str)}
    for field, (value, cast) in overrides.items():
        if value is not None:
            for i, v in enumerate(per_stage(value, n, cast)):
                settings[i] = dataclasses.replace(settings[i], **{field: v})
    return settings


def run(args):
    if args.settings:  # reproduce an earlier run exactly
        with open(args.settings) as f:
            saved = json.load(f)
        args.prompts, args.seed, args.batch_size = saved["prompts"], saved["seed"], saved["batch_size"]
        args.stages, args.workdir = len(saved["stages"]), saved["workdir"]
    if not args.prompts and not args.prompt_set:
        raise SystemExit("usage: python sample.py --workdir DIR \"a prompt\" [\"another\" ...] "
                         "(or --prompts drawbench); see --help")
    named = imagen.SAMPLING[args.sampling] if args.sampling else None
    args.stages = args.stages or (len(named) if named else 3)
    if named and args.stages > len(named):
        raise SystemExit(f"--sampling {args.sampling} gives settings for {len(named)} stages "
                         f"({', '.join(named)}): use --stages {len(named)} or fewer")
    try:
        stages = imagen.load_cascade(args.workdir, args.stages)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    settings = resolve_settings(args, stages)
    if args.settings:
        settings = [imagen.SampleSettings(**s["settings"]) for s in saved["stages"]]
    encoder, tokenizer = data.load_text_encoder(stages[0].config.text_encoder)
    out = args.out or os.path.join(args.workdir, "samples")
    os.makedirs(out, exist_ok=True)

    if args.prompt_set == "drawbench":
        bench = read_drawbench()
        prompts = [p for p, _ in bench]
    else:
        prompts = list(args.prompts)
    gen = lambda st: imagen.generate(stages, encoder, tokenizer, prompts, st, args.seed, args.batch_size,
                                     progress=True)
    if args.sweep:
        key, values = args.sweep.split("=")
        cast = {"guidance": float, "aug_level": float, "threshold": str}[key]
        rows = []
        for v in values.split(","):
            st = [dataclasses.replace(s, **{key: cast(v)}) if key != "aug_level" or i > 0 else s
                  for i, s in enumerate(settings)]
            rows.append(gen(st))
        grid(np.concatenate(rows), cols=len(prompts)).save(os.path.join(out, f"sweep_{key}.png"))
        print(f"wrote {out}/sweep_{key}.png: rows {key} = {values}, columns = prompts")
        images = rows[0]
    else:
        images = gen(settings)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(out, f"{i:04d}.png"))
    grid(images).save(os.path.join(out, "grid.png"))
    if args.prompt_set == "drawbench":
        for cat in sorted({c for _, c in bench}):
            idx = [i for i, (_, c) in enumerate(bench) if c == cat]
            grid(images[idx]).save(os.path.join(out, f"grid_{cat.replace(' ', '_')}.png"))
    record = {"prompts": prompts, "seed": args.seed, "batch_size": args.batch_size,
              "workdir": args.workdir, "text_encoder": stages[0].config.text_encoder,
              "stages": [{"name": s.config.name, "checkpoint_step": s.step, "schedule": s.config.schedule,
                          "settings": dataclasses.asdict(st)}
                         for s, st in zip(stages, settings)]}
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {len(images)} images, grid.png and settings.json to {out}")
    return images


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # bad input: a message, not a traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
