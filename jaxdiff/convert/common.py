"""What every converter shares: reading a state_dict (`load_state_dict`: .npz, .safetensors, a sharded
*.index.json, .pt/.pth/.bin with torch, or a mapping), the weights and config.json of a transformers /
diffusers model folder (`find_weights`, `read_weights`, `read_config_json`), the param layout mapping
(PyTorch <-> Flax transforms per leaf), and strict key/shape checks that name every missing, unexpected
or wrongly shaped key.

One reader per format: safetensors files through `SafetensorsDict` (lazy, tensor by tensor; the
safetensors library with numpy, no torch), torch files through `read_torch_files` (torch imported only
then)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple  # path in the Flax params tree
    key: str  # state_dict key
    shape: tuple  # torch shape
    flax_shape: tuple
    transform: str  # conv2d | conv1d | dense | identity


def to_flax(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv2d":
        return a.transpose(2, 3, 1, 0)
    if transform == "conv1d":
        return a[:, :, 0].T
    return a.T if transform == "dense" else a


def to_torch(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv2d":
        return a.transpose(3, 2, 0, 1)
    if transform == "conv1d":
        return a.T[:, :, None]
    return a.T if transform == "dense" else a


def make_layout(abstract, key_of: Callable, transform_of: Callable, order: Optional[Callable] = None) -> tuple:
    """An Entry per leaf of an abstract params tree (sorted by `order` of the keys when given).
    `transform_of(path, flax_shape)` names the layout change."""
    entries = []
    for path, leaf in flatten_dict(abstract).items():
        shape = tuple(leaf.shape)
        tr = transform_of(path, shape)
        # the torch shape: a zero-stride view of the Flax shape transposed (nothing is allocated)
        torch_shape = to_torch(np.broadcast_to(np.float32(0), shape), tr).shape
        entries.append(Entry(path, key_of(path), torch_shape, shape, tr))
    return tuple(sorted(entries, key=lambda e: order(e.key)) if order else entries)


def key_problems(expected: Mapping, given: Mapping) -> list:
    """(problem, key) for every key whose shape differs ("shape"), then every key not expected
    ("unexpected"), then every expected key not given ("missing"); `expected` and `given` map
    keys to shapes."""
    wrong = [k for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]
    unexpected = [k for k in given if k not in expected]
    missing = [k for k in expected if k not in given]
    return [("shape", k) for k in wrong] + [("unexpected", k) for k in unexpected] + [("missing", k) for k in missing]


def describe_key_problem(problem: str, key: str, expected: Mapping, given: Mapping) -> str:
    """One line naming the key, its shape and what the model needs (a `key_problems` entry)."""
    if problem == "shape":
        return f"key {key!r} has shape {tuple(given[key])}, the model needs {tuple(expected[key])}"
    if problem == "unexpected":
        return f"unexpected key {key!r} {tuple(given[key])} (not in the model)"
    return f"missing key {key!r} {tuple(expected[key])} (the model needs it)"


def mismatch_error(what: str, expected: dict, given: dict, hint_fn: Optional[Callable] = None, kind: str = "",
                    footer: Optional[str] = None, limit: int = 8) -> Optional[str]:
    """None when `given` (key -> shape) matches `expected` exactly; else "`what` (counts)" and a line per
    missing, unexpected or wrongly shaped key (up to `limit`), each with the flag `hint_fn(key, problem,
    kind, expected, given)` most likely responsible when hint_fn is given."""
    problems = key_problems(expected, given)
    if not problems:
        return None
    counts = collections.Counter(p for p, _ in problems)
    head = (f"{what} ({counts['missing']} missing, {counts['unexpected']} unexpected, {counts['shape']} wrongly "
            f"shaped keys)")
    lines = [f"  {describe_key_problem(p, k, expected, given)}" for p, k in problems]
    if hint_fn is None:
        head += ":"
    else:
        hints = [hint_fn(k, p, kind, expected, given) for p, k in problems]
        ranked = [h for h, _ in collections.Counter(hints).most_common()]
        head += f"; most likely flag: {ranked[0]}" + (f" (also: {'; '.join(ranked[1:3])})" if len(ranked) > 1 else "")
        lines = [f"{line}; likely flag: {h}" for line, h in zip(lines, hints)]
    more = [f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []
    return "\n".join([head] + lines[:limit] + more + ([footer] if footer else []))


def is_floating(dtype) -> bool:
    """float16 / float32 / float64, and bfloat16 (numpy's ml_dtypes type, which numpy does not count as floating)."""
    import ml_dtypes  # jax's own dependency

    dtype = np.dtype(dtype)
    return bool(np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16))


