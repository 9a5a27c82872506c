"""Loading transformers' CLIP text encoders (CLIPTextModelWithProjection / CLIPTextModel folders, e.g. unCLIP's
(Karlo's) text_encoder/).

    module, params, config = load_clip_text_folder("karlo-v1-alpha/text_encoder")        # float32
    params = clip_text_params_from_state_dict(state_dict, config)                         # a state_dict in memory
    out = jaxdiff.models.clip_text.encode_clip_text(module, params, tokens, mask)

A folder holds config.json (transformers' CLIPTextConfig; `architectures` tells whether the projection is
there) and the weights: model.safetensors, a sharded model.safetensors.index.json, or (read with torch,
which is then needed) pytorch_model.bin or its index; `variant="fp16"` reads model.fp16.safetensors as
transformers does.

Key map (`jaxdiff.models.clip_text` names the params after the keys): `<path>.<leaf>` <-> params[<path with
".<i>" written "_<i>">][leaf]; Linear weights are `kernel` (transposed: (out, in) -> (in, out)), LayerNorm
weights `scale`, the embeddings' weights `embedding`, biases `bias`. Every expected key must be there with
its shape and nothing else (ValueError listing the missing, unexpected and wrongly shaped keys), except
`text_model.embeddings.position_ids`, the buffer older transformers saved: accepted when it holds
0 .. max_position_embeddings - 1, as transformers ignores it. Params come back as float32 numpy arrays.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdiff.convert.common import (
    as_numpy,
    find_weights,
    layout_params,
    make_layout,
    mismatch_error,
    read_checked_config,
    read_weights,
    shapes_of,
    state_dict_from_layout,
)
from jaxdiff.convert.transformers import WEIGHTS
from jaxdiff.models.clip_text import (
    CLIPTextConfig,
    CLIPTextEncoder,
    abstract_clip_text_params,
    clip_text_config_from_json,
)
from jaxdiff.models.layers import resolve_dtype

__all__ = ["POSITION_IDS_KEY", "clip_text_layout", "clip_text_params_from_state_dict",
           "clip_text_state_dict_from_params", "expected_clip_text_shapes", "find_clip_text_weights",
           "load_clip_text_folder", "load_clip_text_state_dict", "read_clip_text_config"]

POSITION_IDS_KEY = "text_model.embeddings.position_ids"
_INDEXED = re.compile(r"^(layers)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _torch_key(path: tuple) -> str:
    return ".".join([_INDEXED.sub(r"\1.\2", p) for p in path[:-1]] + [_LEAF[path[-1]]])


@functools.lru_cache(maxsize=8)
def clip_text_layout(config: CLIPTextConfig) -> tuple:
    """`convert.common.Entry` per parameter of the encoder of `config` (state_dict key, torch shape, transform)."""
    abstract = abstract_clip_text_params(CLIPTextEncoder(config))
    return make_layout(abstract, _torch_key, lambda path, shape: "dense" if path[-1] == "kernel" else "identity")


def expected_clip_text_shapes(config: CLIPTextConfig) -> dict:
    """{state_dict key: torch shape} of a transformers model of `config` (without the position_ids buffer)."""
    return {e.key: e.shape for e in clip_text_layout(config)}


def _describe(config: CLIPTextConfig) -> str:
    kind = "CLIPTextModelWithProjection" if config.with_projection else "CLIPTextModel"
    return (f"the CLIP text state_dict does not fit the {kind} of config.json (hidden_size={config.hidden_size}, "
            f"num_hidden_layers={config.num_hidden_layers}, intermediate_size={config.intermediate_size}, "
            f"vocab_size={config.vocab_size}, max_position_embeddings={config.max_position_embeddings}"
            + (f", projection_dim={config.projection_dim}" if config.with_projection else "") + ")")


def clip_text_params_from_state_dict(state_dict: Mapping, config: CLIPTextConfig, dtype: Any = None) -> dict:
    """The CLIPTextEncoder's params (nested dicts of numpy arrays, float32 or `dtype`) from a transformers
    state_dict ({key: numpy array or torch tensor}); strict: see the module doc."""
    target = np.dtype(resolve_dtype(dtype))
    layout = clip_text_layout(config)
    given = shapes_of(state_dict)
    position_ids = given.pop(POSITION_IDS_KEY, None)
    footer = None
    if config.with_projection and "text_projection.weight" not in given:
        footer = "  (a CLIPTextModel's weights? config.json's architectures says CLIPTextModelWithProjection)"
    elif not config.with_projection and "text_projection.weight" in given:
        footer = "  (a CLIPTextModelWithProjection's weights? config.json's architectures says CLIPTextModel)"
    err = mismatch_error(_describe(config), {e.key: e.shape for e in layout}, given, footer=footer, limit=20)
    if err:
        raise ValueError(err)
    if position_ids is not None:
        ids = as_numpy(state_dict[POSITION_IDS_KEY])
        want = np.arange(config.max_position_embeddings)
        if ids.size != want.size or not np.array_equal(ids.reshape(-1), want):
            raise ValueError(f"key {POSITION_IDS_KEY!r} {tuple(ids.shape)} is not 0 .. "
                             f"{config.max_position_embeddings - 1} (transformers' buffer); remove it or fix it")
    return layout_params(layout, state_dict, target)


def clip_text_state_dict_from_params(params: Mapping, config: CLIPTextConfig) -> dict:
    """The inverse: params -> {transformers state_dict key: float32 np.ndarray in torch layout}."""
    return state_dict_from_layout(params.get("params", params), clip_text_layout(config))


# --- folders (convert.common's readers) ------------------------------------------------------------------


def find_clip_text_weights(folder, variant: str | None = None) -> tuple:
    """(format, [files]) of the weights in a transformers model folder: "safetensors" or "torch"."""
    files = find_weights(folder, *WEIGHTS, variant=variant, what="CLIP text weights")
    return ("safetensors" if files[0].suffix == ".safetensors" else "torch"), files


def load_clip_text_state_dict(folder, variant: str | None = None) -> Mapping:
    """{key: array} of the folder's weights (safetensors read lazily with numpy, a common.SafetensorsDict;
    .bin files need torch)."""
    return read_weights(find_clip_text_weights(folder, variant)[1])


def read_clip_text_config(folder, *, strict: bool = True) -> CLIPTextConfig:
    """The checked CLIPTextConfig of FOLDER/config.json (ValueError naming the file and the field)."""
    return read_checked_config(folder, functools.partial(clip_text_config_from_json, strict=strict),
                               "a transformers CLIPTextModel folder")


def load_clip_text_folder(path, dtype: Any = None, *, variant: str | None = None, strict: bool = True) -> tuple:
    """(CLIPTextEncoder module, params, CLIPTextConfig) from a transformers CLIPTextModelWithProjection /
    CLIPTextModel folder. dtype: the compute dtype, "float32" (None) or "bfloat16" (params stay float32).
    config.json is checked before the weights are read; then keys and shapes before anything is converted."""
    compute = resolve_dtype(dtype)
    config = read_clip_text_config(path, strict=strict)
    params = clip_text_params_from_state_dict(load_clip_text_state_dict(path, variant), config)
    return CLIPTextEncoder(config, dtype=compute), params, config
