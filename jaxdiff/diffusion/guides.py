"""Guides: classifier, classifier-free, autoguidance and any differentiable log-density.

Model-agnostic and pluggable, in the style of openai/guided-diffusion: a sampler is given

  model_fn(x, t, cond) -> raw model output   (channels last, e.g. eps [+ variance values])
  cond_fn(x, t, cond)  -> gradient of a log-density of x_t, already multiplied by its scale

where `x` is x_t [B, ...], `t` the ORIGINAL (un-respaced) timesteps [B] that the networks are
conditioned on, and `cond` a dict of per-sample arrays with a leading batch axis: the labels ("y")
and every guidance scale ("cfg_scale", "classifier_scale", ...). Keeping the scales in `cond` makes
them traced, per-sample and sharded with the batch: changing a scale never recompiles.

Guides are functions from such functions to such functions, so they compose:

  model_fn = classifier_free(unet_fn(unet, params), null_label=10, learned_sigma=True)
  cond_fn = sum_guides(classifier_guide(logits_fn(classifier, cparams)),
                       log_density_guide(my_log_density, scale_key="clip_scale"))

Scale conventions (docs/guidance.md): classifier-free / autoguidance eps = eps_u + s (eps_c - eps_u),
s = 1 plain conditional (Ho & Salimans' w = s - 1); gradient guides s * grad_x log p(y | x_t), s = 0
no guidance, applied by `condition_mean` (ancestral) or `condition_eps` (DDIM, DPM-Solver++).
Refinements: guidance interval (sigma = sqrt((1 - abar) / abar) in [lo, hi]), dynamic thresholding
(on x0, a sampler's `x0_fn`), CFG rescale (on the model output).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.gaussian import eps_from_x0, extract, x0_from_eps
from jaxdiff.diffusion.schedules import Schedule
from jaxdiff.ops.quantile import quantile_nonnegative

Cond = Mapping[str, jax.Array]


ModelFn = Callable[[jax.Array, jax.Array, Cond], jax.Array]


GradFn = Callable[[jax.Array, jax.Array, Cond], jax.Array]


LABEL_KEY = "y"


LOW_RES_KEY = "low_res"


TEXT_KEYS = ("xf_proj", "xf_out")  # a text U-Net's cached caption features in cond


NULL_PREFIX = "null_"               # ... and the empty caption's (classifier-free guidance)


CLIP_SCALE = "clip_scale"


CFG_SCALE = "cfg_scale"


CFG_RESCALE = "cfg_rescale"


CLASSIFIER_SCALE = "classifier_scale"


AUTOGUIDANCE_SCALE = "autoguidance_scale"


LOG_DENSITY_SCALE = "log_density_scale"


def unet_fn(module, params, *, label_key: str = LABEL_KEY) -> ModelFn:
    """model_fn of an ADM U-Net: apply({'params': params}, x, t, y=cond[label_key] or None), plus
    low_res=cond["low_res"] for a super-resolution model (the per-sample low-resolution images). A
    text-conditional (GLIDE) U-Net reads the cached caption features cond["xf_proj"], cond["xf_out"]
    (see `text_encoder`) instead of labels."""
    text = hasattr(module, "text_ctx")

    def model_fn(x, t, cond):
        extra = {}
        if LOW_RES_KEY in cond:  # uint8 low-resolution samples -> [-1, 1]
            low = cond[LOW_RES_KEY]
            extra[LOW_RES_KEY] = low / 127.5 - 1.0 if jnp.issubdtype(low.dtype, jnp.integer) else low
        if text:
            return module.apply({"params": params}, x, t, text=tuple(cond[k] for k in TEXT_KEYS), **extra)
        return module.apply({"params": params}, x, t, y=cond.get(label_key), **extra)

    return model_fn


def text_encoder(module, params) -> Callable[[Cond], Cond]:
    """prepare(cond) for a text-conditional U-Net, run once before the sampling loop: encodes the
    captions (cond["tokens"], cond["mask"]) and the empty caption (cond["null_tokens"],
    cond["null_mask"], the unconditional input of classifier-free guidance) into the cached
    features the model reads (`TEXT_KEYS`, and `NULL_PREFIX` + each for `caption_dropout`)."""
    from jaxdiff.models.text_unet import encode_text

    def prepare(cond):
        out = dict(cond)
        out.update(zip(TEXT_KEYS, encode_text(module, params, cond["tokens"], cond["mask"])))
        if "null_tokens" in cond:
            null = encode_text(module, params, cond["null_tokens"], cond["null_mask"])
            out.update((NULL_PREFIX + k, v) for k, v in zip(TEXT_KEYS, null))
        return out

    return prepare


def logits_fn(module, params) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(x, t) -> logits of a noisy classifier (ADM EncoderUNetModel or any module with that call)."""
    return lambda x, t: module.apply({"params": params}, x, t)


