"""Checkpoints (orbax): save and restore a stage's train state, and load trained stages for
sampling. A checkpoint holds three items: "train" (parameters, optimizer state, step), "ema"
(the EMA weights, all that sampling reads) and "meta" (JSON: the stage config, the training
settings, the seed, the data and every host's data position). A checkpoint that cannot be read
is skipped for the one before it, with a warning (training also skips one whose recorded step is
not its folder's: a copied folder); nothing saved is ever deleted but by orbax's max_to_keep = 2.
"""

import dataclasses
import errno
import json
import logging
import os
import sys

import jax
import orbax.checkpoint as ocp
from flax import nnx

import imagen
import sharding
import text_encoders
from cli import UserError

# orbax writes a replicated array as one slice per replica, in parallel: one dispatch per slice,
# slow on a train state's many small arrays; only arrays of at least 1 MiB per replica are split
logging.getLogger("absl").setLevel(logging.ERROR)  # not its note that a handler is replaced
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=2 ** 20), override=True)
logging.getLogger("absl").setLevel(logging.NOTSET)


def checkpoint_manager(workdir: str, create: bool = True):
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create))


def _quiet_orphaned_reads(unraisable):
    """sys.unraisablehook that drops one kind of noise: when one read of a damaged checkpoint
    fails, orbax closes its event loop while tensorstore's other reads are still in flight, and
    each of them, finishing, reports "RuntimeError: Event loop is closed" from asyncio's
    call_soon_threadsafe on a thread of its own (a traceback per read, nothing lost: the failure
    itself is raised and reported). Anything else goes to the hook installed before."""
    tb, frames = unraisable.exc_traceback, []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
            and "call_soon_threadsafe" in frames):
        _previous_hook(unraisable)


_previous_hook = sys.unraisablehook


def _install_quiet_hook():
    global _previous_hook
    if sys.unraisablehook is not _quiet_orphaned_reads:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_orphaned_reads


def restore_newest(mngr, restore, set_aside: bool = False, steps=None):
    """-> (step, restore(step)) for the newest checkpoint that can be read (of `steps`, default:
    all there are), or None when there is none. One that cannot (a truncated file, an emptied
    folder) is skipped with a warning naming it, and, with set_aside (training, which will save
    over its step), renamed to broken-STEP beside it, so nothing saved is deleted."""
    directory = str(mngr.directory)
    steps = sorted(mngr.all_steps() if steps is None else steps, reverse=True)
    _install_quiet_hook()  # a damaged checkpoint's reads still in flight (before the first fails)
    for k, step in enumerate(steps):
        try:
            return step, restore(step)
        except UserError:  # readable, but refused (another configuration): nothing is set aside
            raise
        except Exception as e:  # any damage to the files: orbax and tensorstore raise many kinds
            note = ""
            if set_aside:
                note = f"; moved to {_set_aside(directory, step)}"
                mngr.reload()
            print(f"warning: checkpoint {directory}/{step} cannot be read ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}){note}"
                  f"{'; trying the one before it' if k + 1 < len(steps) else ''}", file=sys.stderr)
    if steps:
        raise UserError(f"no checkpoint in {directory} can be read (steps {steps}): move the folder away "
                        f"to start anew, or restore it from a copy")
    return None


def _set_aside(directory, step):
    """Rename checkpoint STEP to the first free name of broken-STEP, broken-STEP.1, ... -> it."""
    name = next(n for n in (f"broken-{step}" + (f".{k}" if k else "") for k in range(10 ** 6))
                if not os.path.exists(os.path.join(directory, n)))
    os.replace(os.path.join(directory, str(step)), os.path.join(directory, name))
    return name


def save_checkpoint(mngr, state: dict, meta: dict):
    """Save a train state {params, ema, opt, step} and its metadata, and wait until written."""
    train = {k: state[k] for k in ("params", "opt", "step")}
    try:  # orbax writes to a temporary folder and renames it: a failed save leaves the others whole
        mngr.save(int(state["step"]), args=ocp.args.Composite(
            train=ocp.args.StandardSave(train), ema=ocp.args.StandardSave(state["ema"]),
            meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
    except Exception as e:  # a full disk, whichever layer (orbax, tensorstore) met it
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device", f"checkpoint {int(state['step'])} in "
                          f"{mngr.directory}") from None
        raise


def read_meta(mngr, step: int | None = None) -> dict:
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_checkpoint(mngr, abstract_state: dict, step: int | None = None) -> dict:
    """The whole train state, onto the shardings of abstract_state's ShapeDtypeStructs."""
    step = mngr.latest_step() if step is None else step
    train = {k: abstract_state[k] for k in ("params", "opt", "step")}
    r = mngr.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(train),
                                                   ema=ocp.args.StandardRestore(abstract_state["ema"])))
    return {**r["train"], "ema": r["ema"]}


