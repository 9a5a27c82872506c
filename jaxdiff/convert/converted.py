"""Converted checkpoints on disk: DIR/config.json ({"kind", "model", "diffusion", "source"}) and DIR/params
(orbax), written atomically; `load_converted` rebuilds the module of any converted kind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from jaxdiff.convert.guided_diffusion import abstract_params
from jaxdiff.util import config as config_util

SOURCES = ("guided-diffusion", "glide")


def save_converted(directory, params, kind: str, model_flags: dict, diffusion_flags: Optional[dict] = None,
                   force: bool = False, *, source: str = "guided-diffusion", extra: Optional[dict] = None) -> Path:
    """Write DIR/config.json and DIR/params (orbax), atomically via DIR.tmp + rename. Refuses an
    existing non-empty DIR unless force. `source` (one of SOURCES) is recorded in config.json and
    `extra` entries are added to it."""
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
        config = {"kind": kind, "model": dict(model_flags), "diffusion": dict(diffusion_flags or {}),
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


def load_converted(directory, **overrides):
    """(module, params, config) from a directory written by `python -m jaxdiff.convert`.

    `overrides` replace model flags that do not change parameter shapes, e.g. dtype="float32" (a
    checkpoint converted with use_fp16=True computes in bfloat16 unless dtype is given) or
    use_checkpoint=True. config is the file's content (without the overrides). CLIP encoders
    (kind clip-image / clip-text) have config["clip"] with glide's CLIP config (logit_scale)."""
    import orbax.checkpoint as ocp

    from jaxdiff.models import create_model
    from jaxdiff.models.clip import CLIP_KINDS, create_clip_encoder

    d = Path(os.fspath(directory)).absolute()
    with open(d / "config.json") as f:
        config = json.load(f)
    flags = {**config["model"], **overrides}
    if config["kind"] in CLIP_KINDS:
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
