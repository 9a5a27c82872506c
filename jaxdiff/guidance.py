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

from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import config_util
from jaxdiff.diffusion import eps_from_x0, extract, x0_from_eps
from jaxdiff.schedules import Schedule

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


# --- adapters from Flax modules ----------------------------------------------------------------

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


# --- scales ------------------------------------------------------------------------------------

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


# --- linear guides (on the model output) -------------------------------------------------------

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
    lo <= sigma <= hi (s = 1 elsewhere).
    """
    if uncond is None:
        if null_label is None:
            raise ValueError("classifier-free guidance needs a model with a null label (built with "
                             "null_label=True and trained with label dropout); this model has none")
        uncond = label_dropout(int(null_label), label_key)

    def guided(x, t, cond):
        b = x.shape[0]
        s = _interval_scale(_get_scale(cond, scale_key, b, None), t, interval, sched, 1.0)
        cond_u = uncond(cond)
        cond2 = {k: jnp.concatenate([v, cond_u[k]], axis=0) for k, v in cond.items()}
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


# --- gradient guides ---------------------------------------------------------------------------

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


# --- applying a gradient inside a sampler step -------------------------------------------------

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


# --- x0 refinements ----------------------------------------------------------------------------

def dynamic_threshold(x0: jax.Array, percentile: float = 0.995) -> jax.Array:
    """Imagen's dynamic thresholding: s = max(quantile(|x0|, p), 1) per sample; clip to [-s, s], / s."""
    b = x0.shape[0]
    s = jnp.quantile(jnp.abs(x0).reshape(b, -1).astype(jnp.float32), percentile, axis=1)
    s = _bcast(jnp.maximum(s, 1.0), x0.ndim).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def make_x0_fn(*, clip_denoised: bool = True, dynamic_threshold_percentile: Optional[float] = None):
    """The x0 processing a sampler applies: dynamic thresholding, clip to [-1, 1], or nothing."""
    if dynamic_threshold_percentile is not None:
        p = float(dynamic_threshold_percentile)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"dynamic threshold percentile {p} must lie in (0, 1]")
        return lambda x0: dynamic_threshold(x0, p)
    if clip_denoised:
        return lambda x0: jnp.clip(x0, -1.0, 1.0)
    return None


# --- the guide registry ------------------------------------------------------------------------

class GuideContext(NamedTuple):
    """What a guide is built from (inside the traced sampler, once per trace).

    `fns` holds the networks guides asked for, as functions: a classifier as `logits_fn(x, t)`, a
    diffusion model as `model_fn(x, t, cond)`, keyed by the sample-config key that names it
    ("classifier", "guide_model", ...).
    """

    fns: Mapping[str, Callable] = {}
    null_label: Optional[int] = None
    learned_sigma: bool = False
    interval: Optional[tuple[float, float]] = None
    sched: Optional[Schedule] = None
    rescale_key: Optional[str] = None
    uncond: Optional[Callable[[Cond], Cond]] = None  # the model's unconditional cond (CFG); None: labels


class Guide(NamedTuple):
    """A registered guide. Exactly one of `wrap` (guides that transform the model output, like CFG)
    and `gradient` (guides that add s * grad log p(. | x_t), like classifier guidance) is set.

    scale_key: its per-sample scale in `cond`; config_key: that scale's sample-config key (default
    scale_key); neutral: the scale at which it does nothing; default: the config's default scale;
    networks: sample-config keys of the networks it needs; check(model_cfg, network_cfgs): host-side
    validation (ValueError); prepare(ctx) -> (cond -> cond): once per sampling call, before the loop.
    """

    name: str
    scale_key: str
    wrap: Optional[Callable[[ModelFn, GuideContext], ModelFn]] = None
    gradient: Optional[Callable[[GuideContext], GradFn]] = None
    neutral: float = 0.0
    default: float = 1.0
    networks: tuple[str, ...] = ()
    check: Optional[Callable[[Mapping, Mapping[str, Mapping]], None]] = None
    config_key: Optional[str] = None
    prepare: Optional[Callable[[GuideContext], Callable[[Cond], Cond]]] = None

    @property
    def config_scale(self) -> str:
        return self.config_key or self.scale_key


