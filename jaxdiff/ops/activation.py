"""The exact (erf) GELU, x / 2 * (1 + erf(x / sqrt 2)), in the form XLA's CPU backend fuses.

`jax.nn.gelu(x, approximate=False)` writes it with erfc, which XLA expands into two polynomial
branches joined by selects. Compiled with `jaxdiff.util.cpu.jit` (YNNPACK's element-wise fusions on)
that expansion splits into a dozen small YNNPACK fusions per GELU, each reading full-size copies of its
broadcast constants: 3.6 ms for one [32, 16, 16, 96] float32 GELU against 0.6 ms for the erf form
(2 cores, 2026-12-04; docs/benchmarks.md), which made the erfc GELUs most of an IF stage-I U-Net
forward on the CPU. After a GroupNorm, `jaxdiff.ops.norm.group_norm(gelu=True)` does better still. The erf form is
PyTorch's own (`torch.nn.functional.gelu`); it differs from the erfc form by float32 round-off (at
most 5e-7 absolute on |x| <= 10, the erf form losing relative accuracy only where the output is below
~1e-7 * |x|, i.e. for x < -5). Same dtype in and out; plain JAX ops, so XLA differentiates it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["gelu"]


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU x * Phi(x) = x / 2 * (1 + erf(x / sqrt 2)), computed in x's (floating) dtype."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    half = np.asarray(0.5, x.dtype)
    return x * (half + half * lax.erf(x * np.asarray(1.0 / math.sqrt(2.0), x.dtype)))
