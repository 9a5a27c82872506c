"""unCLIP's (Karlo's) diffusers folders besides the U-Nets: the prior (`PriorTransformer`, prior/) and the text
projection (`UnCLIPTextProjModel`, text_proj/), each config.json + diffusion_pytorch_model.safetensors (or .bin).

    load_prior_folder(folder, dtype=None) -> (module, params, PriorConfig)
    load_text_proj_folder(folder) -> (module, params, TextProjConfig)
    prior_params_from_state_dict(sd, config), text_proj_params_from_state_dict(sd, config)   (strict)
    prior_state_dict_from_params(params, config), text_proj_state_dict_from_params(params, config)
    expected_prior_shapes(config), expected_text_proj_shapes(config)

As `convert.diffusers` does for the U-Nets: config.json is checked first (ValueError naming the field outside
the supported subset, see `models.prior` / `models.unclip_text_proj`), then every state_dict key against the
layout the module's parameters give (one ValueError listing the missing, unexpected and wrongly shaped keys),
before anything is converted. The mapping is mechanical: a Flax path is the key with each list index joined
to its list's name (`transformer_blocks.0.attn1.to_out.0.weight` <-> `transformer_blocks_0/attn1/to_out_0/
kernel`, `ff.net.2` <-> `ff/net_2`); `weight` is `kernel` for Linear layers (transposed) and `scale` for
LayerNorms; `bias` and the bare parameters (positional_embedding, prd_embedding, clip_mean, clip_std,
learned_classifier_free_guidance_embeddings) keep their names and layout. Params are float32 numpy arrays.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff.convert.common import check_state_dict, layout_params, make_layout, state_dict_from_layout
from jaxdiff.convert.diffusers import load_diffusers_config, load_diffusers_state_dict
from jaxdiff.models.layers import abstract_params
from jaxdiff.models.prior import PriorConfig, PriorTransformer, prior_config
from jaxdiff.models.unclip_text_proj import TextProjConfig, UnCLIPTextProjModel, text_proj_config

__all__ = ["LIST_NAMES", "folder_module", "expected_prior_shapes", "expected_text_proj_shapes", "load_prior_folder",
           "load_text_proj_folder", "prior_params_from_state_dict", "prior_state_dict_from_params",
           "text_proj_params_from_state_dict", "text_proj_state_dict_from_params"]

LIST_NAMES = ("transformer_blocks", "to_out", "net")
_INDEXED = re.compile(rf"^({'|'.join(LIST_NAMES)})_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight"}


def _torch_key(path: tuple) -> str:
    return ".".join([_INDEXED.sub(r"\1.\2", p) for p in path[:-1]] + [_LEAF.get(path[-1], path[-1])])


def _transform(path: tuple, shape: tuple) -> str:
    return "dense" if path[-1] == "kernel" else "identity"


def _layout(module, *input_shapes: tuple) -> tuple:
    """The layout of `module`'s params, initialised (abstractly) on float32 inputs of these shapes."""
    abstract = abstract_params(module, *(jax.ShapeDtypeStruct(s, jnp.float32) for s in input_shapes))
    return make_layout(abstract, _torch_key, _transform)


@functools.lru_cache(maxsize=16)
def _prior_layout(cfg: PriorConfig) -> tuple:
    return _layout(PriorTransformer(cfg), (1, cfg.embedding_dim), (1,), (1, cfg.embedding_proj_dim),
                   (1, cfg.num_embeddings, cfg.embedding_dim))


@functools.lru_cache(maxsize=16)
def _text_proj_layout(cfg: TextProjConfig) -> tuple:
    c = cfg.clip_embeddings_dim
    return _layout(UnCLIPTextProjModel(cfg), (1, c), (1, c), (1, 1, c))


def expected_prior_shapes(config) -> dict:
    """diffusers state_dict key -> torch shape of the PriorTransformer of `config` (dict or PriorConfig)."""
    return {e.key: e.shape for e in _prior_layout(prior_config(config))}


def expected_text_proj_shapes(config) -> dict:
    """diffusers state_dict key -> torch shape of the UnCLIPTextProjModel of `config`."""
    return {e.key: e.shape for e in _text_proj_layout(text_proj_config(config))}


def _params(layout: tuple, state_dict: Mapping, what: str) -> dict:
    check_state_dict(layout, state_dict, f"the state_dict does not fit the {what} built from config.json", limit=20)
    return layout_params(layout, state_dict)


def _state_dict(layout: tuple, params: Mapping) -> dict:
    return state_dict_from_layout(params.get("params", params), layout)


def prior_params_from_state_dict(state_dict: Mapping, config) -> dict:
    """PriorTransformer params (float32 numpy, nested dicts) from a diffusers state_dict; strict."""
    return _params(_prior_layout(prior_config(config)), state_dict, "PriorTransformer")


def prior_state_dict_from_params(params: Mapping, config) -> dict:
    """The inverse: params -> {diffusers key: float32 np.ndarray, torch layout}."""
    return _state_dict(_prior_layout(prior_config(config)), params)


def text_proj_params_from_state_dict(state_dict: Mapping, config) -> dict:
    """UnCLIPTextProjModel params (float32 numpy, nested dicts) from a diffusers state_dict; strict."""
    return _params(_text_proj_layout(text_proj_config(config)), state_dict, "UnCLIPTextProjModel")


def text_proj_state_dict_from_params(params: Mapping, config) -> dict:
    """The inverse: params -> {diffusers key: float32 np.ndarray, torch layout}."""
    return _state_dict(_text_proj_layout(text_proj_config(config)), params)


def load_prior_folder(folder, dtype: Any = None) -> tuple:
    """A diffusers PriorTransformer folder -> (module, params, PriorConfig); config.json is checked before the
    weights are read. dtype: the compute dtype, "float32" (None) or "bfloat16" (params stay float32)."""
    from jaxdiff.models.layers import resolve_dtype

    cfg = prior_config(load_diffusers_config(folder))
    params = prior_params_from_state_dict(load_diffusers_state_dict(folder), cfg)
    return PriorTransformer(cfg, dtype=resolve_dtype(dtype)), params, cfg


def load_text_proj_folder(folder) -> tuple:
    """A diffusers UnCLIPTextProjModel folder -> (module, params, TextProjConfig); config.json first."""
    cfg = text_proj_config(load_diffusers_config(folder))
    params = text_proj_params_from_state_dict(load_diffusers_state_dict(folder), cfg)
    return UnCLIPTextProjModel(cfg), params, cfg


def folder_module(kind: str, model_config: Mapping, dtype: Any = None) -> tuple:
    """(module, abstract float32 params) of a converted "prior" / "unclip_text_proj" from its config.json."""
    from jaxdiff.models.layers import resolve_dtype

    if kind == "prior":
        cfg = prior_config(model_config)
        module = PriorTransformer(cfg, dtype=resolve_dtype(dtype))
    else:
        cfg = text_proj_config(model_config)
        module = UnCLIPTextProjModel(cfg)
    return module, _abstract(kind, cfg)


def _abstract(kind: str, cfg) -> dict:
    from flax.traverse_util import unflatten_dict

    layout = _prior_layout(cfg) if kind == "prior" else _text_proj_layout(cfg)
    return unflatten_dict({e.path: jax.ShapeDtypeStruct(e.flax_shape, jnp.float32) for e in layout})