GUIDES: dict[str, Guide] = {}
NETWORK_NAMES = {"classifier": "noisy classifier", "guide_model": "guide model", "clip_image": "noised CLIP image encoder",
                 "clip_text": "CLIP text encoder"}  # for messages
# The model kind a guide's network must be; also which encoder `checkpoints.load_model` takes from a
# workdir holding a trained CLIP's two (so clip_image and clip_text may name the same "clip" workdir).
NETWORK_KINDS = {"classifier": "classifier", "clip_image": "clip-image", "clip_text": "clip-text"}
ALIASES = {"none": (), "": (), "both": ("cfg", "classifier")}


def register_guide(guide: Guide) -> Guide:
    """Add (or replace) a guide; sample.py, the sweep and `build_guides` then accept its name."""
    if (guide.wrap is None) == (guide.gradient is None):
        raise ValueError(f"guide {guide.name!r}: give exactly one of wrap= and gradient=")
    if guide.name in ALIASES:
        raise ValueError(f"{guide.name!r} is a reserved guidance name")
    GUIDES[guide.name] = guide
    return guide


def register_log_density(name: str, log_density: Callable[[jax.Array, jax.Array, Cond], jax.Array], *,
                         default: float = 1.0) -> Guide:
    """Register any differentiable per-sample log-density `log_density(x_t, t, cond) -> [B]` as a
    gradient guide `name`, its scale `<name>_scale` (0 = off)."""
    key = f"{name}_scale"
    return register_guide(Guide(name, key, default=default, gradient=lambda ctx: log_density_guide(
        log_density, scale_key=key, interval=ctx.interval, sched=ctx.sched)))


def parse_guidance(kind: "str | Sequence[str]") -> tuple[str, ...]:
    """Guide names of a guidance setting: "none", one name, "cfg,classifier", or the alias "both"."""
    if isinstance(kind, str):
        names = ALIASES.get(kind.strip())
        if names is None:
            names = tuple(k.strip() for k in kind.split(",") if k.strip())
    else:
        names = tuple(kind)
    for k in names:
        if k not in GUIDES:
            raise ValueError(f"unknown guidance kind {k!r}; allowed: none, "
                             f"{', '.join(GUIDES)}, or several joined by ','")
    wraps = [k for k in names if GUIDES[k].wrap is not None]
    if len(wraps) > 1:
        raise ValueError(f"guides {' and '.join(wraps)} both transform the model output; use one of them")
    if len(set(names)) != len(names):
        raise ValueError(f"guidance {kind!r} names a guide twice")
    return names


class Guided(NamedTuple):
    """What `build_guides` returns and `samplers.make_sampler`'s `build` may return: the guided
    model function, the summed gradient guide (or None), and the work done once per sampling call
    before the loop (or None)."""

    model_fn: ModelFn
    cond_fn: Optional[GradFn]
    prepare: Optional[Callable[[Cond], Cond]] = None


def chain(*prepares: Optional[Callable[[Cond], Cond]]) -> Optional[Callable[[Cond], Cond]]:
    """The composition of several prepare(cond) functions (None entries skipped)."""
    fns = [f for f in prepares if f is not None]
    if not fns:
        return None

    def prepare(cond):
        for f in fns:
            cond = f(cond)
        return cond

    return prepare


