"""2-D convolution used by every network in jaxdiff (NHWC inputs, HWIO kernels).

One function so that backend-specific speed work has a single place to live; every layer calls
`conv2d` and never `lax.conv_general_dilated` directly.

By default `conv2d` is `lax.conv_general_dilated` and its gradient is XLA's, on every backend.
On the CPU, programs compiled through `jaxdiff.cpu.jit` run these convolutions on XLA's Eigen
path, where the plain gradient was the fastest we measured (`bench/bench_conv.py`).

A custom-VJP variant for CPU programs that run convolutions on YNNPACK
----------------------------------------------------------------------
XLA's default CPU compilation hands convolutions to YNNPACK (a program jitted with plain
`jax.jit`, or a jaxlib without the option `jaxdiff.cpu` sets). There the forward convolution is
fine but the filter gradient XLA derives (the whole image as "window", the batch as feature
dimension) ran 2-9x slower than the same arithmetic split into chunks of a few images, its strided
input gradient misses the fast path, and a 1x1 filter gradient runs as a slow convolution. For
such programs `conv2d(..., impl="fast")` (or `JAXDIFF_CONV_VJP=1` for every `conv2d` traced on
the CPU) is a `jax.custom_vjp`:

* forward: XLA's convolution; 1x1 kernels as a matrix product;
* input gradient, stride 1: a forward convolution of the output gradient with the spatially
  flipped, in/out-transposed kernel (what XLA does too); 1x1: a matrix product;
* input gradient, stride s > 1: for large tensors, split into s*s "phases" (which input pixels
  each kernel tap lands on); each phase is a small stride-1 convolution of the output gradient,
  and the phases are interleaved (no products with inserted zeros). Small ones keep XLA's own;
* filter gradient: XLA's formulation (input transposed to [C, H, W, b] convolved with the output
  gradient as [Ho, Wo, b, O]) evaluated per chunk of about half an L2 cache of input inside a
  `lax.scan`, summed in float32; 1-4 input channels: one im2col matrix product instead;
  1x1: one matrix product.

The per-shape choices (`_dw_plan`, `_DX_PHASE_MIN_ELEMS`) come from `bench/bench_conv.py
--variants`. It is not the default: per convolution it is within ~5 % of the plain gradient
under `jaxdiff.cpu.jit`'s options, and whole training steps ran faster with the plain one.

Switches
--------
* `impl=None` / "auto": plain, unless `JAXDIFF_CONV_VJP=1` and the computation runs on the CPU
  (then the custom VJP, through `lax.platform_dependent`, so a computation placed on an
  accelerator still gets the native gradient). The variable is read when a function is traced.
* `impl="plain"`: always `lax.conv_general_dilated` with XLA's gradient.
* `impl="fast"`: the custom-VJP path regardless of platform (tests, benchmarks).

Differentiation
---------------
Reverse mode (`jax.grad`, `jax.vjp`, also nested: the backward pass is itself made of ordinary
differentiable JAX ops) works under `jit`, `vmap` and `jax.checkpoint`. Forward mode (`jax.jvp`,
`jax.jacfwd`) is not available through a `custom_vjp`; use the plain path for that.

Low precision
-------------
For bfloat16/float16 inputs every product accumulates in float32 (`preferred_element_type`) and
the filter gradient's sum over batch and pixels is carried in float32; results are rounded to the
input dtype once, at the end (the same as XLA's CPU convolution, which computes in float32).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from .cpu import env_on, l2_cache_bytes

__all__ = ["conv2d", "conv2d_plain", "custom_vjp_active"]

_DN = ("NHWC", "HWIO", "NHWC")
_ENV_VJP = "JAXDIFF_CONV_VJP"


# --------------------------------------------------------------------------------------------
# public API


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    impl: Optional[str] = None,
) -> jax.Array:
    """NHWC x HWIO -> NHWC convolution with symmetric zero padding (no bias).

    `impl`: None / "auto" (plain, or the custom CPU gradient with `JAXDIFF_CONV_VJP=1`; see the
    module docstring), "plain" (always `lax.conv_general_dilated` with XLA's gradient) or "fast"
    (always the custom-VJP path).
    """
    stride, padding = int(stride), int(padding)
    if impl in (None, "auto"):
        if not custom_vjp_active():
            return conv2d_plain(x, kernel, stride=stride, padding=padding)
        return lax.platform_dependent(
            x,
            kernel,
            cpu=lambda x, k: _conv_fast(x, k, stride, padding),
            default=lambda x, k: conv2d_plain(x, k, stride=stride, padding=padding),
        )
    if impl == "plain":
        return conv2d_plain(x, kernel, stride=stride, padding=padding)
    if impl == "fast":
        return _conv_fast(x, kernel, stride, padding)
    raise ValueError(f"conv2d: impl must be None, 'auto', 'plain' or 'fast', got {impl!r}")


def conv2d_plain(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding=0, precision=None) -> jax.Array:
    """The reference: `lax.conv_general_dilated` and the gradient XLA derives for it.

    `padding`: p (p rows and columns on each side) or (ph, pw) for rectangular kernels.
    `precision`: passed to XLA (`lax.Precision.HIGHEST` for full float32 on GPUs/TPUs).
    """
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((ph, ph), (pw, pw)),
        dimension_numbers=_DN,
        precision=precision,
    )


def custom_vjp_active() -> bool:
    """Whether `conv2d(impl=None)` traced now would use the custom CPU gradient."""
    return jax.default_backend() == "cpu" and env_on(_ENV_VJP)


# --------------------------------------------------------------------------------------------
# helpers


def _acc_dtype(dtype):
    """float32 accumulation for low-precision floats, else None (the input's own dtype)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.float32
    return None


def _conv(x, w, stride, padding, out_dtype):
    """Forward convolution; `padding` is ((lo, hi), (lo, hi)). Accumulates in float32 for
    low-precision inputs and rounds once to `out_dtype`."""
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=_DN,
        preferred_element_type=_acc_dtype(x.dtype),
    )
    return y.astype(out_dtype)


def _dot(a, b, contract, out_dtype=None):
    """dot_general over `contract` = ((a dims), (b dims)) with float32 accumulation."""
    y = lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=_acc_dtype(a.dtype))
    return y if out_dtype is None else y.astype(out_dtype)


