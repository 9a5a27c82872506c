"""diffusers U-Net folders (config.json + diffusion_pytorch_model.safetensors / .bin) -> jaxdiff models.

    load_diffusers_unet(folder, dtype=None, variant=None) -> (module, params, config)
    unet2d_params_from_state_dict(state_dict, config) -> params        (strict; ValueError lists every problem)
    unet2d_state_dict_from_params(params, config) -> {key: np.ndarray}  (the inverse, torch layout)
    expected_unet2d_shapes(config) -> {key: torch shape}
    abstract_unet2d_params(config) -> the params' shapes (jax.eval_shape: nothing allocated)

The weights are read by `convert.common` (`find_weights`, `read_weights`): safetensors lazily, tensor
by tensor, without torch; sharded *.index.json checkpoints and variants ("fp16") as diffusers names them;
.bin files with torch (imported only then).

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

import collections
import functools
import re
from collections.abc import Mapping
from typing import Any

from jaxdiff.convert.common import (
    describe_key_problem,
    find_weights,
    key_problems,
    layout_params,
    make_layout,
    read_config_json,
    read_weights,
    shapes_of,
    state_dict_from_layout,
)

__all__ = ["LIST_NAMES", "abstract_unet2d_params", "expected_unet2d_shapes", "flax_path", "load_diffusers_config",
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


def abstract_unet2d_params(config):
    """Shapes of the module's params (float32) for a raw or checked config: jax.eval_shape of init on the
    smallest input (nothing allocated or computed)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.layers import abstract_params
    from jaxdiff.models.unet2d_condition import UNet2DConditionConfig

    cfg = unet2d_config(config)
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
    return abstract_params(module, *args, **kw)


def _transform(path: tuple, shape: tuple) -> str:
    if path[-1] != "kernel":
        return "identity"
    return "conv2d" if len(shape) == 4 else "dense"


@functools.lru_cache(maxsize=16)
def _layout(cfg) -> tuple:
    return make_layout(abstract_unet2d_params(cfg), torch_key, _transform)


def expected_unet2d_shapes(config) -> dict:
    """diffusers state_dict key -> torch shape the module built from `config` needs."""
    return {e.key: e.shape for e in _layout(unet2d_config(config))}


# --- Conversion ---------------------------------------------------------------------------------------

def _mismatch(expected: dict, given: dict, cls: str, limit: int = 20) -> str | None:
    """None when `given` (key -> shape) is exactly `expected`; else the error text: counts, then up to
    `limit` lines for each kind of problem (wrong shape, unexpected, missing)."""
    groups = collections.defaultdict(list)  # shape, unexpected, missing: in that order
    for problem, key in key_problems(expected, given):
        groups[problem].append(f"  {describe_key_problem(problem, key, expected, given)}")
    if not groups:
        return None
    lines = [(f"the state_dict does not fit the {cls} built from config.json ({len(groups['missing'])} missing, "
              f"{len(groups['unexpected'])} unexpected, {len(groups['shape'])} wrongly shaped keys):")]
    for group in groups.values():
        lines += group[:limit] + ([f"  ... and {len(group) - limit} more"] if len(group) > limit else [])
    return "\n".join(lines)


def unet2d_params_from_state_dict(state_dict: Mapping, config) -> dict:
    """Flax params (float32 numpy arrays, nested dicts; use as {'params': params}) from a diffusers
    state_dict (numpy arrays or torch tensors) of the U-Net `config` describes. Strict: ValueError listing
    every missing, unexpected or wrongly shaped key, or a non-floating array."""
    cfg = unet2d_config(config)
    layout = _layout(cfg)
    err = _mismatch({e.key: e.shape for e in layout}, shapes_of(state_dict), type(unet2d_module(cfg)).__name__)
    if err:
        raise ValueError(err)
    return layout_params(layout, state_dict)  # tensor by tensor: a SafetensorsDict reads each only now


def unet2d_state_dict_from_params(params: Mapping, config) -> dict:
    """The inverse: jaxdiff params -> {diffusers state_dict key: float32 np.ndarray in torch layout}."""
    return state_dict_from_layout(params, _layout(unet2d_config(config)))


# --- Folders ------------------------------------------------------------------------------------------

def load_diffusers_config(folder) -> dict:
    """FOLDER/config.json as a dict."""
    return read_config_json(folder, "a diffusers model folder")


def load_diffusers_state_dict(folder, variant: str | None = None) -> Mapping:
    """{key: np.ndarray} of a diffusers model folder's weights, found as diffusers looks for them:
    diffusion_pytorch_model.safetensors (read lazily, tensor by tensor: a common.SafetensorsDict), its
    sharded index, or else diffusion_pytorch_model.bin or its index (needs PyTorch, imported only then);
    `variant="fp16"` reads diffusion_pytorch_model.fp16.safetensors etc."""
    return read_weights(find_weights(folder, *WEIGHTS, variant=variant, what="diffusers weights"))


def load_diffusers_unet(folder, dtype: Any = None, variant: str | None = None):
    """A diffusers U-Net folder -> (module, params, config).

    config.json is checked (ValueError naming a field outside the subset) before the weights are read;
    the weights must then fit the module exactly (ValueError listing every key problem). params are
    float32 (nested dicts of numpy arrays): module.apply({'params': params}, ...). dtype: the compute
    dtype, "float32" (None) or "bfloat16"."""
    cfg = unet2d_config(load_diffusers_config(folder))
    module = unet2d_module(cfg, dtype)
    params = unet2d_params_from_state_dict(load_diffusers_state_dict(folder, variant), cfg)
    return module, params, cfg
