"""diffusers' `UNet2DConditionModel` in Flax linen (NHWC): the subset that DeepFloyd IF and unCLIP use.

Built from a diffusers `config.json` (as a dict): `unet2d_condition_config(d)` checks every field and
returns a frozen `UNet2DConditionConfig`; `UNet2DConditionModel(config, dtype)` is the network.

    module.apply({'params': params}, x, t, encoder_hidden_states, class_labels=None, attention_mask=None,
                 train=False) -> [B, H, W, out_channels] float32

  x [B, H, W, in_channels] NHWC (H, W divisible by 2 ** (levels - 1)); t [B] or a scalar (the diffusion
  timesteps, possibly fractional); encoder_hidden_states [B, S, E] (E = encoder_hid_dim with
  encoder_hid_proj, else cross_attention_dim); class_labels: [B] noise levels (class_embed_type
  "timestep", IF stage II) or [B, time_embed_dim] vectors added to the time embedding ("identity",
  unCLIP's decoder); attention_mask [B, S] over the encoder tokens, True / 1 = keep (unCLIP's decoder;
  IF passes none). `train=True` applies the ResNet blocks' dropout (rng 'dropout').

The subset (anything else is refused by `unet2d_condition_config`, naming the field and what is allowed):
  * blocks: down `ResnetDownsampleBlock2D` / `SimpleCrossAttnDownBlock2D`, mid
    `UNetMidBlock2DSimpleCrossAttn` (or none), up `SimpleCrossAttnUpBlock2D` / `ResnetUpsampleBlock2D`;
    resampling is done by ResNet blocks (nearest x2 up, 2x2 average pooling down), as diffusers does;
  * the SimpleCrossAttn blocks' added-KV attention (diffusers' `AttnAddedKVProcessor`): GroupNorm over
    the image tokens, q from them, k and v from `add_k_proj` / `add_v_proj` of the encoder states (group-
    normed first with `cross_attention_norm="group_norm"`: 32 groups, eps 1e-5) joined BEFORE the image
    tokens' own k, v (`to_k`, `to_v`; none with `only_cross_attention`), one softmax, `to_out.0`, residual.
    The attention mask becomes the additive bias (1 - mask) * -10000 over the encoder tokens, 0 over the
    image tokens (diffusers pads the bias with zeros for them);
  * time embedding: sinusoidal (`flip_sin_to_cos`, `freq_shift`) -> linear_1 -> act_fn -> linear_2
    (-> timestep_post_act), plus the class embedding ("timestep": the labels embedded like t by a second
    TimestepEmbedding; "identity": added as given), plus, with `addition_embed_type="text"`, the attention-
    pooled text (`TextTimeEmbedding`: LayerNorm, attention pooling with `addition_embed_type_num_heads`
    heads, Linear, LayerNorm; it sees the encoder states BEFORE encoder_hid_proj), then
    `time_embedding_act_fn`;
  * `encoder_hid_proj` (a Linear, `encoder_hid_dim_type="text_proj"`);
  * ResNet blocks with `resnet_time_scale_shift` "default" (add) or "scale_shift", `act_fn` (silu / swish /
    gelu (exact) / mish / relu), `resnet_skip_time_act`, output divided by `resnet_out_scale_factor`
    (`mid_block_scale_factor` in the mid block), GroupNorm(`norm_num_groups`, `norm_eps`).
  Heads: a block of C channels has C // attention_head_dim heads of attention_head_dim channels (the
  config's `attention_head_dim` is the per-head width for these blocks); up block i takes entry i of a
  per-block list, not the reversed one, exactly as diffusers' constructor does.

Parameter names are diffusers' state_dict keys with every list index joined to its list's name by "_"
(`down_blocks.1.attentions.0.to_out.0.weight` <-> `down_blocks_1/attentions_0/to_out_0/kernel`); Linear
and Conv weights are `kernel` (transposed), GroupNorm / LayerNorm weights `scale`. `jaxdiff.convert.diffusers`
maps a state_dict both ways. Parameters are float32; with dtype bfloat16 the convolutions, projections
and attention products run in bfloat16 while GroupNorm, LayerNorm, the softmax, the time / class / text
embeddings and the output head (conv_norm_out, conv_out) stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import (
    Conv,
    Dense,
    GroupNorm32,
    avg_pool2,
    cast,
    layer_norm,
    merge_heads,
    resolve_dtype,
    split_heads,
    timestep_embedding,
    upsample_nearest,
)
from jaxdiff.ops.activation import gelu
from jaxdiff.ops.attention import attention
from jaxdiff.util.config import did_you_mean, is_int

__all__ = ["ACTIVATIONS", "AddedKVAttention", "AddedKVContext", "AttentionOptions", "AttentionPooling",
           "DiffusersModel", "DownBlock", "MidBlock", "ResnetBlock2D", "ResnetOptions", "TextTimeEmbedding",
           "TimestepEmbedding", "UNet2DConditionConfig", "UNet2DConditionModel", "UpBlock", "activation",
           "attention_bias", "config_choice", "config_error", "layer_context", "norm_act", "sinusoidal_embedding",
           "text_conditioning", "unet2d_condition_config"]

Dtype = Any

# diffusers' get_activation (names lower-cased first, as diffusers does). GELU is the exact (erf) one,
# written as PyTorch does (jaxdiff.ops.activation: the form XLA's CPU backend fuses).
ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": gelu,
    "mish": jax.nn.mish,
    "relu": nn.relu,
}
_SILU = ("silu", "swish")


def activation(name: str):
    """The activation function of a diffusers act_fn name."""
    return ACTIVATIONS[name.lower()]


def sinusoidal_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> jax.Array:
    """diffusers' get_timestep_embedding: [B] -> [B, dim] float32, frequencies exp(-ln(1e4) i / (dim/2 - shift)),
    [cos, sin] with flip_sin_to_cos, else [sin, cos]; odd dims padded with a zero column.

    The default (flip_sin_to_cos, shift 0) is exactly ADM's `layers.timestep_embedding`."""
    if flip_sin_to_cos and freq_shift == 0:
        return timestep_embedding(t, dim)
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - freq_shift)).astype(np.float32)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def attention_bias(mask: jax.Array | None) -> jax.Array | None:
    """diffusers' preparation of `attention_mask` [B, S] (1 / True = keep): the additive bias
    (1 - mask) * -10000, float32 [B, S]; None stays None."""
    if mask is None:
        return None
    return (1.0 - jnp.asarray(mask).astype(jnp.float32)) * -10000.0


