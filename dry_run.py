"""A dry run of train.py: compile a stage's train step on abstract shapes, allocating nothing,
and report what it costs: parameters, FLOPs per step and per image, bytes per device, and the
step time and days for §4.1's 2.5M steps at a given fraction of TPU-v4's peak. It takes
train.py's arguments.

Saharia et al. 2022, §4.1: batch 2048, 2.5M steps, the base model on 256 TPU-v4 chips and each
super-resolution model on 128.

  python dry_run.py --preset paper --stage base --devices 256 --mesh data=16,fsdp=16 --dtype bfloat16
"""

import os
import time

import jax

import cli

import sharding
from text_cache import encoder_spec
import text_encoders
import train

TPU_V4_BF16 = 275e12  # FLOP/s per chip, bf16 (§4.1 trains on TPU-v4)


def dry_run(stage, tcfg, grad_accum, seed, mesh=None, mfu=0.5, text_cache=True):
    """Compile the step train() would run (text_cache=False: the encoder stage.text_encoder
    inside it) on abstract shapes; print and return its costs."""
    mesh = mesh or sharding.make_mesh()
    n = mesh.size
    sharding.check_batch(tcfg.batch_size, grad_accum, n)  # train.train's check, before anything compiles
    _, state = train.abstract_state(stage, tcfg)
    t = time.time()
    args = [state, train.batch_shapes(stage, tcfg.batch_size, stage.text_length, tokens=not text_cache)]
    text, text_row = None, "offline embedding cache (the batch holds the embeddings)"
    if not text_cache:
        text = encoder_spec(text_encoders.abstract_encoder(stage.text_encoder, stage.unet.dtype))
        args.append(text.abstract_weights())
        text_row = (f"{stage.text_encoder} inside the step, {sum(x.size for x in text.leaves) / 1e9:.3f}B, "
                    f"{sharding.bytes_per_device(mesh, args[2]) / 2**30:.2f} GiB per device")
    compiled = train.compile_step(stage, tcfg, mesh, grad_accum, seed, text).lower(*args).compile()
    flops_dev = float(compiled.cost_analysis()["flops"])  # of one device's partition
    mem = compiled.memory_analysis()
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    dev_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    rows = [("stage", f"{stage.name} ({stage.section}), {stage.train_side}x{stage.train_side}, "
                      f"optimizer {tcfg.optimizer}, compute dtype {stage.unet.dtype}"),
            ("parameters", f"{params / 1e9:.3f}B (paper: {stage.paper_params / 1e9:.2f}B)"),
            ("devices", f"{n} ({jax.devices()[0].platform}), mesh ('data': {mesh.shape['data']}, "
                        f"'fsdp': {mesh.shape['fsdp']})"),
            ("global batch", f"{tcfg.batch_size} = {n} devices x {tcfg.batch_size // n // grad_accum} "
                             f"x {grad_accum} micro-batches"),
            ("FLOPs per step", f"{flops_dev * n:.3e} ({flops_dev:.3e} per device)"),
            ("FLOPs per image", f"{flops_dev * n / tcfg.batch_size:.3e}"),
            ("bytes per device", f"{dev_bytes / 2**30:.2f} GiB (arguments {mem.argument_size_in_bytes / 2**30:.2f}, "
                                 f"temporaries {mem.temp_size_in_bytes / 2**30:.2f})"),
            ("train state per device", f"{sharding.bytes_per_device(mesh, state) / 2**30:.2f} GiB (parameters, "
                                       f"EMA, optimizer state)"),
            ("text encoder", text_row),
            (f"step time at {mfu:.0%} of TPU-v4", f"{flops_dev / (TPU_V4_BF16 * mfu):.3f} s "
                                                  f"({TPU_V4_BF16 / 1e12:.0f} TFLOP/s bf16 per chip)"),
            ("2.5M steps at that rate", f"{flops_dev / (TPU_V4_BF16 * mfu) * 2.5e6 / 86400:.1f} days"),
            ("compile time", f"{time.time() - t:.1f} s")]
    for k, v in rows:
        print(f"{k:28s} {v}")
    return dict(rows)


def main(argv=None):
    def run(argv):
        p = train.arg_parser(__doc__)
        p.add_argument("--devices", type=cli.positive_int, default=None, help="emulate N CPU devices")
        p.add_argument("--mfu", type=cli.unit_float, default=0.5, help="the fraction of TPU-v4's peak to time at")
        args = p.parse_args(argv)
        if args.stage is None:
            p.error("add --stage base|sr1|sr2")
        if args.devices:  # before JAX starts its backend
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={args.devices}")
            jax.config.update("jax_platforms", "cpu")
        stage, tcfg = train.stage_and_config(args)
        return dry_run(stage, tcfg, args.grad_accum, args.seed, sharding.make_mesh(**args.mesh), args.mfu,
                       text_cache=bool(args.text_cache))
    return cli.run(run, argv)


if __name__ == "__main__":
    main()
