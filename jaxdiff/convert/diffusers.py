"""diffusers U-Net folders (config.json + diffusion_pytorch_model.safetensors / .bin) -> jaxdiff models.

    load_diffusers_unet(folder, dtype=None) -> (module, params, config)
    unet2d_params_from_state_dict(state_dict, config) -> params        (strict; ValueError lists every problem)
    unet2d_state_dict_from_params(params, config) -> {key: np.ndarray}  (the inverse, torch layout)
    expected_unet2d_shapes(config) -> {key: torch shape}

`config` is the config.json dict or the checked config (`models.unet2d_condition.UNet2DConditionConfig`
for `UNet2DConditionModel`, `models.unet2d.UNet2DConfig` for `UNet2DModel`; a dict's `_class_name` picks
the class; without it, a dict with UNet2DModel's own fields (add_attention, attn_norm_num_groups, ...) and
no cross_attention_dim is a UNet2DModel, any other a UNet2DConditionModel). The config is checked first (ValueError naming the field
outside the supported subset), then every state_dict key against the layout the module's parameters
give: missing, unexpected and wrongly shaped keys are all listed in one ValueError, before anything is
compiled.

The mapping is mechanical: a Flax parameter path is the state_dict key with every list index joined to
its list's name (`down_blocks.1.attentions.0.to_out.0.weight` <-> `down_blocks_1/attentions_0/to_out_0/
kernel`; LIST_NAMES are the lists); the leaf `weight` is `kernel` for Linear (transposed, (out, in) ->
(in, out)) and Conv layers ((out, in, kh, kw) -> (kh, kw, in, out)) and `scale` for GroupNorm / LayerNorm;
`bias` and `positional_embedding` keep their names and layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LIST_NAMES", "expected_unet2d_shapes", "flax_path", "load_diffusers_config",
           "load_diffusers_state_dict", "load_diffusers_unet", "torch_key", "unet2d_config",
           "unet2d_module", "unet2d_params_from_state_dict", "unet2d_state_dict_from_params"]

LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")
_INDEXED = re.compile(rf"^({'|'.join(LIST_NAMES)})_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "positional_embedding": "positional_embedding"}
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CLASSES = ("UNet2DConditionModel", "UNet2DModel")
_UNET2D_ONLY = {"add_attention", "attn_norm_num_groups", "downsample_type", "upsample_type", "num_train_timesteps"}


def torch_key(path: tuple) -> str:
    """Flax parameter path -> diffusers state_dict key."""
    mods = [_INDEXED.sub(r"\1.\2", p) for p in path[:-1]]
    return ".".join(mods + [_LEAF_TO_TORCH[path[-1]]])


def flax_path(key: str, ndim: int) -> tuple:
    """diffusers state_dict key (of an array with `ndim` dimensions) -> Flax parameter path."""
    parts = key.split(".")
    out = []
    for p in parts[:-1]:
        if p.isdigit() and out and out[-1] in LIST_NAMES:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    leaf = parts[-1]
    if leaf == "weight":
        leaf = "kernel" if ndim in (2, 4) else "scale"
    return tuple(out) + (leaf,)


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple  # Flax path
    key: str  # state_dict key
    shape: tuple  # torch shape
    transform: str  # conv2d | dense | identity


def _to_flax(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv2d":
        return a.transpose(2, 3, 1, 0)
    return a.T if transform == "dense" else a


def _to_torch(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv2d":
        return a.transpose(3, 2, 0, 1)
    return a.T if transform == "dense" else a


# --- Configs and modules ------------------------------------------------------------------------------

def unet2d_config(config):
    """The checked config of a diffusers U-Net: a dict (config.json; `_class_name` picks the class, see the
    module docstring) or an already checked config, returned as is."""
    from jaxdiff.models.unet2d import UNet2DConfig, unet2d_model_config
    from jaxdiff.models.unet2d_condition import (
        UNet2DConditionConfig,
        unet2d_condition_config,
    )

    if isinstance(config, (UNet2DConditionConfig, UNet2DConfig)):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a diffusers config.json dict, got {type(config).__name__}")
    cls = config.get("_class_name")
    if cls is None:  # guess: UNet2DModel's own fields, and no cross-attention
        cls = "UNet2DModel" if set(config) & _UNET2D_ONLY and "cross_attention_dim" not in config else CLASSES[0]
    if cls not in CLASSES:
        raise ValueError(f"config.json field _class_name={cls!r} is not supported; allowed: {' / '.join(CLASSES)}")
    return unet2d_model_config(config) if cls == "UNet2DModel" else unet2d_condition_config(config)


def unet2d_module(config, dtype: Any = None):
    """The Flax module of a (checked or raw) config; dtype: compute dtype, "float32" (None) or "bfloat16"."""
    from jaxdiff.models.layers import resolve_dtype
    from jaxdiff.models.unet2d_condition import (
        UNet2DConditionConfig,
        UNet2DConditionModel,
    )

    cfg = unet2d_config(config)
    dt = resolve_dtype(dtype)
    if isinstance(cfg, UNet2DConditionConfig):
        return UNet2DConditionModel(cfg, dtype=dt)
    from jaxdiff.models.unet2d import UNet2DModel

    return UNet2DModel(cfg, dtype=dt)


def _abstract_params(cfg):
    """Shapes of the module's params: jax.eval_shape of init on the smallest input (nothing computed)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.unet2d_condition import UNet2DConditionConfig

    module = unet2d_module(cfg)
    s = 2 ** (len(cfg.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    args, kw = (x, t), {}
    if isinstance(cfg, UNet2DConditionConfig):
        args += (jax.ShapeDtypeStruct((1, 1, cfg.context_dim), jnp.float32),)
    if cfg.class_embed_type == "timestep":
        kw["class_labels"] = t
    elif cfg.class_embed_type == "identity":
        kw["class_labels"] = jax.ShapeDtypeStruct((1, cfg.time_embed_dim), jnp.float32)
    return jax.eval_shape(lambda a, k: module.init(jax.random.key(0), *a, **k), args, kw)["params"]


@functools.lru_cache(maxsize=16)
def _layout(cfg) -> tuple:
    from flax.traverse_util import flatten_dict

    entries = []
    for path, leaf in flatten_dict(_abstract_params(cfg)).items():
        shape = tuple(leaf.shape)
        tr = "conv2d" if path[-1] == "kernel" and len(shape) == 4 else "dense" if path[-1] == "kernel" else "identity"
        torch_shape = _to_torch(np.broadcast_to(np.float32(0), shape), tr).shape
        entries.append(_Entry(path, torch_key(path), tuple(torch_shape), tr))
    return tuple(entries)


def expected_unet2d_shapes(config) -> dict:
    """diffusers state_dict key -> torch shape the module built from `config` needs."""
    return {e.key: e.shape for e in _layout(unet2d_config(config))}


# --- Conversion ---------------------------------------------------------------------------------------

def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _mismatch(expected: dict, given: dict, cls: str, limit: int = 20) -> str | None:
    """None when `given` (key -> shape) is exactly `expected`; else the error text: counts, then up to
    `limit` lines for each kind of problem (wrong shape, unexpected, missing)."""
    wrong = [f"  key {k!r} has shape {tuple(given[k])}, the model needs {tuple(expected[k])}"
             for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]
    unexpected = [f"  unexpected key {k!r} {tuple(given[k])} (not in the model)" for k in given if k not in expected]
    missing = [f"  missing key {k!r} {tuple(expected[k])} (the model needs it)" for k in expected if k not in given]
    if not (wrong or unexpected or missing):
        return None
    lines = [(f"the state_dict does not fit the {cls} built from config.json ({len(missing)} missing, "
              f"{len(unexpected)} unexpected, {len(wrong)} wrongly shaped keys):")]
    for group in (wrong, unexpected, missing):
        lines += group[:limit] + ([f"  ... and {len(group) - limit} more"] if len(group) > limit else [])
    return "\n".join(lines)


def unet2d_params_from_state_dict(state_dict: Mapping, config) -> dict:
    """Flax params (float32 numpy arrays, nested dicts; use as {'params': params}) from a diffusers
    state_dict (numpy arrays or torch tensors) of the U-Net `config` describes. Strict: ValueError listing
    every missing, unexpected or wrongly shaped key, or a non-floating array."""
    import jax.numpy as jnp
    from flax.traverse_util import unflatten_dict

    cfg = unet2d_config(config)
    layout = _layout(cfg)
    sd = {str(k): v for k, v in state_dict.items()}
    err = _mismatch({e.key: e.shape for e in layout}, {k: tuple(np.shape(v)) for k, v in sd.items()},
                    type(unet2d_module(cfg)).__name__)
    if err:
        raise ValueError(err)
    flat = {}
    for e in layout:
        a = _as_numpy(sd[e.key])
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"key {e.key!r} has dtype {a.dtype}, expected floating point")
        flat[e.path] = np.ascontiguousarray(_to_flax(a.astype(np.float32), e.transform))
    return unflatten_dict(flat)


def unet2d_state_dict_from_params(params: Mapping, config) -> dict:
    """The inverse: jaxdiff params -> {diffusers state_dict key: float32 np.ndarray in torch layout}."""
    from flax.traverse_util import flatten_dict

    cfg = unet2d_config(config)
    flat = flatten_dict(dict(params))
    out = {}
    for e in _layout(cfg):
        if e.path not in flat:
            raise ValueError(f"params have no {'/'.join(e.path)} (state_dict key {e.key!r})")
        out[e.key] = np.ascontiguousarray(_to_torch(np.asarray(flat[e.path], np.float32), e.transform))
    return out


# --- Folders ------------------------------------------------------------------------------------------

def load_diffusers_config(folder) -> dict:
    """FOLDER/config.json as a dict."""
    path = Path(os.fspath(folder)) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_diffusers_state_dict(folder) -> dict:
    """{key: np.ndarray} from FOLDER/diffusion_pytorch_model.safetensors (the safetensors library, numpy),
    or else FOLDER/diffusion_pytorch_model.bin (needs PyTorch, imported only then)."""
    folder = Path(os.fspath(folder))
    st, pt = (folder / w for w in WEIGHTS)
    if st.is_file():
        from safetensors.numpy import load_file

        return dict(load_file(str(st)))
    if pt.is_file():
        try:
            import torch
        except ImportError:
            raise ImportError(f"reading {pt} needs PyTorch (pip install torch), or save the weights as "
                              f"{WEIGHTS[0]}") from None
        sd = torch.load(str(pt), map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise ValueError(f"{pt} does not hold a state_dict (got {type(sd).__name__})")
        return {str(k): _as_numpy(v) for k, v in sd.items()}
    raise FileNotFoundError(f"no weights in {folder}: expected {' or '.join(WEIGHTS)}")


def load_diffusers_unet(folder, dtype: Any = None):
    """A diffusers U-Net folder -> (module, params, config).

    config.json is checked (ValueError naming a field outside the subset) before the weights are read;
    the weights must then fit the module exactly (ValueError listing every key problem). params are
    float32 (nested dicts of numpy arrays): module.apply({'params': params}, ...). dtype: the compute
    dtype, "float32" (None) or "bfloat16"."""
    cfg = unet2d_config(load_diffusers_config(folder))
    module = unet2d_module(cfg, dtype)
    params = unet2d_params_from_state_dict(load_diffusers_state_dict(folder), cfg)
    return module, params, cfg
