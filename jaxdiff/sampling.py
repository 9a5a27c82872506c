"""Sampling as a library: load models, validate settings, run guided sampling, write outputs.

`sample.py` is the command line over `run`; the guidance sweep calls `run` once per setting.
Scale conventions (docs/guidance.md): `scale` is the classifier-free / autoguidance scale in the
Imagen convention (1 = plain conditional, 0 = unconditional; Ho & Salimans' w = scale - 1);
`classifier_scale` is guided-diffusion's classifier scale (0 = none).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder


def default_config() -> "ml_collections.ConfigDict":
    """Every sampling setting with its default (configs/sample.py returns this)."""
    c = ml_collections.ConfigDict()
    c.model = ""             # workdir of train.py or a directory written by jaxdiff.convert (required)
    c.classifier = ""        # noisy classifier directory (guidance "classifier" / "both")
    c.guide_model = ""       # weaker model of the same task (guidance "autoguidance")
    c.out = "samples"        # OUT/samples.npz (arr_0 uint8 NHWC images, arr_1 labels) + OUT/grid.png
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddim",          # ddim | ddpm | dpmpp2m
        steps=50,                # sampling steps (<= the model's diffusion steps)
        respacing="",            # "" = str(steps) (ddim, ddpm) or logsnr{steps} (dpmpp2m); or "ddim25", "10,20", "logsnr20"
        eta=0.0,                 # DDIM stochasticity (0 = deterministic)
        fixed_variance="large",  # ddpm without learned sigma: "large" (beta) or "small" (posterior)
        guidance="none",         # none | classifier | cfg | both | autoguidance
        scale=3.0,               # CFG / autoguidance scale (Imagen: 1 = conditional)
        classifier_scale=1.0,    # classifier guidance scale (guided-diffusion: 0 = none)
        cfg_rescale=0.0,         # CFG rescale phi (Lin et al. 2023), 0 = off
        interval_lo=placeholder(float),  # guidance interval in sigma = sqrt((1-abar)/abar); None = always
        interval_hi=placeholder(float),
        dynamic_threshold=0.0,   # Imagen dynamic thresholding percentile (e.g. 0.995), 0 = off
        clip_denoised=True,      # clip x0 to [-1, 1] (guided-diffusion's default)
        classes="all",           # "all" (balanced over every class) or a list "3,5"
        num_samples=16,
        batch_size=16,           # global batch per jitted call (padded to the device count)
        seed=0,
        progress=True,
        grid_max=64,             # images in the labelled PNG grid (0 = no grid)
    ))
    return c


# --------------------------------------------------------------------------------------------
# loading and validation (pure Python / numpy: nothing here traces or compiles)
# --------------------------------------------------------------------------------------------

def load(directory: str):
    """(module, params, config) through jaxdiff.checkpoints.load_model."""
    try:
        from jaxdiff.checkpoints import load_model
    except ImportError as e:  # pragma: no cover - depends on the checkout
        raise RuntimeError(f"jaxdiff.checkpoints.load_model is not available ({e}); "
                           "pass models to sample.run(..., model=(module, params, config))") from e
    return load_model(directory)


def _get(d, key, default=None):
    try:
        v = d[key]
    except (KeyError, TypeError, AttributeError):
        return default
    return default if v is None else v


def model_kind(cfg) -> str:
    """"unet", "classifier" or "superres": config["model"]["kind"] (train.py) or config["kind"] (convert)."""
    return str(_get(_get(cfg, "model", {}), "kind") or _get(cfg, "kind") or "unet")


def model_classes(cfg) -> Optional[int]:
    """Number of classes a loaded model's config says it has (a classifier: its outputs)."""
    m = _get(cfg, "model", {})
    if model_kind(cfg) == "classifier":
        return int(_get(m, "out_channels"))
    n = _get(m, "num_classes")
    return None if n is None else int(n)


