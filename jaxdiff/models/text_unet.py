"""GLIDE's text-conditional ADM U-Nets (openai/glide-text2im Text2ImUNet and its variants), Flax, NHWC.

guided-diffusion's U-Net (`unet.unet_forward`, the same layers and parameter names) plus a caption
encoder (`text.TextEncoder`, parameters under `text_encoder`): its pooled vector xf_proj is added to the
timestep embedding and its features xf_out are joined to the keys and values of every attention block
(`layers.AttentionBlock`'s `encoder_kv`).

Calls (`module.apply({'params': params}, ...)`):
  encode_text:  apply(v, tokens, mask, method="encode_text") -> (xf_proj, xf_out), or
                `encode_text(module, params, tokens, mask)`. Encode the captions ONCE per sampling run.
  __call__:     apply(v, x, timesteps, tokens, mask, train=False)  encodes, then runs the U-Net;
                apply(v, x, timesteps, text=(xf_proj, xf_out))     runs the U-Net on cached features.
  x [B, H, W, 3] NHWC; timesteps [B] the ORIGINAL diffusion timesteps; tokens [B, text_ctx] int ids;
  mask [B, text_ctx] bool, True on the caption's tokens (needed with xf_padding, unused without).
  Returns [B, H, W, out_channels]: eps, then (out_channels 6) the variance interpolation values v.
Super-resolution models also take low_res=[B, h, w, 3] (bilinearly resized to x's size, concatenated
after x); inpainting models take inpaint_image [B, H, W, 3] and inpaint_mask [B, H, W, 1] (zeros when
omitted), given to the network as x, inpaint_image * inpaint_mask, inpaint_mask (then the low-res image).

Flags: GLIDE's constructor keyword arguments (text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln,
xf_padding, guided-diffusion's U-Net flags `unet.ADMFlags` with attention_resolutions as downsampling
factors ds), n_vocab (the tokenizer's vocabulary size; GLIDE's GPT-2 BPE has 50257) and jaxdiff's
dtype / use_checkpoint (see unet.py). `in_channels` is the image's (3) in every variant, as in GLIDE's create_model.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import layers as L
from jaxdiff.models.text import TextEncoder
from jaxdiff.models.unet import ADMFlags, superres_input, unet_forward


class Text2ImUNet(ADMFlags):
    """GLIDE's Text2ImUNet (see the module docstring for the interface).

    create_model requires text_ctx, xf_width, xf_layers, xf_heads and xf_final_ln (their defaults here
    are the released models'); xf_padding defaults to False as in GLIDE's constructor.
    use_new_attention_order is not GLIDE's (its attention is in the legacy order): keep it False.
    """

    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = False
    n_vocab: int = 50257

    def setup(self):
        self.text_encoder = TextEncoder(
            self.text_ctx, self.xf_width, self.xf_layers, self.xf_heads, self.xf_final_ln, self.xf_padding,
            self.n_vocab, 4 * self.model_channels, dtype=L.compute_dtype(self),
        )

    def encode_text(self, tokens: jax.Array, mask: Optional[jax.Array] = None) -> tuple:
        """(xf_proj [B, 4C], xf_out [B, text_ctx, xf_width]), both float32."""
        return self.text_encoder(tokens, mask)

    @nn.compact
    def __call__(self, x, timesteps, tokens=None, mask=None, *, text=None, train: bool = False):
        return text_unet_forward(self, x, timesteps, tokens, mask, text, train, self.in_channels)


def text_unet_forward(m, h, timesteps, tokens, mask, text, train: bool, in_channels: int):
    """The U-Net on network input `h` conditioned on the captions (tokens, mask) or on the cached
    text=(xf_proj, xf_out) of `encode_text`."""
    if text is None:
        if tokens is None:
            raise ValueError(f"{type(m).__name__} needs the captions: tokens (and mask), or text=(xf_proj, "
                             f"xf_out) from encode_text")
        text = m.encode_text(tokens, mask)
    elif tokens is not None or mask is not None:
        raise ValueError("pass either tokens/mask or the cached text=(xf_proj, xf_out), not both")
    xf_proj, xf_out = text
    b = h.shape[0]
    if xf_proj.shape != (b, 4 * m.model_channels) or xf_out.shape != (b, m.text_ctx, m.xf_width):
        raise ValueError(
            f"text=(xf_proj, xf_out) must have shapes ({b}, {4 * m.model_channels}) and ({b}, {m.text_ctx}, "
            f"{m.xf_width}) (encode_text's output for x's batch), got {xf_proj.shape} and {xf_out.shape}"
        )
    return unet_forward(m, h, timesteps, None, train, in_channels, extra_emb=xf_proj, encoder_out=xf_out)


def inpaint_input(m, x, inpaint_image, inpaint_mask) -> jax.Array:
    """[x, inpaint_image * inpaint_mask, inpaint_mask] on the channel axis, float32 (zeros when omitted)."""
    if x.ndim != 4 or x.shape[-1] != m.in_channels:
        raise ValueError(f"x must be NHWC [B, H, W, {m.in_channels}], got {x.shape}")
    x = L.cast(x, jnp.float32)
    image = jnp.zeros_like(x) if inpaint_image is None else L.cast(inpaint_image, jnp.float32)
    keep = jnp.zeros_like(x[..., :1]) if inpaint_mask is None else L.cast(inpaint_mask, jnp.float32)
    if image.shape != x.shape or keep.shape != x.shape[:3] + (1,):
        raise ValueError(f"inpaint_image must have x's shape {x.shape} and inpaint_mask {x.shape[:3] + (1,)}, "
                         f"got {image.shape} and {keep.shape}")
    return jnp.concatenate([x, image * keep, keep], axis=-1)


class SuperResText2ImUNet(Text2ImUNet):
    """GLIDE's SuperResText2ImUNet: apply(v, x, t, tokens, mask, low_res=..., text=None, train=False)."""

    @nn.compact
    def __call__(self, x, timesteps, tokens=None, mask=None, *, low_res=None, text=None, train: bool = False):
        h = superres_input(self, x, low_res)
        return text_unet_forward(self, h, timesteps, tokens, mask, text, train, 2 * self.in_channels)


class InpaintText2ImUNet(Text2ImUNet):
    """GLIDE's InpaintText2ImUNet: apply(v, x, t, tokens, mask, inpaint_image=..., inpaint_mask=...)."""

    @nn.compact
    def __call__(self, x, timesteps, tokens=None, mask=None, *, inpaint_image=None, inpaint_mask=None,
                 text=None, train: bool = False):
        h = inpaint_input(self, x, inpaint_image, inpaint_mask)
        return text_unet_forward(self, h, timesteps, tokens, mask, text, train, 2 * self.in_channels + 1)


class SuperResInpaintText2ImUNet(Text2ImUNet):
    """GLIDE's SuperResInpaintText2ImUnet: inpainting inputs, then the upsampled low_res image."""

    @nn.compact
    def __call__(self, x, timesteps, tokens=None, mask=None, *, low_res=None, inpaint_image=None,
                 inpaint_mask=None, text=None, train: bool = False):
        up = superres_input(self, x, low_res)[..., self.in_channels:]
        h = jnp.concatenate([inpaint_input(self, x, inpaint_image, inpaint_mask), up], axis=-1)
        return text_unet_forward(self, h, timesteps, tokens, mask, text, train, 3 * self.in_channels + 1)


def encode_text(module: Text2ImUNet, params, tokens, mask=None) -> tuple:
    """(xf_proj, xf_out) of the captions, for the cached call module.apply(..., text=(xf_proj, xf_out))."""
    return module.apply({"params": params}, tokens, mask, method="encode_text")
