"""What every converter shares: reading a state_dict (.pt/.pth with torch, .npz, .safetensors, or a
mapping), the param layout mapping (PyTorch <-> Flax transforms per leaf), and strict key/shape checks
that name every missing, unexpected or wrongly shaped key."""

from __future__ import annotations

import collections
import dataclasses
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


def as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def load_state_dict(source) -> dict:
    """A guided-diffusion state_dict as {key: np.ndarray}, from a mapping (numpy arrays or torch
    tensors), a .npz file, or a .pt file (read with torch.load(map_location='cpu', weights_only=True))."""
    if isinstance(source, Mapping):
        return {str(k): as_numpy(v) for k, v in source.items()}
    path = Path(os.fspath(source))
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch); or convert the state_dict to .npz"
        ) from None
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (got {type(sd).__name__})")
    return {str(k): as_numpy(v) for k, v in sd.items()}


def checked_params(layout: tuple, sd: dict, what: str, **mismatch) -> dict:
    """Flax params (float32) from a state_dict, once its keys and shapes match `layout` (else
    ValueError: `mismatch_error(what, ..., **mismatch)`)."""
    import jax

    err = mismatch_error(what, {e.key: e.shape for e in layout}, {k: tuple(np.shape(v)) for k, v in sd.items()},
                          **mismatch)
    if err:
        raise ValueError(err)
    flat = {}
    for e in layout:
        a = np.asarray(sd[e.key])
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"key {e.key!r} has dtype {a.dtype}, expected floating point")
        flat[e.path] = np.ascontiguousarray(to_flax(a.astype(np.float32), e.transform))
    return jax.device_put(unflatten_dict(flat))  # one transfer of the whole tree (per leaf is ~10x slower)


def state_dict_from_layout(params, layout: tuple) -> dict:
    """{state_dict key: np.ndarray} in torch layout and `layout` order, from Flax params."""
    flat, out = flatten_dict(params), {}
    for e in layout:
        a = np.asarray(flat[e.path], dtype=np.float32)
        if tuple(a.shape) != e.flax_shape:
            raise ValueError(f"param {'/'.join(e.path)} has shape {a.shape}, expected {e.flax_shape}")
        out[e.key] = np.ascontiguousarray(to_torch(a, e.transform))
    return out
