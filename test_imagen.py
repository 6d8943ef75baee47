"""Tests of the Imagen reimplementation: tiny configs, properties that follow from the math.

Run with `pytest -q test_imagen.py`. Multi-device tests emulate 8 CPU devices through
XLA_FLAGS=--xla_force_host_platform_device_count=8, set below before JAX is imported.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never use the network

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion as D

# =============================================================================================
# diffusion.py
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
                                       log_snr_fn, steps=20, w=3.0, sampler=sampler,
                                       threshold=threshold))
    x = run(jax.random.PRNGKey(3))
    np.testing.assert_allclose(x, x_star, atol=1e-3)


def test_sampling_guidance_uses_one_batched_call_and_one_pass_at_w1():
    calls = []

    def eps_fn(z_t, log_snr, text_emb, text_mask, lowres, aug_log_snr):
        calls.append(z_t.shape[0])
        return jnp.zeros_like(z_t)

    emb, mask = jnp.ones((2, 4, 8)), jnp.ones((2, 4), bool)
    for w in (1.0, 5.0):
        D.sample(eps_fn, jax.random.PRNGKey(0), (2, 4, 4, 3), emb, mask, D.cosine_log_snr, 3, w=w)
    assert calls == [2, 4]  # traced once each: B examples at w = 1, 2B (cond + uncond) otherwise


def test_loss_drops_text_and_augments_lowres():
    seen = {}

    def eps_fn(z_t, log_snr, text_emb, text_mask, lowres, aug_log_snr):
        seen.update(emb=text_emb, mask=text_mask, lowres=lowres, aug=aug_log_snr, log_snr=log_snr)
        return jnp.zeros_like(z_t)

    B = 2000
    x0 = jnp.zeros((B, 2, 2, 1))
    emb, mask = jnp.ones((B, 3, 4)), jnp.ones((B, 3), bool)
    lowres = jnp.ones((B, 2, 2, 1))
    loss = D.diffusion_loss(eps_fn, x0, emb, mask, jax.random.PRNGKey(0), D.cosine_log_snr,
                            lowres=lowres)
    assert abs(float(loss) - 1.0) < 0.05  # E[eps^2] = 1 for a zero prediction
    dropped = np.asarray(~seen["mask"].any(axis=1))
    assert 0.07 < dropped.mean() < 0.13  # 10% text dropout, §4.1
    assert np.all(np.asarray(seen["emb"])[dropped] == 0) and np.all(np.asarray(seen["emb"])[~dropped] == 1)
    assert seen["aug"].shape == (B,) and float(jnp.std(seen["aug"])) > 1.0  # a random level
    assert not np.allclose(seen["lowres"], lowres)  # the conditioning image was corrupted