# ---------------------------------------------------------------------------------------------
# A training run's checkpoints: what they record; resuming from the newest
# ---------------------------------------------------------------------------------------------

def train_meta(stage, tcfg, seed, data_spec, positions):
    """What a checkpoint records beside the state: what it is and how far each host has read."""
    return {"stage": imagen.config_dict(stage), "train": dataclasses.asdict(tcfg), "seed": seed,
            "data": data_spec, "position": positions}


def check_config(old, meta, workdir):
    """Refuse to resume a checkpoint made with another configuration (the stage, the training
    settings but the step count, the seed, the data, the number of hosts), saying what differs."""
    flat = lambda d, p="": {f"{p}{k}": v for k, v in d.items() if not isinstance(v, dict)} | {
        kk: vv for k, v in d.items() if isinstance(v, dict) for kk, vv in flat(v, f"{p}{k}.").items()}
    try:  # read back through stage_from_dict: a field added since the checkpoint takes its default
        old = dict(old, stage=imagen.config_dict(imagen.stage_from_dict(old["stage"])))
    except ValueError as e:
        raise UserError(f"{workdir}: {e}") from None
    theirs, ours = (flat({k: d[k] for k in ("stage", "train", "seed", "data")} | {"hosts": len(d["position"])})
                    for d in (old, meta))
    diff = [f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}" for k in sorted(theirs | ours)
            if theirs.get(k) != ours.get(k) and k != "train.steps"]
    if diff:
        raise UserError(f"{workdir} holds a checkpoint of another configuration:\n  " + "\n  ".join(diff) +
                        "\nUse another --workdir, or the same settings as before (only --steps may change).")


def restore_or_init(mngr, meta, shapes, init, mesh, workdir):
    """The newest readable checkpoint's state (resharded onto this mesh, whatever mesh saved it)
    and this host's data position, or init() (a new state) at 0. shapes: the state's
    ShapeDtypeStructs; meta: train_meta of this run (another configuration is refused). One that
    cannot be read is set aside (restore_newest) for the one before it."""
    shardings = sharding.state_shardings(mesh, shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def restore(step):
        old = read_meta(mngr, step)
        check_config(old, meta, workdir)  # another configuration is refused, not skipped
        state = restore_checkpoint(mngr, abstract, step)
        if int(state["step"]) != step:  # a copied or renamed folder: it would pin every resume
            raise ValueError(f"its recorded step is {int(state['step'])}, not its folder's")
        return old, state

    found = restore_newest(mngr, restore, set_aside=jax.process_index() == 0)
    if found is None:
        return jax.device_put(init(), shardings), 0
    _, (old, state) = found
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics) and jax.process_index() == 0:  # drop what was logged after it
        with open(metrics) as f:  # and a last line cut short by a kill
            lines = [ln for ln in f if ln.endswith("\n") and json.loads(ln)["step"] <= int(state["step"])]
        with open(metrics, "w") as f:
            f.writelines(lines)
    return state, old["position"][jax.process_index()]


# ---------------------------------------------------------------------------------------------
# Trained stages, for sampling
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedStage:
    config: imagen.StageConfig
    model: nnx.Module
    step: int  # the checkpoint's step


def load_stage(stage_dir: str, step: int | None = None) -> LoadedStage:
    """A stage trained by train.py in stage_dir, for sampling: its config (as recorded in the
    checkpoint, run with this backend's policy) and its EMA weights (nothing else is read), on
    this process's first device, whatever mesh saved them; the newest readable checkpoint, or
    the one of `step` (refused, naming those there are, when it is gone). Creates nothing."""
    if not os.path.isdir(os.path.join(stage_dir, "checkpoints")):
        raise FileNotFoundError(stage_dir)
    mngr = checkpoint_manager(stage_dir, create=False)
    if step is not None and step not in mngr.all_steps():
        raise UserError(f"{stage_dir} no longer holds the checkpoint of step {step} (it holds steps "
                        f"{sorted(mngr.all_steps())}): its images cannot be reproduced from these weights")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore(step):
        config = imagen.with_backend(imagen.stage_from_dict(read_meta(mngr, step)["stage"]), imagen.backend())
        graphdef, params = nnx.split(imagen.abstract_network(config))
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), params)
        ema = mngr.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(params)))["ema"]
        return config, nnx.merge(graphdef, ema)

    found = restore_newest(mngr, restore, steps=None if step is None else [step])
    if found is None:
        raise FileNotFoundError(stage_dir)
    step, (config, model) = found
    return LoadedStage(config, model, step)