def norm_act(x: jax.Array, act: str, groups: int, eps: float, name: str, scale=None, shift=None) -> jax.Array:
    """GroupNorm `name` (float32 statistics; optional scale-shift modulation) then the activation, SiLU and
    GELU fused (jaxdiff.ops.norm)."""
    silu, gelu = act.lower() in _SILU, act.lower() == "gelu"
    h = GroupNorm32(groups, eps, silu=silu, gelu=gelu, name=name)(x, scale, shift)
    return h if silu or gelu else activation(act)(h)


# --- Embeddings ---------------------------------------------------------------------------------------

class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> act -> linear_2 (-> post_act), float32; linear_2 is
    `out_features` wide (diffusers' out_dim; the prior's) when given, else `features`."""

    features: int
    act: str = "silu"
    post_act: str | None = None
    out_features: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.features, name="linear_1")(cast(x, jnp.float32))
        x = Dense(self.out_features or self.features, name="linear_2")(activation(self.act)(x))
        return x if self.post_act is None else activation(self.post_act)(x)


class AttentionPooling(nn.Module):
    """DeepFloyd IF's attention pooling of tokens [B, L, W] -> [B, W] (diffusers' AttentionPooling).

    One query: the mean token plus `positional_embedding` [1, W] (the other tokens get no position),
    keys / values over [query token, tokens]; q and k scaled by d^-1/4; no output projection."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, w = x.shape
        pos = self.param("positional_embedding",
                         lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / math.sqrt(w),
                         (1, w), jnp.float32)
        query = jnp.mean(x, axis=1, keepdims=True) + pos
        tokens = jnp.concatenate([query, x], axis=1)
        s = 1.0 / math.sqrt(math.sqrt(w // self.num_heads))
        q = split_heads(Dense(w, name="q_proj")(query) * s, self.num_heads)
        k = split_heads(Dense(w, name="k_proj")(tokens) * s, self.num_heads)
        v = split_heads(Dense(w, name="v_proj")(tokens), self.num_heads)
        return merge_heads(attention(q, k, v), b)[:, 0]


class TextTimeEmbedding(nn.Module):
    """diffusers' TextTimeEmbedding (addition_embed_type "text"): norm1 - pool - proj - norm2, float32."""

    features: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layer_norm("norm1")(cast(x, jnp.float32))
        h = AttentionPooling(self.num_heads, name="pool")(h)
        h = Dense(self.features, name="proj")(h)
        return layer_norm("norm2")(h)


# --- ResNet block and added-KV attention --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ResnetOptions:
    """What every ResnetBlock2D of a network shares."""

    groups: int = 32
    eps: float = 1e-5
    act: str = "silu"
    scale_shift: bool = False  # resnet_time_scale_shift "scale_shift" (else "default": added)
    skip_time_act: bool = False
    output_scale_factor: float = 1.0
    dropout: float = 0.0


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (NHWC): norm1-act-[up|down]-conv1, time_emb_proj(act(temb)) added or as
    scale-shift of norm2, act-dropout-conv2, plus the input (a 1x1 conv_shortcut when channels change),
    divided by output_scale_factor. up: nearest x2; down: 2x2 average pooling (of both paths)."""

    out_channels: int
    opts: ResnetOptions = ResnetOptions()
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False) -> jax.Array:
        o, cout = self.opts, self.out_channels
        h = norm_act(x, o.act, o.groups, o.eps, "norm1")
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = Conv(cout, 3, dtype=self.dtype, name="conv1")(h)
        if x.shape[0] != temb.shape[0]:  # x's rows repeat (UNet2DConditionModel's shared_rows): now they part
            r = temb.shape[0] // x.shape[0]
            h, x = (jnp.tile(a, (r, 1, 1, 1)) for a in (h, x))
        t = temb if o.skip_time_act else activation(o.act)(temb)
        t = Dense(2 * cout if o.scale_shift else cout, dtype=self.dtype, name="time_emb_proj")(t)
        if o.scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm_act(h, o.act, o.groups, o.eps, "norm2", scale, shift)
        else:
            h = norm_act(h + cast(t, h.dtype)[:, None, None, :], o.act, o.groups, o.eps, "norm2")
        if o.dropout > 0.0:
            h = nn.Dropout(rate=o.dropout)(h, deterministic=not train)
        h = Conv(cout, 3, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != cout:
            x = Conv(cout, 1, inference_forms=True, dtype=self.dtype, name="conv_shortcut")(x)
        out = cast(x, h.dtype) + h
        return out if o.output_scale_factor == 1.0 else out / o.output_scale_factor


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """An added-KV attention layer: `heads` x `dim_head` channels; GroupNorm(groups, 1e-5) of the image
    tokens; `cross_norm`: GroupNorm(32, 1e-5) of the encoder states; `only_cross`: no to_k / to_v."""

    heads: int
    dim_head: int
    groups: int = 32
    cross_norm: bool = False
    only_cross: bool = False


def _biased_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T + bias) v; q [N, T, d], k, v [N, S, d], bias [N, S] (in q's dtype: diffusers' mask
    bias, 0 / -10000); the softmax in float32.

    The bias enters the score product as one more channel (q padded with a 1, k with the bias, both with
    zeros to a multiple of 4 channels): adding it to the [N, T, S] scores instead costs the CPU a pass over
    them (the unCLIP decoder's attention at 16 heads of 4: 3.5 -> 2.5 ms per layer)."""
    n, t, d = q.shape
    extra = (-(d + 1)) % 4 + 1
    q = jnp.concatenate([q, jnp.ones((n, t, 1), q.dtype), jnp.zeros((n, t, extra - 1), q.dtype)], axis=-1)
    k = jnp.concatenate([k, bias[:, :, None].astype(k.dtype), jnp.zeros(k.shape[:2] + (extra - 1,), k.dtype)],
                        axis=-1)
    s = jnp.einsum("ntd,nsd->nts", q, k, preferred_element_type=jnp.float32)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum("nts,nsd->ntd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)


def _context_kv(o: AttentionOptions, dtype: Dtype, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The encoder tokens' keys and values [B, S, heads * dim_head] of an added-KV attention layer (`norm_cross`
    first with cross_norm); called inside a compact method, whose scope gets the parameters."""
    if o.cross_norm:
        context = GroupNorm32(32, 1e-5, name="norm_cross")(context)
    dense = functools.partial(Dense, o.heads * o.dim_head, dtype=dtype)
    return cast(dense(name="add_k_proj")(context), dtype), cast(dense(name="add_v_proj")(context), dtype)


class AddedKVContext(nn.Module):
    """The part of an `AddedKVAttention` layer that depends on the encoder states alone: their keys and values,
    under the layer's own parameter names (apply it to the layer's parameters)."""

    opts: AttentionOptions
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _context_kv(self.opts, self.dtype, context)


class AddedKVAttention(nn.Module):
    """diffusers' Attention with added_kv_proj_dim and AttnAddedKVProcessor (the SimpleCrossAttn blocks).

    x [B, H, W, C], context [B, S, E] or its (keys, values) from `AddedKVContext`, bias [B, S]
    (`attention_bias`) or None -> [B, H, W, C]. With only_cross (no image keys) the bias covers just the
    encoder tokens (diffusers' padded mask would not fit its keys there)."""

    opts: AttentionOptions
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context, bias: jax.Array | None = None) -> jax.Array:
        o = self.opts
        b, c = x.shape[0], x.shape[-1]
        tokens = x.reshape(b, -1, c)
        k, v = context if isinstance(context, tuple) else _context_kv(o, self.dtype, context)
        h = GroupNorm32(o.groups, 1e-5, name="group_norm")(tokens)
        inner = o.heads * o.dim_head
        dense = functools.partial(Dense, inner, dtype=self.dtype)
        q = dense(name="to_q")(h) * (1.0 / math.sqrt(o.dim_head))
        if not o.only_cross:
            k = jnp.concatenate([k, cast(dense(name="to_k")(h), k.dtype)], axis=1)
            v = jnp.concatenate([v, cast(dense(name="to_v")(h), v.dtype)], axis=1)
        q, k, v = (split_heads(cast(a, self.dtype), o.heads) for a in (q, k, v))
        if bias is None:
            out = attention(q, k, v)
        else:  # the encoder tokens' bias; the image tokens (after them) are always attended
            bias = jnp.pad(bias, ((0, 0), (0, k.shape[1] - bias.shape[1])))
            out = _biased_attention(q, k, v, jnp.repeat(bias, o.heads, axis=0))
        out = Dense(c, dtype=self.dtype, name="to_out_0")(merge_heads(out, b))
        return (cast(tokens, out.dtype) + out).reshape(x.shape[:3] + (c,))


# --- Blocks -------------------------------------------------------------------------------------------

def layer_context(context, j: int):
    """Attention layer j's context: the encoder states, or its entry of a block's `text_conditioning`."""
    return context[f"attentions_{j}"] if isinstance(context, Mapping) else context


class _Block(nn.Module):
    """A down or up block's fields: `resample` adds its down- / up-sampling ResNet block."""

    out_channels: int
    num_layers: int
    resample: bool
    resnet: ResnetOptions
    attention: AttentionOptions | None = None
    dtype: Dtype = jnp.float32


class DownBlock(_Block):
    """ResnetDownsampleBlock2D (attention None) / SimpleCrossAttnDownBlock2D: num_layers x (resnet
    [+ attention]), then a down-sampling ResNet block. Returns (h, the skip states)."""

    @nn.compact
    def __call__(self, h, temb, context=None, bias=None, train: bool = False):
        states = []
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.out_channels, self.resnet, dtype=self.dtype, name=f"resnets_{j}")(h, temb, train)
            if self.attention is not None:
                h = AddedKVAttention(self.attention, self.dtype, name=f"attentions_{j}")(
                    h, layer_context(context, j), bias)
            states.append(h)
        if self.resample:
            h = ResnetBlock2D(self.out_channels, self.resnet, down=True, dtype=self.dtype,
                              name="downsamplers_0")(h, temb, train)
            states.append(h)
        return h, tuple(states)


class UpBlock(_Block):
    """ResnetUpsampleBlock2D (attention None) / SimpleCrossAttnUpBlock2D: per layer, the last skip state
    is concatenated (channels last) before the resnet [+ attention]; then an up-sampling ResNet block."""

    @nn.compact
    def __call__(self, h, skips, temb, context=None, bias=None, train: bool = False):
        skips = list(skips)
        for j in range(self.num_layers):
            h = jnp.concatenate([h, cast(skips.pop(), h.dtype)], axis=-1)
            h = ResnetBlock2D(self.out_channels, self.resnet, dtype=self.dtype, name=f"resnets_{j}")(h, temb, train)
            if self.attention is not None:
                h = AddedKVAttention(self.attention, self.dtype, name=f"attentions_{j}")(
                    h, layer_context(context, j), bias)
        if self.resample:
            h = ResnetBlock2D(self.out_channels, self.resnet, up=True, dtype=self.dtype,
                              name="upsamplers_0")(h, temb, train)
        return h


class MidBlock(nn.Module):
    """UNetMidBlock2DSimpleCrossAttn: resnet, then (attention, resnet)."""

    resnet: ResnetOptions
    attention: AttentionOptions
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, bias=None, train: bool = False):
        c = h.shape[-1]
        h = ResnetBlock2D(c, self.resnet, dtype=self.dtype, name="resnets_0")(h, temb, train)
        h = AddedKVAttention(self.attention, self.dtype, name="attentions_0")(h, layer_context(context, 0), bias)
        return ResnetBlock2D(c, self.resnet, dtype=self.dtype, name="resnets_1")(h, temb, train)


