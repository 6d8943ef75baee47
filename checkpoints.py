"""Checkpoints (orbax): save and restore a stage's train state, and load trained stages for
sampling. A checkpoint holds three items: "train" (parameters, optimizer state, step), "ema"
(the EMA weights, all that sampling reads) and "meta" (JSON: the stage config, the training
settings, the seed, the data and every host's data position). A checkpoint that cannot be read
is skipped for the one before it, with a warning (training also skips one whose recorded step is
not its folder's: a copied folder); nothing saved is ever deleted but by orbax's max_to_keep = 2.
"""

import dataclasses
import errno
import logging
import os
import sys

import jax
import orbax.checkpoint as ocp
from flax import nnx

import imagen
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


def restore_newest(mngr, restore, set_aside: bool = False):
    """-> (step, restore(step)) for the newest checkpoint that can be read, or None when there
    is none. One that cannot (a truncated file, an emptied folder) is skipped with a warning
    naming it, and, with set_aside (training, which will save over its step), renamed to
    broken-STEP beside it, so nothing saved is deleted."""
    directory = str(mngr.directory)
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
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
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}){note}; trying the one before it",
                  file=sys.stderr)
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

    if step is not None:
        return LoadedStage(*restore(step), step)
    found = restore_newest(mngr, restore)
    if found is None:
        raise FileNotFoundError(stage_dir)
    step, (config, model) = found
    return LoadedStage(config, model, step)


def check_cascade(workdir: str, num_stages: int = 3):
    """That workdir holds the first num_stages stages' checkpoints (read nothing, create nothing)."""
    for name in imagen.STAGE_NAMES[:num_stages]:
        d = os.path.join(workdir, name, "checkpoints")
        if not (os.path.isdir(d) and any(e.isdigit() for e in os.listdir(d))):
            raise FileNotFoundError(_missing_stage(workdir, name))


def _missing_stage(workdir, name):
    d = os.path.join(workdir, name)
    return (f"no trained {name} stage in {d}. Make it with\n  python train.py --stage {name} "
            f"--workdir {d} [--preset paper ...]\nor run `python demo.py` for the demo cascade (runs/demo).")


def load_cascade(workdir: str, num_stages: int = 3, steps=None) -> list[LoadedStage]:
    """workdir/base, workdir/sr1, workdir/sr2 (train.py workdirs) -> [LoadedStage], the newest
    checkpoints or those of `steps` (one per stage). A missing stage is a FileNotFoundError
    naming the command that makes it."""
    stages = []
    for k, name in enumerate(imagen.STAGE_NAMES[:num_stages]):
        try:
            stages.append(load_stage(os.path.join(workdir, name), steps[k] if steps else None))
        except FileNotFoundError:
            raise FileNotFoundError(_missing_stage(workdir, name)) from None
    return stages
