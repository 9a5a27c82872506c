"""DeepFloyd IF's cascade (`sample.py --config.pipeline=if`, docs/cascade.md): T5 encodes the prompts once,
stage I samples small images from noise, each later stage upsamples the previous stage's images, each stage
one compiled `lax.scan` (`samplers.make_sampler`) guided through the guide registry (`build_guides`, "cfg").

    OUT/stage1/samples.npz, grid.png    stage I's images (e.g. 64x64)
    OUT/stage2/samples.npz, grid.png    stage II's (e.g. 256x256) from OUT/stage1/samples.npz

What each stage does (as diffusers' IFPipeline / IFSuperResolutionPipeline, with the stage's DDPMScheduler:
sampler "diffusers_ddpm", cosine schedule over 1000 steps, "leading" spacing, learned-range variance,
dynamic thresholding):
  - classifier-free guidance on the T5 states, the empty caption as the unconditional input; the variance
    channels are the conditional branch's;
  - stage k >= 2: the previous stage's uint8 images, mapped to [-1, 1], upsampled bilinearly with aligned
    corners to the stage's size, noised to `cascade.noise_level` by the plain cosine schedule, given to the
    U-Net as extra input channels, the level as its class label (`diffusion.conditioning`).

Sample i takes prompt i % P and draws every noise from fold_in(fold_in(seed, stage), i): the same images
on any number of devices or hosts and in any batch size. Each stage is written like sample.py's runs
(`shards`: per-process shards, a manifest of what determines the images, resume after an interruption,
merge in sample-id order); a finished stage is not redone. With `mesh.fsdp` = N > 1 the parameters (the
U-Nets', T5's and the prompt-state table) are split over N devices of a ('data', 'fsdp') mesh
(`parallel.state_shardings`), so models larger than one device fit; batches are split over every device.

Everything is checked before any weight is converted or anything compiled: the prompts, each folder's
config.json (the stages' text widths against each other and T5's d_model, the image sizes and channels),
the tokenizer, the sample settings; then the weights' keys and shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jaxdiff.diffusion import conditioning, guidance, guides, samplers
from jaxdiff.diffusion.schedules import make_schedule, named_betas
from jaxdiff.sample import shards
from jaxdiff.sample.generation import check_process_split, generate_batches
from jaxdiff.sample.pipelines import converted, fingerprint, mesh, parse_prompts, run_stage, sha256_file
from jaxdiff.util import config as config_util

NUM_TIMESTEPS = 1000     # IF's schedules: cosine ("squaredcos_cap_v2") over 1000 steps, for sampling and noising
SCHEDULE = "cosine"
MANIFEST_PIPELINE = "if"
_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage's folder, checked config and sampling settings."""

    index: int          # 0-based
    folder: str         # the U-Net folder (config.json + weights)
    config: Any         # models.unet2d_condition.UNet2DConditionConfig
    size: int           # image side
    channels: int       # image channels
    learned_sigma: bool
    steps: int
    scale: float

    @property
    def name(self) -> str:
        return f"stage{self.index + 1}"


# --- loading (thin: point them at converted checkpoints later) -----------------------------------------

def unet_folder(path: str) -> Path:
    """The U-Net folder of a stage: `path` itself when it holds a config.json, else `path`/unet (a diffusers
    pipeline folder such as IF-I-XL-v1.0)."""
    p = Path(os.path.expanduser(str(path)))
    if (p / "config.json").is_file():
        return p
    if (p / "unet" / "config.json").is_file():
        return p / "unet"
    if not p.exists():
        raise FileNotFoundError(f"stage folder {p} does not exist")
    raise FileNotFoundError(f"no config.json in {p} or {p / 'unet'} (a diffusers UNet2DConditionModel folder)")


