"""The device mesh and the one sharding rule of the train state (FSDP / ZeRO-3 style).

paper: not specified how the state was laid out over its 256 TPU-v4 chips (§4.1 says only
"batch 2048 on 256 chips"); replicated, the 2B base model's float32 state does not fit a
TPU-v4's 32 GiB (docs/performance.md#the-papers-training-setup-dry-run), so it must have
been split somehow.

A ('data', 'fsdp') mesh from `jax.make_mesh`. A global batch splits over every device (BATCH);
parameters, EMA and optimizer moments split over 'fsdp' along one axis each (fsdp_spec) and are
replicated over 'data'. Inside the step the weights are used whole (gathered): XLA's SPMD
partitioner then all-gathers each weight where it is used and reduce-scatters its gradient. That
constraint is the only sharding call the computation needs; the networks carry none.
"""

import argparse
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

import cli

BATCH = P(("data", "fsdp"))  # a global batch splits over every device
FSDP_MIN_SIZE = 2 ** 16  # arrays smaller than this stay replicated: sharding them saves little


def make_mesh(data=-1, fsdp=1, devices=None):
    """A ('data', 'fsdp') mesh over the first `devices` (default all) devices; -1 fills the rest."""
    n = devices or jax.device_count()
    data, fsdp = (n // fsdp, fsdp) if data == -1 else (data, n // data if fsdp == -1 else fsdp)
    if data * fsdp != n or min(data, fsdp) < 1:
        raise cli.UserError(f"--mesh data={data},fsdp={fsdp}: data x fsdp must be the {n} devices")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:n])


def check_batch(batch_size: int, grad_accum: int, devices: int):
    """A global batch must split evenly into micro-batches over the devices, and over the hosts."""
    if batch_size % (grad_accum * devices) or batch_size % jax.process_count():
        raise cli.UserError(f"--batch-size {batch_size} must divide by --grad-accum x devices = "
                            f"{grad_accum} x {devices}")


def parse_mesh(spec: str) -> dict:
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4} (make_mesh's arguments; an argparse type)."""
    try:
        out = {k: int(v) for k, v in (part.split("=") for part in spec.split(","))}
    except ValueError:
        out = None
    if not out or set(out) - {"data", "fsdp"} or any(v == 0 or v < -1 for v in out.values()):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected data=D,fsdp=F (D x F = the devices; -1 fills the rest)")
    return out


def fsdp_spec(shape, fsdp: int) -> P:
    """The one sharding rule: an array of FSDP_MIN_SIZE elements or more is split over 'fsdp'
    along its last axis that fsdp divides (a conv's or dense layer's output features first; a
    3x3 kernel never splits on its 3s), else replicated. An optimizer moment has its
    parameter's shape, so it splits like it; Adafactor's factored moments (a row and a column
    vector per matrix) follow by the same rule or stay replicated."""
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    for axis in reversed(range(len(shape))):
        if shape[axis] % fsdp == 0 and shape[axis] > 3:
            return P(*[None] * axis, "fsdp")
    return P()


def state_shardings(mesh, tree):
    """NamedShardings by fsdp_spec for a pytree of arrays or ShapeDtypeStructs (a train state,
    or the frozen text encoder's weights)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape["fsdp"])), tree)


def gathered(tree, mesh):
    """The weights whole, inside a jitted step: where a sharded weight is used XLA all-gathers
    it, and reduce-scatters its gradient. Without this hint XLA's propagation splits the
    activations along the weights' axes instead and replicates the work (9.3x the FLOPs per
    device for the base model, docs/performance.md#the-papers-training-setup-dry-run)."""
    if mesh is None or mesh.shape["fsdp"] == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


def bytes_per_device(mesh, tree) -> int:
    """Bytes of `tree` one device holds under state_shardings."""
    F = mesh.shape["fsdp"]
    parts = lambda x: F if "fsdp" in fsdp_spec(x.shape, F) else 1
    return sum(x.size * x.dtype.itemsize // parts(x) for x in jax.tree.leaves(tree))
