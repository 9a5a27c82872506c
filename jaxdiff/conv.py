"""2-D convolution used by every network in jaxdiff (NHWC inputs, HWIO kernels).

One function so that backend-specific speed work (issue: CPU convolution gradients) has a single
place to live; every layer calls `conv2d` and never `lax.conv_general_dilated` directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0) -> jax.Array:
    """NHWC x HWIO -> NHWC convolution with symmetric zero padding (no bias)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
