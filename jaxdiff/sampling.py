"""Sampling as a library: settings, validation, and the one `generate` path every sampler user takes.

    generate(sampler_fn, params, sched, num_samples=..., labels=..., scales=...) -> uint8 images
    run(config) -> samples.npz + grid.png (the sweep calls it per setting, images kept in memory)
    run(config, shards=True): what `sample.py` runs: resumable, no image all-gathered (below)
    python -m jaxdiff.sampling merge OUT: OUT/shards -> OUT/samples.npz (run by sample.py itself)

`generate_batches` runs a compiled sampler (`samplers.make_sampler`) over every device of every
process and quantises exactly as guided-diffusion's sample scripts do; `generate` gathers its rows
to every process (training grids, the evaluation command's CFG accuracy, the sweep).

Sharded runs (`run(..., shards=True)`, sample.py): each process writes its rows of each global
batch atomically to OUT/shards/SSSSSSSS-EEEEEEEE.npz (sample ids S..E-1), next to
OUT/shards/manifest.json, which records what determines the images (`settings_manifest`). A rerun
with the same settings generates only the missing global batches; other settings are refused before
any work, naming what differs (`resume_plan`, a collective). When every process is done, process 0
merges the shards into OUT/grid.png and OUT/samples.npz and deletes them (`merge`). Resuming and
merging need OUT on a filesystem every host sees; with per-host disks, copy every host's
OUT/shards/ into one and run the merge command.

Guides and samplers come from their registries (`guidance.GUIDES`, `samplers.SAMPLERS`): the
sample config has one scale key per registered guide (`config_scale`, e.g. `scale` for CFG,
`classifier_scale`) and one path key per network a guide needs (`classifier`, `guide_model`).
Scale conventions: docs/guidance.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from jaxdiff import cli, config_util, files, guidance, samplers

DTYPES = ("float32", "bfloat16")
BASE_KINDS = ("unet", "text2im")                   # model kinds sample.py samples from noise
SUPERRES_KINDS = ("superres", "text2im_superres")  # ... and those that upsample config.low_res
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "jaxdiff-samples-v1"
UNRECORDED = ("progress", "grid_max")  # sample settings that do not change the images
_SHARD = re.compile(r"^(\d+)-(\d+)\.npz$")
_TEMPORARY = re.compile(r"^\.(\d+-\d+\.npz|manifest\.json)\..*\.tmp$")  # files.atomic_write's, of a killed run


def default_config() -> ml_collections.ConfigDict:
    """Every sampling setting with its default (configs/sample.py returns this).

    Built from the registries, so a guide registered before this is called has its scale key
    (and its networks' path keys) here.
    """
    c = ml_collections.ConfigDict()
    c.model = ""             # workdir of train.py or a directory written by jaxdiff.convert (required)
    for g in guidance.GUIDES.values():
        for net in g.networks:
            c[net] = ""      # path of a network a guide needs (e.g. classifier, guide_model)
    c.low_res = ""           # super-resolution: samples.npz of low-resolution images (+ labels) to upsample
    c.tokenizer = ""         # text models: "" = the model's own vocabulary, or a glide-text2im checkout (BPE files)
    c.dtype = ""             # compute dtype: "" = the checkpoint's (bfloat16 for use_fp16), float32, bfloat16
    c.out = "samples"        # OUT/samples.npz (arr_0 uint8 NHWC images, arr_1 labels) + OUT/grid.png
    sample = dict(
        sampler="ddim",          # a name in samplers.SAMPLERS: ddim | ddpm | dpmpp2m
        steps=50,                # sampling steps (<= the model's diffusion steps)
        respacing="",            # "" = the sampler's default for `steps`; or "ddim25", "10,20", "logsnr20"
        eta=0.0,                 # DDIM stochasticity (0 = deterministic)
        fixed_variance="large",  # ddpm without learned sigma: "large" (beta) or "small" (posterior)
        guidance="none",         # none | a guide name | several joined by "," (e.g. "cfg,classifier"; "both")
        cfg_rescale=0.0,         # CFG rescale phi (Lin et al. 2023), 0 = off
        interval_lo=placeholder(float),  # guidance interval in sigma = sqrt((1-abar)/abar); None = always
        interval_hi=placeholder(float),
        dynamic_threshold=0.0,   # Imagen dynamic thresholding percentile (e.g. 0.995), 0 = off
        clip_denoised=True,      # clip x0 to [-1, 1] (guided-diffusion's default)
        classes="all",           # "all" (balanced over every class) or a list "3,5"
        captions="",             # text models: captions separated by "|", cycled over the samples
        num_samples=16,          # with low_res: at most the file's image count (its first rows)
        batch_size=16,           # global batch per jitted call (padded to the device count)
        seed=0,
        progress=True,
        grid_max=64,             # images in the labelled PNG grid (0 = no grid)
    )
    for g in guidance.GUIDES.values():
        sample.setdefault(g.config_scale, float(g.default))
    c.sample = ml_collections.ConfigDict(sample)
    return c


# --- loading and validation (host-side: nothing here traces or compiles) --------------------------

def load(directory: str, dtype: str = "", net: str = ""):
    """(module, params, config) through jaxdiff.checkpoints.load_model; `net`: the sample-config key
    of a guide's network (e.g. "clip_image": the image encoder of a trained CLIP's workdir)."""
    from jaxdiff.checkpoints import load_model

    return load_model(directory, dtype=dtype or None, kind=guidance.NETWORK_KINDS.get(net))


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


def learned_sigma(cfg) -> bool:
    return bool(config_util.get(config_util.get(cfg, "diffusion", {}), "learned_sigma", False))


def read_low_res(path: str, num_classes: Optional[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Low-resolution images (uint8, mapped to [-1, 1] inside the model call, as guided-diffusion's
    super_res_sample does: x / 127.5 - 1) and labels."""
    from jaxdiff.metrics import load_samples_npz

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.low_res={path!r} is not a file (a samples.npz of low-resolution images)")
    return load_samples_npz(path, num_classes=num_classes)


