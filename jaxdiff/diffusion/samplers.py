"""Samplers: DDPM ancestral (also over diffusers' "leading" spacing: `diffusers_ddpm`), DDIM (any eta) and
DPM-Solver++(2M), each a `lax.scan` over a step.

Small composable pieces, k-diffusion style:

  denoise(...)        one model call -> (x0, eps, variance values), x0 processed (clip / threshold)
                      and, for eps-based samplers, classifier-style gradient guidance applied
  ddpm_step / ddim_step / dpmpp_2m_step   pure update rules over a (respaced) `Schedule`
  sample_loop(...)    the whole chain as ONE `lax.scan` (jit it, or use `make_sampler`)

Registry: `SAMPLERS` maps each name to a `Sampler` record; `register_sampler` adds one, and nothing
else in jaxdiff dispatches on sampler names.

Indices `i` run over the respaced schedule from num_steps - 1 down to 0; the networks see the
original timestep `sched.timestep_map[i]`.

Randomness (batch- and device-count independent): sample i uses k_i = fold_in(seed_key,
sample_ids[i]); its starting noise is normal(fold_in(k_i, 0)), that of loop step j (j = 0 at the
highest t) normal(fold_in(fold_in(k_i, 1), j)), unless recorded `noises` are passed.

Progress: with `progress=True` the loop calls an unordered `jax.debug.callback` once per step that
only advances the active tqdm bar (`progress_bar`), so the device never waits on the host.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdiff.diffusion.gaussian import (
    check_prediction,
    eps_from_x0,
    extract,
    model_log_variance,
    q_posterior,
    split_output,
    to_x0,
)
from jaxdiff.diffusion.guides import GradFn, ModelFn, condition_eps, condition_mean, make_x0_fn
from jaxdiff.diffusion.schedules import Schedule
from jaxdiff.util import cpu

FIXED_VARIANCES = ("large", "small")


class StepOptions(NamedTuple):
    """Per-run settings every step function receives (eta may be traced)."""

    eta: Any = 0.0
    fixed_variance: str = "large"


class Sampler(NamedTuple):
    """A registered sampler: k-diffusion-style uniform step over the respaced schedule.

    step(sched, x, i, d, noise, state, first, opts) -> (x_prev, state): `i` the schedule indices
      [B], `d` the `Denoised` model evaluation at x, `noise` (None when not stochastic), `state`
      the sampler's memory (from `init(x_T)`), `first` whether this is the loop's first step.
    stochastic(eta) -> whether a step draws noise (eta may be a Python number or traced).
    guide_eps: gradient guides shift eps (DDIM-type, condition_score) instead of the ancestral mean.
    respacing(steps) -> the default respacing string for `steps` sampling steps.
    """

    name: str
    step: Callable
    init: Callable[[jax.Array], Any] = lambda x_T: None
    stochastic: Callable[[Any], bool] = lambda eta: True
    guide_eps: bool = True
    respacing: Callable[[int], str] = str


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    """Add (or replace) a sampler; `sample_loop`, sample.py and the sweep then accept its name."""
    SAMPLERS[sampler.name] = sampler
    return sampler


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return name


# --- randomness --------------------------------------------------------------------------------

def sample_keys(key: jax.Array, sample_ids: jax.Array) -> jax.Array:
    """Per-sample keys fold_in(key, id): independent of batch composition and device count."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(sample_ids, jnp.uint32))


def initial_noise(key: jax.Array, sample_ids: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """x_T for samples `sample_ids`: normal(fold_in(fold_in(key, id), 0)), shape [B, *shape]."""
    return _initial_from_keys(sample_keys(key, sample_ids), shape, dtype)


def _initial_from_keys(keys: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), tuple(shape), dtype))(keys)


def step_noise(keys: jax.Array, step: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """Noise of loop step `step` from per-sample keys: normal(fold_in(fold_in(k_i, 1), step))."""
    return jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(k, 1), step), tuple(shape), dtype))(keys)


# --- progress ----------------------------------------------------------------------------------

