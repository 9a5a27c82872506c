"""diffusers' `UNet2DModel` in Flax linen (NHWC): the subset unCLIP's (Karlo's) super-resolution U-Nets use.

Built from a diffusers `config.json` (as a dict): `unet2d_model_config(d)` checks every field and returns a
frozen `UNet2DConfig`; `UNet2DModel(config, dtype)` is the network.

    module.apply({'params': params}, x, t, class_labels=None, train=False) -> [B, H, W, out_channels] float32

  x [B, H, W, in_channels] NHWC (H, W divisible by 2 ** (levels - 1); unCLIP's upsamplers take the noisy
  image then the upsampled low-resolution image, 6 channels); t [B] or a scalar; class_labels: [B] with
  class_embed_type "timestep", [B, time_embed_dim] with "identity".

The subset (anything else is refused, naming the field and what is allowed): down blocks
`ResnetDownsampleBlock2D`, up blocks `ResnetUpsampleBlock2D` (the ResNet blocks and blocks of
`unet2d_condition`), mid block `UNetMidBlock2D` (resnet, [self-attention], resnet; resnets and attention
output divided by `mid_block_scale_factor`) or none; time embedding sinusoidal (`flip_sin_to_cos`,
`freq_shift`) -> linear_1 -> SiLU -> linear_2 (SiLU whatever act_fn is, as diffusers); class embedding
"timestep" / "identity"; `act_fn` in the ResNet blocks; the output head GroupNorm - SiLU - conv_out.
The mid block's self-attention: GroupNorm(attn_norm_num_groups, or norm_num_groups when
resnet_time_scale_shift is "default", else none; eps norm_eps) of the pixels, to_q / to_k / to_v, heads
of `attention_head_dim` channels (null: one head), to_out.0, plus the input.

Parameter names follow diffusers' state_dict keys as in `unet2d_condition` (`jaxdiff.convert.diffusers`
maps them; `_class_name` "UNet2DModel" in config.json picks this model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import (
    Conv,
    Dense,
    GroupNorm32,
    cast,
    merge_heads,
    resolve_dtype,
    split_heads,
)
from jaxdiff.models.unet2d_condition import (
    ACTIVATIONS,
    DiffusersModel,
    DownBlock,
    ResnetBlock2D,
    ResnetOptions,
    TimestepEmbedding,
    UNetLevels,
    UpBlock,
    checked_fields,
    config_choice,
    config_error,
    norm_act,
    sinusoidal_embedding,
)
from jaxdiff.ops.attention import attention
from jaxdiff.util.config import is_int

__all__ = ["MidBlock2D", "SpatialSelfAttention", "UNet2DConfig", "UNet2DModel", "unet2d_model_config"]

Dtype = Any
_WHAT = "jaxdiff's UNet2DModel (the unCLIP super-resolution subset of diffusers')"

# Fields that decide nothing in this subset: accepted with any value and ignored.
IGNORED_FIELDS = {
    "sample_size": "the size is the input's",
    "downsample_padding": "only convolutional down-samplers use it; these blocks down-sample in ResNet blocks",
    "downsample_type": "only the Attn* / K* blocks use it",
    "upsample_type": "only the Attn* / K* blocks use it",
    "num_train_timesteps": "only time_embedding_type 'learned' uses it",
}
DEFAULT_ONLY_FIELDS = {"time_embedding_type": "positional", "num_class_embeds": None}
SUPPORTED_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.0,
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
}


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(UNetLevels):
    """A checked UNet2DModel config.json (`unet2d_model_config` builds it)."""

    in_channels: int
    out_channels: int
    center_input_sample: bool
    time_embedding_dim: int | None
    freq_shift: float
    flip_sin_to_cos: bool
    down_block_types: tuple
    mid_block_type: str | None
    up_block_types: tuple
    block_out_channels: tuple
    layers_per_block: int
    mid_block_scale_factor: float
    dropout: float
    act_fn: str
    attention_head_dim: int | None
    norm_num_groups: int
    attn_norm_num_groups: int | None
    norm_eps: float
    resnet_time_scale_shift: str
    add_attention: bool
    class_embed_type: str | None
    sample_size: Any = None

    def resnet_options(self, output_scale_factor: float = 1.0) -> ResnetOptions:
        return ResnetOptions(groups=self.norm_num_groups, eps=self.norm_eps, act=self.act_fn,
                             scale_shift=self.resnet_time_scale_shift == "scale_shift", skip_time_act=False,
                             output_scale_factor=output_scale_factor, dropout=self.dropout)

    @property
    def mid_attention_groups(self) -> int | None:
        """Groups of the mid-block attention's GroupNorm (None: no norm), as UNetMidBlock2D chooses."""
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return self.norm_num_groups if self.resnet_time_scale_shift == "default" else None

    @property
    def mid_attention_heads(self) -> int:
        c = self.block_out_channels[-1]
        return 1 if self.attention_head_dim is None else c // self.attention_head_dim

    def group_norm_channels(self) -> list:
        """(what, channels, groups) of every GroupNorm of the layout (diffusers' constructor)."""
        boc, n, layers, g = self.block_out_channels, self.levels, self.layers_per_block, self.norm_num_groups
        out, norms = boc[0], [("conv_norm_out", boc[0], g)]
        for i in range(n):
            cin, out = out, boc[i]
            norms += [(f"down_blocks.{i}", c, g) for c in [cin] + [out] * layers]
        if self.mid_block_type is not None:
            norms.append(("mid_block", boc[-1], g))
            if self.add_attention and self.mid_attention_groups is not None:
                norms.append(("mid_block.attentions.0.group_norm", boc[-1], self.mid_attention_groups))
        rev, out = boc[::-1], boc[-1]
        for i in range(n):
            prev, out, cin = out, rev[i], rev[min(i + 1, n - 1)]
            norms += [(f"up_blocks.{i}", (prev if j == 0 else out) + (cin if j == layers else out), g)
                      for j in range(layers + 1)]
            norms.append((f"up_blocks.{i}", out, g))
        return norms


