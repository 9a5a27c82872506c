"""The T5 (v1.1) encoder stack in Flax linen: the text encoder of Imagen and DeepFloyd IF.

    cfg = t5_config_from_json(json.load(open("config.json")))    # transformers' T5Config, checked
    module = T5Encoder(cfg, dtype=jnp.float32)                   # or bfloat16 compute
    states = encode(module, params, tokens, mask)                # [B, L] int, [B, L] bool -> [B, L, d_model]

The forward pass is transformers' `T5EncoderModel` (`last_hidden_state`) at inference (dropout off):
token embedding; per block a pre-norm self-attention and a pre-norm feed-forward, each added to the
residual stream; a final norm. T5's details:
- RMS norm (T5LayerNorm, here flax's `nn.RMSNorm`): x * rsqrt(mean(x^2) + eps) * scale, the mean square in float32, no mean
  subtraction, no bias.
- Attention logits are q.k WITHOUT the 1/sqrt(d_kv) scale, plus a relative-position bias: a table
  [num_buckets, num_heads] that lives in block 0's self-attention and that every block reuses. Relative
  positions (key - query) fall into buckets bidirectionally (half the buckets per sign), exact up to
  num_buckets/4 and logarithmic up to relative_attention_max_distance (`relative_position_buckets`,
  computed in float32 in transformers' order of operations so bucket edges agree).
- Padding keys (mask False) get an additive large negative logit; padded query rows are computed
  like the others and their states are whatever the model gives (transformers does the same).
- The feed-forward is `feed_forward_proj`: "gated-gelu" (v1.1, transformers runs it with the tanh
  approximation of GELU, "gelu_new") is act(x W_0) * (x W_1) W_o; "relu" (the original T5) is
  act(x W_i) W_o; the other `[gated-]act` forms transformers knows are supported for the activations in
  ACTIVATIONS.

Parameters mirror transformers' state_dict keys without the leading "encoder." with "." before an index
written "_" (`encoder.block.3.layer.1.DenseReluDense.wi_0.weight` <-> `block_3/layer_1/DenseReluDense/
wi_0/kernel`); Linear weights (out, in) are Dense kernels (in, out); norms' `weight` is `scale`; the
embeddings (`shared.weight` / `encoder.embed_tokens.weight`, and block 0's `relative_attention_bias`)
are `embedding`. The tree is a plain dict of arrays, so it can be sharded with any PartitionSpec tree.

dtype: `dtype` is the compute dtype of the matmuls (float32 default, or bfloat16); `param_dtype` the
dtype parameters are created in by `init` (float32 default; the converter casts loaded weights to what
the caller asks). Whatever the dtypes, the norms' mean square, the softmax and the residual stream are
float32 and the returned states are float32 (for bfloat16 weights this is more accurate than
transformers' all-bfloat16 run, which has the residual stream in bfloat16).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import abstract_params, cast
from jaxdiff.models.text_encoders import PRETRAINED_CONFIG_FIELDS, apply_text_encoder, check_tokens
from jaxdiff.util.config import did_you_mean, is_int

__all__ = ["ACTIVATIONS", "T5Config", "T5Encoder", "abstract_t5_params", "encode", "relative_position_buckets",
           "t5_config_from_json"]

Dtype = Any

# transformers' ACT2FN names that the feed-forward supports.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "silu", "swish")
MODEL_TYPES = ("t5", "mt5")  # mT5 is the same encoder; umt5 has a bias table per layer (not supported)

# config.json fields that are read, with transformers' T5Config defaults (used when a field is absent).
_FIELDS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
           "feed_forward_proj": "relu", "pad_token_id": 0, "eos_token_id": 1}
# transformers' attribute_map aliases
_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
            "head_dim": "d_kv"}
# Fields that do not change the encoder's inference output: transformers' own (text_encoders), T5's
# training settings (dropout), the decoder's, and T5's run-time switches.
_IGNORED = PRETRAINED_CONFIG_FIELDS | {
    "architectures", "dropout_rate", "classifier_dropout", "output_past", "num_decoder_layers", "scale_decoder_outputs",
    "bos_token_id", "n_positions", "decoder_layerdrop", "tie_last_hidden_states",
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder's architecture (transformers' T5Config names and defaults, except the feed-forward:
    v1.1's gated GELU here). `dense_act_fn` / `is_gated_act` are what transformers derives from
    feed_forward_proj (or reads from config.json when stored there)."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"T5 config: {name}={v!r} is not allowed; it must be an integer >= 1")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"T5 config: relative_attention_num_buckets={self.relative_attention_num_buckets!r} is "
                             "not allowed; the bidirectional encoder needs at least 4 buckets")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(f"T5 config: relative_attention_max_distance={self.relative_attention_max_distance!r} "
                             "is not allowed; it must exceed relative_attention_num_buckets // 4 = "
                             f"{self.relative_attention_num_buckets // 4} (the last exactly represented offset)")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
            raise ValueError(f"T5 config: layer_norm_epsilon={eps!r} is not allowed; it must be a number > 0")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5 config: dense_act_fn={self.dense_act_fn!r} is not supported; allowed: "
                             f"{', '.join(ACTIVATIONS)}{did_you_mean(self.dense_act_fn, ACTIVATIONS)}")
        if not isinstance(self.is_gated_act, bool):
            raise ValueError(f"T5 config: is_gated_act={self.is_gated_act!r} is not allowed; it must be true or false")  # noqa: TRY004
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            if not is_int(v) or not 0 <= v < self.vocab_size:
                raise ValueError(f"T5 config: {name}={v!r} is not allowed; it must be an id in [0, {self.vocab_size})")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _activation_of(feed_forward_proj: Any) -> tuple:
    """(dense_act_fn, is_gated_act) as transformers' T5Config derives them ("gated-gelu" -> gelu_new)."""
    if not isinstance(feed_forward_proj, str):
        raise ValueError(f"T5 config: feed_forward_proj={feed_forward_proj!r} is not allowed; it must be a "  # noqa: TRY004
                         "string such as 'gated-gelu' (T5 v1.1) or 'relu' (T5)")
    parts = feed_forward_proj.split("-")
    allowed = ", ".join([*ACTIVATIONS, *(f"gated-{a}" for a in ACTIVATIONS)])
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACTIVATIONS:
        choices = [*ACTIVATIONS, *(f"gated-{a}" for a in ACTIVATIONS)]
        raise ValueError(f"T5 config: feed_forward_proj={feed_forward_proj!r} is not supported; allowed: "
                         f"{allowed}{did_you_mean(feed_forward_proj, choices)}")
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    return act, parts[0] == "gated"


