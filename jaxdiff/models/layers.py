"""Shared building blocks of the ADM (openai/guided-diffusion) networks and the transformers, NHWC.

The layers, the architecture plan (which block sits where, with how many channels) and the one code
path that builds the U-Net's and the classifier's trunks from it.

Submodule names mirror guided-diffusion's state_dict keys with "." written as "_" before an index
(`input_blocks.3.0.in_layers.2` <-> `input_blocks_3_0/in_layers_2`), so `jaxdiff.convert` maps them
mechanically. `dtype` is the compute dtype (float32 or bfloat16); parameters are always float32, and
GroupNorm and the attention softmax always run in float32, as guided-diffusion's fp16 mode does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.ops.attention import attention
from jaxdiff.ops.conv import conv2d, conv2d_inference
from jaxdiff.ops.norm import group_norm
from jaxdiff.util.config import is_int

Dtype = Any

# PyTorch's default init for Conv/Linear (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nn.initializers.zeros


def cast(x: jax.Array, dtype) -> jax.Array:
    """x.astype(dtype), skipping the no-op cast (keeps traced programs small)."""
    return x if x.dtype == dtype else x.astype(dtype)


def resolve_dtype(dtype: Any = None, use_fp16: bool = False) -> jnp.dtype:
    """The compute dtype: "float32" or "bfloat16" (None: bfloat16 if use_fp16 else float32)."""
    if dtype is None:
        return jnp.dtype(jnp.bfloat16 if use_fp16 else jnp.float32)
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype!r} is not supported; use 'float32' or 'bfloat16'")
    return d


def abstract_params(module: nn.Module, *args, **kwargs):
    """Shapes and dtypes of `module`'s params when initialised on these inputs (jax.ShapeDtypeStructs or
    arrays): jax.eval_shape of init, so nothing is allocated or computed."""
    return jax.eval_shape(lambda a, k: module.init(jax.random.key(0), *a, **k), args, kwargs)["params"]


# --- Elementary layers -------------------------------------------------------------------------------

def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps [B] -> [B, dim], float32."""
    half = dim // 2
    # Frequencies computed in float64 on the host and rounded once, like torch's float32 exp.
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm32(nn.Module):
    """torch.nn.GroupNorm(32, C, eps=1e-5), computed in float32, returned in the input dtype.

    Works on [B, ..., C]; statistics over every non-batch axis of a group. `silu=True` applies SiLU
    (`gelu=True` the exact GELU) to the result, and `scale`/`shift` ([B, C]) the ResBlock's scale-shift modulation
    `norm(x) * (1 + scale) + shift`; all of it is one `jaxdiff.ops.norm.group_norm` call.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    silu: bool = False
    gelu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, scale: Optional[jax.Array] = None, shift: Optional[jax.Array] = None) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm32: {c} channels are not divisible by {self.num_groups} groups")
        p = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        q = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if scale is not None:
            p, q = p * (1 + cast(scale, jnp.float32)), q * (1 + cast(scale, jnp.float32))
        if shift is not None:
            q = q + cast(shift, jnp.float32)
        return group_norm(x, p, q, groups=self.num_groups, eps=self.epsilon, silu=self.silu, gelu=self.gelu)


class Conv(nn.Module):
    """2-D convolution (NHWC x HWIO) with bias, through `jaxdiff.ops.conv.conv2d`.

    Parameters: `kernel` [k, k, in, out] (PyTorch-like init, or zeros) and `bias` [out] (zeros),
    float32; computed in `dtype`. `padding` defaults to k // 2 (same size for odd k at stride 1).
    `inference_forms`: `jaxdiff.ops.conv.conv2d_inference` (on the CPU without differentiation, a cheaper
    equivalent form) instead of `conv2d`.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Optional[int] = None
    zero_init: bool = False
    inference_forms: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", zeros_init if self.zero_init else torch_default_init,
                            (k, k, cin, self.features), jnp.float32)
        bias = self.param("bias", zeros_init, (self.features,), jnp.float32)
        pad = k // 2 if self.padding is None else self.padding
        conv = conv2d_inference if self.inference_forms else conv2d
        y = conv(cast(x, self.dtype), cast(kernel, self.dtype), stride=self.stride, padding=pad)
        return y + cast(bias, self.dtype)