class _Progress:
    lock = threading.Lock()
    bar = None
    offset = 0  # steps already done by earlier batches on the same bar


def _progress_hook(step) -> None:
    with _Progress.lock:
        bar = _Progress.bar
        if bar is None:
            return
        n = _Progress.offset + int(step) + 1
        if n > bar.n:  # idempotent: a sharded run may call back once per device
            bar.update(n - bar.n)


@contextlib.contextmanager
def progress_bar(total: int, desc: str = "sampling", **tqdm_kwargs):
    """Activate a tqdm bar of `total` steps for jitted loops built with progress=True.

    Yields a function `advance(num_steps)` to call after each finished batch (it moves the bar's
    base offset so the next batch's per-step callbacks continue from there).
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, **tqdm_kwargs)
    with _Progress.lock:
        _Progress.bar, _Progress.offset = bar, 0

    def advance(num_steps: int) -> None:
        with _Progress.lock:
            _Progress.offset += int(num_steps)
            if _Progress.offset > bar.n:
                bar.update(_Progress.offset - bar.n)

    try:
        yield advance
    finally:
        with _Progress.lock:
            _Progress.bar, _Progress.offset = None, 0
        bar.close()


# --- one model evaluation ----------------------------------------------------------------------

class Denoised(NamedTuple):
    """What a step needs from one (guided) model call."""

    x0: jax.Array            # processed (clipped / thresholded) x0, eps-guided for eps samplers
    eps: jax.Array           # eps consistent with x0 (re-derived, as guided-diffusion does)
    var_values: Optional[jax.Array]  # learned-sigma interpolation values, or None
    grad: Optional[jax.Array]        # the guide's gradient at x_t (for ancestral steps), or None


def denoise(model_fn: ModelFn, sched: Schedule, x: jax.Array, i: jax.Array, cond, *,
            prediction: str = "eps", learned_sigma: bool = False, x0_fn=None,
            cond_fn: Optional[GradFn] = None, guide_eps: bool = True) -> Denoised:
    """Evaluate the model at x_t, schedule index `i` ([B] ints), and apply gradient guidance.

    x0 is derived from the prediction and processed by `x0_fn` (clip to [-1, 1] by default in the
    samplers); eps is re-derived from that x0. With a `cond_fn` and `guide_eps` (DDIM,
    DPM-Solver++), eps -= sqrt(1 - abar) * grad and x0 is recomputed from it (condition_score);
    without `guide_eps` the gradient is returned for the ancestral mean shift.
    """
    t = sched.timestep_map[i]
    out = model_fn(x, t, cond)
    pred, var_values = split_output(out, learned_sigma)
    x0 = to_x0(sched, x, i, pred.astype(x.dtype), prediction)
    if x0_fn is not None:
        x0 = x0_fn(x0)
    grad = None
    if cond_fn is not None:
        grad = cond_fn(x, t, cond).astype(x.dtype)
        if guide_eps:
            x0, _ = condition_eps(sched, x, i, x0, grad)
    eps = eps_from_x0(sched, x, i, x0)
    return Denoised(x0, eps, var_values, grad)


# --- update rules ------------------------------------------------------------------------------

def _nonzero(i: jax.Array, ndim: int) -> jax.Array:
    return (jnp.asarray(i) != 0).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def ddpm_step(sched: Schedule, x: jax.Array, i: jax.Array, d: Denoised, noise: jax.Array, *,
              fixed_variance: str = "large") -> jax.Array:
    """Ancestral step x_t -> x_{t-1} ~ N(mean, variance); guided: mean += variance * grad."""
    mean, _, _ = q_posterior(sched, d.x0, x, i)
    log_var = model_log_variance(sched, i, d.var_values, x.ndim, fixed_variance)
    if d.grad is not None:
        mean = condition_mean(mean, jnp.exp(log_var), d.grad)
    return mean + _nonzero(i, x.ndim) * jnp.exp(0.5 * log_var) * noise


def ddim_step(sched: Schedule, x: jax.Array, i: jax.Array, d: Denoised, noise: jax.Array,
              eta: jax.Array = 0.0) -> jax.Array:
    """DDIM step (Song et al. 2021) to the previous index, stochasticity eta (0: deterministic)."""
    nd = x.ndim
    abar = extract(sched.alphas_cumprod, i, nd)
    abar_prev = extract(sched.alphas_cumprod_prev, i, nd)
    sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
    mean = d.x0 * jnp.sqrt(abar_prev) + jnp.sqrt(jnp.maximum(1 - abar_prev - sigma ** 2, 0.0)) * d.eps
    return mean + _nonzero(i, nd) * sigma * noise


class DPMState(NamedTuple):
    """DPM-Solver++(2M) multistep memory: previous x0 estimate and previous step size h."""

    x0_prev: jax.Array
    h_prev: jax.Array


def dpmpp_2m_step(sched: Schedule, x: jax.Array, i: jax.Array, d: Denoised, state: DPMState,
                  first: jax.Array) -> tuple[jax.Array, DPMState]:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, over the discrete respaced alpha_bars.

    lambda = 0.5 * log_snr. Step from index i to i - 1 (to abar = 1 at i = 0):
      x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D,  h = lambda' - lambda,
      D = (1 + 1/(2r)) x0_i - 1/(2r) x0_prev,  r = h_prev / h,
    first order (D = x0_i) on the first step and on the last (to sigma' = 0, where x' = x0_i).
    """
    nd = x.ndim
    abar = extract(sched.alphas_cumprod, i, nd)
    abar_next = extract(sched.alphas_cumprod_prev, i, nd)
    lam = 0.5 * extract(sched.log_snr, i, nd)
    last = jnp.asarray(i).reshape((-1,) + (1,) * (nd - 1)) == 0
    # lambda' of the next index; +inf at the end (abar' = 1), handled by `last`.
    im1 = jnp.maximum(jnp.asarray(i) - 1, 0)
    lam_next = jnp.where(last, jnp.inf, 0.5 * extract(sched.log_snr, im1, nd))
    h = lam_next - lam
    second = jnp.logical_not(jnp.logical_or(first, last))
    r = jnp.where(second, state.h_prev / jnp.where(second, h, 1.0), 1.0)
    D = jnp.where(second, (1 + 1 / (2 * r)) * d.x0 - (1 / (2 * r)) * state.x0_prev, d.x0)
    sigma, sigma_next = jnp.sqrt(1 - abar), jnp.sqrt(jnp.maximum(1 - abar_next, 0.0))
    x_next = (sigma_next / sigma) * x + jnp.sqrt(abar_next) * (-jnp.expm1(-h)) * D
    x_next = jnp.where(last, d.x0, x_next)
    return x_next, DPMState(d.x0, jnp.broadcast_to(h, state.h_prev.shape))


