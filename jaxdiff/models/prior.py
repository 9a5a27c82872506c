"""diffusers' `PriorTransformer` in Flax linen: unCLIP's prior, which predicts a CLIP image embedding from the
CLIP text embedding and the text encoder's token states (Karlo; Kandinsky's prior has the same layout).

    cfg = prior_config(json.load(open("prior/config.json")))      # checked PriorConfig
    module = PriorTransformer(cfg)
    module.apply({'params': params}, x, t, proj_embedding, encoder_hidden_states, attention_mask=None)
        -> [B, clip_embed_dim] float32 (the predicted image embedding)
    post_process_latents(params, x) = x * clip_std + clip_mean

  x [B, embedding_dim] (the noisy image embedding); t [B] or a scalar (diffusion timesteps); proj_embedding
  [B, embedding_proj_dim] (the CLIP text embedding); encoder_hidden_states [B, num_embeddings, embedding_dim]
  (the text encoder's last_hidden_state); attention_mask [B, num_embeddings] (True / 1 = a real token).

The forward pass (diffusers' at inference): time embedding = linear_2(act(linear_1(sinusoidal(t)))) (flip to
[cos, sin], no shift, inner_dim = num_attention_heads * attention_head_dim wide); the sequence is
[encoder_hidden_states_proj(states) (num_embeddings tokens), embedding_proj([LayerNorm] proj_embedding),
time embedding, proj_in(x), prd_embedding (with added_emb_type "prd")] plus `positional_embedding`; then
[norm_in], `num_layers` BasicTransformerBlocks (LayerNorm - self-attention with biased q/k/v - residual;
LayerNorm - Linear(4 inner) - exact GELU - Linear - residual), norm_out, and proj_to_clip_embeddings of the
last token (prd) or, without prd, of the x token.
  The attention bias, as diffusers builds it: with a mask, (1 - mask) * -10000 over the text tokens, 0 over
  the additional tokens, plus -10000 above the diagonal (causal); WITHOUT a mask no bias at all (not even the
  causal one: diffusers adds the causal mask only together with a given mask; unCLIP always passes one).

Supported config (anything else is refused naming the field): num_attention_heads, attention_head_dim,
num_layers, embedding_dim, num_embeddings, time_embed_act_fn (silu / swish / gelu / mish / relu),
norm_in_type (null / "layer"), embedding_proj_norm_type (null / "layer"), time_embed_dim, embedding_proj_dim,
clip_embed_dim (null: their defaults), added_emb_type ("prd" / null), encoder_hid_proj_type "linear" only
(null feeds unprojected or no token states: Shap-E's layout, not implemented), additional_embeddings = 3 + 1
with prd (else 3: the token count the positional embedding must match); dropout is accepted (inference only).

Parameter names are diffusers' state_dict keys with every list index joined to its list's name by "_"
(`transformer_blocks.0.attn1.to_out.0.weight` <-> `transformer_blocks_0/attn1/to_out_0/kernel`,
`ff.net.0.proj` <-> `ff/net_0/proj`); Linear weights are `kernel` (transposed), LayerNorm weights `scale`;
positional_embedding, prd_embedding, clip_mean and clip_std keep their names and shapes. Parameters are
float32; `dtype` bfloat16 runs the projections and attention products in bfloat16 while the LayerNorms,
softmax, time embedding and residual stream stay float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import Dense, Dtype, cast, layer_norm, merge_heads, resolve_dtype, split_heads
from jaxdiff.models.unet2d_condition import (
    ACTIVATIONS,
    DiffusersModel,
    TimestepEmbedding,
    checked_fields,
    config_error,
    sinusoidal_embedding,
)
from jaxdiff.util.config import did_you_mean, is_int

__all__ = ["PriorConfig", "PriorTransformer", "post_process_latents", "prior_attention_bias", "prior_config"]

_WHAT = "jaxdiff's PriorTransformer"
MASK_VALUE = -10000.0

# diffusers' PriorTransformer arguments and defaults.
DEFAULTS = {
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 768,
    "num_embeddings": 77,
    "additional_embeddings": 4,
    "dropout": 0.0,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """A checked PriorTransformer config.json (`prior_config` builds it); the optional widths resolved."""

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    time_embed_act_fn: str = "silu"
    norm_in: bool = False  # norm_in_type "layer"
    embedding_proj_norm: bool = False  # embedding_proj_norm_type "layer"
    prd: bool = True  # added_emb_type "prd"
    time_embed_dim: int = 2048
    embedding_proj_dim: int = 768
    clip_embed_dim: int = 768

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_tokens(self) -> int:
        return self.num_embeddings + self.additional_embeddings


def _pos_int(v) -> bool:
    return is_int(v) and v >= 1


def prior_config(config: Mapping) -> PriorConfig:
    """Check a diffusers PriorTransformer config.json (a dict). Keys starting with "_" are ignored except
    `_class_name`, which must be "PriorTransformer" when present; absent fields take diffusers' defaults.
    ValueError naming the first field outside the supported subset (see the module doc)."""
    if isinstance(config, PriorConfig):
        return config
    d = checked_fields(config, "PriorTransformer", DEFAULTS, (), {}, _WHAT)
    for f in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim", "num_embeddings"):
        if not _pos_int(d[f]):
            raise config_error(f, d[f], "a positive integer", what=_WHAT)
    for f in ("time_embed_dim", "embedding_proj_dim", "clip_embed_dim"):
        if d[f] is not None and not _pos_int(d[f]):
            raise config_error(f, d[f], "null or a positive integer", what=_WHAT)
    drop = d["dropout"]
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise config_error("dropout", drop, "a probability in [0, 1) (ignored: inference only)", what=_WHAT)
    act = d["time_embed_act_fn"]
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise config_error("time_embed_act_fn", act, " / ".join(map(repr, ACTIVATIONS)),
                           did_you_mean(act, ACTIVATIONS).strip(" ()"), what=_WHAT)
    for f in ("norm_in_type", "embedding_proj_norm_type"):
        if d[f] not in (None, "layer"):
            raise config_error(f, d[f], "None / 'layer'", what=_WHAT)
    if d["encoder_hid_proj_type"] != "linear":
        raise config_error("encoder_hid_proj_type", d["encoder_hid_proj_type"], "'linear'",
                           "without the projection the token states join unprojected or not at all (Shap-E's "
                           "prior), which is not implemented", what=_WHAT)
    if d["added_emb_type"] not in ("prd", None):
        raise config_error("added_emb_type", d["added_emb_type"], "'prd' / None", what=_WHAT)
    prd = d["added_emb_type"] == "prd"
    extra = 3 + int(prd)  # proj_embedding, time, x [, prd]
    if d["additional_embeddings"] != extra:
        raise config_error("additional_embeddings", d["additional_embeddings"], str(extra),
                           f"the tokens after the {d['num_embeddings']} text tokens: the text embedding, the time, "
                           f"the image embedding{', the prd token' if prd else ''}", what=_WHAT)
    inner = d["num_attention_heads"] * d["attention_head_dim"]
    return PriorConfig(
        num_attention_heads=int(d["num_attention_heads"]), attention_head_dim=int(d["attention_head_dim"]),
        num_layers=int(d["num_layers"]), embedding_dim=int(d["embedding_dim"]),
        num_embeddings=int(d["num_embeddings"]), additional_embeddings=extra, time_embed_act_fn=act.lower(),
        norm_in=d["norm_in_type"] == "layer", embedding_proj_norm=d["embedding_proj_norm_type"] == "layer",
        prd=prd, time_embed_dim=int(d["time_embed_dim"] or inner),
        embedding_proj_dim=int(d["embedding_proj_dim"] or d["embedding_dim"]),
        clip_embed_dim=int(d["clip_embed_dim"] or d["embedding_dim"]))


def prior_attention_bias(mask: jax.Array | None, additional_embeddings: int) -> jax.Array | None:
    """diffusers' prior attention bias [B, T, T] float32 from the text mask [B, S] (see the module doc); None
    stays None."""
    if mask is None:
        return None
    m = (1.0 - jnp.asarray(mask).astype(jnp.float32)) * MASK_VALUE
    m = jnp.pad(m, ((0, 0), (0, additional_embeddings)))
    t = m.shape[1]
    causal = jnp.triu(jnp.full((t, t), MASK_VALUE, jnp.float32), k=1)
    return m[:, None, :] + causal[None]


class _Heads(nn.Module):
    """What the attention and the transformer blocks take: `heads` of `dim_head` channels, the compute dtype."""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32


class PriorAttention(_Heads):
    """diffusers' Attention (self-attention, biased to_q / to_k / to_v, to_out.0) with an additive bias."""

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        inner = self.heads * self.dim_head
        h = cast(x, self.dtype)
        q = Dense(inner, dtype=self.dtype, name="to_q")(h)
        k = Dense(inner, dtype=self.dtype, name="to_k")(h)
        v = Dense(inner, dtype=self.dtype, name="to_v")(h)
        q, k, v = (split_heads(cast(a, self.dtype), self.heads) for a in (q, k, v))
        s = jnp.einsum("ntd,nsd->nts", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(self.dim_head))
        if bias is not None:
            s = s + jnp.repeat(bias, self.heads, axis=0)
        w = jax.nn.softmax(s, axis=-1)
        out = jnp.einsum("nts,nsd->ntd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return Dense(c, dtype=self.dtype, name="to_out_0")(merge_heads(cast(out, self.dtype), b))


class FeedForward(nn.Module):
    """diffusers' FeedForward with activation "gelu": net.0.proj (4x) - exact GELU - net.2."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = _Proj(4 * c, self.dtype, name="net_0")(cast(x, self.dtype))
        return Dense(c, dtype=self.dtype, name="net_2")(nn.gelu(h, approximate=False))


class _Proj(nn.Module):
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Dense(self.features, dtype=self.dtype, name="proj")(x)


class BasicTransformerBlock(_Heads):
    """diffusers' BasicTransformerBlock as the prior builds it (layer_norm, self-attention only, GELU FF)."""

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        h = PriorAttention(self.heads, self.dim_head, self.dtype, name="attn1")(layer_norm("norm1")(x), bias)
        x = x + cast(h, jnp.float32)
        h = FeedForward(self.dtype, name="ff")(layer_norm("norm3")(x))
        return x + cast(h, jnp.float32)


def _check_inputs(cfg: PriorConfig, x, t, proj, states, mask) -> None:
    b = x.shape[0]
    if x.shape != (b, cfg.embedding_dim):
        raise ValueError(f"PriorTransformer: hidden_states must be [B, {cfg.embedding_dim}], got {x.shape}")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
        raise ValueError(f"PriorTransformer: timestep must be a scalar or [{b}], got shape {t.shape}")
    if proj.shape != (b, cfg.embedding_proj_dim):
        raise ValueError(f"PriorTransformer: proj_embedding must be [{b}, {cfg.embedding_proj_dim}], got {proj.shape}")
    if states is None or states.shape != (b, cfg.num_embeddings, cfg.embedding_dim):
        raise ValueError(f"PriorTransformer: encoder_hidden_states must be [{b}, {cfg.num_embeddings}, "
                         f"{cfg.embedding_dim}] (num_embeddings tokens), got {None if states is None else states.shape}")
    if mask is not None and mask.shape != (b, cfg.num_embeddings):
        raise ValueError(f"PriorTransformer: attention_mask must be [{b}, {cfg.num_embeddings}], got {mask.shape}")


class PriorTransformer(DiffusersModel):
    """diffusers' PriorTransformer (see the module doc); config: a PriorConfig."""

    @nn.compact
    def __call__(self, hidden_states: jax.Array, timestep: jax.Array, proj_embedding: jax.Array,
                 encoder_hidden_states: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        dtype = resolve_dtype(self.dtype)
        inner = cfg.inner_dim
        x = jnp.asarray(hidden_states).astype(jnp.float32)
        t = jnp.asarray(timestep)
        proj = jnp.asarray(proj_embedding).astype(jnp.float32)
        states = None if encoder_hidden_states is None else jnp.asarray(encoder_hidden_states).astype(jnp.float32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        _check_inputs(cfg, x, t, proj, states, mask)
        b = x.shape[0]

        pos = self.param("positional_embedding", nn.initializers.zeros, (1, cfg.num_tokens, inner), jnp.float32)
        prd = (self.param("prd_embedding", nn.initializers.zeros, (1, 1, inner), jnp.float32) if cfg.prd else None)
        # the prior's normalisation statistics: used by post_process_latents only
        self.param("clip_mean", nn.initializers.zeros, (1, cfg.clip_embed_dim), jnp.float32)
        self.param("clip_std", nn.initializers.zeros, (1, cfg.clip_embed_dim), jnp.float32)

        temb = sinusoidal_embedding(jnp.broadcast_to(t, (b,)), inner, True, 0.0)
        temb = TimestepEmbedding(cfg.time_embed_dim, cfg.time_embed_act_fn, out_features=inner,
                                 name="time_embedding")(temb)
        if cfg.embedding_proj_norm:
            proj = layer_norm("embedding_proj_norm")(proj)
        dense = lambda n, name: Dense(n, dtype=dtype, name=name)  # noqa: E731
        proj = cast(dense(inner, "embedding_proj")(cast(proj, dtype)), jnp.float32)
        states = cast(dense(inner, "encoder_hidden_states_proj")(cast(states, dtype)), jnp.float32)
        x = cast(dense(inner, "proj_in")(cast(x, dtype)), jnp.float32)
        tokens = [states, proj[:, None], temb[:, None], x[:, None]]
        if prd is not None:
            tokens.append(jnp.broadcast_to(prd, (b, 1, inner)))
        h = jnp.concatenate(tokens, axis=1) + pos
        bias = prior_attention_bias(mask, cfg.additional_embeddings)
        if cfg.norm_in:
            h = layer_norm("norm_in")(h)
        for i in range(cfg.num_layers):
            h = BasicTransformerBlock(cfg.num_attention_heads, cfg.attention_head_dim, dtype,
                                      name=f"transformer_blocks_{i}")(h, bias)
        h = layer_norm("norm_out")(h)
        # the prd token (the last), or without it the image-embedding token
        h = h[:, -1] if cfg.prd else h[:, cfg.num_embeddings + 2]
        return Dense(cfg.clip_embed_dim, name="proj_to_clip_embeddings")(h)


def post_process_latents(params: Mapping, x: jax.Array) -> jax.Array:
    """diffusers' PriorTransformer.post_process_latents: x * clip_std + clip_mean (params: the prior's tree,
    or {"params": tree})."""
    p = params.get("params", params)
    return jnp.asarray(x) * jnp.asarray(p["clip_std"]) + jnp.asarray(p["clip_mean"])