# --- Configuration ------------------------------------------------------------------------------------

DOWN_BLOCK_TYPES = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DSimpleCrossAttn", None)

# Fields that decide nothing in this subset: accepted with any value and ignored.
IGNORED_FIELDS = {
    "sample_size": "the size is the input's",
    "downsample_padding": "only convolutional down-samplers use it; these blocks down-sample in ResNet blocks",
    "transformer_layers_per_block": "only the transformer (CrossAttn*) blocks use it",
    "reverse_transformer_layers_per_block": "only the transformer (CrossAttn*) blocks use it",
    "dual_cross_attention": "only the transformer (CrossAttn*) blocks use it",
    "use_linear_projection": "only the transformer (CrossAttn*) blocks use it",
    "upcast_attention": "attention scores and the softmax are always float32 here",
    "addition_time_embed_dim": "only addition_embed_type 'text_time' uses it",
    "projection_class_embeddings_input_dim": "only class_embed_type 'projection' / 'simple_projection' and "
                                             "addition_embed_type 'text_time' use it",
}
# Fields refused unless at diffusers' default (the features they switch on are not implemented).
DEFAULT_ONLY_FIELDS = {
    "num_attention_heads": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
}
# Supported fields and diffusers' defaults (a field absent from config.json takes its default).
SUPPORTED_DEFAULTS = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.0,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
}
_ACT_NAMES = tuple(ACTIVATIONS)
_WHAT = "jaxdiff's UNet2DConditionModel (the DeepFloyd IF / unCLIP subset of diffusers')"


