"""diffusers' `UnCLIPTextProjModel` in Flax linen: how unCLIP's (Karlo's) decoder is conditioned on the CLIP
image embedding and the caption.

    cfg = text_proj_config(json.load(open("text_proj/config.json")))
    module = UnCLIPTextProjModel(cfg)
    hidden_states, time_embeddings = module.apply({'params': params}, image_embeddings, text_embeddings,
                                                  text_encoder_hidden_states, do_classifier_free_guidance=False)
    decoder_attention_mask(text_mask, cfg.clip_extra_context_tokens)   # the decoder's mask over hidden_states
    null_image_embedding(params)                                       # the learned CFG image embedding

  image_embeddings [B, clip_embeddings_dim] (the prior's output), text_embeddings [B', clip_embeddings_dim]
  (CLIP's projected text embedding), text_encoder_hidden_states [B', S, clip_embeddings_dim] (its
  last_hidden_state) -> hidden_states [B', clip_extra_context_tokens + S, cross_attention_dim] (the decoder's
  encoder_hidden_states) and time_embeddings [B', time_embed_dim] (added to the decoder's time embedding: its
  class_labels with class_embed_type "identity"). B' = B, or 2B with do_classifier_free_guidance: then the
  image embeddings are preceded by B copies of the learned null embedding (the unconditional half first, as
  diffusers' UnCLIPPipeline orders the text inputs).

The computation (diffusers'): time_embeddings = embedding_proj(text) + clip_image_embeddings_project_to_time_
embeddings(image); the extra tokens are clip_extra_context_tokens_proj(image) read as [cross_attention_dim,
n] (channel c of extra token j is output c * n + j); the token states go through encoder_hidden_states_proj
and text_encoder_hidden_states_norm (LayerNorm, eps 1e-5); the extra tokens come first.

Parameter names are diffusers' state_dict keys (Linear weights `kernel`, transposed; the LayerNorm weight
`scale`; `learned_classifier_free_guidance_embeddings` as is). Supported config: clip_extra_context_tokens,
clip_embeddings_dim, time_embed_dim, cross_attention_dim (all of the class's arguments). Parameters and
computation are float32 (the model is a handful of small projections).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import Dense, layer_norm
from jaxdiff.models.unet2d_condition import checked_fields, config_error
from jaxdiff.util.config import is_int

__all__ = ["TextProjConfig", "UnCLIPTextProjModel", "decoder_attention_mask", "null_image_embedding",
           "text_proj_config"]

_WHAT = "jaxdiff's UnCLIPTextProjModel"
# diffusers' arguments; None: no default (required)
DEFAULTS = {"clip_extra_context_tokens": 4, "clip_embeddings_dim": 768, "time_embed_dim": None,
            "cross_attention_dim": None}


@dataclasses.dataclass(frozen=True)
class TextProjConfig:
    time_embed_dim: int
    cross_attention_dim: int
    clip_extra_context_tokens: int = 4
    clip_embeddings_dim: int = 768


def text_proj_config(config: Mapping) -> TextProjConfig:
    """Check a diffusers UnCLIPTextProjModel config.json (a dict): keys starting with "_" are ignored except
    `_class_name` (must be "UnCLIPTextProjModel" when present); time_embed_dim and cross_attention_dim are
    required (diffusers has no default for them). ValueError naming the field."""
    if isinstance(config, TextProjConfig):
        return config
    d = checked_fields(config, "UnCLIPTextProjModel", DEFAULTS, (), {}, _WHAT)
    for k, v in d.items():
        if not (is_int(v) and v >= 1):
            raise config_error(k, v, "a positive integer" + (" (required)" if DEFAULTS[k] is None else ""), what=_WHAT)
    return TextProjConfig(**{k: int(v) for k, v in d.items()})


class UnCLIPTextProjModel(nn.Module):
    """diffusers' UnCLIPTextProjModel (see the module doc); returns (hidden_states, time_embeddings), float32."""

    config: TextProjConfig

    @nn.compact
    def __call__(self, image_embeddings: jax.Array, text_embeddings: jax.Array,
                 text_encoder_hidden_states: jax.Array, do_classifier_free_guidance: bool = False) -> tuple:
        cfg = self.config
        c, n, cross = cfg.clip_embeddings_dim, cfg.clip_extra_context_tokens, cfg.cross_attention_dim
        null = self.param("learned_classifier_free_guidance_embeddings", nn.initializers.zeros, (c,), jnp.float32)
        image = jnp.asarray(image_embeddings).astype(jnp.float32)
        text = jnp.asarray(text_embeddings).astype(jnp.float32)
        states = jnp.asarray(text_encoder_hidden_states).astype(jnp.float32)
        if image.ndim != 2 or image.shape[1] != c:
            raise ValueError(f"UnCLIPTextProjModel: image_embeddings must be [B, {c}], got {image.shape}")
        if do_classifier_free_guidance:
            image = jnp.concatenate([jnp.broadcast_to(null, image.shape), image], axis=0)
        b = image.shape[0]
        if text.shape != (b, c):
            raise ValueError(f"UnCLIPTextProjModel: text_embeddings must be [{b}, {c}]"
                             + (" (unconditional and conditional rows, for classifier-free guidance)"
                                if do_classifier_free_guidance else "") + f", got {text.shape}")
        if states.ndim != 3 or states.shape[0] != b or states.shape[2] != c:
            raise ValueError(f"UnCLIPTextProjModel: text_encoder_hidden_states must be [{b}, S, {c}], got {states.shape}")
        time = (Dense(cfg.time_embed_dim, name="embedding_proj")(text)
                + Dense(cfg.time_embed_dim, name="clip_image_embeddings_project_to_time_embeddings")(image))
        extra = Dense(n * cross, name="clip_extra_context_tokens_proj")(image).reshape(b, cross, n)
        states = Dense(cross, name="encoder_hidden_states_proj")(states)
        states = layer_norm("text_encoder_hidden_states_norm")(states)
        return jnp.concatenate([jnp.swapaxes(extra, 1, 2), states], axis=1), time


def null_image_embedding(params: Mapping) -> jax.Array:
    """The learned classifier-free-guidance image embedding [clip_embeddings_dim] (params: the model's tree,
    or {"params": tree}): the image embedding of the unconditional rows."""
    return jnp.asarray(params.get("params", params)["learned_classifier_free_guidance_embeddings"])


def decoder_attention_mask(text_mask: jax.Array, clip_extra_context_tokens: int) -> jax.Array:
    """The decoder's attention mask [B, n + S] (bool) over `hidden_states`: True for the n extra tokens, then
    the text mask [B, S], as diffusers' UnCLIPPipeline pads it."""
    m = jnp.asarray(text_mask).astype(bool)
    return jnp.pad(m, ((0, 0), (clip_extra_context_tokens, 0)), constant_values=True)
