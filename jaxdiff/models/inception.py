"""Inception-v3 as the FID/IS/sFID evaluators run it (TensorFlow's 2015-12-05 graph), Flax linen, NHWC.

Architecture only (preprocessing, weights and the jitted feature function: `jaxdiff.eval.inception`).
The network of guided-diffusion's evaluator and of its PyTorch ports (torch-fidelity, pytorch-fid),
which differs from torchvision's Inception-v3 in three places:

* the average pools of the A, C and E blocks (3x3, stride 1, padding 1) divide by the number of
  pixels inside the image, not by 9 (TensorFlow's SAME pooling);
* the last E block (Mixed_7c) max-pools instead;
* the classifier has 1008 outputs.

Every convolution is bias-free, followed by BatchNorm with running statistics (eps 1e-3; inference
only) and ReLU. Convolutions and the classifier run at `lax.Precision.HIGHEST`: full float32 on
every backend (GPUs would otherwise use TF32, TPUs bfloat16 passes).

Parameters (one "params" collection): each conv layer `<block>/<layer>` holds `kernel` [kh, kw, in,
out], and BatchNorm's `scale`, `bias`, `mean`, `var` [out]; `fc` holds `kernel` [2048, 1008] and
`bias` [1008]. Block and layer names are the PyTorch ports' state_dict names.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["BN_EPS", "ConvBN", "InceptionV3", "Mixed", "NUM_LOGITS", "POOL3_DIM", "SPATIAL_DIM"]

BN_EPS = 1e-3
HIGHEST = lax.Precision.HIGHEST
NUM_LOGITS = 1008
POOL3_DIM = 2048
SPATIAL_BLOCK = "Mixed_6d"  # the evaluator's `mixed_6/conv`: this block's 1x1 branch
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


class Spec(NamedTuple):
    """One ConvBN layer: name, output channels, kernel (kh, kw), stride, and whether it pads by
    k // 2 on each side (size-preserving at stride 1) or not at all."""

    name: str
    features: int
    kernel: Tuple[int, int] = (1, 1)
    stride: int = 1
    pad: bool = True


def _c(name: str, features: int, kernel=1, stride: int = 1, pad: bool = True) -> Spec:
    return Spec(name, features, (kernel, kernel) if isinstance(kernel, int) else tuple(kernel), stride, pad)