class UNetLevels:
    """What both diffusers U-Nets derive from block_out_channels and time_embedding_dim."""

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(UNetLevels):
    """A checked UNet2DConditionModel config.json (per-block fields expanded to tuples, one entry per
    down block; `unet2d_condition_config` builds it)."""

    in_channels: int
    out_channels: int
    center_input_sample: bool
    flip_sin_to_cos: bool
    freq_shift: float
    down_block_types: tuple
    mid_block_type: str | None
    up_block_types: tuple
    only_cross_attention: tuple  # per down block
    mid_block_only_cross_attention: bool
    block_out_channels: tuple
    layers_per_block: tuple  # per down block
    mid_block_scale_factor: float
    dropout: float
    act_fn: str
    norm_num_groups: int
    norm_eps: float
    cross_attention_dim: int
    encoder_hid_dim: int | None
    encoder_hid_dim_type: str | None
    attention_head_dim: tuple  # per down block
    class_embed_type: str | None
    addition_embed_type: str | None
    addition_embed_type_num_heads: int
    resnet_time_scale_shift: str
    resnet_skip_time_act: bool
    resnet_out_scale_factor: float
    time_embedding_dim: int | None
    time_embedding_act_fn: str | None
    timestep_post_act: str | None
    conv_in_kernel: int
    conv_out_kernel: int
    cross_attention_norm: str | None
    sample_size: Any = None

    @property
    def context_dim(self) -> int:
        """Channels of the encoder_hidden_states given to the model (before encoder_hid_proj)."""
        return self.encoder_hid_dim if self.encoder_hid_dim_type == "text_proj" else self.cross_attention_dim

    def resnet_options(self, output_scale_factor: float | None = None) -> ResnetOptions:
        return ResnetOptions(groups=self.norm_num_groups, eps=self.norm_eps, act=self.act_fn,
                             scale_shift=self.resnet_time_scale_shift == "scale_shift",
                             skip_time_act=self.resnet_skip_time_act,
                             output_scale_factor=(self.resnet_out_scale_factor if output_scale_factor is None
                                                  else output_scale_factor),
                             dropout=self.dropout)

    def attention_options(self, channels: int, head_dim: int, only_cross: bool) -> AttentionOptions:
        return AttentionOptions(heads=channels // head_dim, dim_head=head_dim, groups=self.norm_num_groups,
                                cross_norm=self.cross_attention_norm == "group_norm", only_cross=only_cross)

    def blocks(self) -> dict:
        """The network's layout as diffusers' constructor builds it: {"down": [...], "mid": ..., "up": [...]},
        each block a dict of type, in / out channels, resnet input channels, layers, resampling, attention."""
        boc, n = self.block_out_channels, self.levels
        down, out = [], boc[0]
        for i, kind in enumerate(self.down_block_types):
            cin, out = out, boc[i]
            layers = self.layers_per_block[i]
            attn = (self.attention_options(out, self.attention_head_dim[i], self.only_cross_attention[i])
                    if kind == "SimpleCrossAttnDownBlock2D" else None)
            down.append({"type": kind, "out": out, "layers": layers, "resample": i != n - 1, "attention": attn,
                         "resnet_in": tuple([cin] + [out] * (layers - 1))})
        mid = None
        if self.mid_block_type is not None:
            mid = {"type": self.mid_block_type, "out": boc[-1], "layers": 2, "resample": False,
                   "resnet_in": (boc[-1],) * 2,
                   "attention": self.attention_options(boc[-1], self.attention_head_dim[-1],
                                                       self.mid_block_only_cross_attention)}
        up, rev = [], boc[::-1]
        rev_layers, rev_only = self.layers_per_block[::-1], self.only_cross_attention[::-1]
        out = rev[0]
        for i, kind in enumerate(self.up_block_types):
            prev, out, cin = out, rev[i], rev[min(i + 1, n - 1)]
            layers = rev_layers[i] + 1
            # diffusers passes attention_head_dim[i] (not reversed) to up block i
            attn = (self.attention_options(out, self.attention_head_dim[i], rev_only[i])
                    if kind == "SimpleCrossAttnUpBlock2D" else None)
            resnet_in = tuple((prev if j == 0 else out) + (cin if j == layers - 1 else out) for j in range(layers))
            up.append({"type": kind, "out": out, "layers": layers, "resample": i != n - 1, "attention": attn,
                       "resnet_in": resnet_in})
        return {"down": down, "mid": mid, "up": up}


