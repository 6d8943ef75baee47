"""Train one stage of the Imagen cascade, data-parallel on a device mesh.

Saharia et al. 2022, §4.1 and App. F: every model trains at batch 2048 for 2.5M steps (the
base model on 256 TPU-v4 chips, each super-resolution model on 128); Adafactor for the base
model, Adam (0.9, 0.999, 1e-8) for the super-resolution models; learning rate 1e-4 after
10,000 linear warm-up steps, cosine decay; 10% text dropout for classifier-free guidance.

One jitted step, one linear loop. Data parallel: `jax.make_mesh` over all devices with a
'data' axis, parameters replicated (P()), the batch split (P('data')), XLA inserts the
gradient all-reduce. A global batch larger than the devices hold is accumulated over
micro-batches inside the step (lax.scan). Every example draws its own noise from
fold_in(fold_in(seed, step), row), so the losses do not depend on the number of devices,
hosts or micro-batches, and a resumed run repeats an uninterrupted one.

  python train.py [--workdir DIR]                  # the demo: all three stages (demo.py), runs/demo
  python train.py --preset paper --stage base --data /laion --text-encoder ckpt/t5-v1_1-xxl
  python train.py --preset paper --stage base --dry-run --devices 256   # check §4.1's setup
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import data
import diffusion
import imagen
import t5_encoder
from unet import abstract_unet, make_unet, resize_lowres


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-4  # §4.1, peak
    warmup_steps: int = 10_000  # §4.1
    decay_steps: int = 2_500_000  # §4.1: 2.5M steps, cosine decay
    # paper: not specified; the printed warmup_cosine_decay_schedule end_value is a typo: 0
    end_lr: float = 0.0
    batch_size: int = 2048  # §4.1
    grad_clip: float = 1.0  # paper: not specified; global-norm clipping at 1 (NeMo)
    ema_decay: float = 0.9999  # paper: not specified; NeMo's EMA decay
    p_uncond: float = 0.1  # §4.1: text embeddings zeroed 10% of the time
    # §2.4: the augmentation level is "randomly sampled" in training; paper: not specified
    # from what: aug_level ~ U(0, max_aug_level) (super-resolution stages only)
    max_aug_level: float = 1.0


_demo = TrainConfig(lr=1e-3, warmup_steps=20, decay_steps=3000, end_lr=1e-4, batch_size=32, ema_decay=0.995)
# U(0, 0.5) augmentation levels: with U(0, 1) the demo's 32->64 stage learnt to ignore its
# low-res input within 400 steps (shuffling the inputs left its loss unchanged)
_demo_sr = dataclasses.replace(_demo, lr=3e-3, batch_size=64, max_aug_level=0.5)
TRAIN_PRESETS = {  # per preset and stage
    "paper": {"base": TrainConfig(), "sr1": TrainConfig(), "sr2": TrainConfig()},
    # demo: minutes on a laptop CPU (demo.py sets the step counts); its base uses Adam (imagen.py)
    "demo": {"base": dataclasses.replace(_demo, lr=2e-3, end_lr=2e-4), "sr1": _demo_sr, "sr2": _demo_sr},
}


def make_optimizer(stage: imagen.StageConfig, tcfg: TrainConfig):
    """§4.1 / App. F: Adafactor (optax defaults) for the base model, Adam for the SR models."""
    lr = optax.warmup_cosine_decay_schedule(0.0, tcfg.lr, tcfg.warmup_steps,
                                            max(tcfg.decay_steps, tcfg.warmup_steps + 1), tcfg.end_lr)
    opt = (optax.adafactor(lr) if stage.optimizer == "adafactor" else
           optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8))
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), opt), lr


def init_state(stage, tcfg, seed):
    """-> (graphdef, state): state = {params, ema, opt, step} (a pytree)."""
    graphdef, params = nnx.split(make_unet(stage.unet, seed))
    optimizer, _ = make_optimizer(stage, tcfg)
    return graphdef, {"params": params, "ema": jax.tree.map(jnp.copy, params), "opt": optimizer.init(params),
                      "step": jnp.zeros((), jnp.int32)}


def make_mesh(n=None):
    """The first n (default all) devices on one 'data' axis. Auto axis type: XLA propagates the
    shardings (it inserts the gradient all-reduce); the model code needs no annotations."""
    n = n or jax.device_count()
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


def make_train_step(graphdef, stage, tcfg, grad_accum: int, seed: int):
    """The whole update as one function of (state, batch) -> (state, loss), to be jitted."""
    optimizer, _ = make_optimizer(stage, tcfg)
    log_snr_fn = diffusion.SCHEDULES[stage.schedule]

    def loss_fn(params, mb, step_key):
        model = nnx.merge(graphdef, params)
        lowres = resize_lowres(mb["lowres"], mb["image"].shape[1]) if stage.lowres else None
        keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(mb["row"])  # per example
        return diffusion.diffusion_loss(model, mb["image"], mb["text_emb"], mb["text_mask"], keys,
                                        log_snr_fn, tcfg.p_uncond, lowres, tcfg.max_aug_level,
                                        stage.prediction)

    def train_step(state, batch):
        step_key = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
        # (B, ...) -> (K, B/K, ...): micro-batch k holds rows k, k + K, ... so every device keeps
        # its own rows (no communication) and every micro-batch spans all devices
        micro = jax.tree.map(lambda a: a.reshape(a.shape[0] // grad_accum, grad_accum, *a.shape[1:])
                             .swapaxes(0, 1), batch)

        def accumulate(carry, mb):
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], mb, step_key)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
        if jax.default_backend() == "cpu":
            # XLA's CPU backend runs convolutions inside a while loop ~15x slower (measured on
            # the demo base model), so on CPU the micro-batches are unrolled in the graph
            carry = zero
            for k in range(grad_accum):
                carry, _ = accumulate(carry, jax.tree.map(lambda a: a[k], micro))
            loss, grads = carry
        else:
            (loss, grads), _ = jax.lax.scan(accumulate, zero, micro)
        loss, grads = jax.tree.map(lambda g: g / grad_accum, (loss, grads))
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # paper: not specified how the EMA starts; the usual warm-up min(decay, (1 + n) / (10 + n))
        # so that early averages do not keep the random initialisation (0.995**400 = 13% of it)
        n = state["step"].astype(jnp.float32)
        d = jnp.minimum(tcfg.ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
        return {"params": params, "ema": ema, "opt": opt, "step": state["step"] + 1}, loss

    return train_step


def batch_shapes(stage, batch, text_len):
    """ShapeDtypeStructs of one global batch."""
    s, f32 = stage.train_size, jnp.float32
    shapes = {"image": ((batch, s, s, 3), f32), "text_emb": ((batch, text_len, stage.unet.text_dim), f32),
              "text_mask": ((batch, text_len), jnp.bool_), "row": ((batch,), jnp.int32)}
    if stage.lowres:
        low = s * stage.lowres // stage.resolution
        shapes["lowres"] = ((batch, low, low, 3), f32)
    return {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}


def abstract_state(stage, tcfg):
    """(graphdef, ShapeDtypeStructs of the train state): nothing allocated."""
    graphdef, params = nnx.split(abstract_unet(stage.unet))
    optimizer, _ = make_optimizer(stage, tcfg)
    return graphdef, {"params": params, "ema": params, "opt": jax.eval_shape(optimizer.init, params),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}


@functools.lru_cache(maxsize=16)
def compile_step(stage, tcfg, mesh, batch, grad_accum, seed, text_len):
    """The jitted step: state replicated, batch split over 'data', state donated. Cached, so
    that a second train() of the same configuration (a resume) reuses the compiled program."""
    graphdef, shapes = abstract_state(stage, tcfg)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = make_train_step(graphdef, stage, tcfg, grad_accum, seed)
    state_sh = jax.tree.map(lambda _: replicated, shapes)
    batch_sh = {k: split for k in batch_shapes(stage, batch, text_len)}
    return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints (orbax): state + JSON metadata (stage config, text encoder, data position, seed)
# ---------------------------------------------------------------------------------------------

def config_dict(stage):
    """The parts of a stage config that a checkpoint must agree with (not dtype / remat, which
    do not change the parameters)."""
    d = dataclasses.asdict(stage)
    d["unet"] = {k: v for k, v in d["unet"].items() if k not in ("dtype", "remat")}
    return json.loads(json.dumps(d))  # tuples -> lists, as they come back from JSON


def checkpoint_manager(workdir):
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def save(mngr, state, meta):
    import orbax.checkpoint as ocp
    mngr.save(int(state["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()


def read_meta(mngr, step=None):
    import orbax.checkpoint as ocp
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr, abstract_state, step=None):
    import orbax.checkpoint as ocp
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]


# the StageConfig fields that are only sampling defaults (imagen.SampleSettings)
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(imagen.SampleSettings)}


def check_config(meta, stage, text_encoder, workdir):
    """Refuse to resume a checkpoint made with another config, saying what differs."""
    ours = {"stage": config_dict(stage), "text_encoder": text_encoder}
    # read back through stage_from_dict: a field added since the checkpoint takes its default
    theirs = {"stage": config_dict(imagen.stage_from_dict(meta["stage"])), "text_encoder": meta["text_encoder"]}
    for d in (ours, theirs):  # sampling defaults do not change what training makes
        d["stage"] = {k: v for k, v in d["stage"].items() if k not in SAMPLING_FIELDS}
    diff = []
    for key in ("stage", "text_encoder"):
        a, b = theirs[key], ours[key]
        if isinstance(a, dict):
            flat = lambda d, p="": {f"{p}{k}": v for k, v in d.items() if not isinstance(v, dict)} | {
                kk: vv for k, v in d.items() if isinstance(v, dict) for kk, vv in flat(v, f"{p}{k}.").items()}
            fa, fb = flat(a), flat(b)
            diff += [f"{k}: checkpoint {fa.get(k)!r}, now {fb.get(k)!r}" for k in sorted(fa | fb) if fa.get(k) != fb.get(k)]
        elif a != b:
            diff.append(f"{key}: checkpoint {a!r}, now {b!r}")
    if diff:
        raise SystemExit(f"{workdir} holds a checkpoint of another configuration:\n  " + "\n  ".join(diff) +
                         "\nUse another --workdir, or the same --preset/--stage/--text-encoder as before.")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def text_batch(captions, indices, encoder, tokenizer, cache, text_len):
    """T5 embeddings of a batch: from the offline cache (by example index) or encoded now."""
    if cache is not None:
        emb, mask = cache[indices]
        return emb[:, :text_len], mask[:, :text_len]
    emb, mask = t5_encoder.encode(encoder, tokenizer, captions, text_len)
    return np.asarray(emb), mask


def train(stage, tcfg, workdir, steps, *, data_spec="shapes", text_encoder=None, text_cache=None,
          grad_accum=1, seed=0, log_every=10, save_every=1000, text_len=None, progress=True):
    """Train `stage` for `steps` updates in total (resuming from workdir), return the state."""
    from tqdm import tqdm

    text_encoder = text_encoder or stage.text_encoder
    text_len = text_len or stage.text_length
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    n_proc, proc = jax.process_count(), jax.process_index()
    B = tcfg.batch_size
    if B % (grad_accum * jax.device_count()) or B % n_proc:
        raise SystemExit(f"--batch-size {B} must divide by --grad-accum x devices = "
                         f"{grad_accum} x {jax.device_count()}")
    source = data.open_source(data_spec, seed)
    encoder, tokenizer = t5_encoder.load_text_encoder(text_encoder)
    if encoder.cfg.d_model != stage.unet.text_dim:
        raise SystemExit(f"text encoder {text_encoder!r} has width {encoder.cfg.d_model}, the "
                         f"{stage.name} network expects {stage.unet.text_dim}")
    cache = None
    if text_cache:
        t5_encoder.cache_embeddings(encoder, tokenizer, [source.caption(i) for i in range(len(source))],
                                    text_cache, encoder_name=text_encoder)
        cache = t5_encoder.EmbeddingCache(text_cache)

    _, lr_fn = make_optimizer(stage, tcfg)
    step_fn = compile_step(stage, tcfg, mesh, B, grad_accum, seed, text_len)
    replicated = NamedSharding(mesh, P())
    mngr = checkpoint_manager(workdir)
    meta = {"stage": config_dict(stage), "text_encoder": text_encoder, "seed": seed,
            "train": dataclasses.asdict(tcfg), "data": data_spec, "position": [0] * n_proc}
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if mngr.latest_step() is not None:
        old = read_meta(mngr)
        check_config(old, stage, text_encoder, workdir)
        meta["position"] = old["position"]
        abstract_sharded = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                        abstract_state(stage, tcfg)[1])
        state = restore(mngr, abstract_sharded)
        if os.path.exists(metrics_path):  # drop what was logged after the checkpoint
            with open(metrics_path) as f:
                lines = [ln for ln in f if json.loads(ln)["step"] <= int(state["step"])]
            with open(metrics_path, "w") as f:
                f.writelines(lines)
    else:
        _, state = init_state(stage, tcfg, seed)
        state = jax.device_put(state, replicated)
    position, start = meta["position"][proc], int(state["step"])
    if start >= steps:
        return state

    split = NamedSharding(mesh, P("data"))
    local_B = B // n_proc
    skipped, pending, t_log = 0, [], time.time()
    bar = tqdm(total=steps, initial=start, desc=f"train {stage.name}", unit="step", disable=not progress)
    last_saved = start

    def checkpoint(state):
        nonlocal last_saved
        losses = jax.device_get(pending)
        if not np.all(np.isfinite(losses)):
            raise_nan(state, losses)
        save(mngr, state, dict(meta, position=all_positions(position)))
        last_saved = int(state["step"])

    def raise_nan(state, losses):
        bad = int(state["step"]) - len(losses) + int(np.argmin(np.isfinite(losses))) + 1
        raise SystemExit(f"loss is {losses[np.argmin(np.isfinite(losses))]} at step {bad}: stopping. "
                         f"Nothing after step {last_saved} was saved; the last good checkpoint in "
                         f"{workdir}/checkpoints is kept. Lower the learning rate or check the data.")

    try:
        for step in range(start, steps):
            images, lowres, captions, indices, position, bad = data.host_batch(
                source, stage, local_B, position, seed, proc, n_proc)
            skipped += bad
            emb, mask = text_batch(captions, indices, encoder, tokenizer, cache, text_len)
            local = {"image": images, "text_emb": emb.astype(np.float32), "text_mask": mask,
                     "row": np.arange(proc * local_B, (proc + 1) * local_B, dtype=np.int32)}
            if stage.lowres:
                local["lowres"] = lowres
            batch = {k: jax.make_array_from_process_local_data(split, v) for k, v in local.items()}
            state, loss = step_fn(state, batch)
            pending.append(loss)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                losses = jax.device_get(pending)
                if not np.all(np.isfinite(losses)):
                    raise_nan(state, losses)
                dt, t_log = time.time() - t_log, time.time()
                rec = {"step": step + 1, "loss": float(np.mean(losses[-log_every:])),
                       "img_per_s": B * min(log_every, len(losses)) / dt, "lr": float(lr_fn(step)),
                       "skipped_images": skipped}
                if proc == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.1f}")
                if (step + 1) % save_every == 0 or step + 1 == steps:
                    checkpoint(state)
                pending = []
            bar.update(1)
    except KeyboardInterrupt:
        if int(state["step"]) > last_saved:
            checkpoint(state)
        raise SystemExit(f"interrupted at step {int(state['step'])}; checkpoint saved in {workdir}. "
                         f"Run the same command again to resume.")
    finally:
        bar.close()
    if int(state["step"]) > last_saved:
        checkpoint(state)
    if skipped:
        print(f"{skipped} unreadable images were skipped")
    return state


def all_positions(position):
    """Every host's data position (for the checkpoint)."""
    if jax.process_count() == 1:
        return [position]
    from jax.experimental import multihost_utils
    return [int(p) for p in multihost_utils.process_allgather(np.array(position))]