def read_stage_config(path: str):
    """The checked UNet2DConditionModel config of a stage folder (no weights read)."""
    from jaxdiff.convert.diffusers import load_diffusers_config, unet2d_config
    from jaxdiff.models.unet2d_condition import UNet2DConditionConfig

    conv = converted(path)
    folder = Path(os.path.expanduser(str(path))) if conv else unet_folder(path)
    try:
        cfg = unet2d_config(conv["model"] if conv else load_diffusers_config(folder))
    except ValueError as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    if not isinstance(cfg, UNet2DConditionConfig):
        raise ValueError(f"{folder} holds a {type(cfg).__name__}; a cascade stage is a UNet2DConditionModel "
                         "(text-conditioned)")
    return cfg


def load_stage(path: str, dtype: str = ""):
    """(module, params, config) of a stage's U-Net: a diffusers folder or a converted checkpoint of kind
    "unet2d_condition" (params float32 numpy)."""
    from jaxdiff.convert.diffusers import load_diffusers_unet, unet2d_config

    if converted(path):
        from jaxdiff.convert.converted import load_converted

        module, params, config = load_converted(os.path.expanduser(str(path)), **({"dtype": dtype} if dtype else {}))
        return module, params, unet2d_config(config["model"])
    folder = unet_folder(path)
    try:
        return load_diffusers_unet(folder, dtype or None)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None


def read_text_encoder_config(path: str):
    """The T5Config of a transformers T5 folder or of a converted "t5_encoder" checkpoint (no weights read)."""
    from jaxdiff.convert.transformers import read_t5_config
    from jaxdiff.models.t5 import t5_config_from_json

    conv = converted(path)
    if conv:
        return t5_config_from_json(conv["model"], strict=False)
    return read_t5_config(_t5_folder(path), strict=False)


def load_text_encoder(path: str, dtype: str = ""):
    """(T5Encoder module, params, T5Config) of a transformers T5 folder or a converted "t5_encoder" checkpoint."""
    from jaxdiff.convert.transformers import load_t5_folder

    conv = converted(path)
    if conv:
        from jaxdiff.convert.converted import load_converted

        module, params, _ = load_converted(os.path.expanduser(str(path)), **({"dtype": dtype} if dtype else {}))
        return module, params, read_text_encoder_config(path)
    return load_t5_folder(_t5_folder(path), dtype or None, strict=False)