def config_error(field: str, value: Any, allowed: str, note: str = "", what: str = _WHAT) -> ValueError:
    """The ValueError for a config.json field outside the subset: the field, its value, what is allowed."""
    return ValueError(f"config.json field {field}={value!r} is not supported by {what}; allowed: {allowed}"
                      + (f" ({note})" if note else ""))


def checked_fields(config: Mapping, class_name: str, supported: Mapping, ignored, default_only: Mapping,
                   what: str) -> dict:
    """The `supported` fields of a diffusers config.json dict (absent ones at their defaults), once
    `_class_name` (when present) is `class_name`, every field is known (keys starting with "_" aside) and
    the `default_only` fields are at their defaults; else ValueError naming the field."""
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a config.json dict, got {type(config).__name__}")
    cls = config.get("_class_name")
    if cls is not None and cls != class_name:
        raise ValueError(f"config.json field _class_name={cls!r}: expected {class_name!r}")
    known = set(supported) | set(ignored) | set(default_only)
    for k in config:
        if not str(k).startswith("_") and k not in known:
            raise ValueError(f"config.json field {k!r} is not a {class_name} argument known to {what}"
                             f"{did_you_mean(k, sorted(known))}")
    for k, default in default_only.items():
        v = config.get(k, default)
        if v != default or (isinstance(v, bool) != isinstance(default, bool)):
            raise config_error(k, v, repr(default), "the feature it selects is not implemented", what)
    return {k: config.get(k, default) for k, default in supported.items()}