def check_scale(name: str, value) -> None:
    """Host-side check that a scale (number or array) is finite; raises ValueError naming it."""
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        bad = float(arr[~np.isfinite(arr)].reshape(-1)[0])
        raise ValueError(f"{name}={bad!r} is not allowed: guidance scales must be finite numbers")


def make_cond(batch: int, y=None, *, label_key: str = LABEL_KEY, **scales) -> dict:
    """A `cond` dict for `batch` samples: labels as int32 [B] and each scale broadcast to float32 [B].

    Scales are checked to be finite here, on the host, before anything is traced.
    """
    cond = {}
    if y is not None:
        y = np.asarray(y)
        if y.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        cond[label_key] = jnp.asarray(np.broadcast_to(y, (batch,)), jnp.int32)
    for name, value in scales.items():
        if value is None:
            continue
        check_scale(name, value)
        cond[name] = jnp.asarray(np.broadcast_to(np.asarray(value, np.float32), (batch,)))
    return cond


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    """A per-sample [B] array shaped to broadcast against a rank-`ndim` batch."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def noise_level(sched: Schedule, t: jax.Array) -> jax.Array:
    """sigma = sqrt((1 - abar) / abar) at ORIGINAL timesteps t, looked up in the (respaced) schedule."""
    idx = jnp.searchsorted(sched.timestep_map, jnp.asarray(t, sched.timestep_map.dtype))
    idx = jnp.clip(idx, 0, sched.timestep_map.shape[0] - 1)
    return jnp.exp(-0.5 * sched.log_snr[idx])


def _interval_scale(s, t, interval, sched, off: float):
    """s where sigma(t) lies in [lo, hi], `off` elsewhere (Kynkaanniemi et al. 2024)."""
    if interval is None:
        return s
    if sched is None:
        raise ValueError("a guidance interval needs the sampling schedule: pass sched=...")
    lo, hi = interval
    if not (0.0 <= float(lo) <= float(hi)):
        raise ValueError(f"guidance interval (lo={lo}, hi={hi}) must satisfy 0 <= lo <= hi")
    sigma = noise_level(sched, t)
    active = (sigma >= lo) & (sigma <= hi)
    return jnp.where(active, s, jnp.asarray(off, s.dtype))


def _get_scale(cond: Cond, key: str, batch: int, default: Optional[float]) -> jax.Array:
    if key in cond:
        return jnp.asarray(cond[key], jnp.float32)
    if default is None:
        raise KeyError(f"cond has no {key!r} entry: pass the guidance scale per sample (make_cond)")
    return jnp.full((batch,), default, jnp.float32)


def cfg_rescale(guided: jax.Array, cond_out: jax.Array, phi: jax.Array) -> jax.Array:
    """CFG rescale (Lin et al. 2023): match the guided output's per-sample std to the conditional's.

    out = phi * guided * std(cond_out) / std(guided) + (1 - phi) * guided, std over non-batch axes.
    """
    axes = tuple(range(1, guided.ndim))
    std_c = jnp.std(cond_out, axis=axes, keepdims=True)
    std_g = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_c / jnp.maximum(std_g, 1e-12))
    phi = _bcast(phi, guided.ndim)
    return phi * rescaled + (1.0 - phi) * guided


def guided_output(out_c: jax.Array, out_u: jax.Array, s: jax.Array, *, learned_sigma: bool = False,
                  phi: Optional[jax.Array] = None) -> jax.Array:
    """out_u + s (out_c - out_u) on the prediction channels, optional CFG rescale with `phi`.

    With learned sigma the variance channels (second half) of `out_c` are kept unchanged.
    """
    if learned_sigma:
        c = out_c.shape[-1] // 2
        pred_c, var_c = out_c[..., :c], out_c[..., c:]
        pred_u = out_u[..., :c]
    else:
        pred_c, var_c, pred_u = out_c, None, out_u
    g = pred_u + _bcast(s, pred_c.ndim) * (pred_c - pred_u)
    if phi is not None:
        g = cfg_rescale(g, pred_c, phi)
    return g if var_c is None else jnp.concatenate([g, var_c], axis=-1)


def label_dropout(null_label: int, label_key: str = LABEL_KEY) -> Callable[[Cond], Cond]:
    """The unconditional cond of a class-conditional model: every label replaced by `null_label`."""
    def uncond(cond):
        if label_key not in cond:
            raise KeyError(f"classifier-free guidance needs labels in cond[{label_key!r}]")
        return {**cond, label_key: jnp.full_like(cond[label_key], null_label)}

    return uncond


def caption_dropout(cond: Cond) -> Cond:
    """The unconditional cond of a text-conditional model: the empty caption's cached features
    (cond["null_xf_proj"], cond["null_xf_out"]) in place of the captions' (see `text_encoder`)."""
    return {**cond, **{k: cond[NULL_PREFIX + k] for k in TEXT_KEYS}}


