"""Noisy classifier: guided-diffusion's EncoderUNetModel (the U-Net's encoder trunk + a pooling head).

`apply(variables, x, timesteps, train=False)` -> logits [B, out_channels] (float32).
x is NHWC [B, image_size, image_size, in_channels]; timesteps are the ORIGINAL diffusion timesteps
(the classifier sees the same, un-respaced t as the diffusion model).

The trunk is built by `layers.encoder_trunk`, the same code the U-Net uses. Pooling heads (names as
guided-diffusion's `out` Sequential):
  "adaptive"    GN - SiLU - global average - zero-init 1x1 conv            (out.0, out.3)
  "attention"   GN - SiLU - AttentionPool2d(num_head_channels)              (out.0, out.2)
  "spatial"     mean of every block's output, concat - Dense 2048 - ReLU - Dense   (out.0, out.2)
  "spatial_v2"  as spatial with Dense 2048 - GN - SiLU - Dense             (out.0, out.1, out.3)
Flags: as guided-diffusion's constructor, plus `dtype` (see unet.py). num_heads_upsample is accepted
and unused, as in guided-diffusion.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models import layers as L
from jaxdiff.models.unet import ADMFlags, check_image_input, prepare_timesteps


class EncoderUNetModel(ADMFlags):
    """guided-diffusion EncoderUNetModel (see the module docstring for the interface)."""

    pool: str = "adaptive"

    @nn.compact
    def __call__(self, x, timesteps, train: bool = False, return_features: bool = False):
        """Logits [B, out_channels]; with return_features, (logits, features [B, D]).

        Features are the penultimate representation used by evaluation metrics: the spatial mean
        of the normalised trunk output (for the spatial pools, the input of their last layer).
        """
        check_image_input(self, x, self.in_channels, exact_size=self.pool == "attention")
        t = prepare_timesteps(timesteps, x.shape[0])
        plan = L.plan_of(self)
        dtype = L.compute_dtype(self)

        emb = L.time_embed(self, t)
        h = L.cast(x, dtype)
        h, hs = L.encoder_trunk(self, plan, h, emb, train)

        if self.pool.startswith("spatial"):
            feats = jnp.concatenate([L.cast(a, jnp.float32).mean(axis=(1, 2)) for a in hs + [h]], axis=-1)
            f = L.Dense(2048, name="out_0")(feats)
            if self.pool == "spatial":
                f = nn.relu(f)
                logits = L.Dense(self.out_channels, name="out_2")(f)
            else:
                f = L.GroupNorm32(silu=True, name="out_1")(f)
                logits = L.Dense(self.out_channels, name="out_3")(f)
            return (logits, f) if return_features else logits

        h = L.cast(h, jnp.float32)
        h = L.GroupNorm32(silu=True, name="out_0")(h)
        features = jnp.mean(h, axis=(1, 2))
        if self.pool == "adaptive":
            logits = L.Conv(self.out_channels, 1, zero_init=True, name="out_3")(features[:, None, None, :])
            logits = logits.reshape(logits.shape[0], -1)
        else:
            logits = L.AttentionPool2d(self.num_head_channels, self.out_channels, name="out_2")(h)
        return (logits, features) if return_features else logits