def _tap_slices(xp, kh, kw, s, ho, wo):
    """The k*k shifted (and strided) views of the padded input that tap (i, j) multiplies."""
    b, _, _, c = xp.shape
    return [
        lax.slice(xp, (0, i, j, 0), (b, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c), (1, s, s, 1))
        for i in range(kh)
        for j in range(kw)
    ]


def _pad_hw(x, lo_h, hi_h, lo_w, hi_w):
    """Zero padding of the H and W axes; negative amounts crop."""
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))


# --------------------------------------------------------------------------------------------
# input gradient


def _dx_stride1(g, w, x_shape, padding):
    """dL/dx for a stride-1 conv: forward conv of g with the flipped, in/out-transposed kernel."""
    kh, kw = w.shape[:2]
    h, wd = x_shape[1:3]
    ho, wo = g.shape[1:3]
    wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    # full correlation: k - 1 - p zeros in front; behind, whatever gives exactly h rows
    lo_h, lo_w = kh - 1 - padding, kw - 1 - padding
    hi_h, hi_w = h + kh - 1 - lo_h - ho, wd + kw - 1 - lo_w - wo
    # negative amounts (padding > k - 1) crop g first; the convolution gets the rest
    if min(lo_h, hi_h, lo_w, hi_w) < 0:
        g = _pad_hw(g, min(lo_h, 0), min(hi_h, 0), min(lo_w, 0), min(hi_w, 0))
        lo_h, hi_h, lo_w, hi_w = (max(v, 0) for v in (lo_h, hi_h, lo_w, hi_w))
    return _conv(g, wt, 1, ((lo_h, hi_h), (lo_w, hi_w)), g.dtype)