def with_shared_input(model_fn: ModelFn, shared_input: Callable) -> ModelFn:
    """model_fn, given `shared_input(x, t, cond2)`: the outputs of model_fn([x; x], [t; t], cond2) for x, t of
    B rows and cond2 of 2B, computing what depends on x and t once (`classifier_free` uses it: its two branches
    share x and t)."""
    def fn(x, t, cond):
        return model_fn(x, t, cond)

    fn.shared_input = shared_input
    return fn


def _rows_concat(a, b):
    return jnp.concatenate([a, b], axis=0)


def classifier_free(model_fn: ModelFn, *, null_label: Optional[int] = None,
                    uncond: Optional[Callable[[Cond], Cond]] = None, learned_sigma: bool = False,
                    scale_key: str = CFG_SCALE, label_key: str = LABEL_KEY,
                    rescale_key: Optional[str] = None,
                    interval: Optional[tuple[float, float]] = None,
                    sched: Optional[Schedule] = None) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) in the Imagen convention.

    Conditional and unconditional outputs come from ONE call on [x, x] with cond [cond, uncond(cond)]:
    labels [y, null_label] (class-conditional models) or the empty caption (`uncond=caption_dropout`,
    text models). out = out_u + s (out_c - out_u), s = cond[scale_key] per sample. `rescale_key` names
    a per-sample phi for CFG rescale; `interval=(lo, hi)` (with `sched`) guides only where
    lo <= sigma <= hi (s = 1 elsewhere). A model_fn with a `shared_input(x, t, cond2)` attribute (x, t of
    B rows, cond2 of 2B: `with_shared_input`) is called through it, computing what depends on x and t once.
    """
    if uncond is None:
        if null_label is None:
            raise ValueError("classifier-free guidance needs a model with a null label (built with "
                             "null_label=True and trained with label dropout); this model has none")
        uncond = label_dropout(int(null_label), label_key)
    shared = getattr(model_fn, "shared_input", None)

    def guided(x, t, cond):
        b = x.shape[0]
        s = _interval_scale(_get_scale(cond, scale_key, b, None), t, interval, sched, 1.0)
        cond_u = uncond(cond)
        cond2 = {k: jax.tree_util.tree_map(_rows_concat, v, cond_u[k]) for k, v in cond.items()}
        if shared is not None:
            out = shared(x, t, cond2)
        else:
            out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), cond2)
        out_c, out_u = out[:b], out[b:]
        phi = cond[rescale_key] if rescale_key is not None and rescale_key in cond else None
        return guided_output(out_c, out_u, s, learned_sigma=learned_sigma, phi=phi)

    return guided


def autoguidance(model_fn: ModelFn, weak_model_fn: ModelFn, *, learned_sigma: bool = False,
                 scale_key: str = AUTOGUIDANCE_SCALE, rescale_key: Optional[str] = None,
                 interval: Optional[tuple[float, float]] = None,
                 sched: Optional[Schedule] = None) -> ModelFn:
    """Autoguidance (Karras et al. 2024): a weaker model of the same task is the "unconditional" branch.

    out = out_weak + s (out_main - out_weak), both with the same cond (s = 1: the main model alone).
    The main model's variance channels are kept with learned sigma. Two calls (different networks).
    """

    def guided(x, t, cond):
        s = _interval_scale(_get_scale(cond, scale_key, x.shape[0], None), t, interval, sched, 1.0)
        out_c = model_fn(x, t, cond)
        out_w = weak_model_fn(x, t, cond)
        phi = cond[rescale_key] if rescale_key is not None and rescale_key in cond else None
        return guided_output(out_c, out_w, s, learned_sigma=learned_sigma, phi=phi)

    return guided


def log_density_guide(log_density: Callable[[jax.Array, jax.Array, Cond], jax.Array], *,
                      scale_key: str = LOG_DENSITY_SCALE,
                      interval: Optional[tuple[float, float]] = None,
                      sched: Optional[Schedule] = None) -> GradFn:
    """cond_fn from any differentiable log-density `log_density(x, t, cond) -> [B]`.

    Returns s * grad_x sum_i log_density(x, t, cond)_i with s = cond[scale_key] per sample (each
    sample's gradient is independent when the log-density is per-sample). s = 0 is no guidance.
    """

    def grad_fn(x, t, cond):
        s = _interval_scale(_get_scale(cond, scale_key, x.shape[0], None), t, interval, sched, 0.0)
        g = jax.grad(lambda x_: jnp.sum(log_density(x_, t, cond).astype(jnp.float32)))(x)
        return g * _bcast(s, x.ndim).astype(g.dtype)

    return grad_fn


def classifier_log_prob(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], *,
                        label_key: str = LABEL_KEY) -> Callable:
    """log p(y | x_t) = log_softmax(classifier(x_t, t))[y], per sample, as a log-density."""

    def log_prob(x, t, cond):
        logp = jax.nn.log_softmax(logits_fn(x, t).astype(jnp.float32), axis=-1)
        y = jnp.asarray(cond[label_key], jnp.int32)
        return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]

    return log_prob


def classifier_guide(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], *,
                     label_key: str = LABEL_KEY, scale_key: str = CLASSIFIER_SCALE,
                     interval: Optional[tuple[float, float]] = None,
                     sched: Optional[Schedule] = None) -> GradFn:
    """Classifier guidance (Dhariwal & Nichol 2021) from any classifier `logits_fn(x, t) -> [B, K]`.

    g = s * grad_x sum_i log_softmax(classifier(x_t, t))[i, y_i] with per-sample labels
    cond[label_key] and scales cond[scale_key]; t is the original timestep, as for the model.
    """
    return log_density_guide(classifier_log_prob(logits_fn, label_key=label_key),
                             scale_key=scale_key, interval=interval, sched=sched)


def sum_guides(*grad_fns: Optional[GradFn]) -> Optional[GradFn]:
    """The sum of several gradient guides (None entries skipped); None when there are none."""
    fns = [f for f in grad_fns if f is not None]
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]

    def grad_fn(x, t, cond):
        g = fns[0](x, t, cond)
        for f in fns[1:]:
            g = g + f(x, t, cond)
        return g

    return grad_fn


def condition_mean(mean: jax.Array, variance: jax.Array, grad: jax.Array) -> jax.Array:
    """Ancestral steps: mean + variance * gradient (guided-diffusion's condition_mean)."""
    return mean + variance * grad


def condition_eps(sched: Schedule, x: jax.Array, i: jax.Array, x0: jax.Array, grad: jax.Array):
    """eps-based steps (guided-diffusion's condition_score): (x0, eps) after guidance.

    eps is first recomputed from the (clipped) x0, then eps -= sqrt(1 - alpha_bar) * grad and x0 is
    recomputed from the new eps (not clipped again). `i` indexes the (respaced) schedule.
    """
    eps = eps_from_x0(sched, x, i, x0)
    # sqrt(1 - abar) from the float32 abar, as guided-diffusion computes it (bit-level parity)
    eps = eps - jnp.sqrt(1.0 - extract(sched.alphas_cumprod, i, x.ndim)) * grad
    return x0_from_eps(sched, x, i, eps), eps


def dynamic_threshold(x0: jax.Array, percentile: float = 0.995, max_value: Optional[float] = None) -> jax.Array:
    """Imagen's dynamic thresholding: s = max(quantile(|x0|, p), 1) per sample (quantile over every
    element of the sample, linear interpolation as torch.quantile, `ops.quantile`), capped at `max_value` when given (diffusers'
    `sample_max_value`; DeepFloyd IF: p = 0.95, max 1.5); clip to [-s, s], then / s."""
    b = x0.shape[0]
    s = quantile_nonnegative(jnp.abs(x0).reshape(b, -1).astype(jnp.float32), percentile)
    s = jnp.maximum(s, 1.0)
    if max_value is not None:
        s = jnp.minimum(s, float(max_value))
    s = _bcast(s, x0.ndim).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def make_x0_fn(*, clip_denoised: bool = True, dynamic_threshold_percentile: Optional[float] = None,
               dynamic_threshold_max: Optional[float] = None, clip_range: float = 1.0):
    """The x0 processing a sampler applies: dynamic thresholding (percentile, optional cap on s, see
    `dynamic_threshold`), clip to [-clip_range, clip_range] (default [-1, 1]), or nothing."""
    if dynamic_threshold_max is not None and dynamic_threshold_percentile is None:
        raise ValueError("a dynamic thresholding maximum needs dynamic thresholding (a percentile)")
    if dynamic_threshold_percentile is not None:
        p = float(dynamic_threshold_percentile)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"dynamic threshold percentile {p} must lie in (0, 1]")
        m = None if dynamic_threshold_max is None else float(dynamic_threshold_max)
        if m is not None and not m >= 1.0:
            raise ValueError(f"dynamic threshold maximum {m} must be >= 1 (s is never below 1)")
        return lambda x0: dynamic_threshold(x0, p, m)
    if clip_denoised:
        r = float(clip_range)
        if not r > 0:
            raise ValueError(f"clip range {clip_range!r} must be > 0")
        return lambda x0: jnp.clip(x0, -r, r)
    return None