def as_numpy(v) -> np.ndarray:
    """A numpy array of `v` (a torch tensor or anything np.asarray takes) in its own dtype: a torch bfloat16
    tensor becomes an ml_dtypes bfloat16 array (numpy has no bfloat16 of its own)."""
    if hasattr(v, "detach"):  # torch tensor
        import torch

        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            import ml_dtypes

            return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return v.numpy()
    return np.asarray(v)


def shape_of(sd: Mapping, key: str) -> tuple:
    """The shape of sd[key], without reading the tensor when `sd` can tell (a SafetensorsDict)."""
    shape = getattr(sd, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(np.shape(sd[key]))


def shapes_of(sd: Mapping) -> dict:
    """{key: shape} of a state_dict (no tensor is read from a SafetensorsDict)."""
    return {str(k): shape_of(sd, k) for k in sd}


# --- reading weight files ----------------------------------------------------------------------------


class SafetensorsDict(Mapping):
    """A read-only {key: numpy array} over one or more safetensors files (the shards of one state_dict);
    only the headers are read up front, each tensor when it is asked for, so converting holds about the
    converted params plus one tensor. `shape(key)` answers without reading the tensor."""

    def __init__(self, files):
        from safetensors import SafetensorError, safe_open

        self._file: dict = {}
        self._shapes: dict = {}
        for f in files:
            try:
                with safe_open(str(f), framework="np") as h:
                    for k in h.keys():  # noqa: SIM118 (a safe_open handle is not a Mapping)
                        if k in self._file:
                            raise ValueError(f"{f}: key {k} is also in {self._file[k]}")
                        self._file[k] = f
                        self._shapes[k] = tuple(h.get_slice(k).get_shape())
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{f} is not a readable safetensors file: {e}") from None

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self._file[key]), framework="np") as h:
            return h.get_tensor(key)

    def __iter__(self):
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]


def read_torch_files(files) -> dict:
    """{key: np.ndarray} of the state_dicts in torch files (.pt / .pth / .bin, or the shards of one);
    torch is imported only here (ImportError saying so when it is not installed). The files are
    memory-mapped where their format allows, so the arrays are read as they are converted."""
    files = [Path(os.fspath(f)) for f in files]
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {files[0]} needs PyTorch (pip install torch); or convert the weights to "
                          "safetensors or .npz, which are read without it") from None
    sd: dict = {}
    for f in files:
        try:
            part = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, TypeError):  # a legacy (not zip) file cannot be memory-mapped; torch < 2.1 cannot
            part = torch.load(str(f), map_location="cpu", weights_only=True)
        if not isinstance(part, Mapping):
            raise ValueError(f"{f} does not hold a state_dict (got {type(part).__name__})")  # noqa: TRY004
        sd.update({str(k): as_numpy(v) for k, v in part.items()})
    return sd


def index_files(index) -> list:
    """The weight files a sharded checkpoint's index (a JSON object with a "weight_map") lists, beside it."""
    index = Path(os.fspath(index))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a weights index (a JSON object with a 'weight_map'): {e}") from None
    paths = [index.parent / n for n in names]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        more = f", ... ({len(absent) - 8} more)" if len(absent) > 8 else ""
        raise FileNotFoundError(f"{index} lists weight files that are not there: {', '.join(absent[:8])}{more}")
    return paths


def read_weights(files) -> Mapping:
    """The state_dict in weight files (one file or the shards of one checkpoint, all of one format):
    a SafetensorsDict for .safetensors, else read with torch."""
    files = list(files)
    if files and all(Path(os.fspath(f)).suffix == ".safetensors" for f in files):
        return SafetensorsDict(files)
    return read_torch_files(files)


def load_state_dict(source) -> Mapping:
    """A state_dict as {key: np.ndarray}, from a mapping (numpy arrays or torch tensors), a .npz file, a
    .safetensors file (read lazily, tensor by tensor: a SafetensorsDict), a sharded checkpoint's
    *.index.json, or a torch file (.pt / .pth / .bin, read with torch.load(map_location='cpu',
    weights_only=True)). Arrays keep their dtype (bfloat16 as ml_dtypes.bfloat16)."""
    if isinstance(source, Mapping):
        return {str(k): as_numpy(v) for k, v in source.items()}
    path = Path(os.fspath(source))
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if path.name.endswith(".index.json"):
        return read_weights(index_files(path))
    return read_weights([path])


