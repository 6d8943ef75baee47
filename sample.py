"""Sample images from a trained cascade: prompts in, PNGs out.

  python sample.py --workdir runs/demo "a red circle on the left of a blue square"
  python sample.py --workdir runs/demo --prompts drawbench           # one grid per category
  python sample.py --workdir runs/demo --sweep guidance=1,3,5,7 "two blue squares"
  python sample.py --settings runs/demo/samples/001/settings.json   # reproduce, bit for bit

Writes OUT/grid.png, OUT/NNNN.png (one per prompt, in order), OUT/settings.json (everything
needed to reproduce the images exactly); OUT is --out (empty, new, or this same command's) or
else a new WORKDIR/samples/NNN. Settings come from a named set of imagen.SAMPLING
(--sampling; default: "paper-best" for a cascade of the paper presets, the paper's "best
samples": guidance 5, aug level 0.3, dynamic thresholding p = 99.5, App. D.2, Figs. A.10-A.12;
"demo" for the demo cascade), then the flags below; "coco-fid" is Table 1's w = 1.35 (base) /
8.0 (super-resolution) with aug level 0. --settings takes the prompts, seed, batch size,
stages and settings it records: a flag that would change them is refused.
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

import cli
import checkpoints
import imagen
import text_encoders

DRAWBENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drawbench.csv")


def read_drawbench():
    """The 200 DrawBench prompts (§3, App. C, Table A.1): [(prompt, category)]."""
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


MAX_GUIDANCE = 30.0  # a warning above: App. D.2's sweeps reach w = 18 (Fig. A.11)
MAX_STEPS = 10_000  # a warning above (the paper states no step count; DDPM trained with 1000)
SWEEPS = {"guidance": cli.finite_float, "aug_level": cli.unit_float, "steps": cli.positive_int,
          "threshold": ("none", "static", "dynamic")}


def sweep_arg(text):
    """--sweep KEY=V1,V2,... -> (key, [values]), each value checked like its own flag."""
    key, eq, values = text.partition("=")
    if not eq or key not in SWEEPS:
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=V1,V2,... with KEY one of {', '.join(SWEEPS)}")
    return key, cli.per_stage(SWEEPS[key])(values)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help='text prompts ("" or a blank one is unconditional: the null '
                   'condition classifier-free guidance samples without text)')
    p.add_argument("--workdir", default=None, help="holds base/, sr1/, sr2/ from train.py (default: runs/demo; "
                   "with --settings, the one it records)")
    p.add_argument("--out", default=None, help="an empty or new folder (default: WORKDIR/samples/NNN, the next number)")
    p.add_argument("--seed", type=cli.seed, default=None, help="default: 0")
    p.add_argument("--stages", type=int, choices=[1, 2, 3], default=None,
                   help="how many stages to run (default: those of --sampling: 3, or 2 for coco-fid)")
    p.add_argument("--sampling", choices=list(imagen.SAMPLING), default=None,
                   help="named settings (default: the cascade's preset's: paper-best or demo)")
    p.add_argument("--guidance", type=cli.per_stage(cli.finite_float), default=None,
                   help="w, one value or one per stage: 5 or 5,8,8")
    p.add_argument("--aug-level", type=cli.per_stage(cli.unit_float), default=None,
                   help="super-resolution aug level(s) in [0, 1], e.g. 0.3")
    p.add_argument("--threshold", choices=["none", "static", "dynamic"], default=None)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None)
    p.add_argument("--steps", type=cli.per_stage(cli.positive_int), default=None,
                   help="steps, one value or one per stage: 100,50,50")
    p.add_argument("--batch-size", type=cli.positive_int, default=None,
                   help="prompts per batch (default: 8); the images depend on it with the seed")
    p.add_argument("--prompts", dest="prompt_set", choices=["drawbench"], default=None,
                   help="a prompt set, instead of prompts on the command line")
    p.add_argument("--sweep", type=sweep_arg, default=None,
                   help="guidance=1,3,5,7 | aug_level=0,0.3,0.6 | steps=10,50 | threshold=none,static,dynamic")
    p.add_argument("--settings", default=None, help="settings.json of an earlier run: reproduce it, with the "
                   "prompts, seed, batch size, stages and settings it records (give none of these)")
    args = p.parse_args(argv)
    for prompt in args.prompts:  # a command line's undecodable bytes arrive as lone surrogates
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            p.error(f"prompt {prompt.encode('utf-8', 'surrogateescape')[:60]!r} is not UTF-8 text")
    if args.settings is not None:  # reproduces what it records: a flag that changes it is refused
        given = [flag for flag, value in (
            ("the prompts", args.prompts), ("--prompts", args.prompt_set), ("--seed", args.seed),
            ("--batch-size", args.batch_size), ("--stages", args.stages), ("--sampling", args.sampling),
            ("--guidance", args.guidance), ("--aug-level", args.aug_level), ("--threshold", args.threshold),
            ("--sampler", args.sampler), ("--steps", args.steps)) if value not in (None, [])]
        if given:
            p.error(f"--settings reproduces the run it records (its prompts, seed, batch size, stages and "
                    f"settings): drop {', '.join(given)} (or leave --settings out and give every flag)")
        return args
    if args.prompts and args.prompt_set:
        shown = ", ".join(map(repr, args.prompts))
        p.error(f"--prompts {args.prompt_set} and prompts on the command line ({shown[:60]}"
                f"{'...' if len(shown) > 60 else ''}): give one or the other")
    if not args.prompts and not args.prompt_set:
        p.error('give one or more prompts ("a red circle"; "" is unconditional) or --prompts drawbench')
    args.workdir = args.workdir or "runs/demo"
    args.seed = 0 if args.seed is None else args.seed
    args.batch_size = args.batch_size or 8
    named = imagen.SAMPLING[args.sampling] if args.sampling else None
    args.stages = args.stages or (len(named) if named else 3)
    if named and args.stages > len(named):
        p.error(f"--sampling {args.sampling} gives settings for {len(named)} stages "
                f"({', '.join(named)}): use --stages {len(named)} or fewer")
    for flag in ("guidance", "aug_level", "steps"):
        values = getattr(args, flag)
        if values is not None and len(values) not in (1, args.stages):
            p.error(f"--{flag.replace('_', '-')}: give one value or one per stage ({args.stages})")
    return args


def resolve_settings(args, stages):
    """Per-stage SampleSettings: the named set, then the command line's overrides."""
    n = len(stages)
    settings = [imagen.SAMPLING[args.sampling][s.config.name] if args.sampling else
                imagen.default_sampling(s.config) for s in stages]
    overrides = {"guidance": args.guidance, "aug_level": args.aug_level, "steps": args.steps,
                 "threshold": args.threshold and [args.threshold], "sampler": args.sampler and [args.sampler]}
    for field, values in overrides.items():
        if values is not None:
            for i, v in enumerate(values * n if len(values) == 1 else values):
                settings[i] = dataclasses.replace(settings[i], **{field: v})
    return settings