def _per_block(field: str, value: Any, n: int, check, allowed: str) -> tuple:
    """A field given as one value or a list of one value per down block -> tuple of n values."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise config_error(field, value, f"{allowed}, or a list of {n} such values (one per down block)")
    for v in values:
        if not check(v):
            raise config_error(field, value, allowed)
    return values


def _pos_int(v) -> bool:
    return is_int(v) and v >= 1


def _number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def config_choice(d: dict, field: str, choices: tuple, note: str = "", what: str = _WHAT):
    """d[field] (activation names lower-cased) if it is one of `choices`, else `config_error`."""
    v = d[field]
    if isinstance(v, str) and field.endswith(("act_fn", "_act")):
        v = v.lower()
    if v not in choices:
        raise config_error(field, d[field], " / ".join(repr(c) for c in choices), note + did_you_mean(v, choices), what)
    return v


def unet2d_condition_config(config: Mapping) -> UNet2DConditionConfig:
    """Check a diffusers UNet2DConditionModel config.json (a dict) against the supported subset.

    Keys starting with "_" (`_class_name`, `_diffusers_version`, `_name_or_path`) are ignored, except that
    `_class_name`, when present, must be "UNet2DConditionModel"; absent fields take diffusers' defaults.
    Raises ValueError naming the first field outside the subset and the values allowed: fields of
    IGNORED_FIELDS are accepted with any value, DEFAULT_ONLY_FIELDS only at their default, the rest
    (SUPPORTED_DEFAULTS) are checked and implemented.
    """
    if isinstance(config, UNet2DConditionConfig):
        return config
    d = checked_fields(config, "UNet2DConditionModel", SUPPORTED_DEFAULTS, IGNORED_FIELDS, DEFAULT_ONLY_FIELDS, _WHAT)

    down = tuple(d["down_block_types"]) if isinstance(d["down_block_types"], (list, tuple)) else None
    up = tuple(d["up_block_types"]) if isinstance(d["up_block_types"], (list, tuple)) else None
    for field, types, allowed in (("down_block_types", down, DOWN_BLOCK_TYPES), ("up_block_types", up, UP_BLOCK_TYPES)):
        if not types:
            raise config_error(field, d[field], f"a non-empty list of {' / '.join(allowed)}")
        for t in types:
            if t not in allowed:
                raise config_error(field, d[field], " / ".join(allowed), f"{t!r} is not in the subset"
                              + did_you_mean(t, allowed))
    mid = config_choice(d, "mid_block_type", MID_BLOCK_TYPES)
    boc = d["block_out_channels"]
    if not isinstance(boc, (list, tuple)) or not boc or not all(_pos_int(c) for c in boc):
        raise config_error("block_out_channels", boc, "a non-empty list of positive integers")
    boc = tuple(int(c) for c in boc)
    n = len(boc)
    if len(down) != n or len(up) != n:
        raise ValueError(f"config.json: block_out_channels has {n} entries, down_block_types {len(down)} and "
                         f"up_block_types {len(up)}; they must have the same length")
    for field in ("in_channels", "out_channels", "norm_num_groups", "cross_attention_dim",
                  "addition_embed_type_num_heads"):
        if not _pos_int(d[field]):
            raise config_error(field, d[field], "a positive integer")
    for field in ("conv_in_kernel", "conv_out_kernel"):
        if not _pos_int(d[field]) or d[field] % 2 == 0:
            raise config_error(field, d[field], "an odd positive integer")
    for field in ("time_embedding_dim", "encoder_hid_dim"):
        if d[field] is not None and not _pos_int(d[field]):
            raise config_error(field, d[field], "null or a positive integer")
    for field in ("center_input_sample", "flip_sin_to_cos", "resnet_skip_time_act"):
        if not isinstance(d[field], bool):
            raise config_error(field, d[field], "true / false")
    for field in ("freq_shift", "mid_block_scale_factor", "resnet_out_scale_factor", "norm_eps", "dropout"):
        if not _number(d[field]):
            raise config_error(field, d[field], "a number")
    for field in ("mid_block_scale_factor", "resnet_out_scale_factor", "norm_eps"):
        if float(d[field]) <= 0:
            raise config_error(field, d[field], "a positive number")
    if not 0.0 <= float(d["dropout"]) < 1.0:
        raise config_error("dropout", d["dropout"], "a probability in [0, 1)")
    act = config_choice(d, "act_fn", _ACT_NAMES)
    time_act = None if d["time_embedding_act_fn"] is None else config_choice(d, "time_embedding_act_fn", _ACT_NAMES)
    post_act = None if d["timestep_post_act"] is None else config_choice(d, "timestep_post_act", _ACT_NAMES)
    scale_shift = config_choice(d, "resnet_time_scale_shift", ("default", "scale_shift"))
    class_type = config_choice(d, "class_embed_type", (None, "timestep", "identity"))
    add_type = config_choice(d, "addition_embed_type", (None, "text"))
    cross_norm = config_choice(d, "cross_attention_norm", (None, "group_norm"))
    hid_type = config_choice(d, "encoder_hid_dim_type", (None, "text_proj"))
    hid_dim = d["encoder_hid_dim"]
    if hid_type is None and hid_dim is not None:
        hid_type = "text_proj"  # diffusers' default when encoder_hid_dim is set
    if hid_type is not None and hid_dim is None:
        raise config_error("encoder_hid_dim", None, "a positive integer",
                      f"encoder_hid_dim_type={hid_type!r} projects encoder_hid_dim channels")
    layers = _per_block("layers_per_block", d["layers_per_block"], n, _pos_int, "a positive integer")
    heads = _per_block("attention_head_dim", d["attention_head_dim"], n, _pos_int, "a positive integer")
    oca = d["only_cross_attention"]
    only = _per_block("only_cross_attention", oca, n, lambda v: isinstance(v, bool), "true / false")
    mid_only = d["mid_block_only_cross_attention"]
    if mid_only is None:
        mid_only = oca if isinstance(oca, bool) else False
    elif not isinstance(mid_only, bool):
        raise config_error("mid_block_only_cross_attention", mid_only, "null / true / false")
    cfg = UNet2DConditionConfig(
        in_channels=int(d["in_channels"]), out_channels=int(d["out_channels"]),
        center_input_sample=d["center_input_sample"], flip_sin_to_cos=d["flip_sin_to_cos"],
        freq_shift=float(d["freq_shift"]), down_block_types=down, mid_block_type=mid, up_block_types=up,
        only_cross_attention=only, mid_block_only_cross_attention=mid_only, block_out_channels=boc,
        layers_per_block=tuple(int(v) for v in layers), mid_block_scale_factor=float(d["mid_block_scale_factor"]),
        dropout=float(d["dropout"]), act_fn=act, norm_num_groups=int(d["norm_num_groups"]),
        norm_eps=float(d["norm_eps"]), cross_attention_dim=int(d["cross_attention_dim"]),
        encoder_hid_dim=None if hid_dim is None else int(hid_dim), encoder_hid_dim_type=hid_type,
        attention_head_dim=tuple(int(v) for v in heads), class_embed_type=class_type, addition_embed_type=add_type,
        addition_embed_type_num_heads=int(d["addition_embed_type_num_heads"]), resnet_time_scale_shift=scale_shift,
        resnet_skip_time_act=d["resnet_skip_time_act"], resnet_out_scale_factor=float(d["resnet_out_scale_factor"]),
        time_embedding_dim=None if d["time_embedding_dim"] is None else int(d["time_embedding_dim"]),
        time_embedding_act_fn=time_act, timestep_post_act=post_act, conv_in_kernel=int(d["conv_in_kernel"]),
        conv_out_kernel=int(d["conv_out_kernel"]), cross_attention_norm=cross_norm,
        sample_size=config.get("sample_size"))
    _check_channels(cfg)
    return cfg


def _check_channels(cfg: UNet2DConditionConfig) -> None:
    """Channel counts every GroupNorm and attention layer of the layout can work with."""
    g = cfg.norm_num_groups
    layout = cfg.blocks()
    blocks = layout["down"] + ([layout["mid"]] if layout["mid"] else []) + layout["up"]
    for blk in blocks:
        for c in blk["resnet_in"] + (blk["out"],):
            if c % g:
                raise ValueError(f"config.json: norm_num_groups={g} does not divide the {c} channels of a GroupNorm "
                                 f"in a {blk['type']} (block_out_channels={list(cfg.block_out_channels)})")
        a = blk["attention"]
        if a is not None and a.heads < 1:
            raise ValueError(f"config.json: attention_head_dim={a.dim_head} is wider than the {blk['out']} channels "
                             f"of a {blk['type']}: it must be at most the block's channels")
    if cfg.block_out_channels[0] % g:
        raise ValueError(f"config.json: norm_num_groups={g} does not divide block_out_channels[0]="
                         f"{cfg.block_out_channels[0]} (conv_norm_out)")
    if cfg.cross_attention_norm == "group_norm" and cfg.cross_attention_dim % 32:
        raise ValueError(f"config.json: cross_attention_norm='group_norm' normalises the encoder states in 32 "
                         f"groups: cross_attention_dim={cfg.cross_attention_dim} must be a multiple of 32")
    if cfg.addition_embed_type == "text" and cfg.context_dim % cfg.addition_embed_type_num_heads:
        raise ValueError(f"config.json: addition_embed_type_num_heads={cfg.addition_embed_type_num_heads} does not "
                         f"divide the {cfg.context_dim} channels of the pooled text")


# --- The network --------------------------------------------------------------------------------------

class DiffusersModel(nn.Module):
    """What a diffusers network takes: `config`, the checked config of its config.json (a frozen dataclass),
    and `dtype`, the compute dtype (float32 or bfloat16; the parameters are float32)."""

    config: Any
    dtype: Dtype = jnp.float32


def _context_shape(context) -> tuple | None:
    """(rows, tokens, width) of encoder states, or (rows, tokens, None) of a `text_conditioning`."""
    if isinstance(context, Mapping):
        k = jax.tree_util.tree_leaves(context["layers"])
        return (k[0].shape[0], k[0].shape[1], None) if k else None
    return None if context is None or context.ndim != 3 else tuple(context.shape)


def check_inputs(cfg: UNet2DConditionConfig, x, context, class_labels, attention_mask, shared_rows: int = 1) -> None:
    """ValueError for inputs the network cannot take (shapes only; raised while tracing); the conditioning
    (encoder states or their `text_conditioning`) has `shared_rows` times x's rows."""
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
        raise ValueError(f"x must be [B, H, W, {cfg.in_channels}] (NHWC), got {x.shape}")
    f = 2 ** (cfg.levels - 1)
    if x.shape[1] % f or x.shape[2] % f:
        raise ValueError(f"x is {x.shape[1]}x{x.shape[2]}: with {cfg.levels} levels H and W must be multiples of {f}")
    b = x.shape[0] * shared_rows
    shape = _context_shape(context)
    if isinstance(context, Mapping):
        rows = {a.shape[0] for a in jax.tree_util.tree_leaves(context)}
        if rows != {b}:
            raise ValueError(f"text_conditioning must have {b} rows in every array, got {sorted(rows)}")
    elif shape is None or shape[0] != b or shape[-1] != cfg.context_dim:
        raise ValueError(f"encoder_hidden_states must be [{b}, S, {cfg.context_dim}], got "
                         f"{None if context is None else context.shape}")
    if cfg.class_embed_type is None:
        if class_labels is not None:
            raise ValueError("class_labels given, but the config has no class embedding (class_embed_type null)")
    elif class_labels is None:
        raise ValueError(f"class_labels are required with class_embed_type={cfg.class_embed_type!r}")
    elif cfg.class_embed_type == "identity" and class_labels.shape != (b, cfg.time_embed_dim):
        raise ValueError(f"class_labels must be [{b}, {cfg.time_embed_dim}] with class_embed_type 'identity', "
                         f"got {class_labels.shape}")
    elif cfg.class_embed_type == "timestep" and class_labels.ndim > 1:
        raise ValueError(f"class_labels must be [B] noise levels with class_embed_type 'timestep', "
                         f"got {class_labels.shape}")
    if attention_mask is not None and shape is not None and attention_mask.shape != shape[:2]:
        raise ValueError(f"attention_mask must be [B, S] = {shape[:2]}, got {attention_mask.shape}")


