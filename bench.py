"""Speed of one training step and of sampling, side by side with the PyTorch peer.

  python bench.py --preset demo --stage base --batch-size 8            # CPU-sized
  python bench.py --preset paper --stage base --batch-size 64 --json   # an accelerator
  python bench.py --preset demo --stage base --batch-size 8 --compare-peer   # with imagen-pytorch installed

Train step = forward + backward + optimiser update + EMA, jitted as train.py runs it, on
random data of the stage's training shape with 128 (paper) or 64 (demo) text tokens of the
stage's text width. FLOPs come from XLA's cost analysis of the compiled step; MFU is the
achieved FLOP/s over a large matmul measured in the same process (bf16 on accelerators,
float32 on CPU). Sampling: the time of one guided denoising step (2B network passes) and,
with --cascade, the latency of the whole cascade for one prompt at the default step counts.
With --json the last line of stdout is one JSON object. --compare-peer times lucidrains'
imagen-pytorch on the same work (bench_peer) when it is installed (pip install imagen-pytorch).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import checkpoints
import cli
import diffusion
import imagen
import sharding
import train
from unet import UNetConfig

# The peer's "tiny" U-Net (imagen_pytorch_bench.py) in our U-Net's terms: widths 64-256, two
# blocks per level, attention with text at 16, 8 and 4 (of 32), 64-dim heads, no patch.
# --peer-widths puts it in place of the demo base, to compare the frameworks on the same shape.
PEER_TINY_UNET = dict(channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2, attn_resolutions=(16, 8, 4),
                      text_cross_attn_res=(16, 8, 4), per_head_channels=64, patch_size=1, resblock_updown=True)


def with_peer_widths(stage):
    """The demo base at the peer's tiny U-Net widths (PEER_TINY_UNET)."""
    return dataclasses.replace(stage, unet=dataclasses.replace(stage.unet, **PEER_TINY_UNET))


PEER_PRESET = {("paper", "base"): "base64", ("paper", "sr1"): "sr256", ("paper", "sr2"): "sr1024",
               ("demo", "base"): "tiny", ("demo", "sr1"): "tiny", ("demo", "sr2"): "tiny"}


def xla_flops(make_fn, stage, *abstract_args):
    """FLOPs of make_fn(stage)'s function from XLA's cost analysis of its lowering with XLA
    attention: the analysis counts a fused cuDNN attention kernel (a custom call) as 0 FLOPs.
    Lowered for the CPU, whose client analyses uncompiled programs (GPU plugins do not)."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), abstract_args)
    xla = dataclasses.replace(stage, unet=dataclasses.replace(stage.unet, attention="xla"))
    return float(jax.jit(make_fn(xla)).lower(*args).cost_analysis()["flops"])


def timed(fn, *args, n=5):
    """Mean seconds per call after one warm-up call (compile excluded)."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def matmul_peak(dtype):
    """FLOP/s of a large square matmul in this process: the denominator of MFU."""
    n = 8192 if jax.default_backend() != "cpu" else 2048
    x, y = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), dtype)  # not zeros: they run faster
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / timed(f, x, y, n=10)


def bench_train(stage, tcfg, batch, text_len, steps, mesh=None):
    mesh = mesh or sharding.make_mesh()
    tcfg = dataclasses.replace(tcfg, batch_size=batch)
    shapes = train.batch_shapes(stage, batch, text_len)
    _, abstract = train.abstract_state(stage, tcfg)
    flops = xla_flops(lambda st: train.make_train_step(train.abstract_state(st, tcfg)[0], st, tcfg, 1, 0),
                      stage, abstract, shapes)
    t = time.perf_counter()  # compile time from here: the FLOP count above is not part of it
    step = train.compile_step(stage, tcfg, mesh, 1, 0).lower(abstract, shapes).compile()
    mem = step.memory_analysis()  # XLA's plan, on every backend
    _, state = train.init_state(stage, tcfg, 0)
    state = jax.device_put(state, sharding.state_shardings(mesh, state))
    rng = np.random.default_rng(0)
    b = {k: (rng.standard_normal(s.shape).astype(np.float32) if s.dtype == jnp.float32 else
             np.ones(s.shape, bool) if s.dtype == jnp.bool_ else np.arange(s.shape[0], dtype=np.int32))
         for k, s in shapes.items()}
    state, loss = step(state, b)  # warm-up
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t
    print(f"train step compiled in {compile_s:.0f} s", file=sys.stderr, flush=True)
    t = time.perf_counter()
    for _ in range(steps):
        state, loss = step(state, b)
    jax.block_until_ready(loss)
    dt = (time.perf_counter() - t) / steps
    stats = jax.devices()[0].memory_stats() or {}  # measured: accelerators only
    planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return {"step_s": dt, "img_per_s": batch / dt, "flops_per_step": flops, "tflops": flops / dt / 1e12,
            "compile_s": compile_s, "peak_mem_GiB": stats.get("peak_bytes_in_use", 0) / 2 ** 30,
            "planned_mem_GiB": planned / 2 ** 30}


