"""The guide registry: every guide by name (classifier, cfg, autoguidance, clip, registered log-densities),
its scale and networks, host-side checks, and `build_guides`, which turns names into one (model_fn, cond_fn).

    register_guide(Guide(...)), register_log_density(name, fn)   add a guide; sample.py and the sweep accept it by name
    build_guides(names, model_fn, ...) -> Guided(model_fn, cond_fn, prepare)"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax

from jaxdiff.diffusion.clip_guide import CLIP_TEXT_KEY, clip_guide
from jaxdiff.diffusion.guides import (
    AUTOGUIDANCE_SCALE,
    CFG_RESCALE,
    CFG_SCALE,
    CLASSIFIER_SCALE,
    CLIP_SCALE,
    Cond,
    GradFn,
    ModelFn,
    autoguidance,
    classifier_free,
    classifier_guide,
    log_density_guide,
    logits_fn,
    sum_guides,
    unet_fn,
)
from jaxdiff.diffusion.schedules import Schedule
from jaxdiff.util import config as config_util


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
    return clip_guide(ctx.fns["clip_image"], interval=ctx.interval, sched=ctx.sched)


def _clip_prepare(ctx: GuideContext) -> Callable[[Cond], Cond]:
    """The prompts' CLIP text embeddings (cond["clip_tokens"], cond["clip_len"]), once per call."""
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


__all__ = ["ALIASES", "GUIDES", "Guide", "GuideContext", "Guided", "NETWORK_KINDS", "NETWORK_NAMES", "build_guides", "chain", "network_fn", "parse_guidance", "register_guide", "register_log_density"]
