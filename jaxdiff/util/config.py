"""Small helpers for reading configs (ConfigDicts, dicts from config.json) and writing them as JSON."""

from __future__ import annotations

import difflib
import json
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np


def get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg[key], or `default` when the key is missing, None, or cfg is not a mapping."""
    try:
        v = cfg[key]
    except (KeyError, AttributeError, TypeError):
        return default
    return default if v is None else v


def is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def did_you_mean(value: Any, choices: Iterable, *, cutoff: float = 0.6, quote: Callable = repr) -> str:
    """" (did you mean X?)" naming the choice closest to `value` (written by `quote`), or ""."""
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean {quote(near[0])}?)" if near else ""


def jsonable(v: Any) -> Any:
    """Mappings, lists and tuples recursively as JSON types; numpy scalars as Python numbers."""
    if isinstance(v, Mapping) or hasattr(v, "to_dict"):
        v = v.to_dict() if hasattr(v, "to_dict") else v
        return {k: jsonable(a) for k, a in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(a) for a in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def to_json(cfg: Any) -> str:
    """A config as stable, indented JSON (sorted keys)."""
    return json.dumps(jsonable(cfg), indent=1, sort_keys=True)


def model_kind(cfg: Mapping) -> str:
    """"unet", "classifier" or "superres" of a loaded model's config (train.py or convert)."""
    return str(get(get(cfg, "model", {}), "kind") or get(cfg, "kind") or "unet")


def model_classes(cfg: Mapping) -> Optional[int]:
    """Number of classes a loaded model's config says it has (a classifier: its outputs)."""
    m = get(cfg, "model", {})
    if model_kind(cfg) == "classifier":
        return int(get(m, "out_channels"))
    n = get(m, "num_classes")
    return None if n is None else int(n)


def require_kind(cfg: Mapping, kinds: tuple, what: str, where: str) -> None:
    """Raise ValueError unless the loaded model's kind is one of `kinds` (`what` names its role,
    `where` the directory it came from)."""
    kind = model_kind(cfg)
    if kind not in kinds:
        raise ValueError(f"{where!r} holds a {kind!r} model; {what} must be a {' or a '.join(kinds)} model")