def _is_zero(eta) -> bool:
    return isinstance(eta, (int, float)) and float(eta) == 0.0


register_sampler(Sampler(
    "ddpm", lambda sched, x, i, d, noise, state, first, o: (
        ddpm_step(sched, x, i, d, noise, fixed_variance=o.fixed_variance), state),
    guide_eps=False))
register_sampler(Sampler(
    "ddim", lambda sched, x, i, d, noise, state, first, o: (
        ddim_step(sched, x, i, d, jnp.zeros_like(x) if noise is None else noise, o.eta), state),
    stochastic=lambda eta: not _is_zero(eta)))
register_sampler(Sampler(
    "dpmpp2m", lambda sched, x, i, d, noise, state, first, o: dpmpp_2m_step(sched, x, i, d, state, first),
    init=lambda x_T: DPMState(jnp.zeros_like(x_T), jnp.zeros((x_T.shape[0],) + (1,) * (x_T.ndim - 1), x_T.dtype)),
    stochastic=lambda eta: False, respacing=lambda steps: f"logsnr{steps}"))
# diffusers' DDPMScheduler as DeepFloyd IF configures it: the same ancestral step (x0 from eps, then
# thresholding or clipping, the posterior mean, learned-range variance interpolated between log beta and
# log posterior variance of the respaced chain, no noise at the last step) over "leading" spacing.
register_sampler(Sampler(
    "diffusers_ddpm", lambda sched, x, i, d, noise, state, first, o: (
        ddpm_step(sched, x, i, d, noise, fixed_variance=o.fixed_variance), state),
    guide_eps=False, respacing=lambda steps: f"leading{steps}"))
