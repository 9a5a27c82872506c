"""Softmax attention over tokens, softmax(q k^T) v, for q, k, v [N, T, C] (heads folded into N).

Scaling is the caller's (ADM scales q and k by C^-1/4 each). The softmax is computed in float32;
the products accumulate in float32 and the result has v's dtype.

On the CPU the score matrices ([N, T, T] float32, 16 MB for 64 heads of 256 tokens) are what costs:
every pass over them runs at memory speed, and XLA's derivative of the plain formula makes many
such passes and one product with a transposed operand that misses the fast matrix-product path.
So on the CPU (`conv.fast_path_active()`, the same switch as the convolution's) the attention is a
`jax.custom_vjp` evaluated in chunks of heads whose score tiles stay near the L2 cache:

* forward: one product, exp, a row sum, one product, then the division on the small [T, C] result;
* backward: the standard softmax gradient from the saved probabilities, with both products that
  contract over tokens written as plain products of explicitly transposed small operands.

Elsewhere (GPU, TPU) it is the plain formula and XLA's own gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .conv import _l2_bytes, fast_path_active

__all__ = ["attention"]


def _mm(a, b):
    """[n, i, k] x [n, k, j] -> [n, i, j], float32 accumulation."""
    return lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def _mm_nt(a, b):
    """[n, i, k] x [n, j, k] -> [n, i, j], float32 accumulation."""
    return lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def _mm_tn(a, b):
    """[n, k, i] x [n, k, j] -> [n, i, j] as (b^T a)^T: XLA's CPU path for a product contracting the
    leading axis of a large operand is several times slower, so the small operand is transposed
    and the barriers keep the compiler from folding the transposes back into the product."""
    bt = lax.optimization_barrier(jnp.swapaxes(b, 1, 2))
    return jnp.swapaxes(lax.optimization_barrier(_mm(bt, a)), 1, 2)


def _plain(q, k, v):
    w = jax.nn.softmax(_mm_nt(q, k), axis=-1)
    return _mm(w.astype(v.dtype), v).astype(v.dtype)


def _probs(q, k):
    s = _mm_nt(q, k)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e, jnp.sum(e, axis=-1, keepdims=True)


def _core(q, k, v):
    e, l = _probs(q, k)
    return (_mm(e.astype(v.dtype), v) / l).astype(v.dtype)


def _core_fwd(q, k, v):
    e, l = _probs(q, k)
    w = e / l
    return _mm(w.astype(v.dtype), v).astype(v.dtype), (q, k, v, w)


def _core_bwd(res, do):
    q, k, v, w = res
    do = do.astype(jnp.float32)
    dv = _mm_tn(w, do)
    dw = _mm_nt(do, v.astype(jnp.float32))
    ds = w * (dw - jnp.sum(dw * w, axis=-1, keepdims=True))
    dq = _mm(ds, k.astype(jnp.float32))
    dk = _mm_tn(ds, q.astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_fast_core = jax.custom_vjp(_core)
_fast_core.defvjp(_core_fwd, _core_bwd)


def _chunks(n: int, t: int, s: int) -> int:
    """Number of chunks of the N axis: each chunk's [n, T, S] float32 scores about 2 L2 caches."""
    per = max(1, (2 * _l2_bytes() // 4) // (t * s))
    if per >= n:
        return 1
    while n % per:
        per -= 1
    return n // per


def _fast(q, k, v):
    n = q.shape[0]
    c = _chunks(n, q.shape[1], k.shape[1])
    if c == 1:
        return _fast_core(q, k, v)
    split = lambda z: z.reshape((c, n // c) + z.shape[1:])
    out = lax.map(lambda a: _fast_core(*a), (split(q), split(k), split(v)))
    return out.reshape((n,) + out.shape[2:])


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v for q [N, T, C], k and v [N, S, C] -> [N, T, C] (see the module doc)."""
    if not (q.ndim == k.ndim == v.ndim == 3) or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(f"attention: expected q [N, T, C], k and v [N, S, C], got {q.shape}, {k.shape}, {v.shape}")
    if not fast_path_active():
        return _plain(q, k, v)
    return lax.platform_dependent(q, k, v, cpu=_fast, default=_plain)
