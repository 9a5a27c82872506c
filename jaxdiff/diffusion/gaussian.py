"""Forward process, posterior, parameterisations and training losses of discrete diffusion.

Pure functions of a `Schedule` (any respacing) and arrays. `t` is an index into the schedule
(an int array of shape [B] or a scalar), never the original timestep; NHWC or any layout works
since coefficients broadcast over all non-batch axes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")


def extract(coef: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """coef[t] shaped to broadcast against an array of rank `ndim` with batch axis first."""
    out = coef[jnp.asarray(t)]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar) x0, (1 - abar) I) with the given noise."""
    return (extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior(sched: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    nd = xt.ndim
    mean = extract(sched.posterior_mean_coef1, t, nd) * x0 + extract(sched.posterior_mean_coef2, t, nd) * xt
    return (mean, extract(sched.posterior_variance, t, nd),
            extract(sched.posterior_log_variance_clipped, t, nd))


def x0_from_eps(sched: Schedule, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    nd = xt.ndim
    return extract(sched.sqrt_recip_alphas_cumprod, t, nd) * xt - extract(sched.sqrt_recipm1_alphas_cumprod, t, nd) * eps


def eps_from_x0(sched: Schedule, xt: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    nd = xt.ndim
    return (extract(sched.sqrt_recip_alphas_cumprod, t, nd) * xt - x0) / extract(sched.sqrt_recipm1_alphas_cumprod, t, nd)


def v_from_eps_x0(sched: Schedule, t: jax.Array, eps: jax.Array, x0: jax.Array) -> jax.Array:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    nd = eps.ndim
    return extract(sched.sqrt_alphas_cumprod, t, nd) * eps - extract(sched.sqrt_one_minus_alphas_cumprod, t, nd) * x0


def x0_from_v(sched: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    nd = xt.ndim
    return extract(sched.sqrt_alphas_cumprod, t, nd) * xt - extract(sched.sqrt_one_minus_alphas_cumprod, t, nd) * v


def eps_from_v(sched: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    nd = xt.ndim
    return extract(sched.sqrt_one_minus_alphas_cumprod, t, nd) * xt + extract(sched.sqrt_alphas_cumprod, t, nd) * v


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction target {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
    return prediction


def to_x0(sched: Schedule, xt: jax.Array, t: jax.Array, pred: jax.Array, prediction: str) -> jax.Array:
    """x0 implied by a network prediction of kind `prediction` ("eps", "x0" or "v")."""
    check_prediction(prediction)
    if prediction == "eps":
        return x0_from_eps(sched, xt, t, pred)
    if prediction == "v":
        return x0_from_v(sched, xt, t, pred)
    return pred


def to_eps(sched: Schedule, xt: jax.Array, t: jax.Array, pred: jax.Array, prediction: str) -> jax.Array:
    """eps implied by a network prediction of kind `prediction`."""
    check_prediction(prediction)
    if prediction == "eps":
        return pred
    if prediction == "v":
        return eps_from_v(sched, xt, t, pred)
    return eps_from_x0(sched, xt, t, pred)


def split_output(out: jax.Array, learned_sigma: bool) -> tuple[jax.Array, jax.Array | None]:
    """(prediction, variance values) from a raw model output, channels last."""
    if not learned_sigma:
        return out, None
    c = out.shape[-1] // 2
    return out[..., :c], out[..., c:]


def model_log_variance(sched: Schedule, t: jax.Array, var_values: jax.Array | None, ndim: int,
                       fixed: str = "large") -> jax.Array:
    """Log variance of p(x_{t-1} | x_t).

    Learned sigma: frac * log(beta_t) + (1 - frac) * log(posterior variance, clipped), with
    frac = (v + 1) / 2 and v the second half of the output. Otherwise the fixed choice
    "large" (beta_t, posterior variance at t = 0) or "small" (posterior variance).
    """
    if var_values is not None:
        frac = (var_values + 1.0) / 2.0
        return (frac * extract(sched.log_betas, t, ndim)
                + (1.0 - frac) * extract(sched.posterior_log_variance_clipped, t, ndim))
    if fixed == "large":
        return extract(sched.fixed_large_log_variance, t, ndim)
    if fixed == "small":
        return extract(sched.posterior_log_variance_clipped, t, ndim)
    raise ValueError(f"unknown fixed variance {fixed!r}; allowed: 'large', 'small'")


class MeanVariance(NamedTuple):
    """p(x_{t-1} | x_t) from one model call: mean, variance, log variance and x0 estimate."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array


def p_mean_variance(sched: Schedule, model_out: jax.Array, xt: jax.Array, t: jax.Array, *,
                    prediction: str = "eps", learned_sigma: bool = False, fixed_variance: str = "large",
                    clip_denoised: bool = True) -> MeanVariance:
    """guided-diffusion's p_mean_variance from a raw model output (channels last)."""
    pred, var_values = split_output(model_out, learned_sigma)
    log_var = model_log_variance(sched, t, var_values, xt.ndim, fixed_variance)
    log_var = jnp.broadcast_to(log_var, xt.shape)
    x0 = to_x0(sched, xt, t, pred, prediction)
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean, _, _ = q_posterior(sched, x0, xt, t)
    return MeanVariance(mean, jnp.exp(log_var), log_var, x0)


# --- likelihood terms -------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 256 bins under a Gaussian (per element)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(sched: Schedule, model_out: jax.Array, x0: jax.Array, xt: jax.Array, t: jax.Array, *,
                 prediction: str = "eps", learned_sigma: bool = True, fixed_variance: str = "large",
                 clip_denoised: bool = False) -> jax.Array:
    """Per-sample variational bound term in bits per dimension: KL for t > 0, decoder NLL at t = 0."""
    true_mean, _, true_log_var = q_posterior(sched, x0, xt, t)
    out = p_mean_variance(sched, model_out, xt, t, prediction=prediction, learned_sigma=learned_sigma,
                          fixed_variance=fixed_variance, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / np.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(
        x0, means=out.mean, log_scales=0.5 * out.log_variance)) / np.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, nll, kl)


# --- training losses --------------------------------------------------------------------------

def training_target(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, prediction: str) -> jax.Array:
    """What the network regresses onto for `prediction`: eps, x0 or v."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return v_from_eps_x0(sched, t, noise, x0)


def training_losses(sched: Schedule, model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    x0: jax.Array, t: jax.Array, noise: jax.Array, *, prediction: str = "eps",
                    learned_sigma: bool = False, vlb_weight: float | None = None) -> dict[str, jax.Array]:
    """Per-sample losses at schedule indices t.

    `model_fn(x_t, t)` returns the raw model output (channels last). The loss is the MSE on the
    `prediction` target; with learned sigma, Nichol & Dhariwal's hybrid loss adds the VLB term on a
    stop-gradient mean (it trains only the variance), scaled by `vlb_weight` (default num_steps /
    1000: guided-diffusion's RESCALED_MSE).
    """
    xt = q_sample(sched, x0, t, noise)
    out = model_fn(xt, t)
    pred, var_values = split_output(out, learned_sigma)
    mse = mean_flat((training_target(sched, x0, t, noise, prediction) - pred) ** 2)
    losses = {"mse": mse}
    if learned_sigma:
        frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
        vb = vb_terms_bpd(sched, frozen, x0, xt, t, prediction=prediction, learned_sigma=True)
        weight = sched.num_steps / 1000.0 if vlb_weight is None else vlb_weight
        losses["vb"] = vb * weight
        losses["loss"] = mse + losses["vb"]
    else:
        losses["loss"] = mse
    return losses
