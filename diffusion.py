"""The diffusion math of Imagen, as pure functions of arrays.

Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep Language
Understanding" (arXiv 2205.11487):
  App. A   continuous-time Gaussian diffusion, epsilon-prediction, DDIM and ancestral samplers
  §2.2     classifier-free guidance            -> guide
  §2.3     static and dynamic thresholding     -> static_threshold, dynamic_threshold
  §2.4     noise conditioning augmentation     -> noise_augment
  §4.1     10% text dropout during training    -> diffusion_loss
  App. F   noise schedules of the three stages -> cosine_log_snr, linear_log_snr

Nothing here knows about Flax: the network is passed in as a callable
    eps_fn(z_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC, aug_log_snr_B) -> eps_hat_BHWC
(or v_hat for a stage trained with prediction="v", which only the demo uses). Suffixes name
the axes: B batch, H W C image, L text tokens, D text width; mask_BL is bool. The element-wise
math (q_sample, the samplers' steps) takes images (B, H, W, C) and per-example log-SNRs (B,).
Written in the style of VDM / k-diffusion: the paper's symbols are the variable names.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# paper: not specified; log-SNR is clipped to [-20, 20] so that t = 0 and t = 1 stay finite
# (VDM and diffusers' continuous schedules use the same range). At +-20, sigma or alpha is
# sqrt(sigmoid(-20)) = 4.5e-5: indistinguishable from the exact end points in float32.
LOG_SNR_MIN, LOG_SNR_MAX = -20.0, 20.0


# ---------------------------------------------------------------------------------------------
# Noise schedules (App. F)
# ---------------------------------------------------------------------------------------------

def cosine_log_snr(t, s=0.008):
    """log-SNR lambda_t of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), t in [0, 1];
    the base and 64->256 models' (Saharia et al. 2022, App. F.1, F.2). With a(t) = (t + s) /
    (1 + s) pi / 2 and a0 = a(0),
        lambda_t = 2 log cos a - log sin(a - a0) - log sin(a + a0),
    accurate near both ends, clipped to [LOG_SNR_MIN, LOG_SNR_MAX] (it is +inf at t = 0, -inf at
    t = 1). Derivation: docs/noise_schedules.md#cosine.
    """
    t = jnp.asarray(t, jnp.float32)
    a0 = s / (1 + s) * math.pi / 2
    a = (t + s) / (1 + s) * math.pi / 2
    # cos(a) at t = 1 is -4e-8 in float32, not 0: floor it so that the log is -inf-ish, not NaN
    log_snr = 2 * jnp.log(jnp.maximum(jnp.cos(a), 1e-30)) - jnp.log(jnp.sin(a - a0)) - jnp.log(jnp.sin(a + a0))
    return jnp.clip(log_snr, LOG_SNR_MIN, LOG_SNR_MAX)


_GAUSS_LEGENDRE_5 = np.polynomial.legendre.leggauss(5)  # (nodes, weights) on [-1, 1]


def linear_log_snr(t, beta_start=1e-4, beta_end=0.02, num_steps=1000):
    """Continuous-time log-SNR of "the 1000 step linear noise schedule with start and end 1e-4
    and 0.02" (Saharia et al. 2022, App. F.3, the 256->1024 model; Ho et al. 2020):
        log alpha_bar(t) = T int_0^t log(1 - beta(u)) du,  beta(u) = beta_start + (beta_end - beta_start) u,
        lambda_t = L - log(-expm1(L)),  L = log alpha_bar(t),
    the integral by 5-point Gauss-Legendre quadrature; within 0.1 in log-SNR of the discrete
    schedule at t = n / T (n >= 1), -10.12 at t = 1; clipped like the cosine schedule.
    paper: not specified how the discrete schedule maps to continuous time; derivation and
    checks: docs/noise_schedules.md#linear.
    """
    t = jnp.asarray(t, jnp.float32)
    x, wq = _GAUSS_LEGENDRE_5  # nodes and weights on [-1, 1]
    u = t[..., None] * (x + 1) / 2  # nodes mapped to [0, t]
    beta = beta_start + (beta_end - beta_start) * u
    L = num_steps * t * jnp.sum(wq / 2 * jnp.log1p(-beta), axis=-1)  # log alpha_bar(t) <= 0
    L = jnp.minimum(L, -1e-30)  # L = 0 exactly at t = 0; keep log(-expm1(L)) finite (-> clip)
    log_snr = L - jnp.log(-jnp.expm1(L))
    return jnp.clip(log_snr, LOG_SNR_MIN, LOG_SNR_MAX)

# The schedules by the name that stage configs use (App. F: base and 64->256 cosine,
# 256->1024 linear).
SCHEDULES = {"cosine": cosine_log_snr, "linear": linear_log_snr}


def alpha_sigma(log_snr):
    """(alpha_t, sigma_t) of the variance-preserving process (App. A):
    alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1 and
    lambda = log(alpha^2 / sigma^2)."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


