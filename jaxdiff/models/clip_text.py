"""transformers' CLIP text encoder (`CLIPTextModel`, `CLIPTextModelWithProjection`) in Flax linen: the text
encoder of unCLIP (Karlo) and of the latent diffusion models.

    cfg = clip_text_config_from_json(json.load(open("config.json")))    # transformers' CLIPTextConfig, checked
    module = CLIPTextEncoder(cfg)                                         # with_projection from config.json
    out = encode_clip_text(module, params, tokens, mask)                  # [B, L] int, [B, L] bool
    out.last_hidden_state [B, L, hidden_size], out.pooler_output [B, hidden_size],
    out.text_embeds [B, projection_dim] (None without the projection)

The forward pass is transformers' at inference (dropout off): token + position embeddings; per layer a
pre-LayerNorm self-attention and a pre-LayerNorm MLP (fc1 - hidden_act - fc2), each added to the residual
stream; the final LayerNorm gives `last_hidden_state`. Details:
- The self-attention is causal (position i sees positions <= i), and with a mask the padding keys (mask
  False) are hidden too; a row with no visible key (left padding) gets a uniform softmax, as transformers'
  eager attention with its finfo.min bias does. Logits are q.k / sqrt(head_dim).
- `hidden_act` is one of ACTIVATIONS; "quick_gelu" (OpenAI's CLIP) is x * sigmoid(1.702 x).
- Pooling: `pooler_output` is the final state at one position per row: with `eos_token_id` 2 in the config
  (OpenAI's released configs, and transformers' legacy rule kept since PR #24773) the position of the
  largest id (OpenAI's end token is the largest id of its vocabulary); otherwise the first position of
  `eos_token_id` (position 0 when the row has none, as torch's argmax of an all-zero row).
- `text_embeds` (CLIPTextModelWithProjection) is text_projection(pooler_output), a Linear without bias.

Parameters mirror transformers' state_dict keys with "." before an index written "_"
(`text_model.encoder.layers.3.self_attn.q_proj.weight` <-> `text_model/encoder/layers_3/self_attn/q_proj/
kernel`); Linear weights (out, in) are Dense kernels (in, out); LayerNorm `weight` is `scale`; the embeddings'
`weight` is `embedding`. `jaxdiff.convert.clip_text` maps a state_dict (folders of config.json + safetensors).

dtype: parameters are float32; `dtype` (float32 or bfloat16) is the compute dtype of the projections and
attention products, while the embeddings, LayerNorms, softmax and residual stream stay float32 and every
output is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import (
    Dense,
    abstract_params,
    cast,
    layer_norm,
    merge_heads,
    resolve_dtype,
    split_heads,
)
from jaxdiff.models.text_encoders import PRETRAINED_CONFIG_FIELDS, apply_text_encoder, check_tokens
from jaxdiff.util.config import did_you_mean, is_int

__all__ = ["ACTIVATIONS", "CLIPTextConfig", "CLIPTextEncoder", "CLIPTextOutput", "abstract_clip_text_params",
           "clip_text_config_from_json", "encode_clip_text", "pooled_positions"]

Dtype = Any

# transformers' ACT2FN names the MLP supports.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
MODEL_TYPES = ("clip_text_model",)
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
LEGACY_EOS_TOKEN_ID = 2  # transformers pools at the largest id when the config says this

# Fields without effect on the encoder's inference output: transformers' own (text_encoders), the training
# settings (dropout, init), is_decoder and pruned_heads.
_IGNORED = PRETRAINED_CONFIG_FIELDS | {"attention_dropout", "dropout", "initializer_range", "is_decoder", "pruned_heads"}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The encoder's architecture (transformers' CLIPTextConfig names and defaults). `with_projection`:
    CLIPTextModelWithProjection (text_projection, `projection_dim` wide) rather than CLIPTextModel."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    with_projection: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"CLIP text config: {name}={v!r} is not allowed; it must be an integer >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP text config: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP text config: hidden_act={self.hidden_act!r} is not supported; allowed: "
                             f"{', '.join(ACTIVATIONS)}{did_you_mean(self.hidden_act, ACTIVATIONS)}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"CLIP text config: layer_norm_eps={eps!r} is not allowed; it must be a positive number")
        if not is_int(self.eos_token_id):
            raise ValueError(f"CLIP text config: eos_token_id={self.eos_token_id!r} is not allowed; it must be an "
                             "integer (the pooled position is found from it)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pools_at_largest_id(self) -> bool:
        """transformers' legacy rule: eos_token_id 2 pools at the position of the largest id."""
        return self.eos_token_id == LEGACY_EOS_TOKEN_ID