def _pos_int(v) -> bool:
    return is_int(v) and v >= 1


def unet2d_model_config(config: Mapping) -> UNet2DConfig:
    """Check a diffusers UNet2DModel config.json (a dict) against the supported subset (see the module
    docstring); keys starting with "_" are ignored except `_class_name`, which must be "UNet2DModel" when
    present; absent fields take diffusers' defaults. ValueError names the field and the values allowed."""
    if isinstance(config, UNet2DConfig):
        return config
    d = checked_fields(config, "UNet2DModel", SUPPORTED_DEFAULTS, IGNORED_FIELDS, DEFAULT_ONLY_FIELDS, _WHAT)
    for field, allowed in (("down_block_types", "ResnetDownsampleBlock2D"), ("up_block_types", "ResnetUpsampleBlock2D")):
        v = d[field]
        if not isinstance(v, (list, tuple)) or not v or any(t != allowed for t in v):
            bad = next((t for t in v if t != allowed), None) if isinstance(v, (list, tuple)) else None
            raise config_error(field, v, f"a non-empty list of {allowed}",
                               f"{bad!r} is not in the subset" if bad else "", _WHAT)
    mid = config_choice(d, "mid_block_type", ("UNetMidBlock2D", None), what=_WHAT)
    boc = d["block_out_channels"]
    if not isinstance(boc, (list, tuple)) or not boc or not all(_pos_int(c) for c in boc):
        raise config_error("block_out_channels", boc, "a non-empty list of positive integers", what=_WHAT)
    n = len(boc)
    if len(d["down_block_types"]) != n or len(d["up_block_types"]) != n:
        raise ValueError(f"config.json: block_out_channels has {n} entries, down_block_types "
                         f"{len(d['down_block_types'])} and up_block_types {len(d['up_block_types'])}; they must "
                         f"have the same length")
    for field in ("in_channels", "out_channels", "norm_num_groups", "layers_per_block"):
        if not _pos_int(d[field]):
            raise config_error(field, d[field], "a positive integer", what=_WHAT)
    for field in ("time_embedding_dim", "attention_head_dim", "attn_norm_num_groups"):
        if d[field] is not None and not _pos_int(d[field]):
            raise config_error(field, d[field], "null or a positive integer", what=_WHAT)
    for field in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        if not isinstance(d[field], bool):
            raise config_error(field, d[field], "true / false", what=_WHAT)
    for field in ("freq_shift", "mid_block_scale_factor", "norm_eps", "dropout"):
        v = d[field]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise config_error(field, v, "a number", what=_WHAT)
    for field in ("mid_block_scale_factor", "norm_eps"):
        if d[field] <= 0:
            raise config_error(field, d[field], "a positive number", what=_WHAT)
    if not 0.0 <= d["dropout"] < 1.0:
        raise config_error("dropout", d["dropout"], "a probability in [0, 1)", what=_WHAT)
    cfg = UNet2DConfig(
        in_channels=int(d["in_channels"]), out_channels=int(d["out_channels"]),
        center_input_sample=d["center_input_sample"],
        time_embedding_dim=None if d["time_embedding_dim"] is None else int(d["time_embedding_dim"]),
        freq_shift=float(d["freq_shift"]), flip_sin_to_cos=d["flip_sin_to_cos"],
        down_block_types=tuple(d["down_block_types"]), mid_block_type=mid, up_block_types=tuple(d["up_block_types"]),
        block_out_channels=tuple(int(c) for c in boc), layers_per_block=int(d["layers_per_block"]),
        mid_block_scale_factor=float(d["mid_block_scale_factor"]), dropout=float(d["dropout"]),
        act_fn=config_choice(d, "act_fn", tuple(ACTIVATIONS), what=_WHAT),
        attention_head_dim=None if d["attention_head_dim"] is None else int(d["attention_head_dim"]),
        norm_num_groups=int(d["norm_num_groups"]),
        attn_norm_num_groups=None if d["attn_norm_num_groups"] is None else int(d["attn_norm_num_groups"]),
        norm_eps=float(d["norm_eps"]),
        resnet_time_scale_shift=config_choice(d, "resnet_time_scale_shift", ("default", "scale_shift"), what=_WHAT),
        add_attention=d["add_attention"],
        class_embed_type=config_choice(d, "class_embed_type", (None, "timestep", "identity"), what=_WHAT),
        sample_size=config.get("sample_size"))
    for where, c, g in cfg.group_norm_channels():
        if c % g:
            field = "attn_norm_num_groups" if where.endswith("group_norm") and cfg.attn_norm_num_groups else (
                "norm_num_groups")
            raise ValueError(f"config.json: {field}={g} does not divide the {c} channels of a GroupNorm in {where} "
                             f"(block_out_channels={list(cfg.block_out_channels)})")
    if mid is not None and cfg.add_attention and cfg.mid_attention_heads < 1:
        raise ValueError(f"config.json: attention_head_dim={cfg.attention_head_dim} is wider than the "
                         f"{boc[-1]} channels of the mid block's attention")
    return cfg