def check_cascade(workdir: str, num_stages: int = 3, steps=None):
    """That workdir holds the first num_stages stages' checkpoints and that they make one cascade
    (check_stages, on the configs their newest checkpoints, or those of `steps`, record: a
    checkpoint that cannot be read is left to load_cascade). Creates nothing."""
    configs = []
    for k, name in enumerate(imagen.STAGE_NAMES[:num_stages]):
        d = os.path.join(workdir, name, "checkpoints")
        if not (os.path.isdir(d) and any(e.isdigit() for e in os.listdir(d))):
            raise FileNotFoundError(_missing_stage(workdir, name))
        try:
            mngr = checkpoint_manager(os.path.dirname(d), create=False)
            step = steps[k] if steps else mngr.latest_step()
            configs.append(imagen.stage_from_dict(read_meta(mngr, step)["stage"]))
        except Exception:  # damaged, or gone: load_cascade says which, or takes the one before
            configs.append(None)
    check_stages(workdir, configs)


def check_stages(workdir: str, configs):
    """Refuse stages that do not make one cascade: WORKDIR/base must hold a base stage, each
    super-resolution stage the next one, whose low-res side is the side of the stage before it
    (folders swapped or copied in the wrong place), and all of them must have been trained on
    the same text encoder (the cascade encodes each prompt once, for every stage). configs: one
    StageConfig per stage folder in order; None where it is not known."""
    names = imagen.STAGE_NAMES
    for k, c in enumerate(configs):
        if c is None:
            continue
        where, prev = os.path.join(workdir, names[k]), configs[k - 1] if k else None
        what = f"a stage trained as {c.name} ({f'{c.lowres_side}->{c.side}' if c.lowres_side else f'{c.side}x{c.side}'})"
        if k == 0 and (c.name != names[0] or c.lowres_side):
            raise UserError(f"{where} holds {what}, expected a base stage (no low-res input): the stage "
                            f"folders are in the wrong places; move each stage's folder to {workdir}/<its name>")
        if k and c.name != names[k]:
            raise UserError(f"{where} holds {what}, expected the {names[k]} stage: the stage folders are in "
                            f"the wrong places; move each stage's folder to {workdir}/<its name>")
        if k and prev is not None and c.lowres_side != prev.side:
            raise UserError(f"{where} holds {what}, expected one that upsamples the {names[k - 1]} stage's "
                            f"{prev.side}x{prev.side} images: train the stages with one --preset, or sample "
                            f"with --stages {k}")
    known = [(names[k], c) for k, c in enumerate(configs) if c is not None]
    for name, c in known[1:]:
        first, f = known[0]
        if not text_encoders.same_encoder(c.text_encoder, f.text_encoder):
            raise UserError(f"{os.path.join(workdir, name)} was trained on the text encoder {c.text_encoder!r}, "
                            f"{os.path.join(workdir, first)} on {f.text_encoder!r}: the cascade conditions every "
                            f"stage on one encoding of the prompt: train them on one encoder (e.g. {name} "
                            f"again with --text-encoder {f.text_encoder})")


def _missing_stage(workdir, name):
    d = os.path.join(workdir, name)
    return (f"no trained {name} stage in {d}. Make it with\n  python train.py --stage {name} "
            f"--workdir {d} [--preset paper ...]\nor run `python demo.py` for the demo cascade (runs/demo).")


def load_cascade(workdir: str, num_stages: int = 3, steps=None) -> list[LoadedStage]:
    """workdir/base, workdir/sr1, workdir/sr2 (train.py workdirs) -> [LoadedStage], the newest
    checkpoints or those of `steps` (one per stage). A missing stage is a FileNotFoundError
    naming the command that makes it; stages that do not make one cascade (check_stages) are
    refused before any weights are read."""
    check_cascade(workdir, num_stages, steps)
    stages = []
    for k, name in enumerate(imagen.STAGE_NAMES[:num_stages]):
        try:
            stages.append(load_stage(os.path.join(workdir, name), steps[k] if steps else None))
        except FileNotFoundError:
            raise FileNotFoundError(_missing_stage(workdir, name)) from None
    check_stages(workdir, [s.config for s in stages])  # those loaded (an older one, if the newest is damaged)
    return stages