# config.json fields that are read, with transformers' CLIPTextConfig defaults (used when absent): the
# config's fields except `with_projection`, which comes from `architectures`.
_FIELDS = {f.name: f.default for f in dataclasses.fields(CLIPTextConfig) if f.name != "with_projection"}


def clip_text_config_from_json(d: Mapping, *, strict: bool = True, with_projection: bool | None = None) -> CLIPTextConfig:
    """A checked CLIPTextConfig from transformers' config.json (a dict) of a CLIPTextModel /
    CLIPTextModelWithProjection folder.

    with_projection: None takes it from `architectures` (CLIPTextModelWithProjection -> True, CLIPTextModel ->
    False; True when the field is absent). Refuses (ValueError naming the field): a model_type other than
    clip_text_model (a whole CLIPModel's config, model_type "clip", holds the text config under text_config:
    pass that), an unsupported hidden_act, an architecture other than those two, head counts that do not
    divide hidden_size, and with strict=True any field it does not know (strict=False ignores those).
    Fields without effect on the inference output (dropout, init, metadata) are ignored.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"CLIP text config: expected a dict (the contents of config.json), got {type(d).__name__}")
    d = dict(d)
    model_type = d.get("model_type", MODEL_TYPES[0])
    if model_type not in MODEL_TYPES:
        hint = (" (a CLIPModel config: pass its text_config, with projection_dim from the top level)"
                if model_type == "clip" else "")
        raise ValueError(f"CLIP text config: model_type={model_type!r} is not supported; allowed: "
                         f"{', '.join(MODEL_TYPES)}{hint}")
    archs = d.get("architectures")
    if archs is not None:
        if not isinstance(archs, (list, tuple)) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise ValueError(f"CLIP text config: architectures={archs!r} is not supported; allowed: one of "
                             f"{', '.join(ARCHITECTURES)}")
        if with_projection is None:
            with_projection = ARCHITECTURES[archs[0]]
    known = set(_FIELDS) | _IGNORED | {"architectures"}
    unknown = sorted(k for k in d if k not in known)
    if unknown and strict:
        raise ValueError(f"CLIP text config: unsupported field(s) {', '.join(unknown)}"
                         f"{did_you_mean(unknown[0], sorted(_FIELDS))}; the encoder reads {', '.join(_FIELDS)}, "
                         "ignores training settings and metadata; pass strict=False to ignore other fields")
    kw = {k: d.get(k, default) for k, default in _FIELDS.items()}
    for k in ("pad_token_id", "bos_token_id"):
        if kw[k] is None:
            kw[k] = _FIELDS[k]
    if isinstance(kw["eos_token_id"], (list, tuple)) and kw["eos_token_id"]:
        kw["eos_token_id"] = kw["eos_token_id"][0]
    return CLIPTextConfig(**kw, with_projection=True if with_projection is None else bool(with_projection))


# --- the model -------------------------------------------------------------------------------------------


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, hidden_size] float32, after the final LayerNorm
    pooler_output: jax.Array  # [B, hidden_size] float32
    text_embeds: jax.Array | None  # [B, projection_dim] float32 (CLIPTextModelWithProjection), else None


def pooled_positions(tokens: jax.Array, config: CLIPTextConfig) -> jax.Array:
    """int32 [B]: the position pooled in each row (see the module doc)."""
    tokens = jnp.asarray(tokens)
    if config.pools_at_largest_id:
        return jnp.argmax(tokens, axis=-1).astype(jnp.int32)
    return jnp.argmax(tokens == config.eos_token_id, axis=-1).astype(jnp.int32)


class _CLIPLayer(nn.Module):
    """What the encoder and its layers take: the config and the compute dtype (float32 or bfloat16)."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32