def _dx_strided(g, w, x_shape, stride, padding):
    """dL/dx for a stride-s conv by phase decomposition.

    Padded input position z = s*q + r (r in [0, s)) receives g[q - m] * w[r + s*m] for the taps
    m = 0..M_r-1 with r + s*m < k: a stride-1 correlation of g with the flipped sub-kernel
    w[r::s]. Each of the s*s phases is one small stride-1 forward convolution; the phases are
    interleaved and the padding is cropped off.
    """
    s = stride
    b, h, wd, c = x_shape
    kh, kw = w.shape[:2]
    ho, wo = g.shape[1:3]
    qh = -(-(h + padding) // s)  # rows of each phase so that s*qh >= h + padding
    qw = -(-(wd + padding) // s)
    wt = w.transpose(0, 1, 3, 2)  # [kh, kw, O, C]
    out_dtype = g.dtype
    rows = []
    for rh in range(s):
        mh = len(range(rh, kh, s))
        cols = []
        for rw in range(s):
            mw = len(range(rw, kw, s))
            if mh == 0 or mw == 0:
                cols.append(jnp.zeros((b, qh, qw, c), out_dtype))
                continue
            sub = jnp.flip(wt[rh::s, rw::s], (0, 1))
            # output q uses g[q - m], m < M: pad M-1 zeros in front, enough behind for qh rows
            ph = ((mh - 1, max(0, qh - ho)), (mw - 1, max(0, qw - wo)))
            y = _conv(g, sub, 1, ph, out_dtype)
            cols.append(y[:, :qh, :qw])
        rows.append(jnp.stack(cols, axis=3))  # [b, qh, qw, s, c]
    z = jnp.stack(rows, axis=2)  # [b, qh, s, qw, s, c]
    z = z.reshape(b, qh * s, qw * s, c)
    return z[:, padding : padding + h, padding : padding + wd]


def _dx_1x1(g, w, x_shape, stride):
    """1x1 kernel, no padding: dx = g @ w^T (scattered to every s-th pixel for stride s)."""
    y = _dot(g, w[0, 0], ((3,), (1,)), g.dtype)  # NT product
    if stride == 1:
        return y
    b, h, wd, c = x_shape
    ho, wo = g.shape[1:3]
    return lax.pad(
        y,
        jnp.zeros((), y.dtype),
        ((0, 0, 0), (0, h - (stride * (ho - 1) + 1), stride - 1), (0, wd - (stride * (wo - 1) + 1), stride - 1), (0, 0, 0)),
    )


# --------------------------------------------------------------------------------------------
# filter gradient

# Sizes chosen by measurement (bench/bench_conv.py --variants): im2col patch elements per chunk
# for few-channel inputs, and the input-gradient size from which the phase split beats XLA's own.
# The filter-gradient chunk holds about half an L2 cache of input (_dw_chunk_elems).
_IM2COL_MAX_ELEMS = 1 << 22
_MIN_CHUNK_PIXELS = 1024
_DX_PHASE_MIN_ELEMS = 1 << 21


def _dw_chunk_elems():
    """Input elements per filter-gradient chunk: half an L2 cache of float32. Measured optimum:
    about 512 KiB of input on the 1 MiB-L2 Xeon (Cascade Lake) we have, about 1 MiB on a
    Sapphire Rapids with 2 MiB of L2."""
    return l2_cache_bytes() // 8


def _dw_chunk_taps(x, g, kh, kw, stride, padding):
    """Filter gradient of one chunk: sum over pixels of shifted-x^T @ g, per tap."""
    c, o = x.shape[-1], g.shape[-1]
    ho, wo = g.shape[1:3]
    xp = _pad_hw(x, padding, padding, padding, padding)
    g2 = g.reshape(-1, o)
    outs = [_dot(t.reshape(-1, c), g2, ((0,), (0,))) for t in _tap_slices(xp, kh, kw, stride, ho, wo)]
    return jnp.stack(outs).reshape(kh, kw, c, o)


def _dw_chunk_im2col(x, g, kh, kw, stride, padding):
    """Filter gradient of one chunk: g^T @ [patches] in one product (NN layout), transposed."""
    c, o = x.shape[-1], g.shape[-1]
    ho, wo = g.shape[1:3]
    xp = _pad_hw(x, padding, padding, padding, padding)
    p = jnp.concatenate(_tap_slices(xp, kh, kw, stride, ho, wo), axis=-1).reshape(-1, kh * kw * c)
    r = _dot(g.reshape(-1, o).T, p, ((1,), (0,)))  # [o, k*k*c]
    return r.T.reshape(kh, kw, c, o)


def _tap_slices_t(x, kh, kw, s, p, ho, wo):
    """The tap views of the input in channel-major layout: k*k arrays [C, b*ho*wo]."""
    xt = _pad_hw(x, p, p, p, p).transpose(3, 0, 1, 2)  # [C, b, H+2p, W+2p]
    c, b = xt.shape[:2]
    return [
        lax.slice(xt, (0, 0, i, j), (c, b, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1), (1, 1, s, s)).reshape(c, -1)
        for i in range(kh)
        for j in range(kw)
    ]


def _dw_chunk_taps_t(x, g, kh, kw, stride, padding):
    """As _dw_chunk_taps with the input transposed once, so every product is a plain [C, n] @ [n, O]."""
    c, o = x.shape[-1], g.shape[-1]
    ho, wo = g.shape[1:3]
    g2 = g.reshape(-1, o)
    outs = [_dot(t, g2, ((1,), (0,))) for t in _tap_slices_t(x, kh, kw, stride, padding, ho, wo)]
    return jnp.stack(outs).reshape(kh, kw, c, o)


def _dw_chunk_im2col_t(x, g, kh, kw, stride, padding):
    """One product [k*k*C, n] @ [n, O] with the patches built channel-major."""
    c, o = x.shape[-1], g.shape[-1]
    ho, wo = g.shape[1:3]
    pt = jnp.concatenate(_tap_slices_t(x, kh, kw, stride, padding, ho, wo), axis=0)
    return _dot(pt, g.reshape(-1, o), ((1,), (0,))).reshape(kh, kw, c, o)


def _dw_chunk_conv(x, g, kh, kw, stride, padding):
    """Filter gradient of one chunk as the forward convolution XLA derives for it, with the
    operands transposed explicitly (lhs = x as [C, H, W, b], kernel = g as [Ho, Wo, b, O]), so
    that it reaches the fast convolution path also inside a loop body; kernel dilation = stride."""
    b, h, wd, c = x.shape
    ho, wo = g.shape[1:3]
    hi_h = kh + stride * (ho - 1) - h - padding
    hi_w = kw + stride * (wo - 1) - wd - padding
    if min(hi_h, hi_w) < 0:  # rows/columns no window reaches
        x = _pad_hw(x, 0, min(hi_h, 0), 0, min(hi_w, 0))
        hi_h, hi_w = max(hi_h, 0), max(hi_w, 0)
    lhs = x.transpose(3, 1, 2, 0)
    rhs = g.transpose(1, 2, 0, 3)
    out = lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=(1, 1),
        padding=((padding, hi_h), (padding, hi_w)),
        rhs_dilation=(stride, stride),
        dimension_numbers=_DN,
        preferred_element_type=_acc_dtype(x.dtype),
    )
    return out.transpose(1, 2, 0, 3)


def _dw_chunk_xla(x, g, kh, kw, stride, padding):
    """XLA's own filter gradient (reference / fallback)."""
    w0 = jnp.zeros((kh, kw, x.shape[-1], g.shape[-1]), x.dtype)
    _, vjp = jax.vjp(lambda w: _conv(x, w, stride, ((padding, padding), (padding, padding)), x.dtype), w0)
    return vjp(g)[0]


_DW_CHUNK = {
    "taps": _dw_chunk_taps,
    "im2col": _dw_chunk_im2col,
    "taps_t": _dw_chunk_taps_t,
    "im2col_t": _dw_chunk_im2col_t,
    "conv": _dw_chunk_conv,
    "xla": _dw_chunk_xla,
}


def _dw_plan(x_shape, w_shape, g_shape, stride):
    """(variant, images per chunk) for the filter gradient; rules from bench/bench_conv.py.

    * 1-4 input channels (a network's first conv): one im2col product [k*k*C, n] @ [n, O]; the
      patch tensor is small, usually the whole batch in one go.
    * otherwise: XLA's own filter-gradient convolution, but per chunk of images, each chunk about
      half an L2 cache of input (512 KiB here: 2-4 images at 32x32, 16-32 at 8x8; more for
      very few output channels). Over a whole batch of 64-128 at once that convolution ran 2-8x
      slower than chunked; per-tap matrix products came within 1.3x of it at 128+ channels only.
    """
    b, h, wd, cin = x_shape
    kh, kw, _, cout = w_shape
    ho, wo = g_shape[1:3]
    if cin <= 4:
        return "im2col_t", _chunk_size(b, max(1, _IM2COL_MAX_ELEMS // (kh * kw * cin * ho * wo)))
    elems = _dw_chunk_elems() * max(1, 32 // max(1, cout))
    # at least ~1024 output pixels per chunk: tiny images (4x4, 8x8 at 256 channels) ran best with
    # the whole batch in one convolution
    target = max(elems // (h * wd * cin), _MIN_CHUNK_PIXELS // (ho * wo))
    return "conv", _chunk_size(b, max(1, target))


def _chunk_size(b, target):
    """Images per chunk near `target` (a power of two <= target, at most b): the largest divisor
    of b not above it, unless that is under half of it (then the batch is zero-padded)."""
    nb = 1
    while nb * 2 <= min(target, b):
        nb *= 2
    if nb >= b:
        return b
    div = max(d for d in range(1, nb + 1) if b % d == 0)
    return div if 2 * div >= nb else nb


def _dw(x, g, w_shape, stride, padding, plan=None):
    kh, kw = w_shape[:2]
    if kh == 1 and kw == 1 and padding == 0:
        xs = x[:, ::stride, ::stride] if stride > 1 else x
        xs = xs[:, : g.shape[1], : g.shape[2]]
        return _dot(xs.reshape(-1, xs.shape[-1]), g.reshape(-1, g.shape[-1]), ((0,), (0,)))[None, None]
    variant, nb = plan or _dw_plan(x.shape, w_shape, g.shape, stride)
    fn = _DW_CHUNK[variant]
    b = x.shape[0]
    if nb >= b:
        return fn(x, g, kh, kw, stride, padding).astype(jnp.float32)
    if b % nb:  # zero images add nothing to the filter gradient
        extra = nb - b % nb
        x = jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
        g = jnp.concatenate([g, jnp.zeros((extra,) + g.shape[1:], g.dtype)])
        b += extra
    n = b // nb
    xc = x.reshape((n, nb) + x.shape[1:])
    gc = g.reshape((n, nb) + g.shape[1:])

    def body(acc, xg):
        return acc + fn(xg[0], xg[1], kh, kw, stride, padding).astype(jnp.float32), None

    acc0 = jnp.zeros((kh, kw, x.shape[-1], g.shape[-1]), jnp.float32)
    return lax.scan(body, acc0, (xc, gc))[0]


# --------------------------------------------------------------------------------------------
# the custom-VJP convolution


def _dx_xla(g, w, x_shape, stride, padding):
    """XLA's own input gradient (the transpose of the forward convolution)."""
    x_aval = jax.ShapeDtypeStruct(x_shape, g.dtype)
    pads = ((padding, padding), (padding, padding))
    return jax.linear_transpose(lambda x: _conv(x, w, stride, pads, g.dtype), x_aval)(g)[0]


def _dx(g, w, x_shape, stride, padding):
    kh, kw = w.shape[:2]
    if kh == 1 and kw == 1 and padding == 0:
        return _dx_1x1(g, w, x_shape, stride)
    if stride == 1:
        return _dx_stride1(g, w, x_shape, padding)
    if x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3] >= _DX_PHASE_MIN_ELEMS:
        return _dx_strided(g, w, x_shape, stride, padding)
    return _dx_xla(g, w, x_shape, stride, padding)


def _fast_forward(x, w, stride, padding):
    if w.shape[0] == 1 and w.shape[1] == 1 and padding == 0:  # 1x1: a matrix product
        xs = x[:, ::stride, ::stride] if stride > 1 else x
        return _dot(xs, w[0, 0], ((3,), (0,)), x.dtype)
    return _conv(x, w, stride, ((padding, padding), (padding, padding)), x.dtype)


def _conv_fast_fwd(x, w, stride, padding):
    return _fast_forward(x, w, stride, padding), (x, w)


def _conv_fast_bwd(stride, padding, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _dx(g, w, x.shape, stride, padding).astype(x.dtype)
    dw = _dw(x, g, w.shape, stride, padding).astype(w.dtype)
    return dx, dw


_conv_fast_vjp = jax.custom_vjp(_fast_forward, nondiff_argnums=(2, 3))
_conv_fast_vjp.defvjp(_conv_fast_fwd, _conv_fast_bwd)


def _conv_fast(x, w, stride, padding):
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d expects NHWC x HWIO, got {x.shape} and {w.shape}")
    return _conv_fast_vjp(x, w, stride, padding)