def _attention_layers(cfg: UNet2DConditionConfig):
    """(block name, layer count, AttentionOptions) of every block with attention layers."""
    layout = cfg.blocks()
    named = ([(f"down_blocks_{i}", b["layers"], b["attention"]) for i, b in enumerate(layout["down"])]
             + ([("mid_block", 1, layout["mid"]["attention"])] if layout["mid"] is not None else [])
             + [(f"up_blocks_{i}", b["layers"], b["attention"]) for i, b in enumerate(layout["up"])])
    return [(name, n, a) for name, n, a in named if a is not None]


def text_conditioning(module: UNet2DConditionModel, params, encoder_hidden_states: jax.Array) -> dict:
    """What `module` computes from its encoder states alone, to pass as encoder_hidden_states in their place
    (same output): {"layers": {block: {"attentions_j": (keys, values)}}, plus "text_emb", the pooled text
    added to the time embedding, with addition_embed_type "text"}. A sampler computes it once per call
    instead of once per step (`params`: the network's parameters, without the {"params": ...} level)."""
    cfg = module.config
    dtype = resolve_dtype(module.dtype)
    context = jnp.asarray(encoder_hidden_states)
    if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
        raise ValueError(f"encoder_hidden_states must be [B, S, {cfg.context_dim}], got {context.shape}")
    out = {}
    if cfg.addition_embed_type == "text":
        out["text_emb"] = TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads).apply(
            {"params": params["add_embedding"]}, context)
    if cfg.encoder_hid_dim_type == "text_proj":
        context = Dense(cfg.cross_attention_dim, dtype=dtype, name=None).apply({"params": params["encoder_hid_proj"]},
                                                                                context)
    context = cast(context, dtype)
    out["layers"] = {name: {f"attentions_{j}": AddedKVContext(opts, dtype).apply(
        {"params": params[name][f"attentions_{j}"]}, context) for j in range(n)}
        for name, n, opts in _attention_layers(cfg)}
    return out


