"""Converted checkpoints on disk: DIR/config.json ({"kind", "model", "diffusion", "source"}) and DIR/params
(orbax), written atomically; `load_converted` rebuilds the module of any converted kind.

Model folders (`from_folder`): a diffusers UNet2DConditionModel / UNet2DModel folder (source "diffusers",
kind "unet2d_condition" / "unet2d") or a transformers T5EncoderModel folder (source "transformers", kind
"t5_encoder"), and unCLIP's PriorTransformer / UnCLIPTextProjModel (kinds "prior", "unclip_text_proj") and
CLIPTextModel[WithProjection] (kind "clip_text"); their config.json is {"kind", "model": the folder's config.json as it was, "source"} (no
"diffusion": a U-Net folder holds no schedule) and their params are float32."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from jaxdiff.convert.guided_diffusion import abstract_params
from jaxdiff.util import config as config_util

SOURCES = ("guided-diffusion", "glide", "diffusers", "transformers")
FOLDER_SOURCES = ("diffusers", "transformers")  # a model folder (config.json + weights), not one file
FOLDER_KINDS = {"unet2d_condition": "diffusers", "unet2d": "diffusers", "prior": "diffusers",
                "unclip_text_proj": "diffusers", "t5_encoder": "transformers", "clip_text": "transformers"}
DIFFUSERS_CLASSES = {"PriorTransformer": "prior", "UnCLIPTextProjModel": "unclip_text_proj"}  # besides the U-Nets


def save_converted(directory, params, kind: str, model_flags: dict, diffusion_flags: Optional[dict] = None,
                   force: bool = False, *, source: str = "guided-diffusion", extra: Optional[dict] = None) -> Path:
    """Write DIR/config.json and DIR/params (orbax), atomically via DIR.tmp + rename. Refuses an
    existing non-empty DIR unless force. `source` (one of SOURCES) is recorded in config.json and
    `extra` entries are added to it; "diffusion" is left out when diffusion_flags is None."""
    import orbax.checkpoint as ocp

    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {SOURCES}")
    out = Path(os.fspath(directory)).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force (force=True) to replace it")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        ckptr.close()
        config = {"kind": kind, "model": dict(model_flags),
                  **({} if diffusion_flags is None else {"diffusion": dict(diffusion_flags)}),
                  "source": source, **(extra or {})}
        with open(tmp / "config.json", "w") as f:
            json.dump(config_util.jsonable(config), f, indent=1)
        if out.exists():
            old = out.with_name(out.name + ".old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def from_folder(source: str, folder, variant: Optional[str] = None) -> tuple:
    """(kind, params, model config) of a diffusers ("diffusers") or transformers ("transformers") model
    folder; params float32 numpy arrays, the model config the folder's config.json as it was. Strict: the
    config is checked first (ValueError naming a field outside the supported subset), then every key and
    shape of the weights (ValueError listing the missing, unexpected and wrongly shaped keys); nothing is
    compiled."""
    from jaxdiff.convert.common import read_config_json

    if source not in FOLDER_SOURCES:
        raise ValueError(f"source={source!r} is not a model-folder source; those are {', '.join(FOLDER_SOURCES)}")
    config = read_config_json(folder)
    if source == "diffusers" and config.get("_class_name") in DIFFUSERS_CLASSES:
        from jaxdiff.convert import unclip

        kind = DIFFUSERS_CLASSES[config["_class_name"]]
        loader = unclip.load_prior_folder if kind == "prior" else unclip.load_text_proj_folder
        _, params, _ = loader(folder)
    elif source == "transformers" and (config.get("model_type") == "clip_text_model"
                                       or any(str(a).startswith("CLIPText") for a in config.get("architectures") or ())):
        from jaxdiff.convert.clip_text import load_clip_text_folder

        _, params, _ = load_clip_text_folder(folder, variant=variant)
        kind = "clip_text"
    elif source == "diffusers":
        from jaxdiff.convert.diffusers import load_diffusers_unet
        from jaxdiff.models.unet2d import UNet2DConfig

        _, params, cfg = load_diffusers_unet(folder, variant=variant)
        kind = "unet2d" if isinstance(cfg, UNet2DConfig) else "unet2d_condition"
    else:
        from jaxdiff.convert.transformers import load_t5_folder

        _, params, _ = load_t5_folder(folder, variant=variant)
        kind = "t5_encoder"
    return kind, params, config


def _folder_module(kind: str, model_config: dict, dtype=None) -> tuple:
    """(module, abstract float32 params) of a model-folder kind from its config.json; dtype: the compute dtype."""
    if kind == "t5_encoder":
        from jaxdiff.models.layers import resolve_dtype
        from jaxdiff.models.t5 import T5Encoder, abstract_t5_params, t5_config_from_json

        module = T5Encoder(t5_config_from_json(model_config), dtype=resolve_dtype(dtype))
        return module, abstract_t5_params(module)
    if kind == "clip_text":
        from jaxdiff.models.clip_text import CLIPTextEncoder, abstract_clip_text_params, clip_text_config_from_json
        from jaxdiff.models.layers import resolve_dtype

        module = CLIPTextEncoder(clip_text_config_from_json(model_config), dtype=resolve_dtype(dtype))
        return module, abstract_clip_text_params(module)
    if kind in ("prior", "unclip_text_proj"):
        from jaxdiff.convert import unclip

        return unclip.folder_module(kind, model_config, dtype)
    from jaxdiff.convert.diffusers import abstract_unet2d_params, unet2d_module
    from jaxdiff.models.unet2d import unet2d_model_config
    from jaxdiff.models.unet2d_condition import unet2d_condition_config

    cfg = (unet2d_model_config if kind == "unet2d" else unet2d_condition_config)(model_config)
    return unet2d_module(cfg, dtype), abstract_unet2d_params(cfg)


def load_converted(directory, **overrides):
    """(module, params, config) from a directory written by `python -m jaxdiff.convert`.

    `overrides` replace model flags that do not change parameter shapes, e.g. dtype="float32" (a
    checkpoint converted with use_fp16=True computes in bfloat16 unless dtype is given) or
    use_checkpoint=True. config is the file's content (without the overrides). CLIP encoders
    (kind clip-image / clip-text) have config["clip"] with glide's CLIP config (logit_scale). The
    model-folder kinds (FOLDER_KINDS) take only dtype ("float32" / "bfloat16": the compute dtype; the
    params stay float32): UNet2DConditionModel / UNet2DModel (models.unet2d_condition, models.unet2d)
    and T5Encoder (models.t5) built from config["model"], the folder's config.json."""
    import orbax.checkpoint as ocp

    from jaxdiff.models import create_model
    from jaxdiff.models.clip import CLIP_KINDS, create_clip_encoder

    d = Path(os.fspath(directory)).absolute()
    with open(d / "config.json") as f:
        config = json.load(f)
    flags = {**config["model"], **overrides}
    if config["kind"] in FOLDER_KINDS:
        other = sorted(set(overrides) - {"dtype"})
        if other:
            raise ValueError(f"{d}: a converted {config['kind']} takes only the override dtype, not {', '.join(other)}")
        module, abstract = _folder_module(config["kind"], config["model"], overrides.get("dtype"))
    elif config["kind"] in CLIP_KINDS:
        from jaxdiff.convert.clip import abstract_clip_params

        module = create_clip_encoder(config["kind"], **flags)
        abstract = abstract_clip_params(module)
    else:
        module = create_model(config["kind"], **flags)
        abstract = abstract_params(module, config["kind"])
    # Restored on the host, as numpy (as checkpoints.load_model does): with no target sharding,
    # orbax would place the arrays as saved, on process 0's device, which fails on other processes.
    import jax

    ckptr = ocp.PyTreeCheckpointer()
    try:
        params = ckptr.restore(d / "params", args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)))
    finally:
        ckptr.close()
    return module, params, config