def build_guides(kind: "str | Sequence[str]", model_fn: ModelFn, *, logits_fn=None,
                 weak_model_fn: Optional[ModelFn] = None, fns: Optional[Mapping[str, Callable]] = None,
                 null_label: Optional[int] = None, uncond: Optional[Callable[[Cond], Cond]] = None,
                 learned_sigma: bool = False, cfg_rescale: bool = False,
                 interval: Optional[tuple[float, float]] = None, sched: Optional[Schedule] = None,
                 extra_grads: Sequence[GradFn] = (), prepare: Optional[Callable[[Cond], Cond]] = None) -> Guided:
    """`Guided(model_fn, cond_fn, prepare)` for the guides named by `kind` (see `parse_guidance`).

    Networks a guide needs come in `fns` (by its `networks` keys; `logits_fn`, `weak_model_fn`:
    fns["classifier"], fns["guide_model"]). Scales are read from cond. `uncond`: the model's
    unconditional cond for CFG (`caption_dropout` for text models; default: labels replaced by
    `null_label`); `prepare`: the model's own once-per-call work (e.g. `text_encoder`), run first.
    """
    fns = dict(fns or {})
    if logits_fn is not None:
        fns["classifier"] = logits_fn
    if weak_model_fn is not None:
        fns["guide_model"] = weak_model_fn
    ctx = GuideContext(fns, null_label, learned_sigma, interval, sched, CFG_RESCALE if cfg_rescale else None,
                       uncond)
    grads, prepares = [], [prepare]
    for name in parse_guidance(kind):
        guide = GUIDES[name]
        for net in guide.networks:
            if net not in fns:
                raise ValueError(f"guidance {name!r} needs a {NETWORK_NAMES.get(net, net)} ({net})")
        if guide.wrap is not None:
            model_fn = guide.wrap(model_fn, ctx)
        else:
            grads.append(guide.gradient(ctx))
        if guide.prepare is not None:
            prepares.append(guide.prepare(ctx))
    return Guided(model_fn, sum_guides(*grads, *extra_grads), chain(*prepares))


def network_fn(module, params, kind: str) -> Callable:
    """A loaded network as the function guides take: a classifier as `logits_fn(x, t)`, GLIDE's CLIP
    encoders as `(x, t) -> embeddings` / `(tokens, text_len) -> embeddings`, any diffusion model as
    `model_fn(x, t, cond)` (`unet_fn`)."""
    if kind == "classifier":
        return logits_fn(module, params)
    if kind in ("clip-image", "clip-text"):
        return lambda *args: module.apply({"params": params}, *args)
    return unet_fn(module, params)


# --- the built-in guides -----------------------------------------------------------------------

def _check_cfg(model_cfg, nets):
    m = config_util.get(model_cfg, "model", {})
    if "text_ctx" in m:
        return  # text models: the empty caption is the unconditional input
    if not config_util.get(m, "null_label", False):
        raise ValueError(
            "guidance 'cfg' (classifier-free) needs a model with a null label, but the model has none "
            f"(num_classes={config_util.model_classes(model_cfg)}, null_label=False): train it with label "
            "dropout (p_uncond > 0), or use guidance 'classifier' or 'none'")


def _check_classifier(model_cfg, nets):
    num_classes = config_util.model_classes(model_cfg)
    if num_classes is None:
        raise ValueError("guidance 'classifier' needs a class-conditional model (labels to guide towards)")
    ccfg = nets["classifier"]
    config_util.require_kind(ccfg, ("classifier",), "config.classifier", "the classifier directory")
    kc = config_util.model_classes(ccfg)
    if kc != num_classes:
        raise ValueError(f"the classifier has {kc} classes but the model has num_classes={num_classes}; "
                         "they must match")
    for key in ("image_size", "in_channels"):
        _check_same(f"the classifier's {key}", _model_key(ccfg, key), f"the model's {key}", _model_key(model_cfg, key))


def _model_key(cfg, key):
    return config_util.get(config_util.get(cfg, "model", {}), key)


def _check_same(name_a: str, a, name_b: str, b) -> None:
    """Refuse two networks' settings that disagree (a missing one, None, passes)."""
    if a is not None and b is not None and a != b:
        raise ValueError(f"{name_a}={a} differs from {name_b}={b}; they must match")


def _check_autoguidance(model_cfg, nets):
    gcfg = nets["guide_model"]
    if config_util.model_classes(gcfg) != config_util.model_classes(model_cfg):
        raise ValueError(f"the guide model has num_classes={config_util.model_classes(gcfg)}, "
                         f"the model {config_util.model_classes(model_cfg)}")
    target = lambda c: (config_util.get(config_util.get(c, "diffusion", {}), "prediction", "eps"),
                        bool(config_util.get(config_util.get(c, "diffusion", {}), "learned_sigma", False)))
    if target(gcfg) != target(model_cfg):
        raise ValueError("the guide model must predict the same target (prediction, learned_sigma) as the model")


