"""Train one stage of the Imagen cascade, data-parallel on a device mesh.

Saharia et al. 2022, §4.1 and App. F: every model trains at batch 2048 for 2.5M steps (the
base model on 256 TPU-v4 chips, each super-resolution model on 128); Adafactor for the base
model, Adam (0.9, 0.999, 1e-8) for the super-resolution models; learning rate 1e-4 after
10,000 linear warm-up steps, cosine decay; 10% text dropout for classifier-free guidance.

One jitted step, one linear loop, on a ('data', 'fsdp') mesh from `jax.make_mesh`: the batch
splits over both axes; the train state (parameters, EMA, optimizer moments) splits over 'fsdp'
by one rule (sharding.py), ZeRO-3 / FSDP style, and is replicated over 'data'. XLA's SPMD
partitioner inserts the all-gathers of the weights and the reduce-scatters of the gradients
(fsdp = 1: plain data parallelism and its all-reduce). The frozen T5 encoder runs inside the
step on the batch's token ids, its weights sharded by the same rule, unless the embeddings come
from the offline cache (§2.1, --text-cache). A global batch larger than the devices hold is
accumulated over micro-batches inside the step. Every example draws its own noise from
fold_in(fold_in(seed, step), row): the losses do not depend on the number of devices, hosts or
micro-batches, and a resumed run repeats an uninterrupted one.

  python train.py --stage base --workdir runs/demo/base          # one demo stage (demo.py: all)
  python train.py --preset paper --stage base --data /laion --text-encoder ckpt/t5-v1_1-xxl
  python dry_run.py --preset paper --stage base --devices 256   # check §4.1's setup, allocating nothing
"""

import argparse
import contextlib
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import checkpoints
import cli
import data
import diffusion
import imagen
import monitor
import sharding
import t5_encoder
from text_cache import open_text
from sharding import BATCH


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How one stage is trained; defaults are §4.1's and App. F's (the super-resolution models')."""
    # §4.1: Adafactor for the base (F.1: "the default optax.adafactor parameters"), Adam for SR
    optimizer: str = "adam"
    adam_b1: float = 0.9  # F.2: optax.adam(..., b1=0.9, b2=0.999, eps=1e-8)
    adam_b2: float = 0.999  # F.2
    adam_eps: float = 1e-8  # F.2
    lr: float = 1e-4  # F.1-F.3: peak learning rate 1e-4
    warmup_steps: int = 10_000  # F.1-F.3: 10000 (linear) warm-up steps
    # F.1, F.2: warmup_cosine_decay_schedule(..., decay_steps=2500000); F.3 gives only the
    # learning rate and warm-up; paper: not specified for the 256->1024 model: the same decay
    decay_steps: int = 2_500_000
    # paper: not specified; the printed warmup_cosine_decay_schedule end_value (2500000) is a typo: 0
    end_lr: float = 0.0
    steps: int = 2_500_000  # §4.1: total updates
    batch_size: int = 2048  # §4.1
    grad_clip: float = 1.0  # paper: not specified; global-norm clipping at 1 (NeMo)
    ema_decay: float = 0.9999  # paper: not specified; NeMo's EMA decay
    p_uncond: float = 0.1  # §4.1: text embeddings zeroed 10% of the time
    # §2.4: aug_level "chosen randomly" in [0, 1]; Fig. A.32's train_step: uniform(0.0, 1.0), so
    # aug_level ~ U(0, max_aug_level), 1 (super-resolution only; per example: diffusion_loss)
    max_aug_level: float = 1.0


# demo: minutes on 2 CPU cores; the learning rate decays over each stage's own steps.
# Adam for the base (docs/demo_experiments.md#the-demo-bases-optimizer-and-guidance); SR aug
# levels U(0, 0.1), 16 crops of 32x32 per batch (docs/demo_experiments.md#the-super-resolution-stages).
_demo_sr = TrainConfig(optimizer="adam", lr=3e-3, warmup_steps=20, decay_steps=200, end_lr=1e-4, steps=200,
                       batch_size=16, ema_decay=0.995, max_aug_level=0.1)
TRAIN_PRESETS = {
    "paper": {"base": TrainConfig(optimizer="adafactor"), "sr1": TrainConfig(), "sr2": TrainConfig()},
    "demo": {"base": TrainConfig(optimizer="adam", lr=2e-3, warmup_steps=20, decay_steps=1500, end_lr=2e-4,
                                 steps=1500, batch_size=32, ema_decay=0.995),
             "sr1": _demo_sr, "sr2": _demo_sr},
}


# watching a run (monitor.py): held-out loss and sample grids every N steps, by preset; not part
# of TrainConfig (they change no weight; checkpoints do not record them)
WATCH_EVERY = {"paper": {"eval_every": 5000, "sample_every": 20000}, "demo": {"eval_every": 250, "sample_every": 500}}


def make_optimizer(tcfg: TrainConfig):
    """§4.1 / App. F: Adafactor (optax defaults) for the base, Adam for the SR models, after clipping;
    warm-up from 0.0, cosine decay. F.1, F.2's weight_decay=0: optax.adam has none, adafactor's is None."""
    lr = optax.warmup_cosine_decay_schedule(0.0, tcfg.lr, tcfg.warmup_steps,
                                            max(tcfg.decay_steps, tcfg.warmup_steps + 1), tcfg.end_lr)
    opt = (optax.adafactor(lr) if tcfg.optimizer == "adafactor" else
           optax.adam(lr, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps))
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), opt), lr