# --- The network --------------------------------------------------------------------------------------

class SpatialSelfAttention(nn.Module):
    """diffusers' Attention over the pixels as UNetMidBlock2D builds it (AttnProcessor2_0, residual
    connection, output divided by rescale_output_factor). groups None: no GroupNorm."""

    heads: int
    groups: int | None = 32
    eps: float = 1e-5
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        tokens = x.reshape(b, -1, c)
        h = tokens if self.groups is None else GroupNorm32(self.groups, self.eps, name="group_norm")(tokens)
        q, k, v = (Dense(c, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        q = q * (1.0 / math.sqrt(c // self.heads))
        q, k, v = (split_heads(cast(a, self.dtype), self.heads) for a in (q, k, v))
        out = Dense(c, dtype=self.dtype, name="to_out_0")(merge_heads(attention(q, k, v), b))
        out = cast(tokens, out.dtype) + out
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out.reshape(x.shape)


class MidBlock2D(nn.Module):
    """UNetMidBlock2D (one layer): resnet, [self-attention], resnet."""

    resnet: ResnetOptions
    heads: int
    attention_groups: int | None
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, train: bool = False):
        c, o = h.shape[-1], self.resnet
        h = ResnetBlock2D(c, o, dtype=self.dtype, name="resnets_0")(h, temb, train)
        if self.add_attention:
            h = SpatialSelfAttention(self.heads, self.attention_groups, o.eps, o.output_scale_factor, self.dtype,
                                     name="attentions_0")(h)
        return ResnetBlock2D(c, o, dtype=self.dtype, name="resnets_1")(h, temb, train)


class UNet2DModel(DiffusersModel):
    """diffusers' UNet2DModel, unCLIP super-resolution subset (see the module docstring); config: a UNet2DConfig."""

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, class_labels: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        cfg = self.config
        dtype = resolve_dtype(self.dtype)
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be [B, H, W, {cfg.in_channels}] (NHWC), got {x.shape}")
        f = 2 ** (cfg.levels - 1)
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"x is {x.shape[1]}x{x.shape[2]}: with {cfg.levels} levels H and W must be multiples "
                             f"of {f}")
        b, c0, ted = x.shape[0], cfg.block_out_channels[0], cfg.time_embed_dim
        if (class_labels is None) != (cfg.class_embed_type is None):
            raise ValueError(f"class_labels {'are required' if class_labels is None else 'given'} with "
                             f"class_embed_type={cfg.class_embed_type!r}")

        def sin(t):
            return sinusoidal_embedding(jnp.broadcast_to(jnp.asarray(t), (b,)), c0, cfg.flip_sin_to_cos,
                                        cfg.freq_shift)

        emb = TimestepEmbedding(ted, "silu", name="time_embedding")(sin(timesteps))
        if cfg.class_embed_type == "timestep":
            emb = emb + TimestepEmbedding(ted, "silu", name="class_embedding")(sin(class_labels))
        elif cfg.class_embed_type == "identity":
            labels = jnp.asarray(class_labels)
            if labels.shape != (b, ted):
                raise ValueError(f"class_labels must be [{b}, {ted}] with class_embed_type 'identity', got "
                                 f"{labels.shape}")
            emb = emb + labels.astype(jnp.float32)

        if cfg.center_input_sample:
            x = 2 * x - 1.0
        h = Conv(c0, 3, dtype=dtype, name="conv_in")(cast(x, dtype))
        res = cfg.resnet_options()
        skips = [h]
        n, boc = cfg.levels, cfg.block_out_channels
        for i in range(n):
            h, states = DownBlock(boc[i], cfg.layers_per_block, i != n - 1, res, None, dtype,
                                  name=f"down_blocks_{i}")(h, emb, train=train)
            skips.extend(states)
        if cfg.mid_block_type is not None:
            h = MidBlock2D(cfg.resnet_options(cfg.mid_block_scale_factor), cfg.mid_attention_heads,
                           cfg.mid_attention_groups, cfg.add_attention, dtype, name="mid_block")(h, emb, train)
        layers = cfg.layers_per_block + 1
        for i in range(n):
            block_skips, skips = skips[-layers:], skips[:-layers]
            h = UpBlock(boc[::-1][i], layers, i != n - 1, res, None, dtype,
                        name=f"up_blocks_{i}")(h, block_skips, emb, train=train)
        h = norm_act(cast(h, jnp.float32), "silu", cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out")
        return Conv(cfg.out_channels, 3, dtype=jnp.float32, name="conv_out")(h)