def _t5_folder(path: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not (p / "config.json").is_file() and (p / "text_encoder" / "config.json").is_file():
        return p / "text_encoder"
    if not p.is_dir():
        raise FileNotFoundError(f"config.text_encoder={str(path)!r} is not a folder (a transformers T5 encoder: "
                                "config.json + model.safetensors)")
    return p


# --- validation ----------------------------------------------------------------------------------------

def _per_stage(name: str, text, n: int, kind):
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if len(parts) == 1:
        parts = parts * n
    if len(parts) != n:
        raise ValueError(f"config.cascade.{name}={text!r} gives {len(parts)} values for {n} stages: give one "
                         "value, or one per stage separated by ','")
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ValueError(f"config.cascade.{name}={text!r}: expected {kind.__name__} values separated by ','") from None


def _folders(config) -> list:
    folders = [f.strip() for f in str(config_util.get(config, "stages", "") or "").split(",") if f.strip()]
    if not folders:
        raise ValueError("config.stages is required with config.pipeline=if: the stages' diffusers folders "
                         "separated by ',' (stage I first, e.g. IF-I-XL-v1.0,IF-II-L-v1.0)")
    return folders


def validate(config) -> dict:
    """Every setting of an IF run checked from the config.json files and the tokenizer, before any weight is
    converted or anything compiled; returns the plan. Raises ValueError / FileNotFoundError."""
    import jax

    from jaxdiff import parallel
    from jaxdiff.data.t5_tokenizer import T5Tokenizer

    s, c = config.sample, config.cascade
    if config_util.get(config, "model"):
        raise ValueError("config.model does not apply with config.pipeline=if: the stages come from config.stages")
    if config_util.get(config, "low_res"):
        raise ValueError("config.low_res does not apply with config.pipeline=if: stage I makes the low-resolution "
                         "images")
    prompts, source = parse_prompts(config_util.get(config, "prompts", ""))
    folders = _folders(config)
    n_stages = len(folders)
    steps = _per_stage("steps", c.steps, n_stages, int)
    scales = _per_stage("scales", c.scales, n_stages, float)
    for k, st in enumerate(steps):
        if not 1 <= st <= NUM_TIMESTEPS:
            raise ValueError(f"config.cascade.steps: stage {k + 1} has {st} steps; allowed: 1..{NUM_TIMESTEPS}")
    for k, sc in enumerate(scales):
        guides.check_scale(f"config.cascade.scales (stage {k + 1})", sc)
    sampler = samplers.check_sampler(str(c.sampler))
    for name in ("num_samples", "batch_size", "seed"):
        v = config_util.get(s, name)
        if not config_util.is_int(v) or v < (0 if name == "seed" else 1):
            raise ValueError(f"sample.{name}={v!r} must be a {'non-negative' if name == 'seed' else 'positive'} "
                             "integer")
    check_process_split(int(s.num_samples), int(s.batch_size))
    level = c.noise_level
    if not config_util.is_int(level) or not 0 <= level < NUM_TIMESTEPS:
        raise ValueError(f"config.cascade.noise_level={level!r}: a timestep of the noising schedule, 0..{NUM_TIMESTEPS - 1}")
    ratio, tmax = float(c.dynamic_threshold), float(c.threshold_max)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"config.cascade.dynamic_threshold={ratio}: a percentile in (0, 1], or 0 = clip x0 to [-1, 1]")
    if tmax and not tmax >= 1.0:
        raise ValueError(f"config.cascade.threshold_max={tmax}: a cap >= 1 on the threshold, or 0 = none")
    max_length = c.max_length
    if not config_util.is_int(max_length) or max_length < 1:
        raise ValueError(f"config.cascade.max_length={max_length!r} must be a positive integer (IF: 77)")
    dtype = str(config_util.get(config, "dtype", "") or "")
    if dtype and dtype not in _DTYPES:
        raise ValueError(f"config.dtype={dtype!r}; allowed: '' (float32), {', '.join(_DTYPES)}")
    fsdp = config_util.get(config_util.get(config, "mesh", {}), "fsdp", 1)
    parallel.mesh_shape(-1, fsdp, jax.device_count(), prefix="config.mesh.")

    if not config_util.get(config, "text_encoder"):
        raise ValueError("config.text_encoder is required with config.pipeline=if: the T5 encoder's transformers "
                         "folder (IF's text_encoder/)")
    t5_cfg = read_text_encoder_config(config.text_encoder)
    stages, prev = [], None
    for k, folder in enumerate(folders):
        cfg = read_stage_config(folder)
        where = f"stage {k + 1} ({folder})"
        size = cfg.sample_size
        if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            size = size[0]
        if not config_util.is_int(size) or size < 1:
            raise ValueError(f"{where}: config.json needs sample_size (the image side), got {size!r}")
        if prev is not None and cfg.context_dim != prev.config.context_dim:
            raise ValueError(f"{where} takes text states of width {cfg.context_dim} ({_width_field(cfg)}), but stage "
                             f"{k} ({prev.folder}) takes {prev.config.context_dim} ({_width_field(prev.config)}): the "
                             "stages share one text encoder, so their widths must match")
        if cfg.context_dim != t5_cfg.d_model:
            raise ValueError(f"{where} takes text states of width {cfg.context_dim} ({_width_field(cfg)}), but the "
                             f"T5 encoder ({config.text_encoder}) gives d_model={t5_cfg.d_model}: they must match")
        image_in = cfg.in_channels if prev is None else cfg.in_channels - prev.channels
        if prev is not None and image_in != prev.channels:
            raise ValueError(f"{where} has in_channels={cfg.in_channels}; a super-resolution stage takes the noisy "
                             f"image and the upsampled stage-{k} image: 2 x {prev.channels}")
        if cfg.out_channels not in (image_in, 2 * image_in):
            raise ValueError(f"{where} has out_channels={cfg.out_channels}; expected {image_in} (eps) or "
                             f"{2 * image_in} (eps and learned variance) for {image_in}-channel images")
        if prev is not None and cfg.class_embed_type not in (None, "timestep"):
            raise ValueError(f"{where} has class_embed_type={cfg.class_embed_type!r}; a super-resolution stage takes "
                             "the noise level as class label: 'timestep' (or none)")
        if prev is None and cfg.class_embed_type is not None:
            raise ValueError(f"{where} has class_embed_type={cfg.class_embed_type!r}: stage I takes no class labels")
        if prev is not None and size < prev.size:
            raise ValueError(f"{where} makes {size}x{size} images from stage {k}'s larger {prev.size}x{prev.size}")
        f = 2 ** (cfg.levels - 1)
        if size % f:
            raise ValueError(f"{where}: sample_size={size} is not a multiple of {f} (its {cfg.levels} levels)")
        _check_scheduler(folder, k)
        prev = Stage(k, folder, cfg, int(size), image_in, cfg.out_channels == 2 * image_in, steps[k], scales[k])
        stages.append(prev)
    if not config_util.get(config, "tokenizer"):
        raise ValueError("config.tokenizer is required with config.pipeline=if: T5's spiece.model (IF's tokenizer/)")
    tokenizer = T5Tokenizer(os.path.expanduser(str(config.tokenizer)))
    if tokenizer.vocab_size > t5_cfg.vocab_size:
        raise ValueError(f"the tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} pieces, more than the T5 "
                         f"encoder's vocab_size={t5_cfg.vocab_size}: they do not belong together")
    return dict(prompts=prompts, prompt_source=source, stages=stages, sampler=sampler, tokenizer=tokenizer,
                t5_config=t5_cfg, noise_level=int(level), threshold=(ratio or None, (tmax or None) if ratio else None),
                max_length=int(max_length), dtype=dtype, fsdp=int(fsdp))


