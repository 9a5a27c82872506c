"""Softmax attention over tokens, softmax(q k^T) v, for q, k, v [N, T, C] (heads folded into N).

Scaling is the caller's (ADM scales q and k by C^-1/4 each). The softmax is computed in float32;
the products accumulate in float32 and the result has v's dtype.

On the CPU the score matrices ([N, T, T] float32, 16 MB for 64 heads of 256 tokens) are what costs:
every pass over them runs at memory speed, and XLA's derivative of the plain formula makes many
such passes and one product with a transposed operand that misses the fast matrix-product path.
So on the CPU (`cpu.custom_gradients_active()`; `JAXDIFF_PLAIN_OPS=1` turns it off) the attention is a
`jax.custom_vjp` evaluated in chunks of heads whose score tiles stay near the L2 cache:

* forward: one product, exp, a row sum, one product, then the division on the small [T, C] result;
  only the output and each row's log-sum-exp are kept for the backward pass (no [N, T, S] residual:
  storing the probabilities cost more in memory traffic than recomputing them);
* a forward pass that is not differentiated (sampling) is the same computation over all heads at once,
  chunked only to bound the scores' memory (`INFERENCE_SCORES_BYTES`): there the L2-sized chunks,
  a `lax.map` loop, cost more than they saved (IF's 256 x 64 x 141 attention 3.0 -> 2.1 ms, ADM's
  64 x 256 x 256 at 16x16 3.1 -> 2.5 ms, 256 x 256 x 256 11.9 -> 8.9 ms; docs/benchmarks.md);
* backward: the probabilities recomputed per chunk from the log-sum-exp, then the standard softmax
  gradient, with the row term sum(dP * P) taken as sum(dO * O) over [T, C], and both products that
  contract over tokens written as plain products of explicitly transposed small operands.

Elsewhere (GPU, TPU) it is the plain formula and XLA's own gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.util.cpu import custom_gradients_active, l2_cache_bytes

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


# The most score bytes ([N, T, S] float32) a forward pass that is not differentiated writes at once.
INFERENCE_SCORES_BYTES = 64 << 20


def _chunks_of(n: int, per: int) -> int:
    """Number of equal chunks of n with at most `per` (>= 1) in each."""
    if per >= n:
        return 1
    while n % per:
        per -= 1
    return n // per


def _chunks(n: int, t: int, s: int) -> int:
    """Number of chunks of the N axis: each chunk's [n, T, S] float32 scores about 2 L2 caches."""
    return _chunks_of(n, max(1, (2 * l2_cache_bytes() // 4) // (t * s)))


def _inference_chunks(n: int, t: int, s: int) -> int:
    """Number of chunks of the N axis without a gradient: scores of at most INFERENCE_SCORES_BYTES each."""
    return _chunks_of(n, max(1, (INFERENCE_SCORES_BYTES // 4) // (t * s)))


def _over_chunks(fn, *arrays, chunks=None):
    """fn applied to matching chunks of the leading axis of `arrays` (lax.map), results concatenated;
    `chunks` (default: `_chunks`, L2-sized) of them."""
    n = arrays[0].shape[0]
    c = _chunks(n, arrays[0].shape[1], arrays[1].shape[1]) if chunks is None else chunks
    if c == 1:
        return fn(*arrays)
    out = lax.map(lambda a: fn(*a), tuple(z.reshape((c, n // c) + z.shape[1:]) for z in arrays))
    return jax.tree_util.tree_map(lambda z: z.reshape((n,) + z.shape[2:]), out)


def _fwd_chunk(q, k, v):
    """(output, log-sum-exp of each score row) of one chunk."""
    s = _mm_nt(q, k)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    o = (_mm(e.astype(v.dtype), v) / denom).astype(v.dtype)
    return o, m + jnp.log(denom)


def _bwd_chunk(q, k, v, lse, delta, do):
    """dq, dk, dv of one chunk, with the probabilities recomputed from the saved log-sum-exp."""
    w = jnp.exp(_mm_nt(q, k) - lse)
    dv = _mm_tn(w, do)
    ds = w * (_mm_nt(do, v.astype(jnp.float32)) - delta)
    dq = _mm(ds, k.astype(jnp.float32))
    dk = _mm_tn(ds, q.astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _fast_impl(q, k, v):
    return _over_chunks(_fwd_chunk, q, k, v, chunks=_inference_chunks(q.shape[0], q.shape[1], k.shape[1]))[0]


def _fast_fwd(q, k, v):
    o, lse = _over_chunks(_fwd_chunk, q, k, v)
    return o, (q, k, v, o, lse)


def _fast_bwd(res, do):
    q, k, v, o, lse = res
    do = do.astype(jnp.float32)
    # sum_s w * dw over a row equals sum_c do * o: a [T, C] product instead of a pass over [T, S]
    delta = jnp.sum(do * o.astype(jnp.float32), axis=-1, keepdims=True)
    return _over_chunks(_bwd_chunk, q, k, v, lse, delta, do)


_fast = jax.custom_vjp(_fast_impl)
_fast.defvjp(_fast_fwd, _fast_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v for q [N, T, C], k and v [N, S, C] -> [N, T, C] (see the module doc)."""
    if not (q.ndim == k.ndim == v.ndim == 3) or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(f"attention: expected q [N, T, C], k and v [N, S, C], got {q.shape}, {k.shape}, {v.shape}")
    if not custom_gradients_active():
        return _plain(q, k, v)
    return lax.platform_dependent(q, k, v, cpu=_fast, default=_plain)
