"""Sharded, resumable sample files: per-process shards written as they come, a manifest of what
determines the images, the resume plan (a collective) and the merge into samples.npz in sample-id order.

Sharded runs (`run(..., shards=True)`, sample.py): each process writes its rows of each global
batch atomically to OUT/shards/SSSSSSSS-EEEEEEEE.npz (sample ids S..E-1), next to
OUT/shards/manifest.json, which records what determines the images (`settings_manifest`). A rerun
with the same settings generates only the missing global batches; other settings are refused before
any work, naming what differs (`resume_plan`, a collective). When every process is done, process 0
merges the shards into OUT/grid.png and OUT/samples.npz and deletes them (`merge`). Resuming and
merging need OUT on a filesystem every host sees; with per-host disks, copy every host's
OUT/shards/ into one and run the merge command.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from jaxdiff.util import config as config_util
from jaxdiff.util import files

SHARDS_DIR = "shards"


MANIFEST = "manifest.json"


MANIFEST_FORMAT = "jaxdiff-samples-v1"


UNRECORDED = ("progress", "grid_max")  # sample settings that do not change the images


_SHARD = re.compile(r"^(\d+)-(\d+)\.npz$")


_TEMPORARY = re.compile(r"^\.(\d+-\d+\.npz|manifest\.json)\..*\.tmp$")  # files.atomic_write's, of a killed run


def settings_manifest(config, model, networks: Mapping[str, tuple] = ()) -> dict:
    """What determines a run's images, as JSON values: fingerprints of the networks (parameters,
    model and diffusion config) and of config.low_res, config.dtype, and the sample settings except
    `UNRECORDED` ones."""
    from jaxdiff.util.fingerprint import params_fingerprint

    def fingerprint(triple) -> str:
        cfg = triple[2]
        return params_fingerprint(triple[1], name="jaxdiff-sample-network",
                                  config={k: config_util.get(cfg, k) for k in ("model", "diffusion")})

    m = {"format": MANIFEST_FORMAT, "model": fingerprint(model)}
    m.update({k: fingerprint(v) for k, v in dict(networks).items()})
    if config_util.get(config, "low_res"):
        from jaxdiff.util.fingerprint import file_fingerprint

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
                captions: Optional[Sequence[str]] = None, dtype=np.uint8) -> Optional[str]:
    """This process's rows of one global batch (contiguous ids) as one shard file, atomically
    (`labels`, `captions`: every sample's, or None; `dtype`: of the rows, e.g. float32 for embeddings)."""
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
        return None
    if not np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        raise ValueError(f"a shard holds contiguous sample ids; got {ids[:4]}...")
    arrays = {"ids": ids, "images": np.asarray(images, dtype)}
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


def _settings_conflict(out: str, manifest: dict, filename: str = "samples.npz") -> str:
    """Why this run must not write into `out` ("" when it may: nothing there, or the same run)."""
    npz = os.path.join(out, filename)
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


def resume_plan(out: str, manifest: dict, num_samples: int, batch_size: int,
                filename: str = "samples.npz") -> Optional[list[int]]:
    """The global batches a sharded run into `out` still has to generate; None when OUT/`filename`
    (samples.npz) already holds it. Raises ValueError when `out` holds another run's samples.

    A collective with one answer: each process reports whether it refuses, whether OUT/samples.npz
    holds this run (process 0's report decides) and which global batches have all of ITS rows in
    the shards it sees; a batch is skipped when every process has its rows (so per-host disks
    resume too). Writes OUT/shards/manifest.json when absent.
    """
    from jaxdiff import parallel

    n, bs = int(num_samples), int(batch_size)
    conflict = _settings_conflict(out, manifest, filename)
    complete = not conflict and os.path.exists(os.path.join(out, filename))
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


def merge(out: str, *, grid_max: int = 64, filename: str = "samples.npz") -> dict:
    """OUT/shards -> OUT/grid.png (the first `grid_max` images) and OUT/`filename` (arr_0: the uint8
    images, or the rows of another dtype `write_shard` wrote, in sample-id order, streamed one shard at a time; arr_1 labels and `captions` when the
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
            f"this one, then run `python -m jaxdiff.sample merge {out}`")
    plan = _merge_plan(ranges, n)
    per_sample, shape, dtype = {"labels": [], "captions": []}, None, np.uint8  # small: read whole, before the images
    for path, a, lo, hi in plan:
        with np.load(path) as z:
            if not np.array_equal(z["ids"], np.arange(a, a + len(z["ids"]))) or a + len(z["ids"]) < hi:
                raise ValueError(f"{path}: its ids do not match its name")
            for key, rows in per_sample.items():
                if key in z.files:
                    rows.append(z[key][lo - a: hi - a])
            if shape is None:
                shape, dtype = z["images"].shape[1:], z["images"].dtype
    for key, rows in per_sample.items():
        if rows and len(rows) != len(plan):
            raise ValueError(f"{shards}: some shards have {key} and others not")
        per_sample[key] = np.concatenate(rows) if rows else None
    labels, captions = per_sample["labels"], per_sample["captions"]
    result = {"npz": os.path.join(out, filename), "grid": None, "num_samples": n}
    k = min(n, int(grid_max))
    if k > 0:
        first = []
        for chunk in _images(plan):
            first.append(chunk)
            if sum(map(len, first)) >= k:
                break
        result["grid"] = files.save_grid(os.path.join(out, "grid.png"), np.concatenate(first)[:k],
                                         None if labels is None else labels[:k])
    arrays = {"arr_0": files.Rows((n,) + tuple(shape), dtype, _images(plan))}
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