def validate(config, model_cfg, networks: Mapping[str, Optional[Mapping]] = (),
             low_res: Optional[tuple] = None) -> dict:
    """Check every setting against the loaded configs; return the resolved plan. Raises ValueError.

    `networks` maps a guide's network key (e.g. "classifier") to its loaded config (or None);
    `low_res` is (images, labels) for a super-resolution model.
    """
    s = config.sample
    networks = dict(networks)
    sampler = samplers.check_sampler(str(s.sampler))
    names = guidance.parse_guidance(str(s.guidance))
    scale_keys = {g.config_scale for g in guidance.GUIDES.values()}
    for name in sorted(scale_keys) + ["cfg_rescale", "eta", "dynamic_threshold", "interval_lo", "interval_hi"]:
        v = config_util.get(s, name)
        if v is not None:
            guidance.check_scale(f"sample.{name}", v)
    if float(s.eta) < 0:
        raise ValueError(f"sample.eta={s.eta} must be >= 0")
    if not 0.0 <= float(s.cfg_rescale) <= 1.0:
        raise ValueError(f"sample.cfg_rescale={s.cfg_rescale} must lie in [0, 1]")
    if not 0.0 <= float(s.dynamic_threshold) <= 1.0:
        raise ValueError(f"sample.dynamic_threshold={s.dynamic_threshold}: a percentile in (0, 1], or 0 = off")
    lo, hi = config_util.get(s, "interval_lo"), config_util.get(s, "interval_hi")
    interval = None
    if lo is not None or hi is not None:
        interval = (float(0.0 if lo is None else lo), float(math.inf if hi is None else hi))
        if not 0.0 <= interval[0] <= interval[1]:
            raise ValueError(f"guidance interval sample.interval_lo={lo}, sample.interval_hi={hi}: "
                             "need 0 <= lo <= hi (noise levels sigma)")
    if not learned_sigma(model_cfg) and str(s.fixed_variance) not in samplers.FIXED_VARIANCES:
        raise ValueError(f"sample.fixed_variance={s.fixed_variance!r}; allowed: {', '.join(samplers.FIXED_VARIANCES)}")
    for name in ("num_samples", "batch_size", "steps"):
        v = config_util.get(s, name)
        if not config_util.is_int(v) or v < 1:
            raise ValueError(f"sample.{name}={v!r} must be a positive integer")
    _check_process_split(int(s.num_samples), int(s.batch_size))
    dtype = str(config_util.get(config, "dtype", "") or "")
    if dtype and dtype not in DTYPES:
        raise ValueError(f"config.dtype={dtype!r}; allowed: '' (the checkpoint's), {', '.join(DTYPES)}")

    kind = config_util.model_kind(model_cfg)
    if kind in SUPERRES_KINDS and low_res is None:
        raise ValueError(f"config.model={config.model!r} is a super-resolution model: set config.low_res to a "
                         "samples.npz of the low-resolution images to upsample")
    if kind not in BASE_KINDS + SUPERRES_KINDS or (kind in BASE_KINDS and low_res is not None):
        raise ValueError(f"config.model={config.model!r} holds a {kind!r} model; expected a diffusion U-Net"
                         + (" or, with config.low_res, a super-resolution model" if low_res is not None else ""))
    d = config_util.get(model_cfg, "diffusion", {})
    num_timesteps = int(config_util.get(d, "num_timesteps", 1000))
    steps = int(s.steps)
    if steps > num_timesteps:
        raise ValueError(f"sample.steps={steps} is more than the schedule's {num_timesteps} diffusion steps; "
                         f"allowed: 1..{num_timesteps}")
    respacing = str(config_util.get(s, "respacing", "") or samplers.SAMPLERS[sampler].respacing(steps))
    _check_converted_flags(d, respacing)
    from jaxdiff.schedules import make_schedule

    sched = make_schedule(str(config_util.get(d, "schedule", "linear")), num_timesteps, respacing)

    num_classes = config_util.model_classes(model_cfg)
    m = config_util.get(model_cfg, "model", {})
    null = bool(config_util.get(m, "null_label", False))
    n = int(s.num_samples)
    labels = balanced_labels(parse_classes(s.classes, num_classes), n)
    captions = parse_captions(config_util.get(s, "captions", ""))
    if is_text_model(model_cfg) and not captions:
        raise ValueError("config.sample.captions is required for a text-conditional model: captions separated "
                         "by '|', cycled over the samples (e.g. 'a thick seven|a thin two')")
    if captions and not is_text_model(model_cfg) and "clip" not in names:
        raise ValueError("config.sample.captions applies to text-conditional models and the 'clip' guide only")
    for name in names:
        g = guidance.GUIDES[name]
        for net in g.networks:
            if networks.get(net) is None:
                raise ValueError(f"guidance {name!r} needs a {net.replace('_', ' ')}: set config.{net}")
        if g.check is not None:
            g.check(model_cfg, networks)
    per_sample = {}
    size = int(config_util.get(m, "image_size"))
    channels = int(config_util.get(m, "in_channels"))
    if low_res is not None:
        images, lr_labels = low_res
        if len(images) < n:
            raise ValueError(f"sample.num_samples={n} but config.low_res holds {len(images)} images")
        if images.shape[-1] != channels or images.shape[1] > size or images.shape[2] > size:
            raise ValueError(f"config.low_res images are {images.shape[1:]}; the model makes {size}x{size}x"
                             f"{channels} images from smaller ones with {channels} channels")
        if str(s.classes).strip() not in ("all", ""):
            raise ValueError("sample.classes does not apply with config.low_res: the labels come from its arr_1")
        if num_classes is not None:
            if lr_labels is None:
                raise ValueError(f"the super-resolution model is class-conditional (num_classes={num_classes}): "
                                 "config.low_res needs labels (arr_1)")
            labels = lr_labels[:n]
        per_sample[guidance.LOW_RES_KEY] = images[:n]
    if captions:
        per_sample.update(caption_inputs(config, model_cfg, networks, names, captions, n))
    return dict(sampler=sampler, guides=names, sched=sched, respacing=respacing, num_classes=num_classes,
                null=null, labels=labels, interval=interval, per_sample=per_sample, text=is_text_model(model_cfg),
                captions=[captions[i % len(captions)] for i in range(n)] if captions else None,
                shape=(size, size, channels))