def t5_config_from_json(d: Mapping, *, strict: bool = True) -> T5Config:
    """T5Config from a transformers config.json dict (T5EncoderModel / T5ForConditionalGeneration / T5Model).

    Refuses (ValueError naming the field): a decoder (is_decoder true), a model_type other than t5 / mt5,
    an unsupported feed_forward_proj or activation, quantized or pruned or per-layer configs, and with
    strict=True any field it does not know (strict=False ignores those). Fields that do not change the
    encoder's output (dropout, decoder and generation settings, metadata) are ignored.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"T5 config: expected a dict (the contents of config.json), got {type(d).__name__}")
    d = dict(d)
    for alias, name in _ALIASES.items():
        if alias in d:
            v = d.pop(alias)
            if name in d and d[name] != v:
                raise ValueError(f"T5 config: {alias}={v!r} disagrees with {name}={d[name]!r} (the same setting)")
            d.setdefault(name, v)
    model_type = d.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"T5 config: model_type={model_type!r} is not supported; allowed: {', '.join(MODEL_TYPES)}"
                         + (" (umt5 has a relative-position table in every layer)" if model_type == "umt5" else ""))
    if d.get("is_decoder", False):
        raise ValueError(f"T5 config: is_decoder={d['is_decoder']!r} is not supported; only the encoder stack "
                         "(is_decoder false) is implemented")
    for name in ("quantization_config", "per_layer_config"):
        if d.get(name):
            raise ValueError(f"T5 config: {name} is not supported (only plain float weights of a uniform stack)")
    if d.get("pruned_heads"):
        raise ValueError(f"T5 config: pruned_heads={d['pruned_heads']!r} is not supported (every layer must have "
                         "num_heads heads)")
    known = set(_FIELDS) | _IGNORED | {"is_decoder", "dense_act_fn", "is_gated_act", "quantization_config",
                                       "per_layer_config", "pruned_heads"}
    unknown = sorted(k for k in d if k not in known)
    if unknown and strict:
        raise ValueError(f"T5 config: unsupported field(s) {', '.join(unknown)}"
                         f"{did_you_mean(unknown[0], sorted(_FIELDS))}; the encoder reads {', '.join(_FIELDS)} "
                         "(and dense_act_fn / is_gated_act), ignores training, decoder and generation settings; "
                         "pass strict=False to ignore other fields")
    kw = {k: d.get(k, default) for k, default in _FIELDS.items() if k != "feed_forward_proj"}
    if kw["pad_token_id"] is None:
        kw["pad_token_id"] = 0
    if isinstance(kw["eos_token_id"], (list, tuple)) and kw["eos_token_id"]:
        kw["eos_token_id"] = kw["eos_token_id"][0]
    act, gated = _activation_of(d.get("feed_forward_proj", _FIELDS["feed_forward_proj"]))
    # transformers sets stored dense_act_fn / is_gated_act after deriving them, so stored values win.
    act = d.get("dense_act_fn", act)
    gated = d.get("is_gated_act", gated)
    return T5Config(**kw, dense_act_fn=act, is_gated_act=gated)


# --- the model -------------------------------------------------------------------------------------------


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 [query_length, key_length]: the encoder's (bidirectional) bucket of key - query position.

    Half the buckets for each sign (positive offsets from num_buckets // 2); in each half the first half
    are exact offsets 0 .. n/2 - 1, the rest logarithmic up to max_distance, and the last bucket takes
    everything beyond. The logarithmic part is computed in float32 in transformers' order of operations
    (the log correctly rounded), so offsets on a bucket edge fall on the same side.
    """
    rel = np.arange(key_length, dtype=np.int64)[None, :] - np.arange(query_length, dtype=np.int64)[:, None]
    n = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * n
    rel = np.abs(rel)
    max_exact = n // 2
    is_small = rel < max_exact
    scaled = np.maximum(rel, max_exact).astype(np.float32) / np.float32(max_exact)  # small offsets: not used
    log = np.log(scaled.astype(np.float64)).astype(np.float32)  # float32 log, correctly rounded
    large = (log / np.float32(math.log(max_distance / max_exact)) * np.float32(n - max_exact)).astype(np.int64)
    large = np.minimum(max_exact + large, n - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == "relu":
        return nn.relu(x)
    if name == "gelu":
        return nn.gelu(x, approximate=False)
    if name in ("silu", "swish"):
        return nn.silu(x)
    return nn.gelu(x, approximate=True)  # gelu_new, gelu_pytorch_tanh, gelu_fast: the tanh approximation


def t5_layer_norm(eps: float, param_dtype: Dtype, name: str) -> nn.RMSNorm:
    """T5LayerNorm as flax's RMSNorm: x * rsqrt(mean(x^2) + eps) * scale, computed and returned in float32."""
    return nn.RMSNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)