def Dense(features: int, *, name: str, dtype: Dtype = jnp.float32, zero_init: bool = False,
          use_bias: bool = True) -> nn.Dense:
    """nn.Dense with float32 parameters, PyTorch-like kernel init (or zeros), zero bias, compute `dtype`.

    Also guided-diffusion's 1x1 conv1d layers over tokens (qkv, proj_out, qkv_proj, c_proj).
    """
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=zeros_init if zero_init else torch_default_init, bias_init=zeros_init, name=name)


def layer_norm(name: str, eps: float = 1e-5) -> nn.LayerNorm:
    """torch.nn.LayerNorm(eps=eps) in float32 (two-pass variance, as torch)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
                        name=name)


def gelu_mlp(x: jax.Array, fc: str, proj: str, dtype: Dtype = jnp.float32) -> jax.Array:
    """Dense(4W) - exact (erf) GELU - Dense(W), the transformers' MLP, its layers named `fc` and `proj`
    in the calling module."""
    w = x.shape[-1]
    h = nn.gelu(Dense(4 * w, dtype=dtype, name=fc)(x), approximate=False)
    return Dense(w, dtype=dtype, name=proj)(h)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 (F.interpolate(scale_factor=2, mode='nearest')), NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 (nn.AvgPool2d(2)), NHWC; odd edges dropped like torch."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    y = cast(x, jnp.float32).reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return cast(y, x.dtype)


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with align_corners=True: output i samples input
    position i * (n_in - 1) / (n_out - 1) (both ends map to both ends; one output takes input 0)."""
    w = np.zeros((n_out, n_in), np.float64)
    if n_in == 1 or n_out == 1:
        w[:, 0] = 1.0
        return w.astype(np.float32)
    src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 2)
    frac = src - lo
    w[np.arange(n_out), lo] += 1.0 - frac
    w[np.arange(n_out), lo + 1] += frac
    return w.astype(np.float32)


def resize_bilinear_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
    """F.interpolate(x, (height, width), mode='bilinear', align_corners=True), NHWC, float32: how DeepFloyd
    IF's stage II (diffusers' IFSuperResolutionPipeline) upscales the low-resolution image before noising
    it. Two small interpolation matrices applied along H and W (exact for any sizes, up or down)."""
    _, h, w, _ = x.shape
    wh = jnp.asarray(_align_corners_matrix(h, int(height)))
    ww = jnp.asarray(_align_corners_matrix(w, int(width)))
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ih,bhwc->biwc", wh, cast(x, jnp.float32), precision=hi)
    return jnp.einsum("jw,biwc->bijc", ww, y, precision=hi)


def area_downsample(x: jax.Array, factor: int) -> jax.Array:
    """Average pooling over factor x factor blocks (F.interpolate mode='area' for an integer factor), NHWC,
    float32; H and W must be multiples of `factor`."""
    b, h, w, c = x.shape
    f = int(factor)
    if h % f or w % f:
        raise ValueError(f"area_downsample: {h}x{w} is not a multiple of the factor {f}")
    return cast(x, jnp.float32).reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))


class _Resample(nn.Module):
    """An up / down-sampling layer's fields: its output channels, whether it convolves, the compute dtype."""

    out_channels: int
    use_conv: bool = True
    dtype: Dtype = jnp.float32


class Upsample(_Resample):
    """Nearest x2, then (use_conv) a 3x3 conv named `conv`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        if self.use_conv:
            x = Conv(self.out_channels, 3, dtype=self.dtype, name="conv")(x)
        return x


class Downsample(_Resample):
    """Stride-2 3x3 conv named `op` (use_conv), or 2x2 average pooling."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return Conv(self.out_channels, 3, stride=2, padding=1, dtype=self.dtype, name="op")(x)
        return avg_pool2(x)