class ConvBN(nn.Module):
    """Bias-free convolution, BatchNorm (running statistics, eps 1e-3), ReLU."""

    spec: Spec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        kh, kw = s.kernel
        c = s.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], c), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        pad = (kh // 2, kw // 2) if s.pad else (0, 0)
        y = lax.conv_general_dilated(x, kernel, (s.stride, s.stride), ((pad[0], pad[0]), (pad[1], pad[1])),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        mult = scale * lax.rsqrt(var + BN_EPS)  # per channel: one multiply-add per activation
        return jax.nn.relu(y * mult + (bias - mean * mult))


def _window(x: jax.Array, init, op, stride: int, pad: int) -> jax.Array:
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, jnp.asarray(init, x.dtype), op, (1, 3, 3, 1), (1, stride, stride, 1), p)


def _in_window_counts(n: int) -> np.ndarray:
    """For each of n positions, how many of the 3 taps centred on it lie inside [0, n)."""
    return np.convolve(np.ones(n), np.ones(3), mode="same")


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 average, stride 1, padding 1, dividing by the taps inside the image (TensorFlow SAME)."""
    _, h, w, _ = x.shape
    counts = np.outer(_in_window_counts(h), _in_window_counts(w)).astype(np.float32)
    return _window(x, 0.0, lax.add, 1, 1) / counts[None, :, :, None]


def max_pool_3x3(x: jax.Array, stride: int = 1) -> jax.Array:
    """3x3 max pool: stride 1 with padding 1 (same size), or stride 2 without padding."""
    return _window(x, -jnp.inf, lax.max, stride, 1 if stride == 1 else 0)


POOLS = {"avg": avg_pool_3x3, "max": max_pool_3x3, "max_s2": lambda x: max_pool_3x3(x, 2)}


class Mixed(nn.Module):
    """An Inception block: parallel branches concatenated on channels, the pooling branch last.

    `branches`: each a sequence of steps; a step is a Spec, or a tuple of Specs applied to the same
    input and concatenated (the E blocks' 1x3 / 3x1 pairs). `pool`: "avg", "max" (3x3, stride 1)
    or "max_s2" (3x3, stride 2); `pool_features`: channels of the 1x1 ConvBN after it (0: none).
    Returns (output, [each branch's output]).
    """

    branches: tuple
    pool: str
    pool_features: int = 0

    @nn.compact
    def __call__(self, x: jax.Array):
        outs = []
        for branch in self.branches:
            h = x
            for step in branch:
                if isinstance(step, Spec):
                    h = ConvBN(step, name=step.name)(h)
                else:
                    h = jnp.concatenate([ConvBN(s, name=s.name)(h) for s in step], axis=-1)
            outs.append(h)
        p = POOLS[self.pool](x)
        if self.pool_features:
            p = ConvBN(_c("branch_pool", self.pool_features), name="branch_pool")(p)
        outs.append(p)
        return jnp.concatenate(outs, axis=-1), outs


def _block_a(pool_features: int) -> dict:
    return dict(branches=(
        (_c("branch1x1", 64),),
        (_c("branch5x5_1", 48), _c("branch5x5_2", 64, 5)),
        (_c("branch3x3dbl_1", 64), _c("branch3x3dbl_2", 96, 3), _c("branch3x3dbl_3", 96, 3)),
    ), pool="avg", pool_features=pool_features)


def _block_b() -> dict:
    return dict(branches=(
        (_c("branch3x3", 384, 3, 2, False),),
        (_c("branch3x3dbl_1", 64), _c("branch3x3dbl_2", 96, 3), _c("branch3x3dbl_3", 96, 3, 2, False)),
    ), pool="max_s2")


def _block_c(c7: int) -> dict:
    h, v = (1, 7), (7, 1)
    return dict(branches=(
        (_c("branch1x1", 192),),
        (_c("branch7x7_1", c7), _c("branch7x7_2", c7, h), _c("branch7x7_3", 192, v)),
        (_c("branch7x7dbl_1", c7), _c("branch7x7dbl_2", c7, v), _c("branch7x7dbl_3", c7, h),
         _c("branch7x7dbl_4", c7, v), _c("branch7x7dbl_5", 192, h)),
    ), pool="avg", pool_features=192)


def _block_d() -> dict:
    return dict(branches=(
        (_c("branch3x3_1", 192), _c("branch3x3_2", 320, 3, 2, False)),
        (_c("branch7x7x3_1", 192), _c("branch7x7x3_2", 192, (1, 7)), _c("branch7x7x3_3", 192, (7, 1)),
         _c("branch7x7x3_4", 192, 3, 2, False)),
    ), pool="max_s2")


def _block_e(pool: str) -> dict:
    h, v = (1, 3), (3, 1)
    return dict(branches=(
        (_c("branch1x1", 320),),
        (_c("branch3x3_1", 384), (_c("branch3x3_2a", 384, h), _c("branch3x3_2b", 384, v))),
        (_c("branch3x3dbl_1", 448), _c("branch3x3dbl_2", 384, 3),
         (_c("branch3x3dbl_3a", 384, h), _c("branch3x3dbl_3b", 384, v))),
    ), pool=pool, pool_features=192)


MAX_POOL = "max_pool"  # a stem step: 3x3 max pool, stride 2
STEM = (_c("Conv2d_1a_3x3", 32, 3, 2, False), _c("Conv2d_2a_3x3", 32, 3, pad=False), _c("Conv2d_2b_3x3", 64, 3),
        MAX_POOL, _c("Conv2d_3b_1x1", 80), _c("Conv2d_4a_3x3", 192, 3, pad=False), MAX_POOL,)
BLOCKS = (
    ("Mixed_5b", _block_a(32)), ("Mixed_5c", _block_a(64)), ("Mixed_5d", _block_a(64)), ("Mixed_6a", _block_b()),
    ("Mixed_6b", _block_c(128)), ("Mixed_6c", _block_c(160)), ("Mixed_6d", _block_c(160)), ("Mixed_6e", _block_c(192)),
    ("Mixed_7a", _block_d()), ("Mixed_7b", _block_e("avg")), ("Mixed_7c", _block_e("max")),
)


class Logits(nn.Module):
    """The 2048 -> 1008 classifier; returns (x @ kernel, x @ kernel + bias)."""

    @nn.compact
    def __call__(self, x: jax.Array):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,), jnp.float32)
        unbiased = jnp.dot(x, kernel, precision=HIGHEST)
        return unbiased, unbiased + bias


class InceptionV3(nn.Module):
    """The FID Inception-v3 on preprocessed float32 images [N, 299, 299, 3] (see jaxdiff.eval.inception).

    Returns {"pool3": [N, 2048] (global average of Mixed_7c), "logits_unbiased": [N, 1008]
    (pool3 @ W, what the ADM evaluator's Inception Score uses), "logits": [N, 1008] (+ bias),
    "spatial": [N, 2023] (Mixed_6d's 1x1 branch, first 7 channels, flattened in (h, w, c) order:
    the evaluator's sFID features)}.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> dict:
        for step in STEM:
            x = max_pool_3x3(x, 2) if step == MAX_POOL else ConvBN(step, name=step.name)(x)
        spatial = None
        for name, block in BLOCKS:
            x, parts = Mixed(**block, name=name)(x)
            if name == SPATIAL_BLOCK:
                spatial = parts[0][..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        pool3 = jnp.mean(x, axis=(1, 2))
        unbiased, logits = Logits(name="fc")(pool3)
        return {"pool3": pool3, "logits_unbiased": unbiased, "logits": logits, "spatial": spatial}