def is_text_model(cfg) -> bool:
    """Whether a loaded model's config is a text-conditional (GLIDE-style) U-Net."""
    return "text_ctx" in config_util.get(cfg, "model", {})


def parse_captions(text) -> list:
    """'a|b|c' -> ['a', 'b', 'c'] (empty parts kept only when the text names several captions)."""
    text = str(text or "")
    return [] if not text.strip() else [c.strip() for c in text.split("|")]


def tokenizer_for(cfg, path: str = ""):
    """The tokenizer of a text model or CLIP text encoder: its own word vocabulary (config["text"]
    ["vocab"], written by train.py), or the BPE of a glide-text2im checkout at `path` (GPT-2's for a
    text U-Net, CLIP's for a CLIP text encoder)."""
    from jaxdiff import tokenizers

    vocab = config_util.get(config_util.get(cfg, "text", {}), "vocab")
    if vocab and not path:
        return tokenizers.WordTokenizer(vocab, source="the model's config.json")
    if not path:
        raise ValueError("this model has no vocabulary of its own (a converted GLIDE checkpoint): set "
                         "config.tokenizer to your openai/glide-text2im checkout (its BPE files)")
    if config_util.model_kind(cfg) == "clip-text":
        return tokenizers.ClipTokenizer.from_glide(path)
    return tokenizers.GPT2Tokenizer.from_glide(path)


