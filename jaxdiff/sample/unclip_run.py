"""unCLIP (Karlo) from sample.py (`--config.pipeline=unclip`, docs/unclip.md): the stages of `jaxdiff.sample.unclip`
run one after the other, each written and resumable as the IF cascade's (`pipelines.run_stage`):

    OUT/prior/embeddings.npz           arr_0: the CLIP image embeddings [N, D] float32 (text-to-image only)
    OUT/decoder/samples.npz, grid.png  the decoder's images (e.g. 64x64)
    OUT/super_res/samples.npz, grid.png  the upsampled images (e.g. 256x256), from OUT/decoder/samples.npz

The parts: `config.unclip.folder` (a Karlo pipeline folder: prior/, text_proj/, decoder/, super_res_first/,
super_res_last/, text_encoder/, tokenizer/), each overridable by `config.unclip.<part>`, `config.text_encoder` and
`config.tokenizer` (a folder with merges.txt, or CLIP's bpe file); every part may also be a checkpoint written
by `python -m jaxdiff.convert --source diffusers|transformers`. Image variations: `config.unclip.image_embeddings`
(a .npy, or a .npz's arr_0 / image_embeds / embeddings, [M, D]) instead of prompts: no prior, sample i
decodes row i % M with the empty caption (UnCLIPImageVariationPipeline).

Sample i takes prompt i % P and draws every noise from fold_in(fold_in(seed, stage), i) (stages 0, 1, 2): the
same files on any number of devices or hosts and in any batch size. Everything is checked from the config.json
files, the tokenizer and the embeddings file before any weight is read or anything compiled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from jaxdiff.diffusion import guides
from jaxdiff.diffusion.conditioning import PROMPT_KEY
from jaxdiff.sample import shards, unclip
from jaxdiff.sample.generation import check_process_split, generate_batches
from jaxdiff.sample.pipelines import converted, fingerprint, mesh, parse_prompts, run_stage, sha256_file
from jaxdiff.util import config as config_util

PARTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last")
KINDS = {"prior": "prior", "text_proj": "unclip_text_proj", "decoder": "unet2d_condition",
         "super_res_first": "unet2d", "super_res_last": "unet2d", "text_encoder": "clip_text"}
MANIFEST_PIPELINE = "unclip"
STAGES = ("prior", "decoder", "super_res")
_DTYPES = ("float32", "bfloat16")
# what jaxdiff's stages do, as a Karlo folder's scheduler configs say it (checked when they are there)
SCHEDULERS = {"prior_scheduler": {"prediction_type": "sample", "variance_type": "fixed_small_log",
                                  "clip_sample_range": unclip.PRIOR_CLIP_RANGE},
              "decoder_scheduler": {"prediction_type": "epsilon", "variance_type": "learned_range",
                                    "clip_sample_range": 1.0},
              "super_res_scheduler": {"prediction_type": "epsilon", "variance_type": "fixed_small_log",
                                      "clip_sample_range": 1.0}}
_COMMON = {"num_train_timesteps": unclip.NUM_TIMESTEPS, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True}


# --- the parts ----------------------------------------------------------------------------------------

def _path(config, name: str, required: bool = True) -> Optional[str]:
    """A part's path: config.unclip.<name> (text_encoder, tokenizer: config.<name>), else unclip.folder/<name>."""
    u = config.unclip
    explicit = str(config_util.get(config if name in ("text_encoder", "tokenizer") else u, name, "") or "")
    key = f"config.{name}" if name in ("text_encoder", "tokenizer") else f"config.unclip.{name}"
    if explicit:
        p = Path(os.path.expanduser(explicit))
        if not p.exists():
            raise FileNotFoundError(f"{key}={explicit!r} does not exist")
        return str(p)
    folder = str(config_util.get(u, "folder", "") or "")
    if folder:
        root = Path(os.path.expanduser(folder))
        if not root.is_dir():
            raise FileNotFoundError(f"config.unclip.folder={folder!r} is not a folder (a Karlo pipeline folder)")
        if (root / name).exists():
            return str(root / name)
        if not required:
            return None
        raise FileNotFoundError(f"{key} is empty and config.unclip.folder={folder!r} has no {name}/")
    if not required:
        return None
    raise ValueError(f"{key} is required with config.pipeline=unclip (or config.unclip.folder: a Karlo pipeline "
                     "folder with prior/, text_proj/, decoder/, super_res_first/, super_res_last/, text_encoder/, "
                     "tokenizer/)")