def output_dir(args):
    """The folder the images go to, made and checked writable before any model loads: --out
    (refused when it holds another run's files; the same command may rewrite its own), or a new
    WORKDIR/samples/NNN."""
    def same_run(folder):  # this command's own folder: the same prompts, seed and workdir
        try:
            with open(os.path.join(folder, "settings.json")) as f:
                old = json.load(f)
        except (OSError, ValueError):
            return None
        same = (old.get("prompts"), old.get("seed"), old.get("workdir")) == \
               (args.prompts or old.get("prompts"), args.seed, args.workdir) and not args.prompt_set
        return old if same else None

    if args.out is None:  # the next number, or the last one where this command stopped unfinished
        root = os.path.join(args.workdir, "samples")
        taken = [int(d) for d in (os.listdir(root) if os.path.isdir(root) else []) if d.isdigit()]
        last = os.path.join(root, f"{max(taken, default=0):03d}")
        unfinished = taken and (same_run(last) or {}).get("complete") is False
        out = last if unfinished else os.path.join(root, f"{max(taken, default=0) + 1:03d}")
    else:
        out = args.out
        if os.path.isdir(out) and os.listdir(out):
            if same_run(out) is None:
                raise cli.UserError(f"--out {out} already holds files of another run: give an empty or new "
                                    f"folder, or leave --out out for a new WORKDIR/samples/NNN")
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, ".write_test"), "w"):
            pass
        os.remove(os.path.join(out, ".write_test"))
    except OSError as e:
        raise cli.UserError(f"cannot write to --out {out} ({e.strerror}): give a writable folder") from None
    return out