def caption_inputs(config, model_cfg, networks: Mapping, names, captions: list, n: int) -> dict:
    """Per-sample token arrays of the captions (cycled over n samples): for a text model its tokens and
    mask and the empty caption's (CFG's unconditional input); for the 'clip' guide the CLIP prompts."""
    out = {}
    rows = np.arange(n) % len(captions)
    path = str(config_util.get(config, "tokenizer", "") or "")
    if is_text_model(model_cfg):
        tok = tokenizer_for(model_cfg, path)
        ctx = int(config_util.get(config_util.get(model_cfg, "model", {}), "text_ctx"))
        tokens, mask = tok.tokens_and_mask(captions, ctx)
        null_tokens, null_mask = tok.tokens_and_mask([""], ctx)
        out.update(tokens=tokens[rows], mask=mask[rows], null_tokens=np.repeat(null_tokens, n, 0),
                   null_mask=np.repeat(null_mask, n, 0))
    if "clip" in names:
        clip_cfg = networks["clip_text"]
        tok = tokenizer_for(clip_cfg, path)
        tokens, lens = tok.tokens_and_lengths(captions, int(config_util.get(clip_cfg["model"], "max_text_len")))
        out.update(clip_tokens=tokens[rows], clip_len=lens[rows])
    return out


def _check_process_split(num_samples: int, batch_size: int) -> None:
    """Every global batch must give each process at least one row (an empty one cannot be sharded)."""
    import jax

    smallest = min(batch_size, num_samples - (num_samples - 1) // batch_size * batch_size)
    if smallest < jax.process_count():
        raise ValueError(f"sample.num_samples={num_samples} with sample.batch_size={batch_size} makes a global "
                         f"batch of {smallest} samples, fewer than the {jax.process_count()} processes: every "
                         "batch needs at least one sample per process")


def _check_converted_flags(diffusion: Mapping, respacing: str) -> None:
    """Refuse guided-diffusion flags stored with a converted checkpoint that sampling would otherwise
    ignore, changing the samples without a word."""
    stored = str(config_util.get(diffusion, "timestep_respacing", "") or "")
    if stored and stored != respacing:
        raise ValueError(
            f"the checkpoint was converted with --timestep_respacing {stored}, but this run samples with "
            f"respacing {respacing!r}: pass --config.sample.respacing={stored} (respacing is a sampling setting "
            "in jaxdiff), or convert without --timestep_respacing")
    if config_util.get(diffusion, "rescale_timesteps", False):
        raise ValueError(
            "the checkpoint was converted with --rescale_timesteps True (its network sees t * 1000 / "
            "diffusion_steps): not supported; jaxdiff conditions networks on the integer timestep, "
            "guided-diffusion's default and what every released checkpoint uses")


# --- generation: the one sampling path ------------------------------------------------------------

def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 exactly as guided-diffusion's sample scripts ((x + 1) * 127.5, clamp, trunc)."""
    return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)


