"""Group normalisation fused with a per-sample affine map and an optional SiLU or exact GELU.

    y = act(xhat * p + q),   xhat = (x - mean_g) / sqrt(var_g + eps)

with statistics per sample and group over every non-batch axis, `p`, `q` per sample and channel
([B, C]) and act = SiLU, the exact (erf) GELU or identity. Every GroupNorm of the ADM networks is of
this form: p = scale, q = bias for a plain GroupNorm; p = scale * (1 + s), q = bias * (1 + s) + b for
the scale-shift norm of a ResBlock; SiLU follows in most places (GELU in DeepFloyd IF's U-Nets).

The GELU is z/2 + z/2 erf(z / sqrt 2) with both z/2 and z/sqrt 2 taken as per-(sample, channel) affine
maps of x: no scalar constant meets the full-size tensor. Compiled with `jaxdiff.util.cpu.jit`, XLA's
CPU backend hands element-wise work to YNNPACK fusions, which read every scalar constant as a
full-size broadcast tensor written just for them (two per shape for `jaxdiff.ops.activation.gelu`
after a norm: ~4 % of an IF stage-I step).

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


ACTS = (None, "silu", "gelu")
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


def _act_name(act):
    """None / "silu" / "gelu"; True and False stand for "silu" and None (the former `silu` flag)."""
    act = {True: "silu", False: None}.get(act, act) if isinstance(act, bool) else act
    if act not in ACTS:
        raise ValueError(f"group_norm: act={act!r} is not supported; allowed: {ACTS}")
    return act


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


def _gelu_affine(xf, p, q, mean, rstd, barrier=False):
    """GELU(z) for z = xhat * p + q, as h + h erf(u) with h = z / 2 and u = z / sqrt 2 each one
    per-(sample, channel) map of float32 x (h is z / 2 exactly)."""
    a = rstd * p
    d = q - mean * a
    ah, dh, au, du = _coefficients((a * 0.5, d * 0.5, a * _SQRT_HALF, d * _SQRT_HALF), barrier)
    h = xf * _bc(ah, xf) + _bc(dh, xf)
    return h + h * lax.erf(xf * _bc(au, xf) + _bc(du, xf))


def _forward(x, p, q, groups, eps, act, barrier):
    act = _act_name(act)
    xf = x.astype(jnp.float32)
    mean, rstd = _stats(xf, groups, eps)
    if act == "gelu":
        y = _gelu_affine(xf, p, q, mean, rstd, barrier)
    else:
        z = _affine(xf, p, q, mean, rstd, barrier)
        y = z * jax.nn.sigmoid(z) if act == "silu" else z
    return y.astype(x.dtype), (x, p, q, mean, rstd)


def _plain(x, p, q, groups, eps, act):
    return _forward(x, p, q, groups, eps, act, False)[0]


def _cpu_fwd(x, p, q, groups, eps, act):
    return _forward(x, p, q, groups, eps, act, True)


def _cpu(x, p, q, groups, eps, act):
    return _cpu_fwd(x, p, q, groups, eps, act)[0]


def _bwd(groups, eps, act, res, dy):
    act = _act_name(act)
    x, p, q, mean, rstd = res
    xf = x.astype(jnp.float32)
    dy = dy.astype(jnp.float32)
    if act == "silu":
        z = _affine(xf, p, q, mean, rstd, barrier=True)
        sg = jax.nn.sigmoid(z)
        dz = dy * (sg * (1.0 + z * (1.0 - sg)))
    elif act == "gelu":  # GELU'(z) = Phi(z) + z phi(z)
        z = _affine(xf, p, q, mean, rstd, barrier=True)
        dz = dy * (0.5 + 0.5 * lax.erf(z * _SQRT_HALF) + z * jnp.exp(-0.5 * z * z) * _INV_SQRT_2PI)
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
    x: jax.Array, p: jax.Array, q: jax.Array, *, groups: int = 32, eps: float = 1e-5, silu: bool = False,
    gelu: bool = False,
) -> jax.Array:
    """act(GroupNorm(x) * p + q) for x [B, ..., C] and p, q [B, C] (float32); act: SiLU with `silu`, the
    exact (erf) GELU with `gelu`, else none; see the module doc."""
    if x.ndim < 2 or x.shape[-1] % groups:
        raise ValueError(f"group_norm: x {x.shape} needs a channel axis divisible by groups={groups}")
    if silu and gelu:
        raise ValueError("group_norm: silu and gelu are exclusive")
    act = "silu" if silu else "gelu" if gelu else None
    b, c = x.shape[0], x.shape[-1]
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (b, c))
    q = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (b, c))
    if not custom_gradients_active():
        return _plain(x, p, q, groups, eps, act)
    return lax.platform_dependent(
        x, p, q,
        cpu=lambda x, p, q: _fused(x, p, q, groups, eps, act),
        default=lambda x, p, q: _plain(x, p, q, groups, eps, act),
    )