class ResBlock(nn.Module):
    """guided-diffusion ResBlock (NHWC). `deterministic=False` enables dropout (rng 'dropout')."""

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    use_conv: bool = False
    up: bool = False
    down: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        cout = self.out_channels
        h = GroupNorm32(silu=True, name="in_layers_0")(x)
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = Conv(cout, 3, dtype=self.dtype, name="in_layers_2")(h)

        emb_out = Dense(2 * cout if self.use_scale_shift_norm else cout, dtype=self.dtype,
                        name="emb_layers_1")(nn.silu(emb))
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm32(silu=True, name="out_layers_0")(h, scale, shift)
        else:
            h = GroupNorm32(silu=True, name="out_layers_0")(h + cast(emb_out, h.dtype)[:, None, None, :])
        h = nn.Dropout(rate=self.dropout)(h, deterministic=self.deterministic or self.dropout == 0.0)
        h = Conv(cout, 3, zero_init=True, dtype=self.dtype, name="out_layers_3")(h)

        if cin == cout:
            skip = x
        else:
            skip = Conv(cout, 3 if self.use_conv else 1, dtype=self.dtype, name="skip_connection")(x)
        return skip + h


def qkv_projections(x: jax.Array, kernel: jax.Array, bias: jax.Array, num_heads: int, new_order: bool,
                    dtype: Dtype, parts: int = 3) -> tuple:
    """guided-diffusion's qkv conv1d as `parts` projections: tokens [B, T, C_in] -> q, k, v, each
    [B * H, T, ch] (heads folded into the batch), q and k scaled by ch^-1/4. With parts=2 (GLIDE's
    encoder_kv) the projections are k, v: every part but the last (v) is scaled.

    `kernel` [C_in, parts*H*ch] and `bias` [parts*H*ch] keep the checkpoint's channel layout: legacy
    order (QKVAttentionLegacy) is heads first, [H, (q, k, v), ch]; new order (QKVAttention) is
    [(q, k, v), H, ch]. The (small) kernel is split rather than the output, whose strided slices
    would cost zero-padded full-width gradients; the ch^-1/4 scale is folded into the weights.
    """
    b, t, c_in = x.shape
    ch = kernel.shape[1] // (parts * num_heads)
    layout = (parts, num_heads, ch) if new_order else (num_heads, parts, ch)
    kernel, bias = kernel.reshape((c_in,) + layout), bias.reshape(layout)
    part = 0 if new_order else 1  # axis of (q, k, v) in `layout`
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    x = cast(x, dtype)
    out = []
    for i in range(parts):
        s = 1.0 if i == parts - 1 else scale
        w = jnp.take(kernel, i, axis=part + 1).reshape(c_in, num_heads * ch) * s
        w_b = jnp.take(bias, i, axis=part).reshape(num_heads * ch) * s
        y = jax.lax.dot_general(x, cast(w, dtype), (((2,), (0,)), ((), ()))) + cast(w_b, dtype)
        out.append(split_heads(y, num_heads))
    return tuple(out)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, H * d] -> [B * H, T, d]; head h holds channels h*d .. (h+1)*d - 1."""
    b, t, c = x.shape
    return jnp.swapaxes(x.reshape(b, t, num_heads, c // num_heads), 1, 2).reshape(b * num_heads, t, c // num_heads)


def merge_heads(a: jax.Array, batch: int) -> jax.Array:
    """[B * H, T, ch] -> [B, T, H * ch]."""
    n, t, ch = a.shape
    return jnp.swapaxes(a.reshape(batch, n // batch, t, ch), 1, 2).reshape(batch, t, n // batch * ch)


class QKV(nn.Module):
    """guided-diffusion's qkv conv1d (parameters `kernel` [C_in, parts*C], `bias` [parts*C], as nn.Dense
    keeps them) returning the per-head projections of `qkv_projections`. C is `features`, or the
    input's channels when None."""

    num_heads: int
    new_order: bool
    dtype: Dtype = jnp.float32
    parts: int = 3
    features: Optional[int] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple:
        c_in = x.shape[-1]
        c = c_in if self.features is None else self.features
        kernel = self.param("kernel", torch_default_init, (c_in, self.parts * c), jnp.float32)
        bias = self.param("bias", zeros_init, (self.parts * c,), jnp.float32)
        return qkv_projections(x, kernel, bias, self.num_heads, self.new_order, self.dtype, self.parts)


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer: channels // num_head_channels when that is set, else num_heads."""
    return num_heads if num_head_channels == -1 else channels // num_head_channels