class Linear(nn.Module):
    """A bias-free Linear: x @ kernel [in, out] in `dtype` (the result in `dtype`)."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(x.shape[-1] ** -0.5), (x.shape[-1], self.features),
                            self.param_dtype)
        return jax.lax.dot_general(cast(x, self.dtype), cast(kernel, self.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                   precision=self.precision)


class _T5Layer(nn.Module):
    """What every T5 layer takes: the config, the compute dtype, the stored weights' dtype, the matmul precision."""
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @property
    def opts(self) -> dict:
        return {"dtype": self.dtype, "param_dtype": self.param_dtype, "precision": self.precision}


class T5Attention(_T5Layer):
    """T5's self-attention (no 1/sqrt(d) scale). Block 0 holds the relative-position table and returns
    the additive bias [B, H, L, L] (relative positions plus `key_bias` [B, L] of the padding keys) that the
    later blocks receive as `position_bias` (and then add as it is: their `key_bias` is already in it)."""
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, key_bias: jax.Array, position_bias: jax.Array | None = None) -> tuple:
        cfg = self.config
        b, length, _ = x.shape
        lin = self.opts
        q = Linear(cfg.inner_dim, name="q", **lin)(x).reshape(b, length, cfg.num_heads, cfg.d_kv)
        k = Linear(cfg.inner_dim, name="k", **lin)(x).reshape(b, length, cfg.num_heads, cfg.d_kv)
        v = Linear(cfg.inner_dim, name="v", **lin)(x).reshape(b, length, cfg.num_heads, cfg.d_kv)
        if self.has_relative_attention_bias:
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=self.param_dtype,
                             param_dtype=self.param_dtype, embedding_init=nn.initializers.normal(cfg.d_model ** -0.5),
                             name="relative_attention_bias")
            buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            position_bias = jnp.transpose(cast(table(jnp.asarray(buckets)), jnp.float32), (2, 0, 1))  # [H, Lq, Lk]
            # the padding keys' bias joined once, here: every block adds the same [B, H, Lq, Lk] sum
            position_bias = position_bias[None] + key_bias[:, None, None, :]
        elif position_bias is None:
            raise ValueError("T5Attention: blocks after the first need block 0's position_bias")
        # heads moved before the tokens first ([B, H, L, d]): products batched over (b, h) with tokens and
        # channels minor run ~3x faster on the CPU than the same einsums over [B, L, H, d] (same results)
        q, k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in (q, k, v))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
        logits = logits + position_bias
        # softmax(logits) v with the division after the product, on [.., L, d] rather than [.., L, L]
        e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        out = jnp.einsum("bhqk,bhkd->bhqd", cast(e, self.dtype), v, precision=self.precision,
                         preferred_element_type=jnp.float32) / jnp.sum(e, axis=-1, keepdims=True)
        out = jnp.transpose(cast(out, self.dtype), (0, 2, 1, 3)).reshape(b, length, cfg.inner_dim)
        out = Linear(cfg.d_model, name="o", **lin)(out)
        return out, position_bias


