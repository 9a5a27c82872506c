"""The FID Inception-v3's features: preprocessing and the jitted feature function (its weights:
`jaxdiff.convert.inception`).

Preprocessing (`mode`)
* "tf1" (default; guided-diffusion's evaluator, torch-fidelity): uint8 -> float32 in [0, 255];
  bilinear resize to 299x299 as TensorFlow 1's legacy resize_bilinear (no half-pixel offset:
  source coordinate = destination index * in_size / 299); then (x - 128) / 128.
* "pytorch_fid" (pytorch-fid): x / 255; bilinear resize with half-pixel centres (PyTorch's
  F.interpolate(mode="bilinear", align_corners=False): source = (index + 0.5) * in / out - 0.5,
  clamped at 0); then 2x - 1. Its numbers are pytorch-fid's, not the ADM evaluator's.
Neither antialiases. The resize is two interpolation-matrix products at full float32 precision.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert.inception import INPUT_SIZE, check_params
from jaxdiff.models.inception import InceptionV3
from jaxdiff.util import cpu

__all__ = ["INPUT_SIZE", "MODES", "check_images", "feature_fn", "features", "preprocess", "pure_feature_fn",
           "resize_matrix", "source_coordinates"]


MODES = ("tf1", "pytorch_fid")


_HIGHEST = jax.lax.Precision.HIGHEST


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown Inception preprocessing mode {mode!r}; expected one of {MODES} "
                         f"('tf1': guided-diffusion's evaluator / torch-fidelity, 'pytorch_fid': pytorch-fid)")
    return mode


def check_images(images: Any) -> None:
    """Refuse anything but uint8 NHWC RGB images [B, H, W, 3] (works on tracers: shapes and dtypes only)."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"images must be a uint8 array [B, H, W, 3], got {type(images).__name__}")
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be a uint8 array [B, H, W, 3] (NHWC), got shape {shape} ({len(shape)} dimensions)")
    if images.dtype != np.uint8:
        raise ValueError(f"images must have dtype uint8 (0..255, as guided-diffusion's samples.npz), got {images.dtype}; "
                         "convert [-1, 1] floats with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    if shape[-1] != 3:
        hint = " (channels first? transpose NCHW to NHWC)" if shape[1] == 3 else ""
        raise ValueError(f"images must be RGB with 3 channels on the last axis (NHWC), got shape {shape}{hint}")
    if min(shape[1:3]) < 1:
        raise ValueError(f"images must have a positive height and width, got shape {shape}")


def source_coordinates(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """Where each output pixel samples the input: tf1 i * in / out; pytorch_fid max((i + 0.5) * in / out
    - 0.5, 0). Computed in float32 as TensorFlow 1 and PyTorch compute them (scale = float(in) / out,
    then one float multiply): over a few hundred pixels that rounding moves a coordinate by up to
    ~4e-5 pixels, i.e. up to ~1e-2 on the 0-255 scale between two very different neighbours, so the
    float64 formula would not reproduce their resized images to 1e-3."""
    _check_mode(mode)
    dst = np.arange(out_size, dtype=np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    if mode == "tf1":
        return dst * scale
    return np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """[out_size, in_size] float64 bilinear weights: row i mixes the two input pixels around
    `source_coordinates(...)[i]`; indices past the last pixel are clamped to it. No antialiasing, so
    downsampling skips pixels as TF1 and PyTorch do."""
    src = source_coordinates(in_size, out_size, mode).astype(np.float64)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    w = np.zeros((out_size, in_size), np.float64)
    np.add.at(w, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(w, (np.arange(out_size), hi), frac)
    return w


def _resize(x: jax.Array, mode: str) -> jax.Array:
    """Bilinear resize of float32 NHWC x to 299x299 (two matrix products; skipped where the identity)."""
    wy, wx = (resize_matrix(n, INPUT_SIZE, mode) for n in x.shape[1:3])
    if not np.array_equal(wy, np.eye(INPUT_SIZE)):
        x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(wy, jnp.float32), x, precision=_HIGHEST)
    if not np.array_equal(wx, np.eye(INPUT_SIZE)):
        x = jnp.einsum("pw,nhwc->nhpc", jnp.asarray(wx, jnp.float32), x, precision=_HIGHEST)
    return x


def preprocess(images: jax.Array, mode: str = "tf1") -> jax.Array:
    """uint8 [B, H, W, 3] -> the network's float32 input [B, 299, 299, 3] (see the module doc)."""
    _check_mode(mode)
    check_images(images)
    x = images.astype(jnp.float32)
    if mode == "tf1":
        return (_resize(x, mode) - 128.0) / 128.0
    return 2.0 * _resize(x / 255.0, mode) - 1.0


def features(params: Any, images: jax.Array, mode: str = "tf1") -> dict:
    """Pure function: uint8 [B, H, W, 3] -> {"pool3" [B, 2048], "logits_unbiased" [B, 1008],
    "logits" [B, 1008], "spatial" [B, 2023]} (float32), for use inside other jitted/sharded code."""
    return InceptionV3().apply({"params": params}, preprocess(images, mode))


def pure_feature_fn(mode: str = "tf1"):
    """`fn(params, images_uint8) -> outputs` for `mode`, not jitted: for use inside other jitted or
    sharded programs (e.g. `jaxdiff.eval.adm`)."""
    return functools.partial(features, mode=_check_mode(mode))


@functools.lru_cache(maxsize=None)
def _jitted(mode: str):
    return cpu.jit(pure_feature_fn(mode))


def feature_fn(params: Any = None, mode: str = "tf1"):
    """The jitted `fn(params, images_uint8[B, H, W, 3]) -> outputs dict` of `features` for `mode`.

    `params`, when given, is checked against the network (every missing, unexpected or wrongly shaped
    leaf named) before anything is compiled. One compiled program per input shape."""
    _check_mode(mode)
    if params is not None:
        check_params(params)
    return _jitted(mode)