def parse_classes(text, num_classes: Optional[int]) -> Optional[np.ndarray]:
    """"all" -> every class; "3,5" -> those classes. Raises ValueError for labels outside the classes."""
    text = str(text).strip()
    if num_classes is None:
        if text not in ("all", ""):
            raise ValueError(f"classes={text!r}: the model is unconditional (no classes); allowed: 'all'")
        return None
    if text in ("all", ""):
        return np.arange(num_classes)
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"classes={text!r}: expected 'all' or a comma-separated list of integers "
                         f"in 0..{num_classes - 1}") from None
    if not classes:
        raise ValueError(f"classes={text!r}: no class given; allowed: 'all' or labels in 0..{num_classes - 1}")
    for c in classes:
        if not 0 <= c < num_classes:
            raise ValueError(f"label {c} in classes={text!r} is outside the classes: allowed 0..{num_classes - 1} "
                             f"(the model has num_classes={num_classes})")
    return np.asarray(classes)


def balanced_labels(classes: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    """Labels for n samples cycling through `classes` (balanced: counts differ by at most one)."""
    if classes is None:
        return None
    return np.asarray(classes)[np.arange(n) % len(classes)].astype(np.int64)


def default_respacing(sampler: str, steps: int) -> str:
    return f"logsnr{steps}" if sampler == "dpmpp2m" else str(steps)


def validate(config, model_cfg, classifier_cfg=None, guide_cfg=None) -> dict:
    """Check every setting against the models; return the resolved plan. Raises ValueError."""
    from jaxdiff import guidance, samplers

    s = config.sample
    sampler = samplers.check_sampler(str(s.sampler))
    kind = guidance.check_guidance_kind(str(s.guidance))
    for name in ("scale", "classifier_scale", "cfg_rescale", "eta", "dynamic_threshold",
                 "interval_lo", "interval_hi"):
        v = _get(s, name)
        if v is not None:
            guidance.check_scale(f"sample.{name}", v)
    if float(s.eta) < 0:
        raise ValueError(f"sample.eta={s.eta} must be >= 0")
    if not 0.0 <= float(s.cfg_rescale) <= 1.0:
        raise ValueError(f"sample.cfg_rescale={s.cfg_rescale} must lie in [0, 1]")
    if not 0.0 <= float(s.dynamic_threshold) <= 1.0:
        raise ValueError(f"sample.dynamic_threshold={s.dynamic_threshold}: a percentile in (0, 1], or 0 = off")
    lo, hi = _get(s, "interval_lo"), _get(s, "interval_hi")
    interval = None
    if lo is not None or hi is not None:
        interval = (float(0.0 if lo is None else lo), float(math.inf if hi is None else hi))
        if not 0.0 <= interval[0] <= interval[1]:
            raise ValueError(f"guidance interval sample.interval_lo={lo}, sample.interval_hi={hi}: "
                             "need 0 <= lo <= hi (noise levels sigma)")
    if not learned_sigma(model_cfg) and str(s.fixed_variance) not in samplers.FIXED_VARIANCES:
        raise ValueError(f"sample.fixed_variance={s.fixed_variance!r}; allowed: {', '.join(samplers.FIXED_VARIANCES)}")
    for name in ("num_samples", "batch_size"):
        v = _get(s, name)
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"sample.{name}={v!r} must be a positive integer")

    m = _get(model_cfg, "model", {})
    if model_kind(model_cfg) != "unet":
        raise ValueError(f"config.model must be a diffusion U-Net; {config.model!r} holds a "
                         f"{model_kind(model_cfg)!r} model")
    d = _get(model_cfg, "diffusion", {})
    num_timesteps = int(_get(d, "num_timesteps", 1000))
    steps = _get(s, "steps")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"sample.steps={steps!r} must be a positive integer")
    if steps > num_timesteps:
        raise ValueError(f"sample.steps={steps} is more than the schedule's {num_timesteps} diffusion steps; "
                         f"allowed: 1..{num_timesteps}")
    respacing = str(_get(s, "respacing", "") or default_respacing(sampler, int(steps)))
    sched = samplers.respaced_schedule(str(_get(d, "schedule", "linear")), num_timesteps, respacing)

    num_classes = model_classes(model_cfg)
    null = bool(_get(m, "null_label", False))
    classes = parse_classes(s.classes, num_classes)
    if kind in ("cfg", "both") and not null:
        raise ValueError(
            f"guidance={kind!r} (classifier-free) needs a model with a null label, but {config.model!r} has "
            f"none (num_classes={num_classes}, null_label=False): train it with label dropout "
            "(p_uncond > 0), or use guidance 'classifier' or 'none'")
    if kind in ("classifier", "both"):
        if num_classes is None:
            raise ValueError(f"guidance={kind!r} needs a class-conditional model (labels to guide towards)")
        if classifier_cfg is None:
            raise ValueError(f"guidance={kind!r} needs a classifier: set config.classifier")
        if model_kind(classifier_cfg) != "classifier":
            raise ValueError(f"config.classifier={config.classifier!r} holds a {model_kind(classifier_cfg)!r} "
                             "model, not a classifier")
        kc = model_classes(classifier_cfg)
        if kc != num_classes:
            raise ValueError(f"the classifier has {kc} classes but the model has num_classes={num_classes}; "
                             "they must match")
        cm = _get(classifier_cfg, "model", {})
        for key in ("image_size", "in_channels"):
            if _get(cm, key) is not None and _get(m, key) is not None and _get(cm, key) != _get(m, key):
                raise ValueError(f"classifier {key}={_get(cm, key)} differs from the model's {_get(m, key)}")
    if kind == "autoguidance":
        if guide_cfg is None:
            raise ValueError("guidance='autoguidance' needs a weaker model of the same task: set config.guide_model")
        if model_classes(guide_cfg) != num_classes:
            raise ValueError(f"the guide model has num_classes={model_classes(guide_cfg)}, the model {num_classes}")
        if learned_sigma(guide_cfg) != learned_sigma(model_cfg) or \
                _get(_get(guide_cfg, "diffusion", {}), "prediction", "eps") != _get(d, "prediction", "eps"):
            raise ValueError("the guide model must predict the same target (prediction, learned_sigma) as the model")
    return dict(sampler=sampler, kind=kind, sched=sched, respacing=respacing, num_classes=num_classes,
                null=null, classes=classes, interval=interval,
                shape=(int(_get(m, "image_size")), int(_get(m, "image_size")), int(_get(m, "in_channels"))))