def efficient_and_plain(div=1):
    """App. D.3.2's comparison on the 64->256 task: the F.2 Efficient U-Net (the paper preset)
    and a plain U-Net of about its parameter count as [40, 58] build them (ADM, the base's
    network: the same residual blocks at every level, resampling after them): 128 channels x
    (1, 2, 4, 8, 8) at 256 ... 16, two BigGAN blocks per level, attention with the text at 16x16
    as in F.2. div divides every width (the text's and the GroupNorm groups too), for a CPU."""
    sr1 = imagen.PRESETS["paper"]["sr1"]
    text = dict(text_dim=sr1.unet.text_dim // div, norm_groups=max(sr1.unet.norm_groups // div, 1))
    eff = dataclasses.replace(sr1.unet, block_channels=tuple(c // div for c in sr1.unet.block_channels), **text)
    plain = UNetConfig(lowres_cond=True, channels=128 // div, channel_mult=(1, 2, 4, 8, 8), num_res_blocks=2,
                       attn_resolutions=(16,), text_cross_attn_res=(16,), **text)
    return {"efficient": dataclasses.replace(sr1, unet=eff), "plain": dataclasses.replace(sr1, unet=plain)}


def bench_efficient_vs_plain(b, batch, steps, div, remat=False):
    """Training steps/s and memory of both networks of efficient_and_plain(div), in one run."""
    tcfg = train.TRAIN_PRESETS["paper"]["sr1"]
    r = {"width_div": div}
    for name, stage in efficient_and_plain(div).items():
        stage = imagen.with_backend(stage, b, remat)
        res = bench_train(stage, tcfg, batch, stage.text_length, steps)
        r[name] = {"params": imagen.count_params(stage), **res}
        print(f"{name}: {r[name]['params'] / 1e6:.1f}M parameters, {1 / res['step_s']:.3g} steps/s, "
              f"{res['planned_mem_GiB']:.2f} GiB planned", file=sys.stderr, flush=True)
    r["steps_per_s_ratio"] = r["plain"]["step_s"] / r["efficient"]["step_s"]
    r["memory_ratio"] = r["plain"]["planned_mem_GiB"] / r["efficient"]["planned_mem_GiB"]
    return r


def bench_sampling_step(stage, batch, text_len):
    """One guided denoising step: the network on [cond; uncond] (2B examples)."""
    graphdef, state = nnx.split(imagen.init_network(stage))
    side = stage.side  # sampling runs at the stage's full side (training may crop)
    kz, ke = jax.random.split(jax.random.PRNGKey(0))
    z = jax.random.normal(kz, (2 * batch, side, side, 3))
    emb = jax.random.normal(ke, (2 * batch, text_len, stage.unet.text_dim))
    mask = jnp.ones((2 * batch, text_len), bool)
    low = (z, jnp.zeros((2 * batch,))) if stage.lowres_side else (None, None)
    make = lambda st: lambda s, z: diffusion.guide(*jnp.split(nnx.merge(nnx.graphdef(
        imagen.abstract_network(st)), s)(z, jnp.zeros((2 * batch,)), emb, mask, *low), 2), 5.0)
    flops = xla_flops(make, stage, state, z)
    dt = timed(jax.jit(make(stage)), state, z)
    return {"sample_step_s": dt, "sample_tflops": flops / dt / 1e12}


def bench_cascade(preset, text_len, b):
    """Whole-cascade latency for one prompt at the default step counts (random weights)."""
    cfgs = [imagen.with_backend(imagen.PRESETS[preset][n], b) for n in imagen.STAGE_NAMES]
    stages = [checkpoints.LoadedStage(c, imagen.init_network(c), 0) for c in cfgs]
    emb, mask = jnp.zeros((1, text_len, cfgs[0].unet.text_dim)), jnp.ones((1, text_len), bool)

    def run():
        x = None
        for s, st in enumerate(stages):
            x = imagen.sample_stage(st, jax.random.PRNGKey(s), emb, mask, imagen.default_sampling(st.config), x)
        return x
    jax.block_until_ready(run())  # compile
    t = time.perf_counter()
    jax.block_until_ready(run())
    return {"cascade_latency_s": time.perf_counter() - t}


def bench_peer(preset, batch, size, text_dim, tokens, precision, steps=8):
    """lucidrains' imagen-pytorch, the PyTorch peer, on the same work: one training step
    (forward, backward, Adam) of the peer's U-Net for `preset` (its BaseUnet64, SRUnet256,
    SRUnet1024, or a tiny Unet for CPU runs) at batch x size, random images and random text
    embeddings (tokens x text_dim), under bf16 autocast (precision "fp32": off). -> params,
    step time, images/s, FLOPs per step (torch's FlopCounterMode), TFLOP/s and on CUDA the MFU
    against a bf16 matmul timed in the same process. Needs torch and imagen-pytorch installed."""
    import types  # noqa: PLC0415

    import transformers  # noqa: PLC0415
    # imagen-pytorch reads a T5 config from the hub when imported; offline, answer locally
    transformers.T5Config.from_pretrained = classmethod(lambda cls, name, **kw: cls(d_model=text_dim))
    try:
        import datasets  # noqa: F401, PLC0415 (imagen-pytorch's data module imports it; unused here)
    except ImportError:
        for name in ("datasets", "datasets.utils", "datasets.utils.file_utils"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["datasets.utils.file_utils"].get_datasets_user_agent = lambda: "offline"
    import torch  # noqa: PLC0415
    from imagen_pytorch import Imagen, NullUnet, SRUnet256, SRUnet1024, BaseUnet64, Unet  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    unet = {"base64": BaseUnet64, "sr256": SRUnet256, "sr1024": SRUnet1024,
            "tiny": lambda: Unet(dim=64, cond_dim=256, dim_mults=(1, 2, 3, 4), num_resnet_blocks=2,
                                 layer_attns=(False, True, True, True), layer_cross_attns=(False, True, True, True),
                                 attn_heads=4)}[preset]()
    lowres = preset in ("sr256", "sr1024")
    unets, sizes, number = ((NullUnet(), unet), (size // 4, size), 2) if lowres else ((unet,), (size,), 1)
    model = Imagen(unets=unets, image_sizes=sizes, text_embed_dim=text_dim, timesteps=1000, cond_drop_prob=0.1).to(dev)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    imgs = torch.rand(batch, 3, size, size, device=dev)
    emb = torch.randn(batch, tokens, text_dim, device=dev)
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(imgs, text_embeds=emb, text_masks=mask, unet_number=number)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(), step(), sync()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    r = {"peer": "imagen-pytorch", "preset": preset, "device": dev, "precision": precision,
         "params": sum(q.numel() for q in unet.parameters()), "batch": batch, "size": size, "step_s": dt,
         "img_per_s": batch / dt, "flops_per_step": flops, "tflops": flops / dt / 1e12}
    if dev == "cuda":
        x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            x @ x
        sync()
        t = time.perf_counter()
        for _ in range(10):
            x @ x
        sync()
        peak = 2 * 8192 ** 3 / ((time.perf_counter() - t) / 10)
        r.update(matmul_peak_tflops=peak / 1e12, mfu=flops / dt / peak)
    return r


def run_peer(preset, stage, batch, size, text_dim, tokens, precision, python=None):
    """bench_peer in its own process (torch and JAX do not share the accelerator's memory), with
    `python` (an interpreter that has torch and imagen-pytorch; default: this one)."""
    cmd = [python or sys.executable, os.path.abspath(__file__), "--peer-only", PEER_PRESET[(preset, stage)],
           "--batch-size", str(batch), "--peer-size", str(size), "--peer-text", f"{tokens}x{text_dim}",
           "--peer-precision", precision]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:]
        if any("No module named 'imagen_pytorch'" in line for line in last):
            return {"error": "imagen-pytorch is not installed: pip install imagen-pytorch (or give --peer-python)"}
        return {"error": last}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(imagen.PRESETS), default="demo")
    p.add_argument("--stage", choices=list(imagen.STAGE_NAMES), default="base")
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--steps", type=cli.positive_int, default=5, help="timed train steps")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--attention", choices=["xla", "cudnn"], default=None,
                   help="attention implementation (default: cudnn on GPUs in bf16, else xla)")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling-step timing")
    p.add_argument("--no-train", action="store_true", help="skip the train-step timing")
    p.add_argument("--cascade", action="store_true", help="also time the whole cascade for one prompt")
    p.add_argument("--compare-peer", action="store_true", help="run the imagen-pytorch benchmark too")
    p.add_argument("--peer-python", default=None,
                   help="interpreter with torch + imagen-pytorch for the peer (default: this one)")
    p.add_argument("--peer-only", choices=sorted(set(PEER_PRESET.values())), default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-size", type=cli.positive_int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--peer-text", default="128x4096", help=argparse.SUPPRESS)
    p.add_argument("--peer-precision", choices=["bf16", "fp32"], default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--peer-widths", action="store_true",
                   help="demo base only: our U-Net at the widths of the peer's tiny U-Net (PEER_TINY_UNET)")
    p.add_argument("--mesh", type=sharding.parse_mesh, default="data=-1,fsdp=1", help="train step: data=D,fsdp=F as in train.py")
    p.add_argument("--efficient-vs-plain", action="store_true",
                   help="App. D.3.2: train steps/s and memory of the F.2 Efficient U-Net and a plain U-Net of "
                        "its size on 64->256 (efficient_and_plain), instead of the stage benchmark")
    p.add_argument("--width-div", type=cli.positive_int, default=1, help="with --efficient-vs-plain: divide every width")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.peer_only:  # run_peer's own process
        tokens, text_dim = map(int, a.peer_text.split("x"))
        r = bench_peer(a.peer_only, a.batch_size, a.peer_size, text_dim, tokens, a.peer_precision)
        print(json.dumps(r))
        return r
    b = imagen.backend(a.dtype, a.attention)
    if a.efficient_vs_plain:
        if a.width_div not in (1, 2, 4, 8, 16):
            p.error("--width-div: 1, 2, 4, 8 or 16 (the plain U-Net's 1024 channels keep a 64-wide head)")
        r = {"device": jax.devices()[0].device_kind, "dtype": b.dtype, "batch": a.batch_size,
             **bench_efficient_vs_plain(b, a.batch_size, a.steps, a.width_div, a.remat)}
        print(json.dumps(r) if a.json else f"plain / efficient: {r['steps_per_s_ratio']:.2f}x the step time, "
              f"{r['memory_ratio']:.2f}x the memory (paper: the Efficient U-Net is 2-3x faster)")
        return r
    dtype = b.dtype
    stage = imagen.with_backend(imagen.PRESETS[a.preset][a.stage], b, a.remat)
    if a.peer_widths:
        if (a.preset, a.stage) != ("demo", "base"):
            p.error("--peer-widths applies to --preset demo --stage base")
        stage = with_peer_widths(stage)
    tcfg = train.TRAIN_PRESETS[a.preset][a.stage]
    text_len = stage.text_length
    peak = matmul_peak(jnp.dtype(dtype))
    r = {"preset": a.preset, "stage": a.stage, "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
         "dtype": dtype, "params": imagen.count_params(stage), "size": stage.train_side, "batch": a.batch_size,
         "text_tokens": text_len, "attention": b.attention,
         "matmul_peak_tflops": peak / 1e12}
    if not a.no_train:
        mesh = sharding.make_mesh(**a.mesh)
        r.update(bench_train(stage, tcfg, a.batch_size, text_len, a.steps, mesh))
        r["mesh"] = dict(mesh.shape)
        r["mfu"] = r["tflops"] * 1e12 / (peak * jax.device_count())
    if not a.no_sampling:
        r.update(bench_sampling_step(stage, a.batch_size, text_len))
        r["sample_mfu"] = r["sample_tflops"] * 1e12 / peak
    if a.cascade:
        r.update(bench_cascade(a.preset, text_len, b))
    if a.compare_peer:
        peer = run_peer(a.preset, a.stage, a.batch_size, stage.train_side, stage.unet.text_dim, text_len,
                        "fp32" if dtype == "float32" else "bf16", a.peer_python)
        r["peer"] = peer
        if "tflops" in peer and "tflops" in r:
            r["ratio_img_per_s"] = r["img_per_s"] / peer["img_per_s"]
            r["ratio_tflops"] = r["tflops"] / peer["tflops"]
    for k, v in r.items():
        if not a.json:
            print(f"{k:22s} {v:.4g}" if isinstance(v, float) else f"{k:22s} {v}")
    if a.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    cli.run(main)
