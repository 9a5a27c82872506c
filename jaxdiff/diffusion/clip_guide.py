"""CLIP guidance (GLIDE's clip_guided notebook) as a gradient guide in jaxdiff.diffusion.guidance's style.

    image_embedding_fn(module, params) -> (x, t) -> [B, n_embd]
    text_embeddings(module, params, tokens, text_len) -> [B, n_embd]      once per run
    logit_scale_exp(logit_scale=100.0) -> float32 exp(float32 log(logit_scale))
    clip_log_density(image_fn, logit_scale=100.0, text_key="clip_text_emb") -> (x, t, cond) -> [B]
    clip_guide(image_fn, logit_scale=100.0, text_key=..., scale_key="clip_scale") -> cond_fn

The log-density of sample b is exp(logit_scale) * <z_text[b] / (|z_text[b]| + 1e-12),
z_img[b] / (|z_img[b]| + 1e-12)>, z_img = image encoder(x_t, t) at the ORIGINAL timestep t (what
samplers pass), and the guide returns cond[scale_key] * its gradient with respect to x_t (scale 0:
no guidance). The text embeddings are computed once per run and given per sample in
cond[text_key] ([B, n_embd], normalised or not); they are never re-encoded inside the sampling loop:

    text = text_embeddings(text_module, text_params, tokens, lens)
    cond = {**make_cond(B, clip_scale=3.0), CLIP_TEXT_KEY: text}
    cond_fn = clip_guide(image_embedding_fn(image_module, image_params))
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.guides import CLIP_SCALE, log_density_guide
from jaxdiff.util import cpu

__all__ = ["CLIP_SCALE", "CLIP_TEXT_KEY", "clip_guide", "clip_log_density", "image_embedding_fn", "logit_scale_exp",
           "normalize", "text_embeddings"]

CLIP_TEXT_KEY = "clip_text_emb"

ImageFn = Callable[[jax.Array, jax.Array], jax.Array]


def image_embedding_fn(module, params) -> ImageFn:
    """(x, t) -> unnormalised image embeddings of a ClipImageEncoder with `params`."""

    def fn(x, t):
        return module.apply({"params": params}, x, t)

    return fn


def text_embeddings(module, params, tokens, text_len) -> jax.Array:
    """Unnormalised embeddings [B, n_embd] of tokenized prompts (tokens [B, max_text_len], text_len
    [B], as `jaxdiff.data.tokenizers.ClipTokenizer` makes them). Call once per run, outside the loop."""
    tokens, text_len = np.asarray(tokens), np.asarray(text_len)
    if tokens.ndim != 2 or text_len.shape != tokens.shape[:1]:
        raise ValueError(f"expected tokens [B, L] and text_len [B], got {tokens.shape} and {text_len.shape}")
    n = module.max_text_len
    if np.any(text_len < 2) or np.any(text_len > n):
        raise ValueError(f"text_len must count the start and end tokens: 2 <= text_len <= {n}, "
                         f"got {text_len.tolist()}")
    return _jitted_apply()(module, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(text_len, jnp.int32))


@functools.lru_cache(maxsize=None)
def _jitted_apply():
    """module.apply jitted once per process (created on first use, after any distributed setup), with
    the module static: the same encoder is compiled once per input shape."""
    return cpu.jit(lambda module, params, *args: module.apply({"params": params}, *args), static_argnums=0)


def logit_scale_exp(logit_scale: float = 100.0) -> float:
    """exp(log(logit_scale)) with the log stored in float32, as glide's CLIPModel does (100 ->
    100.00000762939453)."""
    if not np.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale={logit_scale!r} must be a positive finite number")
    # float64 exp of the float32 log, rounded once to float32 (numpy's float32 exp is not correctly rounded)
    return float(np.float32(np.exp(np.float64(np.float32(np.log(logit_scale))))))


def normalize(z: jax.Array) -> jax.Array:
    """z / (||z||_2 + 1e-12) over the last axis (glide's normalisation)."""
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)


def clip_log_density(image_fn: ImageFn, *, logit_scale: float = 100.0,
                     text_key: str = CLIP_TEXT_KEY) -> Callable:
    """(x, t, cond) -> [B]: exp(logit_scale) * <normalize(cond[text_key]), normalize(image_fn(x, t))>."""
    scale = logit_scale_exp(logit_scale)

    def log_density(x, t, cond):
        if text_key not in cond:
            raise KeyError(f"CLIP guidance needs the text embeddings in cond[{text_key!r}] ([B, n_embd], "
                           f"from clip_guidance.text_embeddings)")
        z_img = normalize(image_fn(x, t).astype(jnp.float32))
        z_txt = normalize(jnp.asarray(cond[text_key], jnp.float32))
        if z_txt.shape != z_img.shape:
            raise ValueError(f"cond[{text_key!r}] has shape {z_txt.shape}; the image embeddings are {z_img.shape}")
        return scale * jnp.sum(z_txt * z_img, axis=-1)

    return log_density


def clip_guide(image_fn: ImageFn, *, logit_scale: float = 100.0, text_key: str = CLIP_TEXT_KEY,
               scale_key: str = CLIP_SCALE, interval: Optional[tuple[float, float]] = None,
               sched=None):
    """cond_fn(x, t, cond) = cond[scale_key] * grad_x clip_log_density (see the module doc)."""
    return log_density_guide(clip_log_density(image_fn, logit_scale=logit_scale, text_key=text_key),
                             scale_key=scale_key, interval=interval, sched=sched)