def read_part_config(name: str, path: str):
    """The checked config of a part (no weights read): a diffusers / transformers folder or a converted one."""
    from jaxdiff.convert.common import read_config_json
    from jaxdiff.convert.diffusers import unet2d_config
    from jaxdiff.models.clip_text import clip_text_config_from_json
    from jaxdiff.models.prior import prior_config
    from jaxdiff.models.unclip_text_proj import text_proj_config
    from jaxdiff.models.unet2d import UNet2DConfig
    from jaxdiff.models.unet2d_condition import UNet2DConditionConfig

    conv = converted(path)
    if conv and conv["kind"] != KINDS[name]:
        raise ValueError(f"{path} is a converted {conv['kind']!r}; the {name} is a {KINDS[name]!r}")
    d = conv["model"] if conv else read_config_json(path)
    try:
        if name == "prior":
            return prior_config(d)
        if name == "text_proj":
            return text_proj_config(d)
        if name == "text_encoder":
            cfg = clip_text_config_from_json(d, strict=False)
            if not cfg.with_projection:
                raise ValueError("a CLIPTextModel without projection: unCLIP needs CLIPTextModelWithProjection's "
                                 "text_embeds")
            return cfg
        cfg = unet2d_config(d)
    except ValueError as e:
        raise ValueError(f"{Path(path) / 'config.json'}: {e}") from None
    want = UNet2DConditionConfig if name == "decoder" else UNet2DConfig
    if not isinstance(cfg, want):
        raise ValueError(f"{path} holds a {type(cfg).__name__}; the {name} is a {want.__name__}")
    return cfg


def load_part(name: str, path: str, dtype: str = "") -> tuple:
    """(module, params, config) of a part (module doc); params float32 numpy."""
    if converted(path):
        from jaxdiff.convert.converted import load_converted

        module, params, _ = load_converted(path, **({"dtype": dtype} if dtype else {}))
        return module, params, read_part_config(name, path)
    if name == "text_encoder":
        from jaxdiff.convert.clip_text import load_clip_text_folder

        return load_clip_text_folder(path, dtype or None, strict=False)
    if name == "prior":
        from jaxdiff.convert.unclip import load_prior_folder

        return load_prior_folder(path, dtype or None)
    if name == "text_proj":
        from jaxdiff.convert.unclip import load_text_proj_folder

        return load_text_proj_folder(path)
    from jaxdiff.sample.cascade import load_stage

    return load_stage(path, dtype)


def load_tokenizer(path: str):
    """CLIP's BPE tokenizer from a folder holding merges.txt (a Karlo tokenizer/), or CLIP's bpe file."""
    from jaxdiff.data.tokenizers import ClipTokenizer

    p = Path(path)
    if p.is_dir():
        if not (p / "merges.txt").is_file():
            raise FileNotFoundError(f"config.tokenizer={path!r}: no merges.txt in it (a CLIPTokenizer folder)")
        p = p / "merges.txt"
    return ClipTokenizer.from_file(p)


def read_embeddings(path: str) -> np.ndarray:
    """Image embeddings [M, D] float32 from a .npy, or a .npz's arr_0 / image_embeds / embeddings."""
    p = Path(os.path.expanduser(path))
    where = f"config.unclip.image_embeddings={path!r}"
    if not p.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where} is not a .npy / .npz file ({e})") from None
    if isinstance(z, np.lib.npyio.NpzFile):
        with z:
            key = next((k for k in ("arr_0", "image_embeds", "embeddings") if k in z.files), None)
            if key is None:
                raise ValueError(f"{where} holds {z.files}; expected arr_0, image_embeds or embeddings")
            z = z[key]
    a = np.asarray(z)
    if a.ndim != 2 or a.shape[0] < 1 or a.dtype.kind != "f" or not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: expected finite float embeddings [M, D], got {a.dtype} {a.shape}")
    return a.astype(np.float32)