def _bcast(v, x):
    """(B,) -> (B, 1, 1, 1) so that per-example scalars broadcast over an image batch."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(x0, log_snr, noise):
    """z_t = alpha_t x + sigma_t eps, a draw of q(z_t | x) (App. A). log_snr: (B,)."""
    alpha_t, sigma_t = alpha_sigma(_bcast(log_snr, x0))
    return alpha_t * x0 + sigma_t * noise


def predict_x0(z_t, eps_hat, log_snr):
    """x0_hat = (z_t - sigma_t eps_hat) / alpha_t, the data prediction of an epsilon-prediction
    network (App. A)."""
    alpha_t, sigma_t = alpha_sigma(_bcast(log_snr, z_t))
    return (z_t - sigma_t * eps_hat) / alpha_t


# Network targets. The paper's is epsilon (App. A). "v" = alpha_t eps - sigma_t x (Salimans &
# Ho 2022; Imagen Video, Ho et al. 2022, §2.4, "avoids color shifting artifacts") is NOT the
# paper's: only the demo uses it (docs/demo_experiments.md#why-v-prediction).
PREDICTIONS = ("eps", "v")


def target(x0, eps, log_snr, prediction="eps"):
    """What the network is trained to output: eps (App. A) or v = alpha_t eps - sigma_t x."""
    if prediction == "eps":
        return eps
    alpha_t, sigma_t = alpha_sigma(_bcast(log_snr, x0))
    return alpha_t * eps - sigma_t * x0


def output_to_x0(z_t, out, log_snr, prediction="eps"):
    """The data prediction x0_hat from the network's output: predict_x0 for eps, and
    x0_hat = alpha_t z_t - sigma_t v_hat for v. Both are linear in the output, so guiding the
    outputs (§2.2) is guiding x0_hat."""
    if prediction == "eps":
        return predict_x0(z_t, out, log_snr)
    alpha_t, sigma_t = alpha_sigma(_bcast(log_snr, z_t))
    return alpha_t * z_t - sigma_t * out


# ---------------------------------------------------------------------------------------------
# Guidance and thresholding (§2.2, §2.3)
# ---------------------------------------------------------------------------------------------

def guide(eps_cond, eps_uncond, w):
    """Classifier-free guidance, §2.2: eps~ = w eps(z, c) + (1 - w) eps(z). w = 1 is no
    guidance; the paper's "guidance weight" w is this w (not w - 1)."""
    return w * eps_cond + (1 - w) * eps_uncond


def static_threshold(x0_hat):
    """Static thresholding, §2.3: clip x0_hat to [-1, 1], the range of the training data."""
    return jnp.clip(x0_hat, -1.0, 1.0)


def dynamic_threshold(x0_hat, p=99.5):
    """Dynamic thresholding, §2.3: s = the p-th percentile of |x0_hat| per sample; if s > 1,
    clip x0_hat to [-s, s] and divide by s. p = 99.5 is from the caption of Fig. A.10.

    p is a percent. Passing the fraction 0.995 would take the 0.995th percentile, s ~ 0,
    max(s, 1) = 1, and silently turn this into static thresholding (a known bug in a JAX port
    and in diffusers), so it is refused.
    """
    if not 1.0 < p <= 100.0:
        raise ValueError(f"dynamic_threshold: p={p} must be a percent in (1, 100], e.g. 99.5")
    axes = tuple(range(1, x0_hat.ndim))
    s = jnp.percentile(jnp.abs(x0_hat).astype(jnp.float32), p, axis=axes, keepdims=True)
    s = jnp.maximum(s, 1.0)
    return jnp.clip(x0_hat, -s, s) / s


