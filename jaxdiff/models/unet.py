"""ADM U-Net (guided-diffusion's UNetModel) and SuperResModel, Flax linen, NHWC.

`apply(variables, x, timesteps, y=None, train=False)`:
  x          [B, H, W, in_channels] float, NHWC.
  timesteps  [B] (or scalar) int or float: the ORIGINAL (un-respaced) diffusion timesteps.
  y          [B] int labels, or None. Required for class-conditional models unless null_label=True,
             where None means "no label" (index num_classes) for the whole batch.
  train      enables dropout (pass rngs={'dropout': key}).
returns [B, H, W, out_channels]; with learned sigma the first half is eps, the second half the
variance interpolation value v in [-1, 1].

Flags follow guided-diffusion's constructor exactly (attention_resolutions are downsampling factors
ds). jaxdiff extras:
  null_label  the label embedding has num_classes + 1 rows; label num_classes means "no label" (CFG).
  dtype       compute dtype, "float32" or "bfloat16"; None: bfloat16 if use_fp16 else float32.
              Parameters are always float32; GroupNorm, softmax, the time embedding and the output
              head run in float32.
  use_checkpoint  nn.remat on every ResBlock and AttentionBlock.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import layers as L


def check_labels(y, num_classes: Optional[int], null_label: bool = False) -> np.ndarray:
    """Validate concrete integer labels on the host (before jitting): 0 <= y < num_classes, or
    y == num_classes ("no label") when null_label. Returns them as a numpy array; raises ValueError."""
    if num_classes is None:
        raise ValueError("labels y were given to an unconditional model (num_classes=None)")
    arr = np.asarray(y)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels y must be integers, got dtype {arr.dtype}")
    hi = num_classes + (1 if null_label else 0)
    bad = (arr < 0) | (arr >= hi)
    if np.any(bad):
        v = int(arr[bad].reshape(-1)[0])
        allowed = f"0..{num_classes - 1}" + (f", or {num_classes} for 'no label' (null_label)" if null_label else "")
        raise ValueError(f"label y={v} is outside the classes: allowed {allowed} (num_classes={num_classes})")
    return arr


def concrete_array(a) -> Optional[np.ndarray]:
    """np.ndarray of `a` if it is concrete (not traced), else None."""
    tracer = getattr(jax.core, "Tracer", None)
    if tracer is not None and isinstance(a, tracer):
        return None
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def prepare_timesteps(timesteps, batch: int) -> jax.Array:
    t = jnp.asarray(timesteps)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"timesteps must have shape [B]=({batch},) (or be a scalar), got {t.shape}")
    return t


def check_image_input(m, x, in_channels: int, exact_size: bool = False):
    """ValueError for an image batch the ADM network `m` cannot take (NHWC, channels, size)."""
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC [B, H, W, C], got shape {x.shape}")
    if x.shape[-1] != in_channels:
        raise ValueError(f"x has {x.shape[-1]} channels (last axis, NHWC) but the model was built with in_channels="
                         f"{in_channels}" + (" (did you pass NCHW?)" if x.shape[1] == in_channels else ""))
    factor = 2 ** (len(m.channel_mult) - 1)
    h, w = x.shape[1], x.shape[2]
    if exact_size and (h, w) != (m.image_size, m.image_size):
        raise ValueError(f"x is {h}x{w} but the model was built for image_size={m.image_size}")
    if h % factor or w % factor:
        raise ValueError(f"x is {h}x{w}; with {len(m.channel_mult)} levels H and W must be divisible by {factor}")


def unet_forward(m, x, timesteps, y, train: bool, in_channels: int, extra_emb=None, encoder_out=None):
    """The U-Net body shared by UNetModel, SuperResModel and the text-conditional U-Nets (called inside
    their compact __call__). `extra_emb` [B, 4C] is added to the timestep embedding and `encoder_out`
    [B, S, E] is given to every attention block (GLIDE's pooled text vector and text features).

    The flags were validated once by `jaxdiff.models.create_model` (not again on every trace).
    """
    check_image_input(m, x, in_channels)
    t = prepare_timesteps(timesteps, x.shape[0])
    plan = L.plan_of(m)
    dtype = L.compute_dtype(m)

    emb = L.time_embed(m, t)
    if extra_emb is not None:
        emb = emb + L.cast(extra_emb, emb.dtype)
    if getattr(m, "num_classes", None) is not None:
        if y is None:
            if not m.null_label:
                raise ValueError("this model is class-conditional (num_classes set): pass labels y "
                                 "(or build it with null_label=True to allow y=None as 'no label')")
            y = jnp.full((x.shape[0],), m.num_classes, jnp.int32)
        y = jnp.asarray(y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels y must have shape [B]=({x.shape[0]},), got {y.shape}")
        concrete = concrete_array(y)
        if concrete is not None:
            check_labels(concrete, m.num_classes, m.null_label)
        n = m.num_classes + (1 if m.null_label else 0)
        emb = emb + nn.Embed(n, 4 * m.model_channels, param_dtype=jnp.float32, dtype=jnp.float32,
                             embedding_init=nn.initializers.normal(1.0), name="label_emb")(y)
    elif y is not None:
        raise ValueError("labels y were given to an unconditional model (num_classes=None)")

    h = L.cast(x, dtype)
    h, hs = L.encoder_trunk(m, plan, h, emb, train, encoder_out)
    h = L.decoder_trunk(m, plan, h, hs, emb, train, encoder_out)
    h = L.cast(h, jnp.float32)
    h = L.GroupNorm32(silu=True, name="out_0")(h)
    return L.Conv(m.out_channels, 3, zero_init=True, dtype=jnp.float32, name="out_2")(h)


class ADMFlags(nn.Module):
    """guided-diffusion's constructor flags shared by the U-Net and the classifier (fields only)."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[float] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: Any = None


class UNetModel(ADMFlags):
    """guided-diffusion UNetModel (see the module docstring for the interface)."""

    num_classes: Optional[int] = None
    null_label: bool = False

    @nn.compact
    def __call__(self, x, timesteps, y=None, train: bool = False):
        return unet_forward(self, x, timesteps, y, train, self.in_channels)


def upsample_bilinear(low_res: jax.Array, height: int, width: int) -> jax.Array:
    """F.interpolate(low_res, (height, width), mode='bilinear', align_corners=False), NHWC.

    jax.image.resize 'linear' (half-pixel centres, renormalised border weights) equals torch's
    clamping of source coordinates when upsampling (tested against a numpy port of torch's formula).
    """
    b, _, _, c = low_res.shape
    return jax.image.resize(low_res, (b, height, width, c), method="linear", antialias=False)


class SuperResModel(UNetModel):
    """guided-diffusion SuperResModel: `in_channels` is the image's (3); the network sees 2x that.

    `apply(variables, x, timesteps, low_res=..., y=None, train=False)`: low_res [B, h, w, in_channels]
    is upsampled bilinearly to x's size and concatenated after x's channels.
    """

    @nn.compact
    def __call__(self, x, timesteps, low_res=None, y=None, train: bool = False):
        return unet_forward(self, superres_input(self, x, low_res), timesteps, y, train, 2 * self.in_channels)


def superres_input(m, x, low_res) -> jax.Array:
    """x [B, H, W, C] with low_res [B, h, w, C] upsampled bilinearly to H x W concatenated after its
    channels, float32 (C = m.in_channels): the network input of the super-resolution models."""
    name = type(m).__name__
    if low_res is None:
        raise ValueError(f"{name} needs low_res=[B, h, w, C] (the low-resolution image)")
    if low_res.ndim != 4 or low_res.shape[-1] != m.in_channels or low_res.shape[0] != x.shape[0]:
        raise ValueError(f"low_res must be NHWC [B, h, w, {m.in_channels}] with x's batch, got {low_res.shape}")
    if x.ndim != 4 or x.shape[-1] != m.in_channels:
        raise ValueError(f"x must be NHWC [B, H, W, {m.in_channels}], got {x.shape}")
    up = upsample_bilinear(L.cast(low_res, jnp.float32), x.shape[1], x.shape[2])
    return jnp.concatenate([L.cast(x, jnp.float32), up], axis=-1)