def save(img, path):
    """A PNG written whole or not at all (a temporary name, then renamed)."""
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_settings(path):
    """An earlier run's settings.json -> (prompts, seed, batch size, workdir, checkpoint steps,
    [SampleSettings]), every value checked as its flag is; a fault names the file and the field."""
    try:
        with open(path) as f:
            saved = json.load(f)
        prompts, stages = saved["prompts"], saved["stages"]
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise ValueError("prompts: not a list of strings")
        if not (isinstance(stages, list) and 1 <= len(stages) <= len(imagen.STAGE_NAMES)):
            raise ValueError(f"stages: not a list of 1 to {len(imagen.STAGE_NAMES)}")
        checks = {"guidance": cli.finite_float, "aug_level": cli.unit_float, "steps": cli.positive_int,
                  "gamma": cli.finite_float, "p": cli.finite_float,
                  "threshold": ("none", "static", "dynamic"), "sampler": ("ddpm", "ddim")}
        settings = []
        for st in stages:
            fields = dict(st["settings"])
            for k, check in checks.items():
                v = fields[k]
                if isinstance(check, tuple):
                    if v not in check:
                        raise ValueError(f"{k}: {v!r} is not one of {', '.join(check)}")
                elif isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{k}: {v!r} is not a number")
                else:
                    fields[k] = check(str(v))
            settings.append(imagen.SampleSettings(**fields))
        steps = [int(cli.nonnegative_int(str(st["checkpoint_step"]))) for st in stages]
        seed, batch = cli.seed(str(saved["seed"])), cli.positive_int(str(saved["batch_size"]))
        return prompts, seed, batch, str(saved["workdir"]), steps, settings
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise cli.UserError(f"--settings {path} is not JSON ({e}): give the settings.json sample.py wrote") from None
    except (KeyError, TypeError, ValueError, argparse.ArgumentTypeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise cli.UserError(f"--settings {path}: {what}: give the settings.json sample.py wrote") from None


def run(args):
    steps = None
    if args.settings:  # reproduce an earlier run exactly: its prompts, seed, checkpoints, settings
        args.prompts, args.seed, args.batch_size, workdir, steps, saved_settings = read_settings(args.settings)
        args.workdir, args.stages = args.workdir or workdir, len(steps)  # --workdir: where it is now
    checkpoints.check_cascade(args.workdir, args.stages, steps)  # before anything is written there
    out = output_dir(args)
    stages = checkpoints.load_cascade(args.workdir, args.stages, steps)
    settings = saved_settings if args.settings else resolve_settings(args, stages)
    for s, st in zip(stages, settings):  # allowed, but far from anything the paper samples with
        if not 0.0 <= st.guidance <= MAX_GUIDANCE:
            print(f"warning: {s.config.name}: guidance {st.guidance:g} is far outside the paper's range (App. D.2 "
                  f"sweeps w = 1-18): expect saturated or meaningless images", file=sys.stderr)
        if st.steps > MAX_STEPS:
            print(f"warning: {s.config.name}: {st.steps} sampling steps: one network call (two with guidance) each; "
                  f"this will take long (Ctrl-C stops it)", file=sys.stderr)
    encoder, tokenizer = text_encoders.load_text_encoder(stages[0].config.text_encoder)

    if args.prompt_set == "drawbench":
        bench = read_drawbench()
        prompts = [p for p, _ in bench]
    else:
        prompts = list(args.prompts)
    # settings.json first (complete: false until the last image is written), so that the same
    # command after a failure or an interrupt is this run's, not "another run" in --out
    record = {"prompts": prompts, "seed": args.seed, "batch_size": args.batch_size,
              "workdir": args.workdir, "text_encoder": stages[0].config.text_encoder,
              "stages": [{"name": s.config.name, "checkpoint_step": s.step, "schedule": s.config.schedule,
                          "settings": dataclasses.asdict(st)}
                         for s, st in zip(stages, settings)], "complete": False}
    write_json(os.path.join(out, "settings.json"), record)
    gen = lambda st: imagen.generate(stages, encoder, tokenizer, prompts, st, args.seed, args.batch_size,
                                     progress=True)
    if args.sweep:
        key, values = args.sweep
        rows = []
        for v in values:  # the aug level is the super-resolution stages' only
            st = [dataclasses.replace(s, **{key: v}) if key != "aug_level" or i > 0 else s
                  for i, s in enumerate(settings)]
            rows.append(gen(st))
        save(grid(np.concatenate(rows), cols=len(prompts)), os.path.join(out, f"sweep_{key}.png"))
        print(f"wrote {out}/sweep_{key}.png: rows {key} = {','.join(map(str, values))}, columns = prompts")
        images = rows[0]
    else:
        images = gen(settings)
    for i, img in enumerate(images):
        save(Image.fromarray(img), os.path.join(out, f"{i:04d}.png"))
    save(grid(images), os.path.join(out, "grid.png"))
    if args.prompt_set == "drawbench":
        for cat in sorted({c for _, c in bench}):
            idx = [i for i, (_, c) in enumerate(bench) if c == cat]
            save(grid(images[idx]), os.path.join(out, f"grid_{cat.replace(' ', '_')}.png"))
    write_json(os.path.join(out, "settings.json"), dict(record, complete=True))
    print(f"wrote {len(images)} images, grid.png and settings.json to {out}")
    return images


def main(argv=None):
    return cli.run(lambda a: run(parse_args(a)), argv)


if __name__ == "__main__":
    main()