def learned_sigma(cfg) -> bool:
    return bool(_get(_get(cfg, "diffusion", {}), "learned_sigma", False))


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 exactly as guided-diffusion's sample scripts ((x + 1) * 127.5, clamp, trunc)."""
    return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)


def save_npz(path: str, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    """arr_0 images (and arr_1 labels), written to a temporary file and renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        if labels is None:
            np.savez(f, images)
        else:
            np.savez(f, images, np.asarray(labels, np.int64))
    os.replace(tmp, path)


def save_grid(path: str, images: np.ndarray, labels: Optional[np.ndarray], ncol: int = 8) -> None:
    """A labelled PNG grid (matplotlib), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.2 * ncol, 1.35 * nrow), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        img = images[k]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img)
        if labels is not None:
            ax.set_title(f"y={int(labels[k])}", fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------

def run(config, *, model=None, classifier=None, guide_model=None, compiled: Optional[dict] = None) -> dict:
    """Sample as `config` says; models are (module, params, config) triples, loaded when not given.

    Returns {"images", "labels", "npz", "grid"}. Everything is validated before any compile.
    `compiled`: a dict the caller keeps across calls with the same models (a sweep), so settings
    that differ only in scales, seed or number of samples reuse one compiled sampler.
    """
    s = config.sample
    if model is None:
        if not config.model:
            raise ValueError("config.model is required: a train.py workdir or a converted checkpoint directory")
        model = load(config.model)
    kind = str(s.guidance)
    if classifier is None and kind in ("classifier", "both") and config.classifier:
        classifier = load(config.classifier)
    if guide_model is None and kind == "autoguidance" and _get(config, "guide_model"):
        guide_model = load(config.guide_model)
    plan = validate(config, model[2], classifier[2] if classifier else None,
                    guide_model[2] if guide_model else None)

    import jax

    from jaxdiff import guidance, parallel, samplers

    module, params, mcfg = model
    dcfg = _get(mcfg, "diffusion", {})
    ls = learned_sigma(mcfg)
    sched = plan["sched"]
    n = int(s.num_samples)
    labels = balanced_labels(plan["classes"], n)
    kind = plan["kind"]
    all_params = {"model": params}
    if classifier is not None and kind in ("classifier", "both"):
        all_params["classifier"] = classifier[1]
    if guide_model is not None and kind == "autoguidance":
        all_params["guide"] = guide_model[1]

    def build(p):
        return guidance.build_guides(
            kind, guidance.unet_fn(module, p["model"]),
            logits_fn=guidance.logits_fn(classifier[0], p["classifier"]) if "classifier" in p else None,
            weak_model_fn=guidance.unet_fn(guide_model[0], p["guide"]) if "guide" in p else None,
            null_label=plan["num_classes"] if plan["null"] else None, learned_sigma=ls,
            cfg_rescale=float(s.cfg_rescale) > 0, interval=plan["interval"], sched=sched)

    spec = samplers.SamplerSpec(
        sampler=plan["sampler"], prediction=str(_get(dcfg, "prediction", "eps")), learned_sigma=ls,
        fixed_variance=str(s.fixed_variance), clip_denoised=bool(s.clip_denoised),
        dynamic_threshold=float(s.dynamic_threshold) if float(s.dynamic_threshold) > 0 else None,
        progress=bool(s.progress) and jax.process_index() == 0)
    program = (kind, spec, plan["shape"], plan["respacing"], plan["interval"], float(s.cfg_rescale) > 0)
    if compiled is not None and program in compiled:
        sampler_fn = compiled[program]
    else:
        sampler_fn = samplers.make_sampler(build, spec, plan["shape"])
        if compiled is not None:
            compiled[program] = sampler_fn
    scales = {}
    if kind in ("cfg", "both"):
        scales[guidance.CFG_SCALE] = float(s.scale)
    if kind in ("classifier", "both"):
        scales[guidance.CLASSIFIER_SCALE] = float(s.classifier_scale)
    if kind == "autoguidance":
        scales[guidance.AUTOGUIDANCE_SCALE] = float(s.scale)
    if float(s.cfg_rescale) > 0 and kind in ("cfg", "both", "autoguidance"):
        scales[guidance.CFG_RESCALE] = float(s.cfg_rescale)

    mesh = parallel.data_mesh()
    key = jax.random.key(int(s.seed))
    rep_params, rep_sched = parallel.replicate((all_params, sched), mesh)
    bs = int(s.batch_size)
    starts = list(range(0, n, bs))
    chunks = []
    show = spec.progress
    ctx = samplers.progress_bar(len(starts) * sched.num_steps, desc=f"{plan['sampler']} x{len(starts)} batches") \
        if show else _null()
    with ctx as advance:
        for b0 in starts:
            ids = np.arange(b0, min(b0 + bs, n))
            rows = parallel.process_rows(len(ids))
            y = None if labels is None else labels[ids[rows]]
            cond = guidance.make_cond(len(rows), y, **scales)
            out = parallel.sample_batch_sharded(sampler_fn, rep_params, rep_sched, cond, key, ids[rows],
                                                mesh=mesh, eta=float(s.eta))
            chunks.append(parallel.gather_rows(to_uint8(out), len(ids)))
            if show:
                advance(sched.num_steps)
    images = np.concatenate(chunks, axis=0)
    result = {"images": images, "labels": labels, "npz": None, "grid": None}
    if jax.process_index() == 0:
        os.makedirs(config.out, exist_ok=True)
        result["npz"] = os.path.join(config.out, "samples.npz")
        save_npz(result["npz"], images, labels)
        if int(_get(s, "grid_max", 64)) > 0:
            k = min(len(images), int(s.grid_max))
            result["grid"] = os.path.join(config.out, "grid.png")
            save_grid(result["grid"], images[:k], None if labels is None else labels[:k])
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