def generate_batches(sampler_fn, params, sched, *, num_samples: int, labels: Optional[np.ndarray] = None,
                     scales: Optional[Mapping[str, float]] = None,
                     per_sample: Optional[Mapping[str, np.ndarray]] = None, seed: int = 0,
                     batch_size: int = 16, eta: float = 0.0, mesh=None, progress: bool = False,
                     desc: str = "sampling", batches: Optional[Sequence[int]] = None,
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (sample ids, uint8 images) of THIS process's rows, batch by batch.

    `sampler_fn` comes from `samplers.make_sampler`; samples 0..num_samples-1 are drawn in global
    batches of `batch_size` (only those numbered `batches`, when given), each split over the
    processes and sharded over `mesh`. Sample i's noise depends only on (seed, i). `labels`,
    `per_sample` arrays [num_samples, ...] and `scales` (cond keys -> float) go into each batch's cond.
    """
    import contextlib

    import jax

    from jaxdiff import parallel

    mesh = parallel.data_mesh() if mesh is None else mesh
    key = jax.random.key(int(seed))
    params, sched = parallel.replicate((params, sched), mesh)
    starts = range(0, int(num_samples), int(batch_size))
    if batches is not None:
        starts = [starts[int(b)] for b in batches]
    show = progress and jax.process_index() == 0
    ctx = samplers.progress_bar(len(starts) * sched.num_steps, desc=f"{desc} x{len(starts)} batches") \
        if show else contextlib.nullcontext()
    with ctx as advance:
        for b0 in starts:
            ids = np.arange(b0, min(b0 + int(batch_size), int(num_samples)))[parallel.process_rows(
                min(int(batch_size), int(num_samples) - b0))]
            cond = guidance.make_cond(len(ids), None if labels is None else labels[ids], **dict(scales or {}))
            for k, v in (per_sample or {}).items():
                v = np.asarray(v[ids])
                cond[k] = v.astype(np.float32) if v.dtype.kind == "f" else v
            out = parallel.sample_batch_sharded(sampler_fn, params, sched, cond, key, ids, mesh=mesh, eta=eta)
            if show:
                advance(sched.num_steps)
            yield ids, to_uint8(out)


def generate(sampler_fn, params, sched, *, num_samples: int, batch_size: int = 16, **kwargs) -> np.ndarray:
    """uint8 [num_samples, H, W, C] of every process's rows (see `generate_batches` for the arguments)."""
    from jaxdiff import parallel

    n, bs = int(num_samples), int(batch_size)
    batches = generate_batches(sampler_fn, params, sched, num_samples=n, batch_size=bs, **kwargs)
    return np.concatenate([parallel.gather_rows(images, min(bs, n - b0))
                           for b0, (_, images) in zip(range(0, n, bs), batches)], axis=0)


def guide_scales(config, names) -> dict:
    """cond scale keys -> the sample config's values for the guides `names` (+ cfg_rescale)."""
    s = config.sample
    scales = {guidance.GUIDES[n].scale_key: float(s[guidance.GUIDES[n].config_scale]) for n in names}
    if float(s.cfg_rescale) > 0 and any(guidance.GUIDES[n].wrap is not None for n in names):
        scales[guidance.CFG_RESCALE] = float(s.cfg_rescale)
    return scales


def run(config, *, model=None, networks: Optional[Mapping[str, Any]] = None,
        compiled: Optional[dict] = None, shards: bool = False, **named_networks) -> dict:
    """Sample as `config` says; models are (module, params, config) triples, loaded when not given.

    `networks` (or keywords such as classifier=..., guide_model=...) give the guides' networks by
    config key. Everything is validated before any compile. `compiled`: a dict kept across calls with
    the same models (a sweep), so settings differing only in scales, seed or count share one program.

    In memory (default): every process gets every image; returns {"images", "labels", "npz",
    "grid", "num_samples"}. `shards=True` (sample.py, module doc): "images" is None, and "batches" /
    "generated" count the run's global batches and those this call generated. "npz" and "grid" are
    the paths written, on process 0 (None elsewhere).
    """
    s = config.sample
    names = guidance.parse_guidance(str(s.guidance))
    dtype = str(config_util.get(config, "dtype", "") or "")
    if model is None:
        if not config.model:
            raise ValueError("config.model is required: a train.py workdir or a converted checkpoint directory")
        model = load(config.model, dtype)
    nets = {**dict(networks or {}), **named_networks}
    for name in names:
        for net in guidance.GUIDES[name].networks:
            if nets.get(net) is None and config_util.get(config, net):
                nets[net] = load(config[net], dtype, net)
    low_res = None
    if config_util.get(config, "low_res"):
        low_res = read_low_res(config.low_res, config_util.model_classes(model[2]))
    used = {net for n in names for net in guidance.GUIDES[n].networks}
    nets = {k: v for k, v in nets.items() if k in used and v is not None}
    plan = validate(config, model[2], {k: v[2] for k, v in nets.items()}, low_res)
    n, bs = int(s.num_samples), int(s.batch_size)
    labels = plan["labels"]
    todo = None
    if shards:
        todo = resume_plan(config.out, settings_manifest(config, model, nets), n, bs)
        if todo is None:
            return _complete(config, labels, plan["captions"])

    import jax

    module, params, mcfg = model
    dcfg = config_util.get(mcfg, "diffusion", {})
    ls = learned_sigma(mcfg)
    sched = plan["sched"]
    rescale = float(s.cfg_rescale) > 0
    all_params = {"model": params, **{k: v[1] for k, v in nets.items()}}

    def build(p):
        fns = {k: guidance.network_fn(nets[k][0], p[k], config_util.model_kind(nets[k][2])) for k in nets}
        text = plan["text"]
        return guidance.build_guides(plan["guides"], guidance.unet_fn(module, p["model"]), fns=fns,
                                     null_label=plan["num_classes"] if plan["null"] else None,
                                     uncond=guidance.caption_dropout if text else None, learned_sigma=ls,
                                     cfg_rescale=rescale, interval=plan["interval"], sched=sched,
                                     prepare=guidance.text_encoder(module, p["model"]) if text else None)

    # The bar advances after each batch, from the host: no progress callback in the compiled loop, so
    # the program is the same with progress on or off, and JAX's persistent compilation cache keeps
    # it (it does not store programs with host callbacks).
    spec = samplers.SamplerSpec(
        sampler=plan["sampler"], prediction=str(config_util.get(dcfg, "prediction", "eps")), learned_sigma=ls,
        fixed_variance=str(s.fixed_variance), clip_denoised=bool(s.clip_denoised),
        dynamic_threshold=float(s.dynamic_threshold) if float(s.dynamic_threshold) > 0 else None)
    program = (plan["guides"], spec, plan["shape"], plan["respacing"], plan["interval"], rescale)
    sampler_fn = (compiled or {}).get(program)
    if sampler_fn is None:
        sampler_fn = samplers.make_sampler(build, spec, plan["shape"])
        if compiled is not None:
            compiled[program] = sampler_fn
    kwargs = dict(num_samples=n, batch_size=bs, labels=labels, scales=guide_scales(config, plan["guides"]),
                  per_sample=plan["per_sample"], seed=int(s.seed), eta=float(s.eta),
                  progress=bool(s.progress), desc=plan["sampler"])
    grid_max = int(config_util.get(s, "grid_max", 64))
    if shards:
        for ids, images in generate_batches(sampler_fn, all_params, sched, batches=todo, **kwargs):
            write_shard(config.out, ids, images, labels, plan["captions"])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxdiff.sampling.merge")
        result = {"images": None, "labels": labels, "captions": plan["captions"], "npz": None, "grid": None,
                  "num_samples": n, "batches": -(-n // bs), "generated": len(todo)}
        if jax.process_index() == 0:
            result.update(merge(config.out, grid_max=grid_max))
        return result
    images = generate(sampler_fn, all_params, sched, **kwargs)
    result = {"images": images, "labels": labels, "captions": plan["captions"], "npz": None, "grid": None,
              "num_samples": n}
    if jax.process_index() == 0:
        result["npz"] = files.save_npz(os.path.join(config.out, "samples.npz"), images, labels,
                                       captions=plan["captions"])
        if grid_max > 0:
            k = min(len(images), grid_max)
            result["grid"] = files.save_grid(os.path.join(config.out, "grid.png"), images[:k],
                                             None if labels is None else labels[:k])
    return result


def _complete(config, labels, captions) -> dict:
    """run()'s answer when OUT/samples.npz already holds this run (leftover shards of an interrupted
    cleanup are removed)."""
    import jax

    n, bs = int(config.sample.num_samples), int(config.sample.batch_size)
    result = {"images": None, "labels": labels, "captions": captions, "npz": None, "grid": None,
              "num_samples": n, "batches": -(-n // bs), "generated": 0}
    if jax.process_index() == 0:
        result["npz"] = os.path.join(config.out, "samples.npz")
        grid = os.path.join(config.out, "grid.png")
        result["grid"] = grid if os.path.isfile(grid) else None
        remove_shards(config.out)
    return result


# --- sample.py's path: shards written as they come, resumable, merged in sample-id order ----------

def settings_manifest(config, model, networks: Mapping[str, tuple] = ()) -> dict:
    """What determines a run's images, as JSON values: fingerprints of the networks (parameters,
    model and diffusion config) and of config.low_res, config.dtype, and the sample settings except
    `UNRECORDED` ones."""
    from jaxdiff.metrics import params_fingerprint

    def fingerprint(triple) -> str:
        cfg = triple[2]
        return params_fingerprint(triple[1], name="jaxdiff-sample-network",
                                  config={k: config_util.get(cfg, k) for k in ("model", "diffusion")})

    m = {"format": MANIFEST_FORMAT, "model": fingerprint(model)}
    m.update({k: fingerprint(v) for k, v in dict(networks).items()})
    if config_util.get(config, "low_res"):
        from jaxdiff.adm_eval import file_fingerprint

        m["low_res"] = file_fingerprint(config.low_res)
    m["dtype"] = str(config_util.get(config, "dtype", "") or "")
    m["tokenizer"] = str(config_util.get(config, "tokenizer", "") or "")
    m["sample"] = {k: v for k, v in config.sample.to_dict().items() if k not in UNRECORDED}
    return json.loads(json.dumps(m, sort_keys=True, default=repr))


def shard_path(out: str, start: int, stop: int) -> str:
    return os.path.join(out, SHARDS_DIR, f"{int(start):08d}-{int(stop):08d}.npz")


def list_shards(out: str) -> list[tuple[int, int, str]]:
    """(first id, last id + 1, path) of every shard in OUT/shards, by first id (longest first)."""
    directory = os.path.join(out, SHARDS_DIR)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _SHARD.match(name)
        if m and int(m.group(2)) > int(m.group(1)):
            found.append((int(m.group(1)), int(m.group(2)), os.path.join(directory, name)))
    return sorted(found, key=lambda r: (r[0], -r[1]))


def write_shard(out: str, ids: np.ndarray, images: np.ndarray, labels: Optional[np.ndarray] = None,
                captions: Optional[Sequence[str]] = None) -> Optional[str]:
    """This process's rows of one global batch (contiguous ids) as one shard file, atomically
    (`labels`, `captions`: every sample's, or None)."""
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
        return None
    if not np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        raise ValueError(f"a shard holds contiguous sample ids; got {ids[:4]}...")
    arrays = {"ids": ids, "images": np.asarray(images, np.uint8)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int64)[ids]
    if captions is not None:
        arrays["captions"] = np.asarray(list(captions), dtype=str)[ids]
    return files.write_npz(shard_path(out, ids[0], ids[-1] + 1), arrays)


def _gaps(ranges: Sequence[tuple], lo: int, hi: int) -> list[tuple[int, int]]:
    """The id ranges [a, b) within [lo, hi) that no (start, stop, ...) in `ranges` (sorted) covers."""
    gaps, pos = [], int(lo)
    for a, b, *_ in ranges:
        if pos >= hi or a >= hi:
            break
        if b <= pos:
            continue
        if a > pos:
            gaps.append((pos, a))
        pos = b
    if pos < hi:
        gaps.append((pos, int(hi)))
    return gaps


def _read_manifest(out: str) -> Optional[dict]:
    path = os.path.join(out, SHARDS_DIR, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def recorded_settings(npz_path: str) -> Optional[dict]:
    """The manifest a sharded run stored in its samples.npz (the zip comment), or None."""
    import zipfile

    try:
        with zipfile.ZipFile(npz_path) as zf:
            m = json.loads(zf.comment.decode() or "null")
    except (zipfile.BadZipFile, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT else None


def _differences(here: Mapping, there: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(here) | set(there)):
        a, b = here.get(k), there.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            name = {"model": "config.model", "low_res": "config.low_res", "dtype": "config.dtype"}.get(
                k, f"{prefix}{k}" if prefix else f"config.{k}")
            if isinstance(a, str) and len(a) == 64 and isinstance(b, str):  # a fingerprint
                out.append(f"{name} (other parameters or configuration: fingerprint {a[:12]} here, {b[:12]} there)")
            else:
                out.append(f"{name}={a!r} here, {b!r} there")
    return out


def _settings_conflict(out: str, manifest: dict) -> str:
    """Why this run must not write into `out` ("" when it may: nothing there, or the same run)."""
    npz = os.path.join(out, "samples.npz")
    tail = ("; use another config.out, or the same settings to resume or reuse it (nothing was changed)")
    if os.path.exists(npz):
        recorded = recorded_settings(npz)
        if recorded is None:
            return (f"{npz} exists and records no settings (not written by a sharded sample.py run): "
                    f"it is not overwritten{tail}")
        if recorded != manifest:
            return f"{npz} holds samples made with other settings: {'; '.join(_differences(manifest, recorded))}{tail}"
    try:
        recorded = _read_manifest(out)
    except (OSError, ValueError) as e:
        return f"{os.path.join(out, SHARDS_DIR, MANIFEST)} cannot be read ({e}){tail}"
    if recorded is None and list_shards(out):
        return f"{os.path.join(out, SHARDS_DIR)} holds shards but no {MANIFEST}: their settings are unknown{tail}"
    if recorded is not None and recorded != manifest:
        return (f"{os.path.join(out, SHARDS_DIR)} holds shards made with other settings: "
                f"{'; '.join(_differences(manifest, recorded))}{tail}")
    return ""


def _all_gather(local: np.ndarray) -> np.ndarray:
    """[num_processes, ...]: every process's `local` (same shape everywhere), on every process."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(local)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local)))


def resume_plan(out: str, manifest: dict, num_samples: int, batch_size: int) -> Optional[list[int]]:
    """The global batches a sharded run into `out` still has to generate; None when OUT/samples.npz
    already holds it. Raises ValueError when `out` holds another run's samples.

    A collective with one answer: each process reports whether it refuses, whether OUT/samples.npz
    holds this run (process 0's report decides) and which global batches have all of ITS rows in
    the shards it sees; a batch is skipped when every process has its rows (so per-host disks
    resume too). Writes OUT/shards/manifest.json when absent.
    """
    from jaxdiff import parallel

    n, bs = int(num_samples), int(batch_size)
    conflict = _settings_conflict(out, manifest)
    complete = not conflict and os.path.exists(os.path.join(out, "samples.npz"))
    have = [] if conflict or complete else list_shards(out)
    mine = []
    for b0 in range(0, n, bs):
        rows = b0 + parallel.process_rows(min(bs, n - b0))  # contiguous, never empty (validate)
        mine.append(not _gaps(have, rows[0], rows[-1] + 1))
    reports = _all_gather(np.array([bool(conflict), complete] + mine, np.int32))
    refused = np.flatnonzero(reports[:, 0])
    if len(refused):
        raise ValueError(conflict or f"process {refused[0]} refuses to write into config.out={out!r}: it holds "
                         "samples made with other settings there (that process's error names them)")
    if reports[0, 1]:
        return None
    if _read_manifest(out) is None:
        files.write_json(os.path.join(out, SHARDS_DIR, MANIFEST), manifest)
    return [b for b in range(reports.shape[1] - 2) if not reports[:, 2 + b].all()]


def _merge_plan(ranges: Sequence[tuple], n: int) -> list[tuple[str, int, int, int]]:
    """(path, first id of the file, lo, hi): ids lo..hi-1 taken from each file, in id order."""
    plan, pos = [], 0
    for a, b, path in ranges:
        if b > pos and a <= pos < n:
            plan.append((path, a, pos, min(b, n)))
            pos = min(b, n)
    return plan


def _images(plan) -> Iterator[np.ndarray]:
    for path, a, lo, hi in plan:
        with np.load(path) as z:
            yield z["images"][lo - a: hi - a]


def merge(out: str, *, grid_max: int = 64) -> dict:
    """OUT/shards -> OUT/grid.png (the first `grid_max` images) and OUT/samples.npz (arr_0 uint8
    images in sample-id order, streamed one shard at a time; arr_1 labels and `captions` when the
    shards have them, as `files.save_npz`; the manifest in the zip comment), then the shards are
    deleted. Raises ValueError naming missing ids."""
    shards = os.path.join(out, SHARDS_DIR)
    manifest = _read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"no {os.path.join(shards, MANIFEST)}: {out} holds no sharded sample.py run")
    n = int(manifest["sample"]["num_samples"])
    ranges = list_shards(out)
    gaps = _gaps(ranges, 0, n)
    if gaps:
        missing = sum(b - a for a, b in gaps)
        shown = ", ".join(f"{a}..{b - 1}" for a, b in gaps[:5]) + (", ..." if len(gaps) > 5 else "")
        raise ValueError(
            f"{shards} lacks {missing} of the {n} samples (ids {shown}): rerun the same sample.py command to "
            f"make them; if the processes wrote to per-host disks, first copy every host's {shards}/*.npz into "
            f"this one, then run `python -m jaxdiff.sampling merge {out}`")
    plan = _merge_plan(ranges, n)
    per_sample, shape = {"labels": [], "captions": []}, None  # small: read whole, before the images
    for path, a, lo, hi in plan:
        with np.load(path) as z:
            if not np.array_equal(z["ids"], np.arange(a, a + len(z["ids"]))) or a + len(z["ids"]) < hi:
                raise ValueError(f"{path}: its ids do not match its name")
            for key, rows in per_sample.items():
                if key in z.files:
                    rows.append(z[key][lo - a: hi - a])
            if shape is None:
                shape = z["images"].shape[1:]
    for key, rows in per_sample.items():
        if rows and len(rows) != len(plan):
            raise ValueError(f"{shards}: some shards have {key} and others not")
        per_sample[key] = np.concatenate(rows) if rows else None
    labels, captions = per_sample["labels"], per_sample["captions"]
    result = {"npz": os.path.join(out, "samples.npz"), "grid": None, "num_samples": n}
    k = min(n, int(grid_max))
    if k > 0:
        first = []
        for chunk in _images(plan):
            first.append(chunk)
            if sum(map(len, first)) >= k:
                break
        result["grid"] = files.save_grid(os.path.join(out, "grid.png"), np.concatenate(first)[:k],
                                         None if labels is None else labels[:k])
    arrays = {"arr_0": files.Rows((n,) + tuple(shape), np.uint8, _images(plan))}
    if labels is not None:
        arrays["arr_1"] = labels.astype(np.int64)
    if captions is not None:
        arrays["captions"] = captions
    files.write_npz(result["npz"], arrays, comment=json.dumps(manifest, sort_keys=True).encode())
    remove_shards(out)
    return result


def remove_shards(out: str) -> None:
    """Delete OUT/shards' shard files, manifest and temporaries (written after samples.npz is
    complete); the directory goes when nothing else is in it."""
    directory = os.path.join(out, SHARDS_DIR)
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _SHARD.match(name) or _TEMPORARY.match(name) or name == MANIFEST:
            os.unlink(os.path.join(directory, name))
    try:
        os.rmdir(directory)
    except OSError:
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m jaxdiff.sampling",
                                description="Merge the shards of a sample.py run (sample.py merges by itself; "
                                            "this is for shards collected from per-host disks).")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="OUT/shards -> OUT/samples.npz (sample-id order) + OUT/grid.png")
    m.add_argument("out", help="the config.out of the sample.py run")
    m.add_argument("--grid_max", type=int, default=64, help="images in the grid (0 = no grid)")
    args = p.parse_args(argv)
    res = merge(args.out, grid_max=args.grid_max)
    print(f"wrote {res['npz']} ({res['num_samples']} images)" + (f" and {res['grid']}" if res["grid"] else ""))
    return 0


if __name__ == "__main__":
    cli.main_of(main, "python -m jaxdiff.sampling")
