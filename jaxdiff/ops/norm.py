"""Group normalisation fused with a per-sample affine map and an optional SiLU.

    y = act(xhat * p + q),   xhat = (x - mean_g) / sqrt(var_g + eps)

with statistics per sample and group over every non-batch axis, `p`, `q` per sample and channel
([B, C]) and act = SiLU or identity. Every GroupNorm of the ADM networks is of this form:
p = scale, q = bias for a plain GroupNorm; p = scale * (1 + s), q = bias * (1 + s) + b for the
scale-shift norm of a ResBlock; SiLU follows in most places.

Speed on the CPU: the statistics are reduced per channel first ([B, C], channels minor) and then
per group; reducing a [..., G, C/G] view directly ran 2-4x slower forward and 4x slower backward.
The backward pass is written by hand as two sweeps over the activations: one reduction of
(dz, dz * x) per channel and one elementwise map dx = dz * alpha + x * beta + gamma with
per-(sample, channel) coefficients; z and SiLU' are recomputed instead of stored. In isolation it
runs about as fast as XLA's derivative of the per-channel formula; it keeps the number of passes
fixed inside the whole network, where XLA's fusion choices vary. The custom rule is used only
when the computation runs on the CPU (`cpu.custom_gradients_active()`; `JAXDIFF_PLAIN_OPS=1`
turns it off); elsewhere XLA differentiates the plain formula.
All arithmetic is float32; the output has the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.util.cpu import custom_gradients_active

__all__ = ["group_norm"]


def _group_mean(stat: jax.Array, groups: int) -> jax.Array:
    """[B, C] -> [B, C], averaged over the channels of each group."""
    b, c = stat.shape
    return jnp.repeat(stat.reshape(b, groups, c // groups).mean(axis=-1), c // groups, axis=-1)


def _stats(x: jax.Array, groups: int, eps: float):
    """Per-(sample, channel) group mean and 1/std, each [B, C], from float32 x [B, ..., C].

    Reduces over the spatial axes per channel first (channels minor: the fast reduction on the
    CPU), then over the channels of a group; two passes (centre, then square), as torch does."""
    spatial = tuple(range(1, x.ndim - 1))
    mean = _group_mean(jnp.mean(x, axis=spatial), groups)
    var = _group_mean(jnp.mean(jnp.square(x - _bc(mean, x)), axis=spatial), groups)
    return mean, lax.rsqrt(var + eps)


def _bc(v: jax.Array, x: jax.Array) -> jax.Array:
    """[B, C] -> [B, 1, ..., 1, C], broadcastable against x."""
    return v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[1],))


def _act(z, silu):
    return z * jax.nn.sigmoid(z) if silu else z


def _coefficients(arrays: tuple, barrier: bool) -> tuple:
    """Per-(sample, channel) [B, C] coefficients; with `barrier` (the CPU path) materialised
    before they are broadcast: otherwise XLA's CPU fusion folds the small [B, C] arithmetic into
    the broadcast and writes a full [B, ..., C] tensor for the element-wise fusion to read (48 such
    tensors, 62 MB of temporary memory, in a fixture-A training step at batch 16)."""
    return lax.optimization_barrier(arrays) if barrier else arrays


def _affine(xf, p, q, mean, rstd, barrier=False):
    """z = xhat * p + q as one per-(sample, channel) map of float32 x."""
    a = rstd * p
    a, d = _coefficients((a, q - mean * a), barrier)
    return xf * _bc(a, xf) + _bc(d, xf)


def _forward(x, p, q, groups, eps, silu, barrier):
    xf = x.astype(jnp.float32)
    mean, rstd = _stats(xf, groups, eps)
    return _act(_affine(xf, p, q, mean, rstd, barrier), silu).astype(x.dtype), (x, p, q, mean, rstd)


def _plain(x, p, q, groups, eps, silu):
    return _forward(x, p, q, groups, eps, silu, False)[0]


def _cpu_fwd(x, p, q, groups, eps, silu):
    return _forward(x, p, q, groups, eps, silu, True)


def _cpu(x, p, q, groups, eps, silu):
    return _cpu_fwd(x, p, q, groups, eps, silu)[0]


def _bwd(groups, eps, silu, res, dy):
    x, p, q, mean, rstd = res
    xf = x.astype(jnp.float32)
    dy = dy.astype(jnp.float32)
    if silu:
        z = _affine(xf, p, q, mean, rstd, barrier=True)
        sg = jax.nn.sigmoid(z)
        dz = dy * (sg * (1.0 + z * (1.0 - sg)))
    else:
        dz = dy
    spatial = tuple(range(1, x.ndim - 1))
    n = 1
    for ax in spatial:
        n *= x.shape[ax]
    s1 = jnp.sum(dz, axis=spatial)  # [B, C]
    s2 = jnp.sum(dz * xf, axis=spatial)
    dq = s1
    dp = rstd * (s2 - mean * s1)  # sum of dz * xhat
    g1 = _group_mean(p * s1, groups) / n  # mean over the group of dxhat
    g2 = _group_mean(p * dp, groups) / n  # mean over the group of dxhat * xhat
    beta = -rstd * rstd * g2
    gamma = -mean * beta - rstd * g1
    a, beta, gamma = _coefficients((rstd * p, beta, gamma), barrier=True)
    dx = dz * _bc(a, xf) + xf * _bc(beta, xf) + _bc(gamma, xf)
    return dx.astype(x.dtype), dp.astype(p.dtype), dq.astype(q.dtype)


_fused = jax.custom_vjp(_cpu, nondiff_argnums=(3, 4, 5))
_fused.defvjp(_cpu_fwd, _bwd)


def group_norm(
    x: jax.Array, p: jax.Array, q: jax.Array, *, groups: int = 32, eps: float = 1e-5, silu: bool = False
) -> jax.Array:
    """act(GroupNorm(x) * p + q) for x [B, ..., C] and p, q [B, C] (float32); see the module doc."""
    if x.ndim < 2 or x.shape[-1] % groups:
        raise ValueError(f"group_norm: x {x.shape} needs a channel axis divisible by groups={groups}")
    b, c = x.shape[0], x.shape[-1]
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (b, c))
    q = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (b, c))
    if not custom_gradients_active():
        return _plain(x, p, q, groups, eps, silu)
    return lax.platform_dependent(
        x, p, q,
        cpu=lambda x, p, q: _fused(x, p, q, groups, eps, silu),
        default=lambda x, p, q: _plain(x, p, q, groups, eps, silu),
    )
