"""Sampling as `sample.py` and the sweep run it: the sample config, loading and validating the models
before any compile, labels and captions, guide scales, and `run(config)`.

Guides and samplers come from their registries (`guidance.GUIDES`, `samplers.SAMPLERS`): the
sample config has one scale key per registered guide (`config_scale`, e.g. `scale` for CFG,
`classifier_scale`) and one path key per network a guide needs (`classifier`, `guide_model`).
Scale conventions: docs/guidance.md.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from jaxdiff.diffusion import guidance, guides, samplers
from jaxdiff.sample.generation import check_process_split, generate, generate_batches
from jaxdiff.sample.shards import merge, remove_shards, resume_plan, settings_manifest, write_shard
from jaxdiff.util import config as config_util
from jaxdiff.util import files

DTYPES = ("float32", "bfloat16")


PIPELINES = ("if", "unclip")                       # config.pipeline: jaxdiff.sample.cascade, jaxdiff.sample.unclip_run


PIPELINE_KEYS = ("prompts", "stages", "text_encoder")  # config keys of pipelines only


BASE_KINDS = ("unet", "text2im")                   # model kinds sample.py samples from noise


SUPERRES_KINDS = ("superres", "text2im_superres")  # ... and those that upsample config.low_res


def default_config() -> ml_collections.ConfigDict:
    """Every sampling setting with its default (configs/sample.py returns this).

    Built from the registries, so a guide registered before this is called has its scale key
    (and its networks' path keys) here.
    """
    c = ml_collections.ConfigDict()
    c.pipeline = ""          # "" = sample config.model; "if" = DeepFloyd IF's cascade (the keys below; docs/cascade.md);
                             # "unclip" = Karlo's unCLIP (config.unclip; docs/unclip.md)
    c.model = ""             # workdir of train.py or a directory written by jaxdiff.convert (required without pipeline)
    for g in guidance.GUIDES.values():
        for net in g.networks:
            c[net] = ""      # path of a network a guide needs (e.g. classifier, guide_model)
    c.low_res = ""           # super-resolution: samples.npz of low-resolution images (+ labels) to upsample
    c.tokenizer = ""         # text models: "" = the model's own vocabulary, or a glide-text2im checkout (BPE files);
                             # pipeline=if: T5's spiece.model (or its folder); unclip: CLIP's merges.txt folder
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
        threshold_max=0.0,       # cap on dynamic thresholding's s (diffusers' sample_max_value), 0 = none
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
    # pipeline=if (jaxdiff.sample.cascade): num_samples, batch_size, seed, progress and grid_max come from sample
    c.prompts = ""           # a text file (one prompt a line) or prompts separated by "|", cycled over the samples
    c.stages = ""            # the stages' diffusers folders, separated by "," (a pipeline folder or its unet/)
    c.text_encoder = ""      # the T5 encoder's transformers folder (T5EncoderModel: config.json + safetensors);
                             # unclip: CLIPTextModelWithProjection's (default: unclip.folder/text_encoder)
    c.cascade = ml_collections.ConfigDict(dict(
        sampler="diffusers_ddpm",  # a name in samplers.SAMPLERS; diffusers_ddpm = IF's DDPMScheduler
        steps="100,50",            # sampling steps of each stage ("," separated; one value = every stage)
        scales="7,4",              # classifier-free guidance scale of each stage (Imagen convention; IF's 7 and 4)
        noise_level=250,           # super-resolution stages: noise-augmentation level of the upsampled input (0..999)
        dynamic_threshold=0.95,    # diffusers' dynamic_thresholding_ratio (percentile); 0 = clip x0 to [-1, 1]
        threshold_max=1.5,         # diffusers' sample_max_value: cap on the threshold s; 0 = none
        max_length=77,             # T5 tokens per prompt (IF: 77)
    ))
    c.unclip = ml_collections.ConfigDict(dict(  # pipeline=unclip (jaxdiff.sample.unclip_run, docs/unclip.md)
        folder="",                 # a Karlo pipeline folder (prior/, text_proj/, decoder/, super_res_first/, ...)
        prior="",                  # each part's diffusers folder or converted checkpoint ("" = folder/<part>)
        text_proj="",
        decoder="",
        super_res_first="",
        super_res_last="",
        image_embeddings="",       # image variations: a .npy / .npz of CLIP image embeddings [M, D] instead of prompts
        steps="25,25,7",           # prior, decoder and super-resolution steps (UnCLIPPipeline's defaults)
        scales="4,8",              # prior and decoder classifier-free guidance scales (Imagen convention)
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        fsdp=1,                    # pipeline=if / unclip: split the parameters over this many devices (big models fit)
    ))
    return c


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
    from jaxdiff.util.images import load_samples_npz

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
    for name in sorted(scale_keys) + ["cfg_rescale", "eta", "dynamic_threshold", "threshold_max", "interval_lo",
                                      "interval_hi"]:
        v = config_util.get(s, name)
        if v is not None:
            guides.check_scale(f"sample.{name}", v)
    if float(s.eta) < 0:
        raise ValueError(f"sample.eta={s.eta} must be >= 0")
    if not 0.0 <= float(s.cfg_rescale) <= 1.0:
        raise ValueError(f"sample.cfg_rescale={s.cfg_rescale} must lie in [0, 1]")
    if not 0.0 <= float(s.dynamic_threshold) <= 1.0:
        raise ValueError(f"sample.dynamic_threshold={s.dynamic_threshold}: a percentile in (0, 1], or 0 = off")
    tmax = float(config_util.get(s, "threshold_max", 0.0))
    if tmax and not tmax >= 1.0:
        raise ValueError(f"sample.threshold_max={tmax}: a cap >= 1 on dynamic thresholding's s, or 0 = none")
    if tmax and not float(s.dynamic_threshold):
        raise ValueError(f"sample.threshold_max={tmax} needs dynamic thresholding: set sample.dynamic_threshold "
                         "(a percentile, e.g. 0.95)")
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
    check_process_split(int(s.num_samples), int(s.batch_size))
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
    from jaxdiff.diffusion.schedules import make_schedule

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
        per_sample[guides.LOW_RES_KEY] = images[:n]
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
    from jaxdiff.data import tokenizers

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


def guide_scales(config, names) -> dict:
    """cond scale keys -> the sample config's values for the guides `names` (+ cfg_rescale)."""
    s = config.sample
    scales = {guidance.GUIDES[n].scale_key: float(s[guidance.GUIDES[n].config_scale]) for n in names}
    if float(s.cfg_rescale) > 0 and any(guidance.GUIDES[n].wrap is not None for n in names):
        scales[guides.CFG_RESCALE] = float(s.cfg_rescale)
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

    config.pipeline="if" runs DeepFloyd IF's cascade instead (`jaxdiff.sample.cascade.run`: always
    sharded and resumable, one OUT/stageK per stage; the result is the last stage's, with "stages").
    """
    pipeline = str(config_util.get(config, "pipeline", "") or "")
    if pipeline:
        if pipeline not in PIPELINES:
            raise ValueError(f"config.pipeline={pipeline!r}; allowed: '' (sample config.model), "
                             f"{', '.join(map(repr, PIPELINES))}")
        if pipeline == "unclip":
            from jaxdiff.sample import unclip_run

            return unclip_run.run(config)
        for key, value in config_util.get(config, "unclip", {}).items():
            if key not in ("steps", "scales") and value:
                raise ValueError(f"config.unclip.{key} applies to config.pipeline=unclip only (Karlo's unCLIP)")
        from jaxdiff.sample import cascade

        return cascade.run(config)
    for key in PIPELINE_KEYS:
        if config_util.get(config, key):
            raise ValueError(f"config.{key} applies to config.pipeline=if only (DeepFloyd IF's cascade) and "
                             "config.pipeline=unclip")
    for key, value in config_util.get(config, "unclip", {}).items():
        if key not in ("steps", "scales") and value:
            raise ValueError(f"config.unclip.{key} applies to config.pipeline=unclip only (Karlo's unCLIP)")
    if int(config_util.get(config_util.get(config, "mesh", {}), "fsdp", 1)) != 1:
        raise ValueError("config.mesh.fsdp applies to config.pipeline=if / unclip only (one model samples "
                         "data-parallel)")
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
        return guidance.build_guides(plan["guides"], guides.unet_fn(module, p["model"]), fns=fns,
                                     null_label=plan["num_classes"] if plan["null"] else None,
                                     uncond=guides.caption_dropout if text else None, learned_sigma=ls,
                                     cfg_rescale=rescale, interval=plan["interval"], sched=sched,
                                     prepare=guides.text_encoder(module, p["model"]) if text else None)

    # The bar advances after each batch, from the host: no progress callback in the compiled loop, so
    # the program is the same with progress on or off, and JAX's persistent compilation cache keeps
    # it (it does not store programs with host callbacks).
    spec = samplers.SamplerSpec(
        sampler=plan["sampler"], prediction=str(config_util.get(dcfg, "prediction", "eps")), learned_sigma=ls,
        fixed_variance=str(s.fixed_variance), clip_denoised=bool(s.clip_denoised),
        dynamic_threshold=float(s.dynamic_threshold) if float(s.dynamic_threshold) > 0 else None,
        threshold_max=float(s.threshold_max) if float(s.dynamic_threshold) > 0 and float(s.threshold_max) > 0 else None)
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

            multihost_utils.sync_global_devices("jaxdiff.sample.shards.merge")
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