register_guide(Guide(
    "classifier", CLASSIFIER_SCALE, networks=("classifier",), check=_check_classifier,
    gradient=lambda ctx: classifier_guide(ctx.fns["classifier"], interval=ctx.interval, sched=ctx.sched)))
register_guide(Guide(
    "cfg", CFG_SCALE, config_key="scale", neutral=1.0, default=3.0, check=_check_cfg,
    wrap=lambda model_fn, ctx: classifier_free(
        model_fn, null_label=ctx.null_label, uncond=ctx.uncond, learned_sigma=ctx.learned_sigma,
        rescale_key=ctx.rescale_key, interval=ctx.interval, sched=ctx.sched)))
register_guide(Guide(
    "autoguidance", AUTOGUIDANCE_SCALE, config_key="scale", neutral=1.0, default=3.0,
    networks=("guide_model",), check=_check_autoguidance,
    wrap=lambda model_fn, ctx: autoguidance(
        model_fn, ctx.fns["guide_model"], learned_sigma=ctx.learned_sigma, rescale_key=ctx.rescale_key,
        interval=ctx.interval, sched=ctx.sched)))



def _clip_gradient(ctx: GuideContext) -> GradFn:
    from jaxdiff.clip_guidance import clip_guide

    return clip_guide(ctx.fns["clip_image"], interval=ctx.interval, sched=ctx.sched)


def _clip_prepare(ctx: GuideContext) -> Callable[[Cond], Cond]:
    """The prompts' CLIP text embeddings (cond["clip_tokens"], cond["clip_len"]), once per call."""
    from jaxdiff.clip_guidance import CLIP_TEXT_KEY

    def prepare(cond):
        if CLIP_TEXT_KEY in cond:
            return cond
        return {**cond, CLIP_TEXT_KEY: ctx.fns["clip_text"](cond["clip_tokens"], cond["clip_len"])}

    return prepare


def _check_clip(model_cfg, nets):
    for net in ("clip_image", "clip_text"):
        config_util.require_kind(nets[net], (NETWORK_KINDS[net],), f"config.{net}", f"the {net} directory")
    image = nets["clip_image"]
    _check_same("the CLIP image encoder's image_size", _model_key(image, "image_size"),
                "the model's image_size", _model_key(model_cfg, "image_size"))
    # the encoder embeds the sampler's original timesteps: its table must be the model's schedule's
    _check_same("the CLIP image encoder's n_timesteps", _model_key(image, "n_timesteps"),
                "the model's diffusion.num_timesteps",
                config_util.get(config_util.get(model_cfg, "diffusion", {}), "num_timesteps"))


register_guide(Guide(
    "clip", CLIP_SCALE, networks=("clip_image", "clip_text"), check=_check_clip, gradient=_clip_gradient,
    prepare=_clip_prepare))


__all__ = [
    "ALIASES", "AUTOGUIDANCE_SCALE", "CFG_RESCALE", "CFG_SCALE", "CLASSIFIER_SCALE", "GUIDES", "Guide",
    "NETWORK_KINDS", "NETWORK_NAMES",
    "GuideContext", "Guided", "LABEL_KEY", "NULL_PREFIX", "TEXT_KEYS", "caption_dropout", "chain",
    "label_dropout", "network_fn", "text_encoder", "LOG_DENSITY_SCALE", "autoguidance", "build_guides", "cfg_rescale",
    "check_scale", "classifier_free", "classifier_guide", "classifier_log_prob", "condition_eps",
    "condition_mean", "dynamic_threshold", "guided_output", "log_density_guide", "logits_fn", "make_cond",
    "make_x0_fn", "noise_level", "parse_guidance", "register_guide", "register_log_density", "sum_guides",
    "unet_fn",
]