def weights_name(name: str, variant: Optional[str] = None) -> str:
    """A weights file's name for a variant, as transformers and diffusers name them (model.safetensors ->
    model.fp16.safetensors, model.safetensors.index.json -> model.safetensors.index.fp16.json)."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


def find_weights(folder, safetensors_name: str, torch_name: str, variant: Optional[str] = None,
                 what: str = "weights") -> list:
    """The weight files of a transformers / diffusers model folder, in the order those libraries look for
    them: NAME.safetensors, its sharded index, the torch file, its sharded index (`safetensors_name`
    and `torch_name` give NAME; `variant` as in `weights_name`). FileNotFoundError listing what was
    looked for and what the folder holds."""
    folder = Path(os.fspath(folder))
    names = [safetensors_name, safetensors_name + ".index.json", torch_name, torch_name + ".index.json"]
    for name in names:
        p = folder / weights_name(name, variant)
        if p.is_file():
            return index_files(p) if name.endswith(".index.json") else [p]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"no {what} in {folder}: looked for {', '.join(weights_name(n, variant) for n in names)}"
                            f"; the folder holds {present if present else 'nothing'}")


def read_config_json(folder, what: str = "a model folder") -> dict:
    """FOLDER/config.json as a dict (FileNotFoundError for a missing folder or file, ValueError for bad JSON)."""
    folder = Path(os.fspath(folder))
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} (expected {what}: config.json and the weights)")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder} ({what} has one)")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds {type(d).__name__}, not a JSON object")
    return d


def read_checked_config(folder, check: Callable, what: str = "a model folder"):
    """`check(d)` of FOLDER/config.json's dict `d` (`read_config_json`): the checked config, or its ValueError
    with the file's path in front."""
    d = read_config_json(folder, what)
    try:
        return check(d)
    except ValueError as e:
        raise ValueError(f"{Path(os.fspath(folder)) / 'config.json'}: {e}") from None


def check_state_dict(layout: tuple, sd: Mapping, what: str, **mismatch) -> None:
    """ValueError (`mismatch_error(what, ..., **mismatch)`) unless the keys and shapes of `sd` are exactly
    those of `layout`; no tensor is read from a SafetensorsDict."""
    err = mismatch_error(what, {e.key: e.shape for e in layout}, shapes_of(sd), **mismatch)
    if err:
        raise ValueError(err)


def layout_params(layout: tuple, sd: Mapping, dtype=np.float32) -> dict:
    """Flax params (nested dicts of numpy arrays in `dtype`) from a state_dict whose keys and shapes fit
    `layout`, tensor by tensor (a SafetensorsDict reads each only now); ValueError for a tensor that is not
    floating point."""
    flat = {}
    for e in layout:
        a = as_numpy(sd[e.key])
        if not is_floating(a.dtype):
            raise ValueError(f"key {e.key!r} has dtype {a.dtype}, expected floating point")
        flat[e.path] = np.ascontiguousarray(to_flax(a.astype(np.float32), e.transform).astype(dtype, copy=False))
    return unflatten_dict(flat)


def checked_params(layout: tuple, sd: Mapping, what: str, **mismatch) -> dict:
    """Flax params (float32) from a state_dict, once its keys and shapes match `layout` (else
    ValueError: `mismatch_error(what, ..., **mismatch)`)."""
    import jax

    check_state_dict(layout, sd, what, **mismatch)
    return jax.device_put(layout_params(layout, sd))  # one transfer of the whole tree (per leaf is ~10x slower)


def state_dict_from_layout(params, layout: tuple) -> dict:
    """{state_dict key: float32 np.ndarray} in torch layout and `layout` order, from Flax params (ValueError
    for a parameter that is missing or wrongly shaped)."""
    flat, out = flatten_dict(dict(params)), {}
    for e in layout:
        if e.path not in flat:
            raise ValueError(f"params have no {'/'.join(e.path)} (state_dict key {e.key!r})")
        a = np.asarray(flat[e.path], dtype=np.float32)
        if tuple(a.shape) != e.flax_shape:
            raise ValueError(f"param {'/'.join(e.path)} has shape {a.shape}, expected {e.flax_shape}")
        out[e.key] = np.ascontiguousarray(to_torch(a, e.transform))
    return out
