"""GLIDE's caption encoder (openai/glide-text2im Text2ImUNet's transformer), Flax linen.

`TextEncoder` maps tokens [B, text_ctx] (and, with xf_padding, a boolean mask [B, text_ctx], True on
real tokens) to

  xf_proj  [B, 4 * model_channels] float32: transformer_proj of the output at the LAST position (whatever
           the mask says); the text U-Net adds it to the timestep embedding;
  xf_out   [B, text_ctx, xf_width] float32: every position's output, channels last (GLIDE keeps it
           (B, xf_width, text_ctx)); every attention block of the text U-Net attends to it.

Input: token_embedding[token] + positional_embedding; with xf_padding, positions where the mask is False
take padding_embedding[position] instead (so their ids have no effect); without it the mask is unused.
Blocks: xf_layers pre-LayerNorm blocks x + attn(ln_1(x)), x + mlp(ln_2(x)), no attention mask; c_qkv
holds [q | k | v] per head (guided-diffusion's legacy order, `layers.QKV`). With xf_final_ln a last
LayerNorm (`final_ln`) follows. Submodule names mirror GLIDE's state_dict keys ("transformer.
resblocks.0.attn.c_qkv" <-> transformer/resblocks_0/attn/c_qkv) for `jaxdiff.convert`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import layers as L
from jaxdiff.models.unet import concrete_array
from jaxdiff.ops.attention import attention
from jaxdiff.util.config import is_int

TEXT_FLAGS = ("text_ctx", "xf_width", "xf_layers", "xf_heads", "n_vocab")


class MultiheadAttention(nn.Module):
    """c_qkv (W -> 3W, per head [q | k | v]) - softmax attention over all positions - c_proj."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, w = x.shape
        q, k, v = L.QKV(self.heads, new_order=False, dtype=self.dtype, name="c_qkv")(x)
        return L.Dense(w, dtype=self.dtype, name="c_proj")(L.merge_heads(attention(q, k, v), b))


class MLP(nn.Module):
    """c_fc (W -> 4W) - exact (erf) GELU - c_proj (4W -> W)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return L.gelu_mlp(x, "c_fc", "c_proj", self.dtype)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); the residual stream stays float32."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + L.cast(MultiheadAttention(self.heads, self.dtype, name="attn")(L.layer_norm("ln_1")(x)), jnp.float32)
        return x + L.cast(MLP(self.dtype, name="mlp")(L.layer_norm("ln_2")(x)), jnp.float32)


class Transformer(nn.Module):
    """`layers` ResidualAttentionBlocks named resblocks_0, resblocks_1, ..."""

    layers: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.heads, self.dtype, name=f"resblocks_{i}")(x)
        return x


class TextEncoder(nn.Module):
    """GLIDE's caption encoder: (tokens, mask) -> (xf_proj, xf_out); see the module docstring.

    `emb_channels` is the U-Net's timestep-embedding width (4 * model_channels); `dtype` the compute
    dtype of the linear layers (LayerNorm, softmax and the residual stream are float32).
    """

    text_ctx: int
    xf_width: int
    xf_layers: int
    xf_heads: int
    xf_final_ln: bool
    xf_padding: bool
    n_vocab: int
    emb_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: Optional[jax.Array] = None) -> tuple:
        check_tokens(self, tokens, mask)
        ctx, width = self.text_ctx, self.xf_width
        normal = nn.initializers.normal(0.01)
        x = nn.Embed(self.n_vocab, width, dtype=jnp.float32, param_dtype=jnp.float32, embedding_init=normal,
                     name="token_embedding")(jnp.asarray(tokens, jnp.int32))
        x = x + self.param("positional_embedding", normal, (ctx, width), jnp.float32)[None]
        if self.xf_padding:
            pad = self.param("padding_embedding", normal, (ctx, width), jnp.float32)
            x = jnp.where(jnp.asarray(mask, bool)[..., None], x, pad[None])
        x = Transformer(self.xf_layers, self.xf_heads, self.dtype, name="transformer")(x)
        if self.xf_final_ln:
            x = L.layer_norm("final_ln")(x)
        xf_proj = L.Dense(self.emb_channels, dtype=self.dtype, name="transformer_proj")(x[:, -1])
        return L.cast(xf_proj, jnp.float32), x


def check_text_flags(m) -> None:
    """Raise ValueError naming the flag if GLIDE's text flags of `m` (a module or any object with them as
    attributes) cannot build the encoder."""
    for flag in TEXT_FLAGS:
        v = getattr(m, flag)
        if not is_int(v) or v < (0 if flag == "xf_layers" else 1):
            raise ValueError(f"{flag}={v!r}: expected a positive integer" + (" (or 0)" if flag == "xf_layers" else ""))
    if m.xf_width % m.xf_heads:
        raise ValueError(f"xf_heads={m.xf_heads} does not divide xf_width={m.xf_width}")
    for flag in ("xf_final_ln", "xf_padding"):
        if not isinstance(getattr(m, flag), (bool, np.bool_)):
            raise ValueError(f"{flag}={getattr(m, flag)!r}: expected True or False")


def check_tokens(m, tokens, mask) -> None:
    """Shape checks (and, for concrete ids, the vocabulary range) of a caption batch, before tracing."""
    shape = tuple(np.shape(tokens))
    if len(shape) != 2 or shape[1] != m.text_ctx:
        raise ValueError(f"tokens must have shape [B, text_ctx] = [B, {m.text_ctx}], got {shape}")
    if m.xf_padding:
        if mask is None:
            raise ValueError("this model has a padding embedding (xf_padding=True): pass mask [B, text_ctx], "
                             "True on the caption's tokens")
        if tuple(np.shape(mask)) != shape:
            raise ValueError(f"mask must have the shape of tokens {shape}, got {tuple(np.shape(mask))}")
    ids = concrete_array(tokens)
    if ids is not None:
        if ids.dtype.kind not in "iu":
            raise ValueError(f"tokens must be integer ids, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= m.n_vocab)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary 0..{m.n_vocab - 1} "
                             f"(n_vocab={m.n_vocab})")
