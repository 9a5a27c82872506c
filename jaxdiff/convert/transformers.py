"""Loading transformers' T5 encoders (T5EncoderModel folders, e.g. DeepFloyd IF's text_encoder/).

    module, params, config = load_t5_folder("IF-I-XL-v1.0/text_encoder")              # float32
    module, params, config = load_t5_folder(path, dtype="bfloat16")                   # bfloat16 weights + compute
    params = t5_params_from_state_dict(state_dict, config)                            # a state_dict in memory
    states = jaxdiff.models.t5.encode(module, params, tokens, mask)

A folder holds config.json (transformers' T5Config) and the weights: model.safetensors, a sharded
model.safetensors.index.json, or (read with torch, which is then needed) pytorch_model.bin or its
index; `variant="fp16"` reads model.fp16.safetensors / model.safetensors.index.fp16.json as
transformers does. safetensors files are read tensor by tensor, so peak host memory is about the
converted params plus one tensor.

Key map (`jaxdiff.models.t5` names the params after the keys): `encoder.<path>.weight` <->
params[<path with ".<i>" written "_<i>">][leaf], leaf `kernel` for Linear layers (transposed: (out, in) ->
(in, out)), `scale` for the norms, `embedding` for the relative-position table; the token embedding
`embed_tokens/embedding` comes from `shared.weight` or `encoder.embed_tokens.weight` (a T5EncoderModel
stores both, tied; either alone is enough, and if both are given they must be equal). Every expected key
must be present with its shape and nothing else may be there (ValueError listing the missing, unexpected
and wrongly shaped keys); the decoder of a full T5 checkpoint (`decoder.*`, `lm_head.weight`) is dropped
only with allow_decoder=True.

The params come back as numpy arrays on the host (float32, or the dtype asked for): jax.device_put them
with the shardings you want (T5-v1.1-XXL is 19 GB in float32, 9.5 GB in bfloat16).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdiff.convert.common import as_numpy, find_weights, is_floating, read_checked_config, read_weights, shape_of
from jaxdiff.models.layers import resolve_dtype
from jaxdiff.models.t5 import (
    T5Config,
    T5Encoder,
    abstract_t5_params,
    t5_config_from_json,
)

__all__ = ["expected_t5_shapes", "find_t5_weights", "load_t5_folder", "load_t5_state_dict", "t5_params_from_state_dict"]

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
_MAX_LISTED = 12


def _torch_key(path: tuple) -> str:
    """Flax param path -> transformers state_dict key (the token embedding: "shared.weight")."""
    if path == ("embed_tokens", "embedding"):
        return "shared.weight"
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"(block|layer)_(\d+)", p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    return "encoder." + ".".join(parts) + ".weight"


def _layout(config: T5Config) -> dict:
    """{state_dict key: (flax path, flax shape, transpose)} for the encoder of `config`."""
    import jax

    abstract = abstract_t5_params(T5Encoder(config))
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(k.key for k in path)
        transpose = path[-1] == "kernel"
        out[_torch_key(path)] = (path, tuple(leaf.shape), transpose)
    return out


def expected_t5_shapes(config: T5Config) -> dict:
    """{state_dict key: shape (PyTorch layout)} that a T5EncoderModel of `config` holds (the token
    embedding under "shared.weight"; "encoder.embed_tokens.weight" is accepted in its place)."""
    return {k: (s[::-1] if t else s) for k, (_, s, t) in _layout(config).items()}


def _listed(keys: list) -> str:
    head = ", ".join(keys[:_MAX_LISTED])
    return head + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _checked_keys(state_dict: Mapping, config: T5Config, allow_decoder: bool) -> dict:
    """{flax path: (state_dict key, transpose)} once keys and shapes match (ValueError otherwise)."""
    layout = _layout(config)
    given = [str(k) for k in state_dict]
    if allow_decoder:
        given = [k for k in given if not (k.startswith("decoder.") or k == "lm_head.weight")]
    embed = [k for k in EMBED_KEYS if k in given]
    expected = {k: v for k, v in layout.items() if k != "shared.weight"}
    missing = [k for k in expected if k not in given]
    if not embed:
        missing.insert(0, " or ".join(EMBED_KEYS))
    unexpected = [k for k in given if k not in expected and k not in EMBED_KEYS]
    wrong = []
    for k in [*embed, *(k for k in expected if k in given)]:
        _, shape, transpose = layout["shared.weight"] if k in EMBED_KEYS else layout[k]
        want = shape[::-1] if transpose else shape
        got = shape_of(state_dict, k)
        if got != want:
            wrong.append(f"{k}: {got}, expected {want}")
    if missing or unexpected or wrong:
        lines = [(f"T5 state_dict does not fit the encoder of this config (d_model={config.d_model}, "
                  f"num_layers={config.num_layers}, num_heads={config.num_heads}, d_kv={config.d_kv}, "
                  f"d_ff={config.d_ff}, vocab_size={config.vocab_size}, "
                  f"{'gated ' if config.is_gated_act else ''}{config.dense_act_fn}):")]
        if missing:
            lines.append(f"  missing keys: {_listed(missing)}")
        if unexpected:
            hint = ""
            if any(k.startswith("decoder.") or k == "lm_head.weight" for k in unexpected):
                hint = " (a full encoder-decoder checkpoint: allow_decoder=True drops the decoder)"
            lines.append(f"  unexpected keys: {_listed(unexpected)}{hint}")
        if wrong:
            lines.append(f"  wrong shapes: {_listed(wrong)}")
        raise ValueError("\n".join(lines))
    keys = {path: (k, t) for k, (path, _, t) in expected.items()}
    keys[layout["shared.weight"][0]] = (embed[0], False)
    return keys


def t5_params_from_state_dict(state_dict: Mapping, config: T5Config, dtype: Any = None, *,
                              allow_decoder: bool = False) -> dict:
    """The T5Encoder's params (numpy arrays, float32 or `dtype`: "float32" / "bfloat16") from a transformers
    T5 state_dict ({key: numpy array or torch tensor}); strict: see the module doc."""
    target = np.dtype(resolve_dtype(dtype))
    keys = _checked_keys(state_dict, config, allow_decoder)
    if all(k in state_dict for k in EMBED_KEYS):
        a, b = (as_numpy(state_dict[k]) for k in EMBED_KEYS)
        if not np.array_equal(a, b):
            raise ValueError(f"T5 state_dict: {EMBED_KEYS[0]} and {EMBED_KEYS[1]} differ; a T5EncoderModel ties them "
                             "(give one of them)")
        del a, b
    params: dict = {}
    for path, (key, transpose) in keys.items():
        a = as_numpy(state_dict[key])
        if not is_floating(a.dtype):
            raise ValueError(f"T5 state_dict: {key} has dtype {a.dtype}; allowed: floating point (float32, float16, "
                             "bfloat16)")
        a = np.ascontiguousarray((a.T if transpose else a).astype(target, copy=False))
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = a
    return params


# --- reading folders (convert.common's readers) ------------------------------------------------------

WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def find_t5_weights(folder, variant: str | None = None) -> list:
    """The weight files of a transformers model folder: model.safetensors, its sharded index, or (read with
    torch) pytorch_model.bin or its index; `variant="fp16"` reads model.fp16.safetensors etc."""
    return find_weights(folder, *WEIGHTS, variant=variant, what="T5 weights")


def load_t5_state_dict(folder, variant: str | None = None) -> Mapping:
    """The folder's state_dict: {key: array}, lazily read for safetensors (a common.SafetensorsDict)."""
    return read_weights(find_t5_weights(folder, variant))


def read_t5_config(folder, *, strict: bool = True) -> T5Config:
    return read_checked_config(folder, functools.partial(t5_config_from_json, strict=strict),
                               "a transformers T5EncoderModel folder")


def load_t5_folder(path, dtype: Any = None, *, param_dtype: Any = None, variant: str | None = None,
                   strict: bool = True, allow_decoder: bool = False) -> tuple:
    """(T5Encoder module, params, T5Config) from a transformers T5EncoderModel folder.

    dtype: the compute dtype, "float32" (None) or "bfloat16"; param_dtype: the params' dtype (default:
    dtype). The config and the weights' keys and shapes are checked before any tensor is converted.
    strict: refuse config.json fields the encoder does not know (see t5_config_from_json).
    """
    compute = resolve_dtype(dtype)
    store = resolve_dtype(param_dtype) if param_dtype is not None else compute
    config = read_t5_config(path, strict=strict)
    sd = load_t5_state_dict(path, variant)
    params = t5_params_from_state_dict(sd, config, store, allow_decoder=allow_decoder)
    return T5Encoder(config, dtype=compute, param_dtype=store), params, config