def _width_field(cfg) -> str:
    return "encoder_hid_dim" if cfg.encoder_hid_dim_type == "text_proj" else "cross_attention_dim"


_SCHEDULER_EXPECTED = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": NUM_TIMESTEPS,
                       "prediction_type": "epsilon"}


def _check_scheduler(folder: str, k: int) -> None:
    """A pipeline folder's scheduler configs must describe what this sampler does (when they are there)."""
    p = Path(os.path.expanduser(str(folder)))
    root = p if (p / "unet").is_dir() else p.parent if p.name == "unet" else None
    if root is None:
        return
    names = ["scheduler"] + (["image_noising_scheduler"] if k else [])
    for name in names:
        path = root / name / "scheduler_config.json"
        if not path.is_file():
            continue
        try:
            d = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
        for key, want in _SCHEDULER_EXPECTED.items():
            got = d.get(key, want)
            if got != want:
                raise ValueError(f"{path}: {key}={got!r}; the IF pipeline samples with {key}={want!r} only")
        if name == "scheduler" and d.get("timestep_spacing", "leading") != "leading":
            raise ValueError(f"{path}: timestep_spacing={d['timestep_spacing']!r}; supported: 'leading' (IF's)")


# --- the run -------------------------------------------------------------------------------------------

def stage_manifest(plan: dict, stage: Stage, config, fingerprints: dict, low_res: Optional[str]) -> dict:
    """What determines a stage's images (JSON values; stored with its shards and in its samples.npz)."""
    s = config.sample
    prompts = "\n".join(plan["prompts"]).encode()
    m = {"format": shards.MANIFEST_FORMAT, "pipeline": MANIFEST_PIPELINE, "stage": stage.index + 1,
         "stages": fingerprints[stage.index], "text_encoder": fingerprints["t5"],
         "tokenizer": fingerprints["tokenizer"], "dtype": plan["dtype"],
         "prompts": f"{len(plan['prompts'])} prompts, sha256 {hashlib.sha256(prompts).hexdigest()}",
         "sample": {"num_samples": int(s.num_samples), "batch_size": int(s.batch_size), "seed": int(s.seed)},
         "cascade": {"sampler": plan["sampler"], "steps": stage.steps, "scales": stage.scale,
                     "dynamic_threshold": plan["threshold"][0], "threshold_max": plan["threshold"][1],
                     "max_length": plan["max_length"]}}
    if low_res is not None:
        from jaxdiff.util.fingerprint import file_fingerprint

        m["cascade"]["noise_level"] = plan["noise_level"]
        m["previous_stage"] = file_fingerprint(low_res)
    return json.loads(json.dumps(m, sort_keys=True))