# diffusers' UnCLIPScheduler (Karlo): the same ancestral step over its own spacing ("unclipN": T - 1 down to 0);
# its beta of a skipped step, 1 - abar_t / abar_prev, is the respaced chain's, and its variances ("fixed_small_log":
# the posterior's, "learned_range": between it and that beta) are fixed_variance "small" and learned sigma.
register_sampler(Sampler(
    "unclip", lambda sched, x, i, d, noise, state, first, o: (
        ddpm_step(sched, x, i, d, noise, fixed_variance=o.fixed_variance), state),
    guide_eps=False, respacing=lambda steps: f"unclip{steps}"))


# --- the loop ----------------------------------------------------------------------------------

def sample_loop(model_fn: ModelFn, sched: Schedule, x_T: Optional[jax.Array], cond, *,
                sampler: str = "ddim", key: Optional[jax.Array] = None,
                sample_ids: Optional[jax.Array] = None, shape: Optional[tuple] = None,
                noises: Optional[jax.Array] = None, eta=0.0, cond_fn: Optional[GradFn] = None,
                prediction: str = "eps", learned_sigma: bool = False, fixed_variance: str = "large",
                clip_denoised: bool = True, x0_fn: Optional[Callable] = None,
                progress: bool = False, return_trajectory: bool = False, loop: str = "scan"):
    """Run `sampler` (a name in SAMPLERS) from x_T (index num_steps - 1) down to index 0; returns x_0.

    Pure and traceable: call it inside `jax.jit` (see `make_sampler`); the steps are one `lax.scan`
    (`loop="python"`: a Python loop, for debugging or eager use). `x_T=None` draws the start from
    `key` and `sample_ids` (with per-sample `shape`); per-step noise comes from them too, or from
    recorded `noises` [num_steps, B, ...] in loop order. `x0_fn` replaces the default clipping
    (`clip_denoised`) of x0. `eta` may be traced (DDIM only). With `return_trajectory` also returns
    the stacked x0 estimates.
    """
    spec = SAMPLERS[check_sampler(sampler)]
    check_prediction(prediction)
    if loop not in ("scan", "python"):
        raise ValueError(f"unknown loop {loop!r}; allowed: 'scan', 'python'")
    if not learned_sigma and fixed_variance not in FIXED_VARIANCES:
        raise ValueError(f"unknown fixed variance {fixed_variance!r}; allowed: {', '.join(FIXED_VARIANCES)}")
    if x0_fn is None:
        x0_fn = make_x0_fn(clip_denoised=clip_denoised)
    n = sched.num_steps
    keys = None
    stochastic = spec.stochastic(eta)
    if x_T is None or (noises is None and stochastic):
        if key is None or sample_ids is None:
            raise ValueError("sample_loop needs `key` and `sample_ids` to draw noise "
                             "(or x_T, and recorded `noises` for a stochastic sampler)")
        keys = sample_keys(key, sample_ids)
    if x_T is None:
        if shape is None:
            raise ValueError("sample_loop needs x_T or the per-sample `shape`")
        x_T = _initial_from_keys(keys, shape)
    x_T = jnp.asarray(x_T)
    b = x_T.shape[0]
    if noises is not None and tuple(noises.shape) != (n,) + tuple(x_T.shape):
        raise ValueError(f"noises must have shape {(n,) + tuple(x_T.shape)}, got {tuple(noises.shape)}")
    opts = StepOptions(jnp.asarray(eta, x_T.dtype), fixed_variance)

    def body(carry, xs):
        x, state = carry
        j, nz = xs
        i = jnp.full((b,), n - 1 - j, jnp.int32)
        d = denoise(model_fn, sched, x, i, cond, prediction=prediction, learned_sigma=learned_sigma,
                    x0_fn=x0_fn, cond_fn=cond_fn, guide_eps=spec.guide_eps)
        noise = nz
        if noise is None and stochastic:
            noise = step_noise(keys, j, x.shape[1:], x.dtype)
        x, state = spec.step(sched, x, i, d, noise, state, j == 0, opts)
        if progress:
            jax.debug.callback(_progress_hook, j, ordered=False)
        return (x, state), (d.x0 if return_trajectory else None)

    xs = (jnp.arange(n, dtype=jnp.int32), noises)
    carry = (x_T, spec.init(x_T))
    if loop == "scan":
        (x, _), traj = jax.lax.scan(body, carry, xs)
    else:
        outs = []
        for j in range(n):
            carry, o = body(carry, (xs[0][j], None if noises is None else noises[j]))
            outs.append(o)
        x = carry[0]
        traj = jnp.stack(outs) if return_trajectory else None
    return (x, traj) if return_trajectory else x