THRESHOLDS = {"none": lambda x: x, "static": static_threshold, "dynamic": dynamic_threshold}


# ---------------------------------------------------------------------------------------------
# Samplers (App. A)
# ---------------------------------------------------------------------------------------------

def ddim_step(z_t, x0_hat, log_snr_t, log_snr_s):
    """DDIM update from t to s < t (App. A; Song et al. 2021):
    z_s = alpha_s x0_hat + (sigma_s / sigma_t)(z_t - alpha_t x0_hat). log_snr_*: (B,)."""
    alpha_t, sigma_t = alpha_sigma(_bcast(log_snr_t, z_t))
    alpha_s, sigma_s = alpha_sigma(_bcast(log_snr_s, z_t))
    return alpha_s * x0_hat + (sigma_s / sigma_t) * (z_t - alpha_t * x0_hat)


def ancestral_step(z_t, x0_hat, log_snr_t, log_snr_s, noise, gamma):
    """Ancestral (DDPM) update from t to s < t, App. A:
        z_s = mu + sqrt((sigma~^2_{s|t})^(1 - gamma) (sigma^2_{t|s})^gamma) eps,
        mu  = e^(lambda_t - lambda_s) (alpha_s / alpha_t) z_t + (1 - e^(lambda_t - lambda_s)) alpha_s x0_hat,
        sigma~^2_{s|t} = (1 - e^(lambda_t - lambda_s)) sigma_s^2,
        sigma^2_{t|s}  = (1 - e^(lambda_t - lambda_s)) sigma_t^2.
    gamma interpolates between the posterior variance (0) and the forward variance (1)."""
    lt, ls = _bcast(log_snr_t, z_t), _bcast(log_snr_s, z_t)
    alpha_t, sigma_t = alpha_sigma(lt)
    alpha_s, sigma_s = alpha_sigma(ls)
    r = jnp.exp(lt - ls)  # e^(lambda_t - lambda_s) < 1 since lambda decreases in t
    mu = r * (alpha_s / alpha_t) * z_t + (1 - r) * alpha_s * x0_hat
    # (1 - r)^(1-g) sigma_s^(2(1-g)) * (1 - r)^g sigma_t^(2g) = (1 - r) sigma_s^(2(1-g)) sigma_t^(2g)
    var = (1 - r) * sigma_s ** (2 * (1 - gamma)) * sigma_t ** (2 * gamma)
    return mu + jnp.sqrt(var) * noise


# ---------------------------------------------------------------------------------------------
# Noise conditioning augmentation (§2.4)
# ---------------------------------------------------------------------------------------------

def resize_lowres(x_BHWC, side: int):
    """A low-resolution image (B, h, w, C) resized to (B, side, side, C), the size of the image
    it conditions. paper: not specified; bicubic (SR3 and imagen-pytorch up-sample bicubically
    or bilinearly)."""
    B, _, _, C = x_BHWC.shape
    return jax.image.resize(x_BHWC.astype(jnp.float32), (B, side, side, C), "bicubic")


def noise_augment(lowres_BHWC, aug_level_B, noise_BHWC, log_snr_fn, side):
    """Noise conditioning augmentation, §2.4: "we corrupt the low-resolution image with the
    augmentation", so the image (B, h, w, C) is corrupted at its own, low resolution and then
    resized to the stage's side. Returns the image the network sees, (B, side, side, C), and
    the augmentation's log-SNR (B,), which the network is conditioned on.

    paper: not specified how aug_level maps to a noise level ("Gaussian noise augmentation ...
    resembling the forward process"); we run the stage's own forward process to t = aug_level,
    so aug_level = 0 is no noise and 1 pure noise, and a level means a different log-SNR on each
    stage's schedule: aug_level = 0.3 is log-SNR +1.31 (alpha 0.89) on the cosine schedule of
    the 64->256 model, and -0.42 (alpha 0.63) on the linear schedule of the 256->1024 model. So
    Fig. A.12's "aug_level = 0.3 for both" super-resolution models, read this way, corrupts the
    256x256 input of the 256->1024 model much more than the 64x64 input of the 64->256 model.
    noise_BHWC: standard normal noise of the low-resolution image's shape.
    """
    aug_log_snr_B = log_snr_fn(aug_level_B)
    return resize_lowres(q_sample(lowres_BHWC, aug_log_snr_B, noise_BHWC), side), aug_log_snr_B