class T5SelfAttentionLayer(_T5Layer):
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, key_bias: jax.Array, position_bias: jax.Array | None) -> tuple:
        h = t5_layer_norm(self.config.layer_norm_epsilon, self.param_dtype, "layer_norm")(cast(x, jnp.float32))
        h, position_bias = T5Attention(self.config, has_relative_attention_bias=self.has_relative_attention_bias, **self.opts,
                                       name="SelfAttention")(h, key_bias, position_bias)
        return x + cast(h, jnp.float32), position_bias


class T5FeedForwardLayer(_T5Layer):

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = t5_layer_norm(cfg.layer_norm_epsilon, self.param_dtype, "layer_norm")(cast(x, jnp.float32))
        lin = self.opts
        return x + cast(_FeedForward(cfg, **lin, name="DenseReluDense")(h), jnp.float32)


class _FeedForward(_T5Layer):
    """wo(act(wi(x))), or wo(act(wi_0(x)) * wi_1(x)) for the gated variants (v1.1's gated-gelu)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        lin = self.opts
        if cfg.is_gated_act:
            h = _act(cfg.dense_act_fn, Linear(cfg.d_ff, name="wi_0", **lin)(x)) * Linear(cfg.d_ff, name="wi_1", **lin)(x)
        else:
            h = _act(cfg.dense_act_fn, Linear(cfg.d_ff, name="wi", **lin)(x))
        return Linear(cfg.d_model, name="wo", **lin)(h)


class T5Block(_T5Layer):
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, key_bias: jax.Array, position_bias: jax.Array | None) -> tuple:
        x, position_bias = T5SelfAttentionLayer(self.config, has_relative_attention_bias=self.has_relative_attention_bias, **self.opts,
                                                name="layer_0")(x, key_bias, position_bias)
        x = T5FeedForwardLayer(self.config, **self.opts, name="layer_1")(x)
        return x, position_bias


class T5Encoder(_T5Layer):
    """(tokens int [B, L], mask bool [B, L] True on real tokens, or None: all real) -> float32 [B, L, d_model],
    transformers' T5EncoderModel(...).last_hidden_state at inference."""

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"T5Encoder: tokens must be [batch, length], got shape {tokens.shape}")
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        elif mask.shape != tokens.shape:
            raise ValueError(f"T5Encoder: mask shape {mask.shape} differs from tokens shape {tokens.shape}")
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.param_dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(1.0), name="embed_tokens")
        x = cast(embed(tokens), jnp.float32)
        key_bias = jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        position_bias = None
        for i in range(cfg.num_layers):
            x, position_bias = T5Block(cfg, has_relative_attention_bias=i == 0, **self.opts, name=f"block_{i}")(x, key_bias, position_bias)
        return t5_layer_norm(cfg.layer_norm_epsilon, self.param_dtype, "final_layer_norm")(cast(x, jnp.float32))


def abstract_t5_params(module: T5Encoder, length: int = 8):
    """Shapes and dtypes of the module's params (jax.eval_shape of init: nothing is allocated)."""
    return abstract_params(module, jax.ShapeDtypeStruct((1, length), jnp.int32),
                           jax.ShapeDtypeStruct((1, length), jnp.bool_))


def encode(module: T5Encoder, params, tokens, mask=None) -> jax.Array:
    """The encoder's states float32 [B, L, d_model] for tokens [B, L] and mask [B, L] (True on real tokens;
    None: all real); `params` is the params tree (or {"params": tree}), numpy or jax arrays, sharded or not.
    Concrete inputs are checked first (ids within the vocabulary, the mask's shape): a ValueError instead
    of NaN states. The forward pass is jitted (one compile per module and input shape)."""
    check_tokens(tokens, mask, module.config.vocab_size, "T5")
    return apply_text_encoder(module, params, tokens, mask)
