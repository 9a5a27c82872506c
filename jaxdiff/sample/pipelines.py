"""What the multi-stage pipelines (`cascade`: DeepFloyd IF, `unclip_run`: Karlo) share: prompts, converted
checkpoints, fingerprints, the mesh, and one stage's sharded, resumable run (`run_stage`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from jaxdiff.sample import shards


def converted(path) -> Optional[dict]:
    """The config.json of a checkpoint `python -m jaxdiff.convert` wrote (its "kind" and the original
    config.json as "model"), or None for a diffusers / transformers folder."""
    p = Path(os.path.expanduser(str(path)))
    if not (p / "params").is_dir() or not (p / "config.json").is_file():
        return None
    config = json.loads((p / "config.json").read_text())
    return config if isinstance(config, dict) and "kind" in config and "model" in config else None


def parse_prompts(text, pipeline: str = "if") -> tuple[list, str]:
    """(prompts, where they came from): a text file's non-empty lines, or the text split at "|"."""
    text = str(text or "")
    path = Path(os.path.expanduser(text.strip())) if text.strip() else None
    if path is not None and path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line]
        if not prompts:
            raise ValueError(f"config.prompts={text!r} is an empty file: expected one prompt a line")
        return prompts, str(path)
    if not text.strip():
        raise ValueError(f"config.prompts is required with config.pipeline={pipeline}: a text file (one prompt a "
                         "line) or prompts separated by '|'")
    return [c.strip() for c in text.split("|")], "config.prompts"


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(params, config) -> str:
    """A network's fingerprint (parameters and config) for the stage manifests."""
    from jaxdiff.util.fingerprint import params_fingerprint

    cfg = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return params_fingerprint(params, name="jaxdiff-cascade-network", config=cfg)


def mesh(fsdp: int):
    """The data mesh, or with fsdp > 1 a ('data', 'fsdp') mesh splitting parameters over `fsdp` devices."""
    from jaxdiff import parallel

    return parallel.data_mesh() if fsdp == 1 else parallel.make_mesh(-1, fsdp)


def run_stage(name: str, out: str, manifest: dict, num_samples: int, batch_size: int,
              sample: Callable[[Sequence[int]], None], *, grid_max: int = 64, filename: str = "samples.npz") -> dict:
    """One stage into `out`: the batches `shards.resume_plan` says are missing are made by `sample(todo)` (which
    writes the shards), then process 0 merges them into OUT/`filename` (+ grid.png); a finished stage is not
    redone. Returns {"stage", "npz", "grid", "num_samples", "batches", "generated"} (paths on process 0)."""
    import jax

    n, bs = int(num_samples), int(batch_size)
    todo = shards.resume_plan(out, manifest, n, bs, filename)
    result = {"stage": name, "npz": None, "grid": None, "num_samples": n, "batches": -(-n // bs), "generated": 0}
    if todo is not None:
        sample(todo)
        result["generated"] = len(todo)
        _sync(f"jaxdiff.pipeline.{name}.shards")
        if jax.process_index() == 0:
            result.update(shards.merge(out, grid_max=grid_max, filename=filename))
    elif jax.process_index() == 0:
        result["npz"] = os.path.join(out, filename)
        grid = os.path.join(out, "grid.png")
        result["grid"] = grid if os.path.isfile(grid) else None
        shards.remove_shards(out)
    _sync(f"jaxdiff.pipeline.{name}.merged")  # the next stage reads this one's file on every process
    return result


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = ["converted", "fingerprint", "mesh", "parse_prompts", "run_stage", "sha256_file"]