class CLIPAttention(_CLIPLayer):
    """Multi-head self-attention (q_proj, k_proj, v_proj, out_proj) with a boolean mask [B, L, L]."""

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        cfg = self.config
        b, c, heads = x.shape[0], cfg.hidden_size, cfg.num_attention_heads
        h = cast(x, self.dtype)
        q = Dense(c, dtype=self.dtype, name="q_proj")(h) * (cfg.head_dim ** -0.5)
        k = Dense(c, dtype=self.dtype, name="k_proj")(h)
        v = Dense(c, dtype=self.dtype, name="v_proj")(h)
        q, k, v = (split_heads(cast(a, self.dtype), heads) for a in (q, k, v))
        s = jnp.einsum("ntd,nsd->nts", q, k, preferred_element_type=jnp.float32)
        s = jnp.where(jnp.repeat(allowed, heads, axis=0), s, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(s, axis=-1)
        out = jnp.einsum("nts,nsd->ntd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return Dense(c, dtype=self.dtype, name="out_proj")(merge_heads(cast(out, self.dtype), b))


class CLIPMLP(_CLIPLayer):

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(cast(x, self.dtype))
        return Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(ACTIVATIONS[cfg.hidden_act](h))


class CLIPEncoderLayer(_CLIPLayer):

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = CLIPAttention(self.config, self.dtype, name="self_attn")(layer_norm("layer_norm1", eps)(x), allowed)
        x = x + cast(h, jnp.float32)
        h = CLIPMLP(self.config, self.dtype, name="mlp")(layer_norm("layer_norm2", eps)(x))
        return x + cast(h, jnp.float32)


class CLIPEncoder(_CLIPLayer):

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, allowed)
        return x


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
                       embedding_init=init, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
                       embedding_init=init, name="position_embedding")
        return tok(tokens) + pos(jnp.arange(tokens.shape[1]))[None]


class CLIPTextTransformer(_CLIPLayer):

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> tuple:
        cfg = self.config
        length = tokens.shape[1]
        x = CLIPTextEmbeddings(cfg, name="embeddings")(tokens)
        allowed = jnp.tril(jnp.ones((length, length), bool))[None] & mask[:, None, :]
        x = CLIPEncoder(cfg, self.dtype, name="encoder")(x, allowed)
        x = layer_norm("final_layer_norm", cfg.layer_norm_eps)(x)
        pooled = jnp.take_along_axis(x, pooled_positions(tokens, cfg)[:, None, None], axis=1)[:, 0]
        return x, pooled


class CLIPTextEncoder(_CLIPLayer):
    """(tokens int [B, L], mask bool [B, L] True on real tokens, or None: all real) -> CLIPTextOutput;
    transformers' CLIPTextModelWithProjection (or CLIPTextModel, config.with_projection False) at inference."""

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> CLIPTextOutput:
        cfg = self.config
        dtype = resolve_dtype(self.dtype)
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"CLIPTextEncoder: tokens must be [batch, length], got shape {tokens.shape}")
        if tokens.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextEncoder: {tokens.shape[1]} tokens, but max_position_embeddings is "
                             f"{cfg.max_position_embeddings}")
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        elif jnp.shape(mask) != tokens.shape:
            raise ValueError(f"CLIPTextEncoder: mask shape {jnp.shape(mask)} differs from tokens shape {tokens.shape}")
        hidden, pooled = CLIPTextTransformer(cfg, dtype, name="text_model")(tokens, jnp.asarray(mask).astype(bool))
        embeds = None
        if cfg.with_projection:
            embeds = Dense(cfg.projection_dim, use_bias=False, name="text_projection")(pooled)
        return CLIPTextOutput(hidden, pooled, embeds)


def abstract_clip_text_params(module: CLIPTextEncoder, length: int = 2):
    """Shapes and dtypes of the module's params (jax.eval_shape of init: nothing is allocated)."""
    return abstract_params(module, jax.ShapeDtypeStruct((1, length), jnp.int32),
                           jax.ShapeDtypeStruct((1, length), jnp.bool_))


def encode_clip_text(module: CLIPTextEncoder, params, tokens, mask=None) -> CLIPTextOutput:
    """CLIPTextOutput (float32 arrays) for tokens [B, L] and mask [B, L] (True on real tokens; None: all real);
    `params` is the params tree (or {"params": tree}). Concrete inputs are checked first (ids within the
    vocabulary, the length, the mask's shape). Jitted: one compile per module and input shape."""
    check_tokens(tokens, mask, module.config.vocab_size, "CLIP", max_positions=module.config.max_position_embeddings)
    return apply_text_encoder(module, params, tokens, mask)