class SamplerSpec(NamedTuple):
    """Static description of a sampling run (hashable; what `make_sampler` compiles for)."""

    sampler: str = "ddim"
    prediction: str = "eps"
    learned_sigma: bool = False
    fixed_variance: str = "large"
    clip_denoised: bool = True
    dynamic_threshold: Optional[float] = None  # percentile, e.g. 0.995 (replaces clipping)
    progress: bool = False
    threshold_max: Optional[float] = None      # cap on dynamic thresholding's s (diffusers' sample_max_value)
    clip_range: float = 1.0                    # clip_denoised clips x0 to [-clip_range, clip_range]


def make_sampler(build: Callable[[Any], tuple[ModelFn, Optional[GradFn]]], spec: SamplerSpec,
                 shape: tuple, compiler_options: Optional[dict] = None) -> Callable:
    """A jitted `run(params, sched, cond, key, sample_ids, eta=0.0, x_T=None, noises=None) -> x_0`.

    `build(params) -> (model_fn, cond_fn[, prepare])` (e.g. `guidance.build_guides`) makes the
    (guided) functions from a parameter pytree passed at call time, so parameters are arguments of
    the compiled loop, not constants; `prepare(cond) -> cond` runs once before the loop.
    `compiler_options` override `util.cpu.jit`'s (e.g. `cpu.compiler_options(partitioned=True)` for
    parameters split over devices).
    Everything numeric (scales in `cond`, eta, the schedule's arrays) is traced.
    """
    check_sampler(spec.sampler)
    x0_fn = make_x0_fn(clip_denoised=spec.clip_denoised, dynamic_threshold_percentile=spec.dynamic_threshold,
                       dynamic_threshold_max=spec.threshold_max, clip_range=spec.clip_range)
    shape = tuple(int(s) for s in shape)

    @cpu.jit(compiler_options=compiler_options)
    def run(params, sched, cond, key, sample_ids, eta=0.0, x_T=None, noises=None):
        built = build(params)
        model_fn, cond_fn = built[0], built[1]
        if len(built) > 2 and built[2] is not None:
            cond = built[2](cond)  # once per call, before the loop (e.g. encoding the captions)
        return sample_loop(model_fn, sched, x_T, cond, sampler=spec.sampler, key=key,
                           sample_ids=sample_ids, shape=shape, noises=noises, eta=eta, cond_fn=cond_fn,
                           prediction=spec.prediction, learned_sigma=spec.learned_sigma,
                           fixed_variance=spec.fixed_variance, x0_fn=x0_fn, progress=spec.progress)

    return run


__all__ = [
    "DPMState", "Denoised", "FIXED_VARIANCES", "SAMPLERS", "Sampler", "SamplerSpec", "StepOptions",
    "check_sampler", "ddim_step", "ddpm_step", "denoise", "dpmpp_2m_step", "initial_noise", "make_sampler",
    "progress_bar", "register_sampler", "sample_keys", "sample_loop", "step_noise",
]