class AttentionBlock(nn.Module):
    """Self-attention over all pixels: GN - qkv - attention - zero-init proj_out, residual.

    `encoder_out` [B, S, E] (GLIDE's text features): its 1x1 projection `encoder_kv` (E -> 2C, per head
    [k | v]) gives S more keys and values, joined to the pixels' under one softmax.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, encoder_out: Optional[jax.Array] = None) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        heads = attention_heads(c, self.num_heads, self.num_head_channels)
        tokens = x.reshape(b, -1, c)
        q, k, v = QKV(heads, self.use_new_attention_order, self.dtype, name="qkv")(GroupNorm32(name="norm")(tokens))
        if encoder_out is not None:
            kv = QKV(heads, self.use_new_attention_order, self.dtype, parts=2, features=c, name="encoder_kv")
            ek, ev = kv(encoder_out)
            k, v = jnp.concatenate([ek, k], axis=1), jnp.concatenate([ev, v], axis=1)
        h = Dense(c, dtype=self.dtype, zero_init=True, name="proj_out")(merge_heads(attention(q, k, v), b))
        return (tokens + h).reshape(x.shape)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (guided-diffusion's classifier head), new QKV order.

    `positional_embedding` is stored [H*W + 1, C] (token-major; guided-diffusion stores [C, H*W + 1]).
    """

    num_head_channels: int
    output_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        tokens = x.reshape(b, -1, c)
        tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)
        pos = self.param("positional_embedding",
                         lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / math.sqrt(c),
                         (tokens.shape[1], c), jnp.float32)
        if pos.shape != tokens.shape[1:]:
            raise ValueError(
                f"AttentionPool2d: {tokens.shape[1] - 1} pixels at the pooling resolution, but the positional "
                f"embedding was built for {pos.shape[0] - 1}: the classifier needs inputs of its image_size")
        tokens = tokens + cast(pos, tokens.dtype)
        q, k, v = QKV(c // self.num_head_channels, new_order=True, dtype=self.dtype, name="qkv_proj")(tokens)
        out = Dense(self.output_dim, dtype=self.dtype, name="c_proj")(merge_heads(attention(q, k, v), b))
        return out[:, 0]


# --- Architecture plan: the block layout, used by validation and the modules -------------------------

@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a TimestepEmbedSequential block.

    kind: "conv_in" | "res" | "attn" | "down" | "up"; `ds` is the downsampling factor the layer runs at
    (its input's); `upsample_heads` marks attention in the decoder (num_heads_upsample).
    """

    kind: str
    in_ch: int
    out_ch: int
    ds: int
    up: bool = False
    down: bool = False
    use_conv: bool = True
    upsample_heads: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    input_blocks: tuple  # tuple[tuple[LayerSpec, ...], ...]
    middle_block: tuple  # tuple[LayerSpec, ...]
    output_blocks: tuple  # tuple[tuple[LayerSpec, ...], ...]; empty for the encoder only
    input_ch: int  # channels after the first conv (and of the U-Net's last level)
    mid_ch: int  # channels of the middle block
    mid_ds: int  # downsampling factor of the middle block
    feature_size: int  # sum of the channels of every encoder output (spatial pooling)
    out_ch: int  # channels entering the U-Net's `out` head

    def attention_layers(self):
        for blocks in (self.input_blocks, (self.middle_block,), self.output_blocks):
            for block in blocks:
                for spec in block:
                    if spec.kind == "attn":
                        yield spec


def make_plan(model_channels: int, channel_mult: Sequence[float], num_res_blocks: int,
              attention_resolutions: Sequence[int], resblock_updown: bool, conv_resample: bool = True,
              decoder: bool = True) -> Plan:
    """Block layout exactly as guided-diffusion's UNetModel / EncoderUNetModel constructors."""
    attn = set(int(a) for a in attention_resolutions)
    ch = input_ch = int(channel_mult[0] * model_channels)
    input_blocks = [(LayerSpec("conv_in", -1, ch, 1),)]
    chans = [ch]
    feature_size = ch
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out = int(mult * model_channels)
            layers = [LayerSpec("res", ch, out, ds)]
            ch = out
            if ds in attn:
                layers.append(LayerSpec("attn", ch, ch, ds))
            input_blocks.append(tuple(layers))
            chans.append(ch)
            feature_size += ch
        if level != len(channel_mult) - 1:
            if resblock_updown:
                input_blocks.append((LayerSpec("res", ch, ch, ds, down=True),))
            else:
                input_blocks.append((LayerSpec("down", ch, ch, ds, use_conv=conv_resample),))
            chans.append(ch)
            ds *= 2
            feature_size += ch
    middle = (LayerSpec("res", ch, ch, ds), LayerSpec("attn", ch, ch, ds), LayerSpec("res", ch, ch, ds))
    feature_size += ch
    mid_ch, mid_ds = ch, ds

    output_blocks = []
    if decoder:
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = chans.pop()
                out = int(model_channels * mult)
                layers = [LayerSpec("res", ch + ich, out, ds)]
                ch = out
                if ds in attn:
                    layers.append(LayerSpec("attn", ch, ch, ds, upsample_heads=True))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(LayerSpec("res", ch, ch, ds, up=True))
                    else:
                        layers.append(LayerSpec("up", ch, ch, ds, use_conv=conv_resample))
                    ds //= 2
                output_blocks.append(tuple(layers))
    return Plan(input_blocks=tuple(input_blocks), middle_block=middle, output_blocks=tuple(output_blocks),
                input_ch=input_ch, mid_ch=mid_ch, mid_ds=mid_ds, feature_size=feature_size, out_ch=ch)


def plan_of(m) -> Plan:
    """The plan of a UNetModel / SuperResModel / EncoderUNetModel instance."""
    return make_plan(m.model_channels, tuple(m.channel_mult), m.num_res_blocks, tuple(m.attention_resolutions),
                     m.resblock_updown, m.conv_resample, decoder=not hasattr(m, "pool"))


# --- Trunks of the U-Net and the classifier ----------------------------------------------------------
# Called from inside a module's @nn.compact __call__ (passed as `m`), so the layers they create become
# that module's submodules under guided-diffusion's names.


def compute_dtype(m) -> jnp.dtype:
    return resolve_dtype(getattr(m, "dtype", None), getattr(m, "use_fp16", False))


def time_embed(m, timesteps: jax.Array) -> jax.Array:
    """sinusoidal(t) -> Dense(4C) -> SiLU -> Dense(4C), float32; names time_embed_0 / time_embed_2."""
    ted = 4 * m.model_channels
    emb = timestep_embedding(timesteps, m.model_channels)
    emb = Dense(ted, name="time_embed_0")(emb)
    emb = Dense(ted, name="time_embed_2")(nn.silu(emb))
    return emb


def _make_layer(m, spec: LayerSpec, name: str, out_channels_conv_in: int, train: bool):
    dtype = compute_dtype(m)
    remat = bool(getattr(m, "use_checkpoint", False))
    if spec.kind == "conv_in":
        return Conv(out_channels_conv_in, 3, dtype=dtype, name=name)
    if spec.kind == "res":
        cls = nn.remat(ResBlock) if remat else ResBlock
        return cls(out_channels=spec.out_ch, dropout=float(m.dropout), use_scale_shift_norm=m.use_scale_shift_norm,
                   up=spec.up, down=spec.down, deterministic=not train, dtype=dtype, name=name)
    if spec.kind == "attn":
        cls = nn.remat(AttentionBlock) if remat else AttentionBlock
        heads = m.num_heads
        if spec.upsample_heads and getattr(m, "num_heads_upsample", -1) != -1:
            heads = m.num_heads_upsample
        return cls(num_heads=heads, num_head_channels=m.num_head_channels,
                   use_new_attention_order=m.use_new_attention_order, dtype=dtype, name=name)
    if spec.kind == "down":
        return Downsample(spec.out_ch, use_conv=spec.use_conv, dtype=dtype, name=name)
    if spec.kind == "up":
        return Upsample(spec.out_ch, use_conv=spec.use_conv, dtype=dtype, name=name)
    raise AssertionError(spec.kind)


def run_block(m, block, prefix: str, h: jax.Array, emb: jax.Array, train: bool,
              encoder_out: Optional[jax.Array] = None) -> jax.Array:
    """Apply one TimestepEmbedSequential block; layer j is named f"{prefix}_{j}". `encoder_out` (text
    features) goes to the attention layers."""
    for j, spec in enumerate(block):
        layer = _make_layer(m, spec, f"{prefix}_{j}", spec.out_ch, train)
        if spec.kind == "res":
            h = layer(h, emb)
        elif spec.kind == "attn" and encoder_out is not None:
            h = layer(h, encoder_out)
        else:
            h = layer(h)
    return h


def encoder_trunk(m, plan: Plan, h: jax.Array, emb: jax.Array, train: bool,
                  encoder_out: Optional[jax.Array] = None):
    """input_blocks + middle_block, the one encoder used by the U-Net and the classifier.

    Returns (middle block output, [output of every input block]).
    """
    hs = []
    for i, block in enumerate(plan.input_blocks):
        h = run_block(m, block, f"input_blocks_{i}", h, emb, train, encoder_out)
        hs.append(h)
    h = run_block(m, plan.middle_block, "middle_block", h, emb, train, encoder_out)
    return h, hs


def decoder_trunk(m, plan: Plan, h: jax.Array, hs, emb: jax.Array, train: bool,
                  encoder_out: Optional[jax.Array] = None) -> jax.Array:
    """output_blocks of the U-Net: each concatenates the matching encoder output (channels last)."""
    hs = list(hs)
    for i, block in enumerate(plan.output_blocks):
        h = jnp.concatenate([h, cast(hs.pop(), h.dtype)], axis=-1)
        h = run_block(m, block, f"output_blocks_{i}", h, emb, train, encoder_out)
    return h


# --- Validation (pure Python, before anything is traced or compiled) ---------------------------------

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


def check_architecture(m, kind: str) -> None:
    """Raise ValueError (naming the flag, the value and what is allowed) if the flags of `m` (a module
    or any object with the constructor flags as attributes) cannot build a working network."""
    for flag in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks"):
        v = getattr(m, flag)
        if not is_int(v) or v < (0 if flag == "num_res_blocks" else 1):
            raise ValueError(f"{flag}={v!r}: expected a positive integer")
    if getattr(m, "dims", 2) != 2:
        raise ValueError(f"dims={m.dims!r}: jaxdiff models are 2-D only (dims=2)")
    cm = tuple(m.channel_mult)
    if not cm or any(isinstance(c, bool) or not isinstance(c, (int, float, np.number)) or c <= 0 for c in cm):
        raise ValueError(f"channel_mult={m.channel_mult!r}: expected a non-empty sequence of positive numbers")
    for c in cm:
        ch = int(c * m.model_channels)
        if ch < 32 or ch % 32:
            raise ValueError(f"channel_mult entry {c} with model_channels={m.model_channels} gives {ch} channels; "
                             f"GroupNorm32 needs a positive multiple of 32 channels (ch = int(mult * model_channels))")
    levels = len(cm)
    factor = 2 ** (levels - 1)
    if m.image_size % factor:
        raise ValueError(f"image_size={m.image_size} cannot be halved {levels - 1} times by channel_mult={cm} "
                         f"({levels} levels): image_size must be divisible by {factor}")
    if not 0.0 <= float(m.dropout) < 1.0:
        raise ValueError(f"dropout={m.dropout!r}: expected a probability in [0, 1)")
    reached = [2**i for i in range(levels)]
    for a in m.attention_resolutions:
        if not is_int(a) or a not in reached:
            res = [m.image_size // d for d in reached]
            raise ValueError(f"attention_resolutions contains {a!r}, a downsampling factor (ds) this network never "
                             f"reaches: with channel_mult={cm} it runs at ds {reached} (resolutions {res} for "
                             f"image_size {m.image_size}). attention_resolutions are factors ds = image_size // "
                             f"resolution, as inside guided-diffusion's UNetModel; jaxdiff.convert.guided_diffusion.flags_from_args "
                             f"converts command-line resolutions")
    nh, nhc = m.num_heads, m.num_head_channels
    nhu = getattr(m, "num_heads_upsample", -1)
    if nhc == -1:
        if not is_int(nh) or nh < 1:
            raise ValueError(f"num_heads={nh!r}: expected a positive integer (or set num_head_channels)")
        if nhu != -1 and (not is_int(nhu) or nhu < 1):
            raise ValueError(f"num_heads_upsample={nhu!r}: expected a positive integer or -1 (= num_heads)")
    elif not is_int(nhc) or nhc < 1:
        raise ValueError(f"num_head_channels={nhc!r}: expected a positive integer or -1 (use num_heads)")
    plan = make_plan(m.model_channels, cm, m.num_res_blocks, tuple(m.attention_resolutions), m.resblock_updown,
                     m.conv_resample, decoder=(kind != "classifier"))
    for spec in plan.attention_layers():
        ch = spec.in_ch
        if nhc != -1 and ch % nhc:
            raise ValueError(f"num_head_channels={nhc} does not divide the {ch} channels of the attention layer at "
                             f"ds {spec.ds}; every attention layer's channels must be a multiple of num_head_channels")
        flag = "num_heads_upsample" if spec.upsample_heads and nhu != -1 else "num_heads"
        heads = nhu if flag == "num_heads_upsample" else nh
        if nhc == -1 and ch % heads:
            raise ValueError(f"{flag}={heads} does not divide the {ch} channels of the attention layer at ds {spec.ds}")
    if kind == "classifier":
        if m.pool not in POOLS:
            raise ValueError(f"pool={m.pool!r} is unknown; expected one of {POOLS}")
        if m.pool == "attention":
            if nhc == -1:
                raise ValueError("pool='attention' needs num_head_channels (64 in guided-diffusion), not -1")
            if plan.mid_ch % nhc:
                raise ValueError(f"num_head_channels={nhc} does not divide the {plan.mid_ch} channels of the "
                                 "attention pooling")
    else:
        nc = getattr(m, "num_classes", None)
        if nc is not None and (not is_int(nc) or nc < 1):
            raise ValueError(f"num_classes={nc!r}: expected a positive integer or None (unconditional)")
        if getattr(m, "null_label", False) and nc is None:
            raise ValueError("null_label=True needs num_classes (the null label is index num_classes)")
    resolve_dtype(getattr(m, "dtype", None), getattr(m, "use_fp16", False))