# ---------------------------------------------------------------------------------------------
# Training loss (App. A, §4.1)
# ---------------------------------------------------------------------------------------------

def drop_text(txt_BLD, mask_BL, drop):
    """The null condition of classifier-free guidance for the examples where drop (B,) is True.

    §4.1: the text embeddings are zeroed. paper: not specified what happens to the mask; we also
    clear it (no text tokens at all), so that the unconditional model does not see the prompt's
    length, and sampling's unconditional pass is the same (zeros, all-False mask)."""
    keep = ~drop
    return txt_BLD * keep[:, None, None].astype(txt_BLD.dtype), mask_BL & keep[:, None]


def diffusion_loss(eps_fn, x0_BHWC, txt_BLD, mask_BL, keys, log_snr_fn, p_uncond=0.1, lowres_BHWC=None,
                   max_aug_level=1.0, prediction="eps", t_B=None):
    """Imagen's training loss: plain MSE on epsilon (App. A), t ~ U(0, 1) in continuous time
    (App. F), text dropped with probability p_uncond = 10% (§4.1). For super-resolution stages
    (lowres_BHWC given, at its low resolution) the conditioning image is noise-augmented at
    aug_level ~ U(0, max_aug_level) per example, then resized to x0's side (§2.4).

    keys: one PRNG key per example, (B, 2), so that an example's noise does not depend on how
    the batch is split over devices, hosts or micro-batches.
    §2.4: "During training, aug_level is chosen randomly"; Fig. A.32's train_step draws it as
    jnp.random.uniform(0.0, 1.0): U(0, max_aug_level), 1 by default (train.TrainConfig.max_aug_level).
    paper: not specified whether one level per batch (the listing's train_step) or per example;
    per example here.
    prediction: "eps" (the paper) or "v" (see PREDICTIONS): plain MSE on that target.
    t_B: given times in place of the drawn ones (the held-out loss at chosen noise levels).
    Returns the mean loss over the batch (a scalar, float32).
    """
    def draw(key):  # everything random about one example
        k_t, k_eps, k_drop, k_aug, k_aug_eps = jax.random.split(key, 5)
        aug_eps = None if lowres_BHWC is None else jax.random.normal(k_aug_eps, lowres_BHWC.shape[1:])
        return (jax.random.uniform(k_t), jax.random.normal(k_eps, x0_BHWC.shape[1:]),
                jax.random.bernoulli(k_drop, p_uncond), max_aug_level * jax.random.uniform(k_aug), aug_eps)

    drawn_t_B, eps_BHWC, drop_B, aug_level_B, aug_eps = jax.vmap(draw)(keys)
    t_B = drawn_t_B if t_B is None else t_B
    log_snr_B = log_snr_fn(t_B)
    z_t_BHWC = q_sample(x0_BHWC, log_snr_B, eps_BHWC)
    txt_BLD, mask_BL = drop_text(txt_BLD, mask_BL, drop_B)
    aug_log_snr_B = None
    if lowres_BHWC is not None:
        lowres_BHWC, aug_log_snr_B = noise_augment(lowres_BHWC, aug_level_B, aug_eps, log_snr_fn, x0_BHWC.shape[1])
    out_BHWC = eps_fn(z_t_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC, aug_log_snr_B)
    target_BHWC = target(x0_BHWC, eps_BHWC, log_snr_B, prediction)
    return jnp.mean(jnp.square(out_BHWC.astype(jnp.float32) - target_BHWC))


# ---------------------------------------------------------------------------------------------
# Sampling loop (App. A, §2.2-2.4), compiled as a whole
# ---------------------------------------------------------------------------------------------

def initial_carry(key, shape):
    """The sampling loop's start: (z_1 ~ N(0, I), x0_hat = 0), drawn from sample's own key."""
    return jax.random.normal(jax.random.split(key, 3)[0], shape, jnp.float32), jnp.zeros(shape, jnp.float32)


