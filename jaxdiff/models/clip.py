"""GLIDE's noised CLIP encoders (openai/glide-text2im, glide_text2im/clip) in Flax linen.

    ClipImageEncoder(image_size, patch_size, n_embd, n_head, n_xf_blocks, n_head_state, n_timestep)
        (x [B, H, W, 3] in model space [-1, 1], t [B] original diffusion timesteps) -> [B, n_embd]
    ClipTextEncoder(n_bpe_vocab, max_text_len, n_embd, n_head, n_xf_blocks, n_head_state)
        (tokens [B, max_text_len] int, text_len [B] int) -> [B, n_embd]
    create_clip_encoder(kind, **kwargs)         kind: "clip-image" | "clip-text"
    ClipModel(...)  both encoders and the logit scale, trained together by jaxdiff.train's "clip" task

The encoders return unnormalised embeddings. Constructor arguments are glide's own (width = n_head *
n_head_state). Submodule and parameter names mirror the state_dict keys without the leading "blocks."
(`blocks.block_3.f_attn.f_q.w` <-> `block_3/f_attn/f_q/kernel`) for `jaxdiff.convert.clip`.

glide pads every sequence to a multiple of 32 tokens and masks the padding with -1e10 logits; for
the real tokens that equals plain attention over the unpadded sequence, which is what is computed
here (image: no mask; text: causal).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import Dense, gelu_mlp, layer_norm, merge_heads, split_heads
from jaxdiff.ops.attention import attention
from jaxdiff.util.config import did_you_mean, is_int

__all__ = ["CLIP_IMAGE_MEAN", "CLIP_IMAGE_STD", "CLIP_KINDS", "ClipImageEncoder", "ClipModel", "ClipTextEncoder",
           "MAX_LOGIT_SCALE", "PreLNAttention", "PreLNMLP", "TransformerBlock", "check_clip_kind", "create_clip_encoder",
           "multihead_attention"]

# CLIP's per-channel statistics of [0, 255] images (glide_text2im/clip/encoders.py).
CLIP_IMAGE_MEAN = (122.77093945, 116.74601272, 104.09373519)
CLIP_IMAGE_STD = (68.50053285, 66.63215831, 70.32316309)


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T + causal mask) v for [N, T, d]; the softmax in float32."""
    s = jnp.einsum("ntd,nsd->nts", q, k, preferred_element_type=jnp.float32)
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("nts,nsd->ntd", w.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, *, causal: bool = False) -> jax.Array:
    """Scaled dot-product attention of q, k, v [B, T, C] with `num_heads` contiguous heads -> [B, T, C].

    q and k are each scaled by d^-1/4 (d = C / num_heads: total 1/sqrt(d)). Without a mask this is
    `jaxdiff.ops.attention.attention` (with its CPU gradient); `causal=True` lets position i attend
    to positions <= i only (a plain formula).
    """
    b, t, c = q.shape
    if c % num_heads:
        raise ValueError(f"{c} channels do not split into {num_heads} heads")
    s = (c // num_heads) ** -0.25
    q, k, v = split_heads(q * s, num_heads), split_heads(k * s, num_heads), split_heads(v, num_heads)
    out = _causal_attention(q, k, v) if causal else attention(q, k, v)
    return merge_heads(out, b)


class PreLNAttention(nn.Module):
    """x + f_c(attention(f_q(ln x), f_k(ln x), f_v(ln x))); f_k has no bias (glide's f_attn)."""

    num_heads: int
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = layer_norm("ln")(x)
        q, k, v = Dense(c, name="f_q")(h), Dense(c, name="f_k", use_bias=False)(h), Dense(c, name="f_v")(h)
        return x + Dense(c, name="f_c")(multihead_attention(q, k, v, self.num_heads, causal=self.causal))


class PreLNMLP(nn.Module):
    """x + f_2(GELU(f_1(ln x))), exact (erf) GELU, hidden width 4C (glide's f_mlp)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x + gelu_mlp(layer_norm("ln")(x), "f_1", "f_2")


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: attention then MLP, each residual."""

    num_heads: int
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = PreLNAttention(self.num_heads, self.causal, name="f_attn")(x)
        return PreLNMLP(name="f_mlp")(x)


class _Head(nn.Module):
    """Output LayerNorm + bias-free projection of one token per sample, [B, C] -> [B, n_embd].

    With `last` [B] (the text encoder), h is every token [B, T, C]: the LayerNorm is applied to all of
    them (it acts per token) and the projection to token last[b] of row b; returns (the projection
    [B, n_embd], the normalised tokens [B, T, C])."""

    n_embd: int

    @nn.compact
    def __call__(self, h: jax.Array, last: jax.Array | None = None):
        x = layer_norm("ln")(h)
        if last is None:
            return Dense(self.n_embd, name="f", use_bias=False)(x)
        pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return Dense(self.n_embd, name="f", use_bias=False)(pooled), x


def _check_positive(owner: str, **values) -> None:
    for name, v in values.items():
        if not is_int(v) or v < 1:
            raise ValueError(f"{owner}: {name}={v!r} must be a positive integer")


class _ImageInput(nn.Module):
    """glide's ImageEmbedding with timesteps: patches, w_t[t] as token 0, w_pos, LayerNorm."""

    patch_size: int
    n_tokens: int
    width: int
    n_timestep: int

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        p, w = self.patch_size, self.width
        w_t = self.param("w_t", nn.initializers.normal(1 / math.sqrt(w)), (self.n_timestep, w), jnp.float32)
        # HWIO like every jaxdiff convolution; stride = kernel, so it is a product over flattened patches
        kernel = self.param("patch_proj", nn.initializers.normal(math.sqrt(2 / (w * p * p))), (p, p, 3, w), jnp.float32)
        w_pos = self.param("w_pos", nn.initializers.normal(1 / math.sqrt(w)), (self.n_tokens, w), jnp.float32)
        b, hh, ww, c = x.shape
        g1, g2 = hh // p, ww // p
        patches = x.reshape(b, g1, p, g2, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g1 * g2, p * p * c)
        h = jnp.einsum("bnk,kw->bnw", patches, kernel.reshape(p * p * c, w))
        if jnp.issubdtype(t.dtype, jnp.floating):
            t = jnp.round(t)
        sot = jnp.take(w_t, t.astype(jnp.int32), axis=0, mode="clip")[:, None]
        return layer_norm("ln")(jnp.concatenate([sot, h], axis=1) + w_pos[None])


class ClipImageEncoder(nn.Module):
    """GLIDE's noised CLIP image encoder (glide's ImageEncoder with n_timestep > 0), NHWC.

    __call__(x, t): x [B, image_size, image_size, 3] in model space [-1, 1] (mapped to [0, 255] by
    (x + 1) * 127.5, then normalised with CLIP's channel means and stds); grayscale images
    [B, image_size, image_size, 1] are repeated to the three channels first; t [B] the ORIGINAL
    diffusion timesteps in [0, n_timestep) (out-of-range values are clamped; float values rounded).
    Returns the unnormalised embedding [B, n_embd] read at token 0 (the timestep token).
    """

    image_size: int
    patch_size: int
    n_embd: int
    n_head: int
    n_xf_blocks: int
    n_head_state: int = 64
    n_timestep: int = 1000

    def __post_init__(self):
        _check_positive("ClipImageEncoder", image_size=self.image_size, patch_size=self.patch_size,
                        n_embd=self.n_embd, n_head=self.n_head, n_xf_blocks=self.n_xf_blocks,
                        n_head_state=self.n_head_state, n_timestep=self.n_timestep)
        if self.image_size % self.patch_size:
            raise ValueError(f"ClipImageEncoder: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        s = self.image_size
        t = jnp.asarray(t)
        if x.ndim != 4 or x.shape[1:3] != (s, s) or x.shape[3] not in (1, 3):
            raise ValueError(f"ClipImageEncoder expects images [B, {s}, {s}, 3] or [B, {s}, {s}, 1] (NHWC), "
                             f"got {x.shape}")
        if x.shape[3] == 1:
            x = jnp.repeat(x, 3, axis=3)
        if t.shape != x.shape[:1]:
            raise ValueError(f"ClipImageEncoder expects timesteps [{x.shape[0]}], got {t.shape}")
        mean = jnp.asarray(CLIP_IMAGE_MEAN, jnp.float32)
        std = jnp.asarray(CLIP_IMAGE_STD, jnp.float32)
        x = ((x.astype(jnp.float32) + 1.0) * 127.5 - mean) / std
        width = self.n_head * self.n_head_state
        n_tokens = 1 + (s // self.patch_size) ** 2
        h = _ImageInput(self.patch_size, n_tokens, width, self.n_timestep, name="input")(x, t)
        for i in range(self.n_xf_blocks):
            h = TransformerBlock(self.n_head, name=f"block_{i}")(h)
        return _Head(self.n_embd, name="output")(h[:, 0])


class _TextInput(nn.Module):
    """glide's TextEmbedding: w_voc[token] + w_pos."""

    n_vocab: int
    n_context: int
    width: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        w_voc = self.param("w_voc", nn.initializers.normal(0.02), (self.n_vocab, self.width), jnp.float32)
        w_pos = self.param("w_pos", nn.initializers.normal(0.01), (self.n_context, self.width), jnp.float32)
        return jnp.take(w_voc, tokens.astype(jnp.int32), axis=0, mode="clip") + w_pos[None]


class ClipTextEncoder(nn.Module):
    """GLIDE's CLIP text encoder (glide's TextEncoder).

    __call__(tokens, text_len, return_states=False): tokens [B, max_text_len] int ([start] + BPE ids + [end],
    padded; see `jaxdiff.data.tokenizers.ClipTokenizer`), text_len [B] the number of ids including start
    and end. Causal attention; the output is read at position text_len - 1 (the end token), so ids after it
    have no effect. Returns the unnormalised embedding [B, n_embd]; with return_states=True, (embedding,
    token states [B, max_text_len, n_head * n_head_state]): every position's output of the last block
    after the output LayerNorm (the embedding is the projection of position text_len - 1's state, as
    transformers' CLIPTextModel gives `last_hidden_state` and the pooled output). States after
    text_len - 1 belong to padding (causal attention: they never influence the real ones).
    """

    n_bpe_vocab: int
    max_text_len: int
    n_embd: int
    n_head: int
    n_xf_blocks: int
    n_head_state: int = 64

    def __post_init__(self):
        _check_positive("ClipTextEncoder", n_bpe_vocab=self.n_bpe_vocab, max_text_len=self.max_text_len,
                        n_embd=self.n_embd, n_head=self.n_head, n_xf_blocks=self.n_xf_blocks,
                        n_head_state=self.n_head_state)
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array, text_len: jax.Array, return_states: bool = False):
        n = self.max_text_len
        tokens, text_len = jnp.asarray(tokens), jnp.asarray(text_len)
        if tokens.ndim != 2 or tokens.shape[1] != n:
            raise ValueError(f"ClipTextEncoder expects tokens [B, {n}] (max_text_len), got {tokens.shape}")
        if text_len.shape != tokens.shape[:1]:
            raise ValueError(f"ClipTextEncoder expects text_len [{tokens.shape[0]}], got {text_len.shape}")
        width = self.n_head * self.n_head_state
        h = _TextInput(self.n_bpe_vocab, n, width, name="input")(tokens)
        for i in range(self.n_xf_blocks):
            h = TransformerBlock(self.n_head, causal=True, name=f"block_{i}")(h)
        last = jnp.clip(text_len.astype(jnp.int32) - 1, 0, n - 1)
        emb, states = _Head(self.n_embd, name="output")(h, last)
        return (emb, states) if return_states else emb


CLIP_KINDS = {"clip-image": ClipImageEncoder, "clip-text": ClipTextEncoder}
#: CLIP's cap on the logit scale (the learned log is clipped at log 100).
MAX_LOGIT_SCALE = 100.0


class ClipModel(nn.Module):
    """Both encoders of a noised CLIP and its logit scale (what jaxdiff.train's "clip" task trains).

    Fields are glide's clip/config.yaml names (`jaxdiff.convert.clip.CLIP_CONFIG`), so `image_encoder()`
    and `text_encoder()` are the ClipImageEncoder / ClipTextEncoder of the released layout; their
    parameters are this module's "image" and "text" subtrees.

    __call__(x, t, tokens, text_len) -> (image embeddings [B, n_embd], text embeddings [B, n_embd],
    logit scale), unnormalised; methods "encode_image" (x, t), "encode_text" (tokens, text_len) and
    "encode_text_states" (tokens, text_len: the per-token states a text-conditional U-Net attends to).
    Logit scale, CLIP's convention: logits = scale * cosine similarity.
    learn_logit_scale=True (CLIP): a parameter "logit_scale" holds its log, initialised at
    log(logit_scale) (CLIP: 1 / 0.07), and scale = exp(min(log, log 100)); False: scale = logit_scale,
    fixed (glide's noised CLIP reports 100 in its config).
    """

    image_size: int
    patch_size: int
    n_embd: int
    n_head_image: int
    n_xf_blocks_image: int
    n_vocab: int
    max_text_len: int
    n_head_text: int
    n_xf_blocks_text: int
    n_head_state_image: int = 64
    n_head_state_text: int = 64
    n_timesteps: int = 1000
    logit_scale: float = 1 / 0.07
    learn_logit_scale: bool = True

    def __post_init__(self):
        if not (isinstance(self.logit_scale, (int, float)) and not isinstance(self.logit_scale, bool)
                and 0 < self.logit_scale <= MAX_LOGIT_SCALE):
            raise ValueError(f"ClipModel: logit_scale={self.logit_scale!r} must lie in (0, {MAX_LOGIT_SCALE:g}]")
        if not isinstance(self.learn_logit_scale, bool):
            raise ValueError(f"ClipModel: learn_logit_scale={self.learn_logit_scale!r}: expected True or False")
        self.image_encoder(parent=None), self.text_encoder(parent=None)  # validates their arguments
        super().__post_init__()

    def image_encoder(self, **kwargs) -> ClipImageEncoder:
        """The image encoder (parent=None: a standalone module for this model's "image" parameters)."""
        return ClipImageEncoder(self.image_size, self.patch_size, self.n_embd, self.n_head_image,
                                self.n_xf_blocks_image, self.n_head_state_image, self.n_timesteps, **kwargs)

    def text_encoder(self, **kwargs) -> ClipTextEncoder:
        """The text encoder (parent=None: a standalone module for this model's "text" parameters)."""
        return ClipTextEncoder(self.n_vocab, self.max_text_len, self.n_embd, self.n_head_text,
                               self.n_xf_blocks_text, self.n_head_state_text, **kwargs)

    def setup(self):
        self.image = self.image_encoder()
        self.text = self.text_encoder()
        if self.learn_logit_scale:
            self.log_scale = self.param("logit_scale", nn.initializers.constant(math.log(self.logit_scale)), (),
                                        jnp.float32)

    def scale(self) -> jax.Array:
        if not self.learn_logit_scale:
            return jnp.float32(self.logit_scale)
        return jnp.exp(jnp.minimum(self.log_scale, math.log(MAX_LOGIT_SCALE)))

    def encode_image(self, x, t) -> jax.Array:
        return self.image(x, t)

    def encode_text(self, tokens, text_len) -> jax.Array:
        return self.text(tokens, text_len)

    def encode_text_states(self, tokens, text_len) -> jax.Array:
        """The text encoder's token states [B, max_text_len, width] (`ClipTextEncoder`, return_states)."""
        return self.text(tokens, text_len, return_states=True)[1]

    def __call__(self, x, t, tokens, text_len) -> tuple:
        return self.image(x, t), self.text(tokens, text_len), self.scale()


def check_clip_kind(kind: str) -> str:
    """`kind` if it names a CLIP encoder, else ValueError listing the kinds."""
    if kind not in CLIP_KINDS:
        raise ValueError(f"unknown CLIP encoder kind {kind!r}{did_you_mean(kind, CLIP_KINDS)}; expected one of "
                         f"{sorted(CLIP_KINDS)}")
    return kind


def create_clip_encoder(kind: str, **kwargs) -> nn.Module:
    """ClipImageEncoder ("clip-image") or ClipTextEncoder ("clip-text") from glide's constructor
    keyword arguments; unknown kinds or arguments raise ValueError naming them."""
    cls = CLIP_KINDS[check_clip_kind(kind)]
    names = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
    bad = [k for k in kwargs if k not in names]
    if bad:
        raise ValueError(f"unknown argument(s) {bad} for a {kind!r} encoder; allowed: {', '.join(names)}")
    return cls(**kwargs)