# --- validation ---------------------------------------------------------------------------------------

def _numbers(name: str, text, n: int, kind) -> list:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if len(parts) != n:
        raise ValueError(f"config.unclip.{name}={text!r}: expected {n} values separated by ','")
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ValueError(f"config.unclip.{name}={text!r}: expected {kind.__name__} values separated by ','") from None


def _check_schedulers(folder: str) -> None:
    root = Path(os.path.expanduser(folder)) if folder else None
    for name, want in SCHEDULERS.items():
        path = root / name / "scheduler_config.json" if root else None
        if path is None or not path.is_file():
            continue
        try:
            d = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
        for key, value in {**_COMMON, **want}.items():
            got = d.get(key, value)
            if got != value:
                raise ValueError(f"{path}: {key}={got!r}; jaxdiff's unCLIP samples this stage with {key}={value!r}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(config) -> dict:
    """Every setting of an unCLIP run checked (config.json files, tokenizer, embeddings file, sample settings)
    before any weight is read or anything compiled; returns the plan. Raises ValueError / FileNotFoundError."""
    import jax

    s, u = config.sample, config.unclip
    for key, why in (("model", "the parts come from config.unclip"), ("low_res", "the decoder makes the "
                     "low-resolution images"), ("stages", "that is config.pipeline=if's key; use config.unclip.*")):
        if config_util.get(config, key):
            raise ValueError(f"config.{key} does not apply with config.pipeline=unclip: {why}")
    emb_path = str(config_util.get(u, "image_embeddings", "") or "")
    prompts_text = str(config_util.get(config, "prompts", "") or "")
    if emb_path and prompts_text:
        raise ValueError("give config.prompts (text to image) or config.unclip.image_embeddings (image variations), "
                         "not both")
    variations = bool(emb_path)
    prompts, source = ([""], "image variations") if variations else parse_prompts(prompts_text, "unclip")
    steps = _numbers("steps", u.steps, 3, int)
    for name, st in zip(STAGES, steps):
        if not 2 <= st <= unclip.NUM_TIMESTEPS:
            raise ValueError(f"config.unclip.steps: the {name} has {st} steps; allowed: 2..{unclip.NUM_TIMESTEPS}")
    scales = _numbers("scales", u.scales, 2, float)
    for name, sc in zip(STAGES, scales):
        guides.check_scale(f"config.unclip.scales ({name})", sc)
    n, bs = int(s.num_samples), int(s.batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"sample.num_samples={n} and sample.batch_size={bs} must be >= 1")
    check_process_split(n, bs)
    dtype = str(config_util.get(config, "dtype", "") or "")
    if dtype and dtype not in _DTYPES:
        raise ValueError(f"config.dtype={dtype!r}; allowed: '' (float32), {', '.join(_DTYPES)}")
    fsdp = int(config_util.get(config_util.get(config, "mesh", {}), "fsdp", 1))
    if fsdp < 1 or jax.device_count() % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1 and divide the {jax.device_count()} devices")

    text_encoder = _path(config, "text_encoder", required=False)
    if text_encoder is None:
        raise ValueError(("config.prompts needs" if not variations else "image variations need")
                         + " a CLIP text encoder (the empty caption is the unconditional input): config.text_encoder "
                         "is empty and config.unclip.folder has no text_encoder/")
    paths = {"text_encoder": text_encoder}
    for name in PARTS:
        if name != "prior" or not variations:
            paths[name] = _path(config, name)
    cfgs = {name: read_part_config(name, path) for name, path in paths.items()}
    clip, tp, dec = cfgs["text_encoder"], cfgs["text_proj"], cfgs["decoder"]
    first, last = cfgs["super_res_first"], cfgs["super_res_last"]
    where = lambda name: f"the {name} ({paths[name]})"  # noqa: E731
    if not variations:
        prior = cfgs["prior"]
        _require(prior.clip_embed_dim == tp.clip_embeddings_dim,
                 f"{where('prior')} makes CLIP image embeddings of width {prior.clip_embed_dim} (clip_embed_dim), but "
                 f"{where('text_proj')} takes clip_embeddings_dim={tp.clip_embeddings_dim}: the prior and the decoder "
                 "must share one CLIP width")
        _require(prior.embedding_proj_dim == clip.projection_dim and prior.embedding_dim == clip.hidden_size
                 and prior.num_embeddings == clip.max_position_embeddings,
                 f"{where('prior')} takes text embeddings of width {prior.embedding_proj_dim}, token states "
                 f"[{prior.num_embeddings}, {prior.embedding_dim}], but {where('text_encoder')} gives "
                 f"{clip.projection_dim} and [{clip.max_position_embeddings}, {clip.hidden_size}]")
    _require(tp.clip_embeddings_dim == clip.projection_dim == clip.hidden_size,
             f"{where('text_proj')} takes CLIP embeddings and token states of width {tp.clip_embeddings_dim}, but "
             f"{where('text_encoder')} gives projection_dim={clip.projection_dim}, hidden_size={clip.hidden_size}")
    _require(dec.context_dim == tp.cross_attention_dim and dec.class_embed_type == "identity"
             and dec.time_embed_dim == tp.time_embed_dim,
             f"{where('decoder')} (cross_attention_dim {dec.context_dim}, class_embed_type {dec.class_embed_type!r}, "
             f"time embedding {dec.time_embed_dim}) does not take {where('text_proj')}'s tokens of width "
             f"{tp.cross_attention_dim} and additive time embedding of width {tp.time_embed_dim} ('identity')")
    _require(dec.out_channels in (dec.in_channels, 2 * dec.in_channels) and dec.sample_size,
             f"{where('decoder')}: out_channels={dec.out_channels} for {dec.in_channels}-channel images, sample_size="
             f"{dec.sample_size}")
    for name, c in (("super_res_first", first), ("super_res_last", last)):
        _require(c.in_channels == 2 * dec.in_channels and c.out_channels == dec.in_channels,
                 f"{where(name)} has in_channels={c.in_channels}, out_channels={c.out_channels}; an upsampler takes "
                 f"the noisy image and the upsampled decoder image ({2 * dec.in_channels}) and predicts eps "
                 f"({dec.in_channels})")
        _require(c.sample_size and c.sample_size >= dec.sample_size and c.sample_size == first.sample_size,
                 f"{where(name)}: sample_size={c.sample_size}; expected the upsamplers' common size, at least the "
                 f"decoder's {dec.sample_size}")
        _require(c.class_embed_type is None, f"{where(name)} has class_embed_type={c.class_embed_type!r}; unCLIP's "
                 "upsamplers take no class labels")
    embeddings = None
    if variations:
        embeddings = read_embeddings(emb_path)
        if embeddings.shape[1] != tp.clip_embeddings_dim:
            raise ValueError(f"config.unclip.image_embeddings={emb_path!r} holds embeddings of width "
                             f"{embeddings.shape[1]}; the decoder ({paths['text_proj']}) takes CLIP image embeddings "
                             f"of width {tp.clip_embeddings_dim}")
    _check_schedulers(str(config_util.get(u, "folder", "") or ""))
    tok_path = _path(config, "tokenizer", required=False)
    if tok_path is None:
        raise ValueError("config.tokenizer is required with config.pipeline=unclip (CLIP's merges.txt folder, or "
                         "config.unclip.folder with tokenizer/)")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.n_vocab > clip.vocab_size:
        raise ValueError(f"the tokenizer ({tokenizer.source}) has {tokenizer.n_vocab} ids, more than the CLIP text "
                         f"encoder's vocab_size={clip.vocab_size}: they do not belong together")
    return dict(prompts=prompts, prompt_source=source, variations=variations, embeddings=embeddings,
                embeddings_path=emb_path, paths=paths, configs=cfgs, steps=steps, scales=scales, dtype=dtype,
                fsdp=fsdp, tokenizer=tokenizer)


# --- the run ------------------------------------------------------------------------------------------

def encode_text(clip, tokenizer, prompts: list) -> unclip.TextTable:
    """The CLIP text table of the prompts and (last row) the empty caption: tokens run without a mask, as the
    pipeline runs the encoder (the attention is causal: padding changes only padding positions)."""
    from jaxdiff.models.clip_text import encode_clip_text

    module, params, cfg = clip
    tokens, lengths = tokenizer.tokens_and_lengths(list(prompts) + [""], cfg.max_position_embeddings)
    out = encode_clip_text(module, params, tokens)
    mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
    return unclip.TextTable(np.asarray(out.text_embeds, np.float32), np.asarray(out.last_hidden_state, np.float32),
                            mask)


def _manifest(plan, config, stage: str, fingerprints: dict, previous: Optional[str]) -> dict:
    from jaxdiff.util.fingerprint import file_fingerprint

    s = config.sample
    k = STAGES.index(stage)
    nets = {"prior": ("prior",), "decoder": ("text_proj", "decoder"),
            "super_res": ("super_res_first", "super_res_last")}[stage]
    prompts = "\n".join(plan["prompts"]).encode()
    m = {"format": shards.MANIFEST_FORMAT, "pipeline": MANIFEST_PIPELINE, "stage": stage,
         "networks": {name: fingerprints[name] for name in nets}, "dtype": plan["dtype"],
         "sample": {"num_samples": int(s.num_samples), "batch_size": int(s.batch_size), "seed": int(s.seed)},
         "unclip": {"steps": plan["steps"][k], "scale": plan["scales"][k] if k < 2 else None}}
    if stage != "super_res":
        m.update(text_encoder=fingerprints["text_encoder"], tokenizer=fingerprints["tokenizer"],
                 prompts=f"{len(plan['prompts'])} prompts, sha256 {hashlib.sha256(prompts).hexdigest()}")
    if previous is not None:
        m["previous_stage"] = file_fingerprint(previous)
    return json.loads(json.dumps(m, sort_keys=True))


def run(config) -> dict:
    """Run unCLIP as `config` says (module doc). Returns the last stage's result as `runner.run(shards=True)`
    does, with "stages": every stage's."""
    from jaxdiff import parallel
    from jaxdiff.util import cpu

    plan = validate(config)
    s = config.sample
    n, bs = int(s.num_samples), int(s.batch_size)
    nets = {name: load_part(name, path, plan["dtype"]) for name, path in plan["paths"].items()}
    fingerprints = {name: fingerprint(net[1], net[2]) for name, net in nets.items()}
    fingerprints["tokenizer"] = sha256_file(Path(plan["tokenizer"].source))
    if plan["variations"]:
        fingerprints["embeddings"] = sha256_file(os.path.expanduser(plan["embeddings_path"]))
    mesh_ = mesh(plan["fsdp"])
    partitioned = plan["fsdp"] > 1
    opts = cpu.compiler_options(partitioned=True) if partitioned else None
    text = None
    num_prompts = len(plan["prompts"])
    rows = np.full((n,), num_prompts, np.int32) if plan["variations"] else (np.arange(n) % num_prompts).astype(np.int32)
    captions = [""] * n if plan["variations"] else [plan["prompts"][r] for r in rows]
    root, grid_max = str(config.out), int(config_util.get(s, "grid_max", 64))
    results = []

    def text_table():
        nonlocal text
        if text is None:
            text = encode_text(nets["text_encoder"], plan["tokenizer"], plan["prompts"])
        return text

    def stage_run(k, fn, sched, params, per_sample, scale, out, todo, convert=None, dtype=np.uint8):
        import jax

        key = jax.random.fold_in(jax.random.key(int(s.seed)), k)
        shardings = parallel.state_shardings(params, mesh_) if partitioned else None
        extra = {} if convert is None else {"convert": convert}
        for ids, rows_out in generate_batches(fn, params, sched, num_samples=n, batch_size=bs,
                                              scales={} if scale is None else {guides.CFG_SCALE: scale},
                                              per_sample=per_sample, key=key, mesh=mesh_, param_shardings=shardings,
                                              progress=bool(s.progress), desc=f"unclip {STAGES[k]}", batches=todo,
                                              **extra):
            shards.write_shard(out, ids, rows_out, None, captions, dtype=dtype)

    # prior -> OUT/prior/embeddings.npz (text to image) or the given embeddings (image variations)
    if plan["variations"]:
        emb = plan["embeddings"]
        embeddings_path = os.path.expanduser(plan["embeddings_path"])
        embeds = lambda: emb[np.arange(n) % len(emb)]  # noqa: E731
    else:
        out = os.path.join(root, "prior")
        prior = nets["prior"]

        def sample_prior(todo):
            fn, sched = unclip.prior_sampler(prior[0], num_prompts, plan["steps"][0], opts)
            post = lambda x: unclip.post_process(prior[1], x)  # noqa: E731
            stage_run(0, fn, sched, {"model": prior[1], "text": tuple(text_table())}, {PROMPT_KEY: rows},
                      plan["scales"][0], out, todo, convert=post, dtype=np.float32)

        results.append(run_stage("prior", out, _manifest(plan, config, "prior", fingerprints, None), n, bs,
                                 sample_prior, grid_max=0, filename="embeddings.npz"))
        embeddings_path = os.path.join(out, "embeddings.npz")

        def embeds():
            with np.load(embeddings_path) as z:
                return z["arr_0"][:n]

    # decoder -> OUT/decoder/samples.npz
    out = os.path.join(root, "decoder")
    previous = None if plan["variations"] else embeddings_path
    manifest = _manifest(plan, config, "decoder", fingerprints, previous)
    if plan["variations"]:
        manifest["image_embeddings"] = fingerprints["embeddings"]

    def sample_decoder(todo):
        (tp, tparams, _), (dec, dparams, _) = nets["text_proj"], nets["decoder"]
        fn, sched = unclip.decoder_sampler(tp, dec, num_prompts, plan["steps"][1], opts)
        params = {"model": dparams, "text_proj": tparams, "text": tuple(text_table())}
        stage_run(1, fn, sched, params, {PROMPT_KEY: rows, unclip.IMAGE_EMBED_KEY: embeds()}, plan["scales"][1],
                  out, todo)

    results.append(run_stage("decoder", out, manifest, n, bs, sample_decoder, grid_max=grid_max))
    low_res_path = os.path.join(out, "samples.npz")

    # super-resolution -> OUT/super_res/samples.npz
    out = os.path.join(root, "super_res")

    def sample_super_res(todo):
        (first, fparams, _), (last, lparams, _) = nets["super_res_first"], nets["super_res_last"]
        fn, sched = unclip.super_res_sampler(first, last, plan["steps"][2], opts)
        with np.load(low_res_path) as z:
            low = z["arr_0"][:n]
        stage_run(2, fn, sched, {"first": fparams, "last": lparams}, {guides.LOW_RES_KEY: low}, None, out, todo)

    results.append(run_stage("super_res", out, _manifest(plan, config, "super_res", fingerprints, low_res_path), n,
                             bs, sample_super_res, grid_max=grid_max))
    final = dict(results[-1])
    final.update(images=None, labels=None, captions=captions, stages=results)
    return final


__all__ = ["encode_text", "load_part", "load_tokenizer", "read_embeddings", "read_part_config", "run", "validate"]