def init_state(stage, tcfg, seed):
    """-> (graphdef, state): state = {params, ema, opt, step} (a pytree)."""
    graphdef, params = nnx.split(imagen.init_network(stage, seed))
    optimizer, _ = make_optimizer(tcfg)
    return graphdef, {"params": params, "ema": jax.tree.map(jnp.copy, params), "opt": optimizer.init(params),
                      "step": jnp.zeros((), jnp.int32)}


def abstract_state(stage, tcfg):
    """(graphdef, ShapeDtypeStructs of the train state): nothing allocated."""
    graphdef, params = nnx.split(imagen.abstract_network(stage))
    optimizer, _ = make_optimizer(tcfg)
    return graphdef, {"params": params, "ema": params, "opt": jax.eval_shape(optimizer.init, params),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}


def make_train_step(graphdef, stage, tcfg, grad_accum: int, seed: int, mesh=None, text_graphdef=None):
    """The whole update as one function to be jitted: (state, batch) -> (state, {loss, grad_norm}) when the
    batch holds text embeddings (the offline cache), (state, batch, text_weights) when it holds
    token ids and the frozen encoder (text_graphdef) runs inside the step."""
    optimizer, _ = make_optimizer(tcfg)
    log_snr_fn = diffusion.SCHEDULES[stage.schedule]
    unroll = imagen.backend().unroll_micro_batches

    def loss_fn(params, mb, step_key, text_weights):
        model = nnx.merge(graphdef, sharding.gathered(params, mesh))  # the one sharding hint
        if text_graphdef is None:
            text_emb = mb["text_emb"]
        else:  # §2.1: frozen, so no gradient flows into it
            encoder = nnx.merge(text_graphdef, sharding.gathered(text_weights, mesh))
            text_emb = jax.lax.stop_gradient(t5_encoder.embed(encoder, mb["tokens"], mb["text_mask"]))
        lowres_BHWC = mb["lowres"] if stage.lowres_side else None  # at its low side: corrupted, then resized
        keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(mb["row"])  # per example
        return diffusion.diffusion_loss(model, mb["image"], text_emb, mb["text_mask"], keys,
                                        log_snr_fn, tcfg.p_uncond, lowres_BHWC, tcfg.max_aug_level,
                                        stage.prediction)

    def train_step(state, batch, text_weights=None):
        step_key = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
        # (B, ...) -> (K, B/K, ...): micro-batch k holds rows k, k + K, ... so every device keeps
        # its own rows (no communication) and every micro-batch spans all devices
        micro = jax.tree.map(lambda a: a.reshape(a.shape[0] // grad_accum, grad_accum, *a.shape[1:])
                             .swapaxes(0, 1), batch)

        def accumulate(carry, mb):
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], mb, step_key, text_weights)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        carry = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
        if unroll:  # imagen.backend: on CPU, a loop in the graph
            for k in range(grad_accum):
                carry, _ = accumulate(carry, jax.tree.map(lambda a: a[k], micro))
        else:
            carry, _ = jax.lax.scan(accumulate, carry, micro)
        loss, grads = jax.tree.map(lambda g: g / grad_accum, carry)
        grad_norm = optax.global_norm(grads)
        loss = jnp.where(jnp.isfinite(grad_norm), loss, jnp.nan)  # a bad gradient: NaN too
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # paper: not specified how the EMA starts; the usual warm-up min(decay, (1 + n) / (10 + n))
        # so that early averages do not keep the random initialisation (0.995**400 = 13% of it)
        n = state["step"].astype(jnp.float32)
        d = jnp.minimum(tcfg.ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
        return {"params": params, "ema": ema, "opt": opt, "step": state["step"] + 1}, {"loss": loss, "grad_norm": grad_norm}

    return train_step


def batch_shapes(stage, batch, text_len, tokens=False):
    """ShapeDtypeStructs of one global batch: with text embeddings, or with token ids."""
    s, f32 = stage.train_side, jnp.float32
    text = ((batch, text_len), jnp.int32) if tokens else ((batch, text_len, stage.unet.text_dim), f32)
    shapes = {"image": ((batch, s, s, 3), f32), "tokens" if tokens else "text_emb": text,
              "text_mask": ((batch, text_len), jnp.bool_), "row": ((batch,), jnp.int32)}
    if stage.lowres_side:
        low = stage.train_lowres_side
        shapes["lowres"] = ((batch, low, low, 3), f32)
    return {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}


def compile_step(stage, tcfg, mesh, grad_accum, seed, text=None):
    """The jitted step: state sharded by sharding.state_shardings, batch split over every
    device, state donated; with text = text_cache.encoder_spec(encoder), the encoder's weights (a third
    argument, sharded by the same rule) encode the batch's tokens inside it. Cached, so that a
    second train() of the same configuration (a resume, or more steps) reuses it."""
    return _compile_step(stage, dataclasses.replace(tcfg, steps=0), mesh, grad_accum, seed, text)  # steps: not in it


@functools.lru_cache(maxsize=16)
def _compile_step(stage, tcfg, mesh, grad_accum, seed, text):
    graphdef, shapes = abstract_state(stage, tcfg)
    step = make_train_step(graphdef, stage, tcfg, grad_accum, seed, mesh, text and text.graphdef)
    state_sh = sharding.state_shardings(mesh, shapes)
    batch_sh = {k: NamedSharding(mesh, BATCH) for k in batch_shapes(stage, 1, 1, tokens=text is not None)}
    in_sh = (state_sh, batch_sh)
    if text is not None:
        in_sh += (sharding.state_shardings(mesh, text.abstract_weights()),)
    return jax.jit(step, in_shardings=in_sh, out_shardings=(state_sh, NamedSharding(mesh, P())),
                   donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# The loop and its helpers
# ---------------------------------------------------------------------------------------------

def global_batch(stream, stage, text, mesh):
    """This host's share of the next global batch from its data stream (data.host_stream), as
    arrays sharded over the mesh -> (batch, (the examples tried first, how many of them in a
    row were unreadable and replaced))."""
    b = next(stream)
    local_B = len(b["image"])
    if text.offline is not None:  # a text_cache.TextCache or CaptionTable
        emb, mask = text.offline.embeddings(b)
        local = {"text_emb": emb[:, :stage.text_length], "text_mask": mask[:, :stage.text_length]}
    else:  # encoded inside the step
        local = dict(zip(("tokens", "text_mask"), t5_encoder.tokenize(text.tokenizer, b["caption"], stage.text_length)))
    proc = jax.process_index()
    local.update(image=b["image"], row=np.arange(proc * local_B, (proc + 1) * local_B, dtype=np.int32))
    if stage.lowres_side:
        local["lowres"] = b["lowres"]
    split = NamedSharding(mesh, BATCH)
    return {k: jax.make_array_from_process_local_data(split, v) for k, v in local.items()}, (b["tried"], b["skipped"])


def note_skipped(workdir, source, tried, skipped, shown=3):
    """Name the examples replaced as unreadable: all of them appended to WORKDIR/skipped.txt, the
    first few in a warning; -> how many."""
    names = [source.name(int(i) + k) for i, n in zip(tried, skipped) for k in range(int(n))]
    if names and jax.process_index() == 0:
        with open(os.path.join(workdir, "skipped.txt"), "a") as f:
            f.writelines(n + "\n" for n in names)
        tqdm.write(f"warning: {len(names)} unreadable examples replaced by the next readable ones: "
                   f"{', '.join(names[:shown])}{', ...' if len(names) > shown else ''} (all in {workdir}/skipped.txt)",
                   file=sys.stderr)
    return len(names)


def checked_losses(pending, step, last_saved, workdir):
    """The pending losses as floats; a NaN or Inf stops the run, keeping the last checkpoint."""
    losses = np.asarray(jax.device_get(pending), np.float64)
    if not np.all(np.isfinite(losses)):
        first = int(np.argmin(np.isfinite(losses)))
        raise cli.UserError(f"loss (or gradient) is {losses[first]} at step {step - len(losses) + first + 1}: stopping. "
                         f"Nothing after step {last_saved} was saved; the last good checkpoint in "
                         f"{workdir}/checkpoints is kept. Lower the learning rate or check the data.")
    return losses


def all_positions(position):
    """Every host's data position (for the checkpoint)."""
    return [int(p) for p in np.atleast_1d(multihost_utils.process_allgather(np.array(position)))]


def train(stage, tcfg, workdir, *, data_spec="shapes", text_encoder=None, text_cache=None,
          grad_accum=1, seed=0, log_every=10, save_every=1000, progress=True, callback=None, mesh=None,
          data_workers=0, index_dir=None, eval_every=0, sample_every=0, heldout=None, heldout_data=None):
    """Train `stage` up to tcfg.steps updates in total (resuming from workdir); -> the state.
    mesh: a sharding.make_mesh() mesh (default: every device on 'data'); data_workers: decode
    processes (0: threads of this one); index_dir: where .tar shards keep their index.
    Watching it (monitor.py): every eval_every steps the EMA weights' held-out loss by noise
    level, every sample_every steps a grid of samples with fixed noise (WORKDIR/samples), both
    with the training scalars in metrics.jsonl and TensorBoard (WORKDIR/tensorboard). The
    held-out set: heldout_data (a dataset like data_spec), the shapes dataset's held-out captions,
    or a batch given as `heldout` (monitor.heldout_set). progress: a tqdm bar of the steps;
    callback: called once at the start with the steps done before (resumed) and after each step,
    with {"stage", "step", "steps", "new_steps", "resumed"}."""
    stage = dataclasses.replace(stage, text_encoder=text_encoder or stage.text_encoder)
    B = tcfg.batch_size
    mesh = mesh or sharding.make_mesh()
    sharding.check_batch(B, grad_accum, mesh.size)
    # set-up: folders, data, held-out data, text encoder (a fault in any leaves no workdir behind)
    cli.check_folder(workdir, "--workdir")
    cli.check_folder(text_cache, "--text-cache")
    source = data.open_source(data_spec, seed, index_dir)
    watch = heldout is None and (eval_every or sample_every)
    heldout_source = monitor.open_heldout_data(workdir, heldout_data, index_dir) if watch else None
    text = open_text(stage, text_cache, source, mesh)
    with cli.workdir_lock(workdir):  # one run per workdir, until this one ends
        # restore or init, then compile the step
        mngr = checkpoints.checkpoint_manager(workdir)
        meta = checkpoints.train_meta(stage, tcfg, seed, data_spec, [0] * jax.process_count())
        state, position = checkpoints.restore_or_init(mngr, meta, abstract_state(stage, tcfg)[1],
                                                      lambda: init_state(stage, tcfg, seed)[1], mesh, workdir)
        start = last_saved = int(state["step"])
        if start >= tcfg.steps:
            print(f"{workdir} is already at step {start}: nothing to do for --steps {tcfg.steps} "
                  f"(give more --steps to train on)")
            return state
        step_fn = compile_step(stage, tcfg, mesh, grad_accum, seed, text.spec)
        text_args = () if text.weights is None else (text.weights,)
        _, lr_fn = make_optimizer(tcfg)
        local_B = B // jax.process_count()
        stream = data.host_stream(source, stage, local_B, position, seed, jax.process_index(), jax.process_count(),
                                  data_workers)
        if watch:  # watching it: the held-out set, the samples, TensorBoard
            heldout = monitor.load_heldout(workdir, stage, data_spec, heldout_source)
            if heldout is None:
                print(f"no held-out loss or samples: {data_spec} has no held-out split (give --heldout-data)")
        watched = heldout is not None
        eval_fn = monitor.heldout_loss_fn(stage, tcfg) if watched and eval_every else None
        sample_fn = monitor.sampler(stage, heldout) if watched and sample_every else None
        writer = monitor.open_writer(workdir, start)
        peak = monitor.peak_tflops(stage)
        step_tflop = 3 * B * imagen.forward_flops(stage, compile=False) / 1e12  # forward + backward, the U-Net's
        train_seconds = monitor.train_seconds(workdir, start)
        pending, skipped, t_log = [], 0, time.time()
        bar = tqdm(total=tcfg.steps, initial=start, desc=f"train {stage.name}", unit="step", disable=not progress)
        tell = callback or (lambda info: None)
        tell({"stage": stage.name, "step": start, "steps": tcfg.steps, "new_steps": start, "resumed": True})

        def log(rec, images=None):
            if jax.process_index() == 0:
                with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            monitor.write(writer, rec, images)

        with cli.StopSignals() as stop, bar, contextlib.closing(stream), \
                (writer or contextlib.nullcontext()):
            for step in range(start + 1, tcfg.steps + 1):
                # one update on the next batch; the position moves on only once the step is done
                batch, bad = global_batch(stream, stage, text, mesh)
                state, out = step_fn(state, batch, *text_args)
                position, skipped = position + local_B, skipped + note_skipped(workdir, source, *bad)
                pending.append(out)
                bar.update(1)
                tell({"stage": stage.name, "step": step, "steps": tcfg.steps, "new_steps": 1, "resumed": False})
                stopping = stop.agreed(at_log_step=step % log_every == 0)
                # log every log_every steps (and check the losses are finite)
                if step % log_every == 0 or step == tcfg.steps or stopping:
                    losses = checked_losses([o["loss"] for o in pending], step, last_saved, workdir)
                    seconds = time.time() - t_log
                    train_seconds += seconds
                    rec = {"step": step, "loss": float(np.mean(losses)), "lr": float(lr_fn(step - 1)),
                           "grad_norm": float(np.mean(jax.device_get([o["grad_norm"] for o in pending]))),
                           "img_per_s": B * len(losses) / seconds, "tflops": step_tflop * len(losses) / seconds,
                           "skipped_images": skipped, "train_seconds": round(train_seconds, 3)}
                    if peak:
                        rec["mfu"] = rec["tflops"] / peak
                    log(rec)
                    if progress:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.1f}")
                    pending, t_log = [], time.time()
                # the held-out loss and the samples (their time is not training time)
                t_watch = time.time()
                if eval_fn is not None and (step % eval_every == 0 or step == tcfg.steps):
                    by_bucket = np.asarray(eval_fn(state["ema"], monitor.loss_batch(heldout)))
                    log({"step": step, "heldout_loss": float(by_bucket.mean()),
                         "train_seconds": round(train_seconds + t_watch - t_log, 3),
                         "eval_seconds": round(time.time() - t_watch, 3),
                         "heldout_by_log_snr": dict(zip(map(str, monitor.bucket_log_snrs(stage)), by_bucket.tolist()))})
                if sample_fn is not None and (step % sample_every == 0 or step == tcfg.steps):
                    t = time.time()
                    images = sample_fn(state["ema"])
                    if jax.process_index() == 0:
                        monitor.save_grid(workdir, step, images)
                    log({"step": step, "sample_seconds": round(time.time() - t, 3)}, images)
                t_log += time.time() - t_watch
                # save every save_every steps, at the end, and when asked to stop
                if step % save_every == 0 or step == tcfg.steps or stopping:
                    checked_losses([o["loss"] for o in pending], step, last_saved, workdir)
                    checkpoints.save_checkpoint(mngr, state, dict(meta, position=all_positions(position)))
                    last_saved = step
                if stopping:
                    raise cli.Stopped(f"{stop.requested or 'a signal to another host'}: stopped after step {step}; "
                                     f"checkpoint saved in {workdir}. Run the same command again to resume.")
        if skipped:
            print(f"{skipped} unreadable examples were replaced by the next readable ones "
                  f"(named in {workdir}/skipped.txt)")
        return state


def arg_parser(description=__doc__):
    """train.py's arguments (dry_run.py adds its own to them)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(imagen.PRESETS), default="demo")
    p.add_argument("--stage", choices=list(imagen.STAGE_NAMES), default=None, help="the stage to train")
    p.add_argument("--workdir", default=None, help="default runs/<preset>/<stage>")
    p.add_argument("--steps", type=cli.positive_int, default=None, help="total updates (default: the preset's)")
    p.add_argument("--batch-size", type=cli.positive_int, default=None, help="global batch (paper: 2048)")
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per step")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--data", default="shapes", help="'shapes', a folder of images + .txt, or .tar shards")
    p.add_argument("--data-workers", type=cli.nonnegative_int, default=0, help="image decode processes (0: threads)")
    p.add_argument("--index-dir", default=None, help=".tar shards: where their index is kept (default: beside them)")
    p.add_argument("--text-encoder", default=None, help="a T5 v1.1 checkpoint directory, a name in encoders/, random:NAME (its architecture untrained), or whitened:NAME (its output whitened on the shapes captions, the demo's)")
    p.add_argument("--text-cache", default=None,
                   help="directory of the offline T5 embedding cache (default: encode inside the step)")
    p.add_argument("--log-every", type=cli.positive_int, default=10)
    p.add_argument("--eval-every", type=cli.nonnegative_int, default=None,
                   help="held-out loss by noise level every N steps (0: never; default: the preset's, "
                        f"{WATCH_EVERY['demo']['eval_every']} for the demo)")
    p.add_argument("--sample-every", type=cli.nonnegative_int, default=None,
                   help="a grid of samples with fixed noise every N steps, WORKDIR/samples (0: never; default: "
                        f"the preset's, {WATCH_EVERY['demo']['sample_every']} for the demo)")
    p.add_argument("--heldout-data", default=None,
                   help="examples never trained on, like --data, for the held-out loss and the samples "
                        "(default: the shapes dataset's held-out captions; other data: none)")
    p.add_argument("--save-every", type=cli.positive_int, default=1000)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--remat", action="store_true", help="rematerialise residual blocks (memory)")
    p.add_argument("--mesh", type=sharding.parse_mesh, default="data=-1,fsdp=1",
                   help="data=D,fsdp=F: the batch splits over D x F devices, the train state over F (FSDP)")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=cli.positive_int, default=1)
    p.add_argument("--process-id", type=cli.nonnegative_int, default=0)
    return p


def stage_and_config(args):
    """The stage config and TrainConfig the arguments name."""
    stage = imagen.with_backend(imagen.PRESETS[args.preset][args.stage], imagen.backend(args.dtype), args.remat)
    stage = dataclasses.replace(stage, text_encoder=args.text_encoder or stage.text_encoder)
    tcfg = TRAIN_PRESETS[args.preset][args.stage]
    return stage, dataclasses.replace(tcfg, **{k: v for k, v in (("batch_size", args.batch_size), ("steps", args.steps))
                                               if v is not None})


def main(argv=None):
    return cli.run(_main, argv)


def _main(argv):
    args = arg_parser().parse_args(argv)
    if args.stage is None:
        raise SystemExit("train.py trains one stage: add --stage base|sr1|sr2. The demo cascade "
                         "(all three stages, then a report) is `python demo.py`.")
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    stage, tcfg = stage_and_config(args)
    mesh = sharding.make_mesh(**args.mesh)
    workdir = args.workdir or os.path.join("runs", args.preset, args.stage)  # sample.py reads runs/<preset>
    train(stage, tcfg, workdir, data_spec=args.data, text_encoder=args.text_encoder, text_cache=args.text_cache,
          grad_accum=args.grad_accum, seed=args.seed, log_every=args.log_every, save_every=args.save_every,
          mesh=mesh, data_workers=args.data_workers, index_dir=args.index_dir, heldout_data=args.heldout_data,
          **{k: WATCH_EVERY[args.preset][k] if getattr(args, k) is None else getattr(args, k)
             for k in ("eval_every", "sample_every")})


if __name__ == "__main__":
    main()