def encode_prompts(t5, tokenizer, prompts: list, max_length: int, mesh, fsdp: int) -> np.ndarray:
    """T5 states [P + 1, max_length, d_model] float32 of the prompts and (last row) the empty caption, once."""
    import jax

    from jaxdiff import parallel
    from jaxdiff.models import t5 as t5_model

    module, params, _ = t5
    tokens, mask = tokenizer.tokens_and_mask(list(prompts) + [""], max_length)
    if fsdp == 1:
        return np.asarray(t5_model.encode(module, params, tokens, mask), np.float32)
    placed = parallel.place(params, parallel.state_shardings(params, mesh))
    fn = jax.jit(lambda p, t, m: module.apply({"params": p}, t, m),
                 out_shardings=parallel.replicated_sharding(mesh))
    out = fn(placed, parallel.replicate(np.asarray(tokens, np.int32), mesh), parallel.replicate(mask, mesh))
    return np.asarray(out.addressable_data(0), np.float32)


def run(config) -> dict:
    """Run the cascade as `config` says (module docstring). Returns the last stage's result as
    `runner.run(shards=True)` does ("npz", "grid", "num_samples", "batches", "generated"), with
    "stages": every stage's."""
    plan = validate(config)
    s = config.sample
    n, bs = int(s.num_samples), int(s.batch_size)
    stages = plan["stages"]
    # the weights: every key and shape checked before anything compiles
    nets = {st.index: load_stage(st.folder, plan["dtype"]) for st in stages}
    t5 = load_text_encoder(config.text_encoder, plan["dtype"])
    fingerprints = {st.index: fingerprint(nets[st.index][1], st.config) for st in stages}
    fingerprints["t5"] = fingerprint(t5[1], t5[2])
    fingerprints["tokenizer"] = sha256_file(plan["tokenizer"].path)

    mesh_ = mesh(plan["fsdp"])
    states = None  # T5's states, encoded once, when the first stage with work to do needs them
    num_prompts = len(plan["prompts"])
    rows = (np.arange(n) % num_prompts).astype(np.int32)
    captions = [plan["prompts"][r] for r in rows]
    out_root = str(config.out)
    results, low_res_path = [], None
    for st in stages:
        out = os.path.join(out_root, st.name)
        manifest = stage_manifest(plan, st, config, fingerprints, low_res_path)

        def sample(todo, st=st, out=out, low_res_path=low_res_path):
            nonlocal states, t5
            if states is None:
                states = encode_prompts(t5, plan["tokenizer"], plan["prompts"], plan["max_length"], mesh_,
                                        plan["fsdp"])
                t5 = None  # its memory back before the stages sample
            per_sample = {conditioning.PROMPT_KEY: rows}
            if low_res_path is not None:
                with np.load(low_res_path) as z:
                    per_sample[guides.LOW_RES_KEY] = z["arr_0"][:n]
                per_sample[conditioning.NOISE_LEVEL_KEY] = np.full((n,), plan["noise_level"], np.int32)
            _sample_stage(plan, st, nets[st.index], states, num_prompts, per_sample, out, todo, mesh_, config,
                          captions)

        results.append(run_stage(st.name, out, manifest, n, bs, sample,
                                 grid_max=int(config_util.get(s, "grid_max", 64))))
        low_res_path = os.path.join(out, "samples.npz")
        nets.pop(st.index)
    final = dict(results[-1])
    final.update(images=None, labels=None, captions=captions, stages=results)
    return final