# ---------------------------------------------------------------------------------------------
# --dry-run: compile the step on abstract shapes and report what it costs
# ---------------------------------------------------------------------------------------------

TPU_V4_BF16 = 275e12  # FLOP/s per chip, bf16 (§4.1 trains on TPU-v4)


def dry_run(stage, tcfg, grad_accum, seed, text_len, mfu=0.5):
    n = jax.device_count()
    mesh = make_mesh()
    _, state = abstract_state(stage, tcfg)
    t = time.time()
    step = compile_step(stage, tcfg, mesh, tcfg.batch_size, grad_accum, seed, text_len)
    compiled = step.lower(state, batch_shapes(stage, tcfg.batch_size, text_len)).compile()
    flops_dev = float(compiled.cost_analysis()["flops"])  # of one device's partition
    mem = compiled.memory_analysis()
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    dev_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    rows = [("stage", f"{stage.name} ({stage.section}), {stage.train_size}x{stage.train_size}, "
                      f"optimizer {stage.optimizer}, compute dtype {stage.unet.dtype}"),
            ("parameters", f"{params / 1e9:.3f}B (paper: {stage.paper_params / 1e9:.2f}B)"),
            ("devices", f"{n} ({jax.devices()[0].platform}), mesh ('data': {n})"),
            ("global batch", f"{tcfg.batch_size} = {n} devices x {tcfg.batch_size // n // grad_accum} "
                             f"x {grad_accum} micro-batches"),
            ("FLOPs per step", f"{flops_dev * n:.3e} ({flops_dev:.3e} per device)"),
            ("FLOPs per image", f"{flops_dev * n / tcfg.batch_size:.3e}"),
            ("bytes per device", f"{dev_bytes / 2**30:.2f} GiB (arguments {mem.argument_size_in_bytes / 2**30:.2f}, "
                                 f"temporaries {mem.temp_size_in_bytes / 2**30:.2f})"),
            (f"step time at {mfu:.0%} of TPU-v4", f"{flops_dev / (TPU_V4_BF16 * mfu):.3f} s "
                                                  f"({TPU_V4_BF16 / 1e12:.0f} TFLOP/s bf16 per chip)"),
            ("2.5M steps at that rate", f"{flops_dev / (TPU_V4_BF16 * mfu) * 2.5e6 / 86400:.1f} days"),
            ("compile time", f"{time.time() - t:.1f} s")]
    for k, v in rows:
        print(f"{k:28s} {v}")
    return dict(rows)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(imagen.PRESETS), default="demo")
    p.add_argument("--stage", choices=["base", "sr1", "sr2"], default=None,
                   help="train one stage; without it, the demo cascade (all three stages + report)")
    p.add_argument("--workdir", default=None, help="default runs/<preset>-<stage>, or runs/demo")
    p.add_argument("--steps", type=int, default=None, help="total updates (default: the schedule's decay steps)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (paper: 2048)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="shapes", help="'shapes', a folder of images + .txt, or .tar shards")
    p.add_argument("--text-encoder", default=None, help="'demo-t5' or a T5 v1.1 checkpoint directory")
    p.add_argument("--text-cache", default=None, help="directory of the offline T5 embedding cache")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--remat", action="store_true", help="rematerialise residual blocks (memory)")
    p.add_argument("--dry-run", action="store_true", help="compile on abstract shapes, print costs")
    p.add_argument("--devices", type=int, default=None, help="with --dry-run: emulate N CPU devices")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.stage is None:  # the README's main job: the demo cascade, `[--workdir DIR]`
        defaults = vars(parse_args([]))
        other = [k for k, v in vars(args).items() if k != "workdir" and v != defaults[k]]
        if other:
            raise SystemExit(f"--{other[0].replace('_', '-')} trains one stage: add --stage base|sr1|sr2 "
                             f"(without --stage, train.py runs the demo cascade and takes only --workdir)")
        import demo
        return demo.main(args.workdir or "runs/demo")
    if args.devices:  # must happen before JAX starts its backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        jax.config.update("jax_platforms", "cpu")
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    stage = imagen.PRESETS[args.preset][args.stage]
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    stage = dataclasses.replace(stage, unet=dataclasses.replace(stage.unet, dtype=dtype, remat=args.remat))
    tcfg = TRAIN_PRESETS[args.preset][args.stage]
    if args.batch_size:
        tcfg = dataclasses.replace(tcfg, batch_size=args.batch_size)
    if args.dry_run:
        return dry_run(stage, tcfg, args.grad_accum, args.seed, stage.text_length)
    workdir = args.workdir or os.path.join("runs", f"{args.preset}-{args.stage}")
    train(stage, tcfg, workdir, args.steps or tcfg.decay_steps, data_spec=args.data,
          text_encoder=args.text_encoder, text_cache=args.text_cache, grad_accum=args.grad_accum,
          seed=args.seed, log_every=args.log_every, save_every=args.save_every)


if __name__ == "__main__":
    main()