def sample(eps_fn, key, shape, txt_BLD, mask_BL, log_snr_fn, *, steps, guided=False, w=1.0, sampler="ddpm",
           gamma=0.0, threshold="dynamic", p=99.5, lowres_BHWC=None, aug_level=0.0, prediction="eps",
           span=None, carry=None):
    """Draw x ~ p(x | c) with `steps` uniformly spaced times from t = 1 to t = 0 (App. A).

    Every step: one network call (guided: classifier-free guidance at weight w, the conditional
    and unconditional passes batched into a single call of 2B examples, eps~ = guide(...), §2.2;
    not guided: the conditional pass alone, w unused), x0_hat from eps~, thresholding of x0_hat
    (§2.3), then a DDIM or ancestral step (App. A). The loop is a lax.fori_loop: under jax.jit
    there is no host round trip per step. Returns the last x0_hat, (B, H, W, C) float32.

    For super-resolution stages, lowres_BHWC (B, h, w, C) is the previous stage's output at its own
    side; it is noise-augmented once at the fixed aug_level, then resized to this stage's side
    (§2.4), and the same corrupted image conditions every step.

    paper: not specified: the step counts and gamma; ancestral sampling with gamma = 0 (the
    posterior variance of DDPM) is our default. prediction: what eps_fn outputs ("eps", the
    paper's, or "v"); guidance combines the outputs either way.

    span = (i, j): only steps i, ..., j-1, from carry (z_t, x0_hat) (None: from z_1), returning
    the carry, so that a caller can run the loop in pieces with the same result.
    """
    B = shape[0]
    thresh = (lambda x: dynamic_threshold(x, p)) if threshold == "dynamic" else THRESHOLDS[threshold]
    _, k_aug, k_loop = jax.random.split(key, 3)  # the first: initial_carry's
    aug_log_snr_B = None
    if lowres_BHWC is not None:
        lowres_BHWC, aug_log_snr_B = noise_augment(
            lowres_BHWC, jnp.full((B,), aug_level, jnp.float32),
            jax.random.normal(k_aug, lowres_BHWC.shape, jnp.float32), log_snr_fn, shape[1])

    if guided:  # one network call on [cond; uncond]
        null_emb, null_mask = drop_text(txt_BLD, mask_BL, jnp.ones((B,), bool))
        txt_2BLD = jnp.concatenate([txt_BLD, null_emb])
        mask_2BL = jnp.concatenate([mask_BL, null_mask])
        dup = lambda a: None if a is None else jnp.concatenate([a, a])
        lowres_2BHWC, aug_2B = dup(lowres_BHWC), dup(aug_log_snr_B)

    def eps_tilde(z_t_BHWC, log_snr_B):
        if not guided:
            return eps_fn(z_t_BHWC, log_snr_B, txt_BLD, mask_BL, lowres_BHWC, aug_log_snr_B).astype(jnp.float32)
        eps_2BHWC = eps_fn(jnp.concatenate([z_t_BHWC, z_t_BHWC]), jnp.concatenate([log_snr_B, log_snr_B]),
                           txt_2BLD, mask_2BL, lowres_2BHWC, aug_2B).astype(jnp.float32)
        return guide(eps_2BHWC[:B], eps_2BHWC[B:], w)

    def body(i, carry):
        z_t_BHWC, _ = carry
        t = 1.0 - i / steps
        s = 1.0 - (i + 1) / steps
        log_snr_t_B = jnp.full((B,), log_snr_fn(t))
        log_snr_s_B = jnp.full((B,), log_snr_fn(s))
        x0_hat_BHWC = thresh(output_to_x0(z_t_BHWC, eps_tilde(z_t_BHWC, log_snr_t_B), log_snr_t_B, prediction))
        if sampler == "ddim":
            z_s_BHWC = ddim_step(z_t_BHWC, x0_hat_BHWC, log_snr_t_B, log_snr_s_B)
        elif sampler == "ddpm":
            noise = jax.random.normal(jax.random.fold_in(k_loop, i), shape, jnp.float32)
            z_s_BHWC = ancestral_step(z_t_BHWC, x0_hat_BHWC, log_snr_t_B, log_snr_s_B, noise, gamma)
        else:
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        return z_s_BHWC, x0_hat_BHWC

    carry = initial_carry(key, shape) if carry is None else carry
    if span is not None:
        return jax.lax.fori_loop(span[0], span[1], body, carry)
    _, x0_hat_BHWC = jax.lax.fori_loop(0, steps, body, carry)
    return x0_hat_BHWC