def stage_sampler(module, stage: Stage, num_prompts: int, sampler: str = "diffusers_ddpm",
                  threshold: tuple = (0.95, 1.5), compiler_options: Optional[dict] = None):
    """(sampler_fn, sched) of one stage: `samplers.make_sampler` over `guidance.build_guides("cfg", ...)` with
    the U-Net conditioned on the text states params["text"] ([num_prompts + 1, L, D], the empty caption last;
    `conditioning.text_prepare`: what it computes from them, once per call), noise augmentation of
    cond["low_res"] for a super-resolution stage (index > 0), and IF's schedule.

    sampler_fn({"model": unet_params, "text": states}, sched, cond, key, sample_ids[, eta, x_T, noises]);
    cond: conditioning.PROMPT_KEY rows, guides.CFG_SCALE, and for stage index > 0 guides.LOW_RES_KEY and
    conditioning.NOISE_LEVEL_KEY and conditioning.LOW_RES_NOISE_KEY (`augmentation_noise`)."""
    prepare = None
    if stage.index > 0:
        prepare = conditioning.noise_augment(np.cumprod(1.0 - named_betas(SCHEDULE, NUM_TIMESTEPS)),
                                             (stage.size, stage.size))

    def build(p):
        return guidance.build_guides("cfg", conditioning.text_unet_fn(module, p["model"]),
                                     uncond=conditioning.text_uncond, learned_sigma=stage.learned_sigma,
                                     prepare=guidance.chain(conditioning.text_prepare(module, p["model"], p["text"],
                                                                                     num_prompts), prepare))

    ratio, tmax = threshold
    spec = samplers.SamplerSpec(sampler=sampler, prediction="eps", learned_sigma=stage.learned_sigma,
                                fixed_variance="small", clip_denoised=True, dynamic_threshold=ratio,
                                threshold_max=tmax)
    sampler_fn = samplers.make_sampler(build, spec, (stage.size, stage.size, stage.channels), compiler_options)
    sched = make_schedule(SCHEDULE, NUM_TIMESTEPS, samplers.SAMPLERS[sampler].respacing(stage.steps))
    return sampler_fn, sched


def augmentation_noise(key, shape: tuple):
    """batch_inputs(ids) of a super-resolution stage: {conditioning.LOW_RES_NOISE_KEY: [len(ids), *shape]}, sample
    i's normal(fold_in(fold_in(key, i), 2)), drawn sample by sample by one small compiled function, so its bits
    never depend on the batch or the devices (inside the sampler's program XLA may fuse the draw differently
    for another per-device batch and change the last bit)."""
    import jax
    import jax.numpy as jnp

    shape = tuple(int(d) for d in shape)
    draw = jax.jit(lambda k, i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, i), 2), shape,
                                                  jnp.float32))

    def inputs(ids):
        noise = [np.asarray(draw(key, np.uint32(i))) for i in np.asarray(ids)]
        return {conditioning.LOW_RES_NOISE_KEY: np.stack(noise) if noise else np.zeros((0,) + shape, np.float32)}

    return inputs


def _sample_stage(plan, st: Stage, net, states, num_prompts, per_sample, out, todo, mesh, config, captions):
    import jax

    from jaxdiff import parallel
    from jaxdiff.util import cpu

    module, params, _ = net
    s = config.sample
    partitioned = plan["fsdp"] > 1
    sampler_fn, sched = stage_sampler(module, st, num_prompts, plan["sampler"], plan["threshold"],
                                      compiler_options=cpu.compiler_options(partitioned=True) if partitioned else None)
    tree = {"model": params, "text": states}
    shardings = parallel.state_shardings(tree, mesh) if partitioned else None
    key = jax.random.fold_in(jax.random.key(int(s.seed)), st.index)
    noise = augmentation_noise(key, (st.size, st.size, st.channels)) if st.index else None
    for ids, images in generate_batches(sampler_fn, tree, sched, num_samples=int(s.num_samples),
                                        batch_size=int(s.batch_size), scales={guides.CFG_SCALE: st.scale},
                                        per_sample=per_sample, key=key, mesh=mesh, param_shardings=shardings,
                                        progress=bool(s.progress), desc=f"{st.name} {plan['sampler']}",
                                        batches=todo, batch_inputs=noise):
        shards.write_shard(out, ids, images, None, captions)


__all__ = ["Stage", "augmentation_noise", "encode_prompts", "load_stage", "load_text_encoder", "parse_prompts", "read_stage_config",
           "run", "stage_manifest", "stage_sampler", "unet_folder", "validate"]