class UNet2DConditionModel(DiffusersModel):
    """diffusers' UNet2DConditionModel, IF / unCLIP subset (see the module docstring); config: a
    UNet2DConditionConfig."""

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, encoder_hidden_states,
                 class_labels: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 train: bool = False, shared_rows: int = 1) -> jax.Array:
        """encoder_hidden_states: [B, S, E], or their `text_conditioning` (computed once for many calls).
        `shared_rows` = R > 1: x and timesteps hold B rows and the conditioning R B, the network's input being x
        and t repeated R times ([x; x] for classifier-free guidance's two branches): what depends on x
        and t alone (the time embedding, conv_in, the first ResNet block's first convolution) runs on the B
        rows once. The same result as the R B repeated rows."""
        cfg = self.config
        dtype = resolve_dtype(self.dtype)
        text = encoder_hidden_states if isinstance(encoder_hidden_states, Mapping) else None
        x, context = jnp.asarray(x), (text if text is not None else jnp.asarray(encoder_hidden_states))
        class_labels = None if class_labels is None else jnp.asarray(class_labels)
        attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)
        check_inputs(cfg, x, context, class_labels, attention_mask, shared_rows)
        bx, c0, ted = x.shape[0], cfg.block_out_channels[0], cfg.time_embed_dim
        b = bx * shared_rows
        repeat = (lambda a: a) if shared_rows == 1 else (lambda a: jnp.tile(a, (shared_rows,) + (1,) * (a.ndim - 1)))

        # time, class and text embeddings (float32)
        t = jnp.broadcast_to(jnp.asarray(timesteps), (bx,))
        sin = functools.partial(sinusoidal_embedding, dim=c0, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                freq_shift=cfg.freq_shift)
        emb = repeat(TimestepEmbedding(ted, cfg.act_fn, cfg.timestep_post_act, name="time_embedding")(sin(t)))
        if cfg.class_embed_type == "timestep":
            labels = jnp.broadcast_to(class_labels, (b,))
            emb = emb + TimestepEmbedding(ted, cfg.act_fn, name="class_embedding")(sin(labels))
        elif cfg.class_embed_type == "identity":
            emb = emb + class_labels.astype(jnp.float32)
        if cfg.addition_embed_type == "text":
            emb = emb + (text["text_emb"] if text is not None else
                         TextTimeEmbedding(ted, cfg.addition_embed_type_num_heads, name="add_embedding")(context))
        if cfg.time_embedding_act_fn is not None:
            emb = activation(cfg.time_embedding_act_fn)(emb)
        if text is None:
            if cfg.encoder_hid_dim_type == "text_proj":
                context = Dense(cfg.cross_attention_dim, dtype=dtype, name="encoder_hid_proj")(context)
            context = cast(context, dtype)
        block_context = (lambda name: context) if text is None else (lambda name: text["layers"].get(name))
        bias = attention_bias(attention_mask)

        if cfg.center_input_sample:
            x = 2 * x - 1.0
        h = Conv(c0, cfg.conv_in_kernel, dtype=dtype, name="conv_in")(cast(x, dtype))  # bx rows (ResnetBlock2D)
        layout = cfg.blocks()
        res = cfg.resnet_options()
        skips = [repeat(h)]
        for i, blk in enumerate(layout["down"]):
            h, states = DownBlock(blk["out"], blk["layers"], blk["resample"], res, blk["attention"], dtype,
                                  name=f"down_blocks_{i}")(h, emb, block_context(f"down_blocks_{i}"), bias, train)
            skips.extend(states)
        if layout["mid"] is not None:
            h = MidBlock(cfg.resnet_options(cfg.mid_block_scale_factor), layout["mid"]["attention"], dtype,
                         name="mid_block")(h, emb, block_context("mid_block"), bias, train)
        for i, blk in enumerate(layout["up"]):
            n = blk["layers"]
            block_skips, skips = skips[-n:], skips[:-n]
            h = UpBlock(blk["out"], n, blk["resample"], res, blk["attention"], dtype,
                        name=f"up_blocks_{i}")(h, block_skips, emb, block_context(f"up_blocks_{i}"), bias,
                                               train)
        h = norm_act(cast(h, jnp.float32), cfg.act_fn, cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out")
        return Conv(cfg.out_channels, cfg.conv_out_kernel, dtype=jnp.float32, name="conv_out")(h)
