"""2-D convolution of the networks (NHWC x HWIO), with XLA's gradient in canonical form on the CPU.

XLA's CPU backend runs a convolution on its fast (Eigen) path only in canonical form: input NHWC,
kernel HWIO, output NHWC; any other form is emitted as a naive loop nest. The convolutions JAX
derives for a gradient are not canonical (input gradient: the flipped kernel with its feature axes
read the other way round, `b01f_01oi->b01f`; filter gradient: batch and feature axes swapped,
`f01b_i01o->01bf`), and XLA's pass that rewrites them with explicit transposes
(`ConvCanonicalization`) visits only a program's entry computation (jax-ml/jax#12868). In the body
of a `lax.scan` / `while_loop` every gradient convolution therefore ran naively: the classifier
gradient of a guided sampling loop made a classifier-guided DDIM step 1.5-2.1x its parts, and the
U-Net's parameter gradient inside a scan ran ~40x slower (docs/benchmarks.md).

So on the CPU (`cpu.custom_gradients_active()`; `JAXDIFF_PLAIN_OPS=1` turns it off) `conv2d` is a
`jax.custom_vjp` whose backward pass is XLA's own gradient with those transposes written out: the
same convolutions, bit for bit, that XLA runs in an entry computation, now in any computation.
Elsewhere (GPU, TPU: `lax.platform_dependent`) it is the plain convolution and XLA's gradient.
Reverse mode only on the CPU (a `custom_vjp` has no forward-mode rule).

On the CPU, `conv2d_inference` runs a 1x1 convolution at stride 1 without padding as a matrix product over
the channels when nothing differentiates it (a `jax.custom_jvp` whose derivative rule, and so any
gradient, is `conv2d`'s: training computes exactly what it did). XLA's CPU backend otherwise puts the
1x1 convolution of a ResNet block's shortcut in one YNNPACK fusion with the block's 3x3 convolution, and
that fusion runs slower than the two apart: an IF stage-I CFG step 1-2 % faster on 2 cores, the same
results (docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.util.cpu import custom_gradients_active

__all__ = ["conv2d", "conv2d_inference"]

_DN = ("NHWC", "HWIO", "NHWC")


def _plain(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding), (padding, padding)),
                                   dimension_numbers=_DN)


def _dx(g, w, x_shape, stride, padding):
    """XLA's input gradient, computed over the kernel with its feature axes swapped beforehand: JAX's
    transpose of a convolution over an [kh, kw, O, I] ("HWOI") kernel reads it as HWIO."""
    wt = jnp.swapaxes(w, 2, 3)
    pads = ((padding, padding), (padding, padding))
    fwd = lambda x: lax.conv_general_dilated(x, wt, (stride, stride), pads,  # noqa: E731
                                             dimension_numbers=("NHWC", "HWOI", "NHWC"))
    return jax.linear_transpose(fwd, jax.ShapeDtypeStruct(x_shape, g.dtype))(g)[0]


def _dw(x, g, w_shape, stride, padding):
    """XLA's filter gradient: x as an NHWC input [C, H, W, B] convolved with g as an HWIO kernel
    [Ho, Wo, B, O] (dilated by the stride), giving [C, kh, kw, O]."""
    kh, kw = w_shape[:2]
    ho, wo = g.shape[1:3]
    hi_h = kh + stride * (ho - 1) - x.shape[1] - padding
    hi_w = kw + stride * (wo - 1) - x.shape[2] - padding
    if min(hi_h, hi_w) < 0:  # rows / columns no window reaches
        x = x[:, : x.shape[1] + min(hi_h, 0), : x.shape[2] + min(hi_w, 0)]
        hi_h, hi_w = max(hi_h, 0), max(hi_w, 0)
    out = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1),
                                   ((padding, hi_h), (padding, hi_w)), rhs_dilation=(stride, stride),
                                   dimension_numbers=_DN)
    return out.transpose(1, 2, 0, 3)


def _canonical_fwd(x, w, stride, padding):
    return _plain(x, w, stride, padding), (x, w)


def _canonical_bwd(stride, padding, res, g):
    x, w = res
    return _dx(g, w, x.shape, stride, padding).astype(x.dtype), _dw(x, g, w.shape, stride, padding).astype(w.dtype)


_canonical = jax.custom_vjp(_plain, nondiff_argnums=(2, 3))
_canonical.defvjp(_canonical_fwd, _canonical_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0) -> jax.Array:
    """NHWC x HWIO -> NHWC convolution with symmetric zero padding, no bias (see the module doc)."""
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"conv2d expects NHWC x HWIO, got {x.shape} and {kernel.shape}")
    stride, padding = int(stride), int(padding)
    if not custom_gradients_active():
        return _plain(x, kernel, stride, padding)
    return lax.platform_dependent(x, kernel, cpu=lambda x, k: _canonical(x, k, stride, padding),
                                  default=lambda x, k: _plain(x, k, stride, padding))


def _channel_product(x, kernel):
    """A 1x1 convolution at stride 1 without padding as a product over the channels."""
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


def conv2d_inference(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0) -> jax.Array:
    """`conv2d`, on the CPU without differentiation in a cheaper equivalent form where it has one (see the
    module doc): a 1x1 convolution at stride 1 without padding as a product over the channels. Gradients
    are `conv2d`'s."""
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"conv2d_inference expects NHWC x HWIO with matching channels, got {x.shape} and "
                         f"{kernel.shape}")
    stride, padding = int(stride), int(padding)
    plain = lambda x, k: conv2d(x, k, stride=stride, padding=padding)  # noqa: E731
    if kernel.shape[:2] != (1, 1) or (stride, padding) != (1, 0) or not custom_gradients_active():
        return plain(x, kernel)
    product = jax.custom_jvp(_channel_product)  # differentiated as the plain convolution
    product.defjvp(lambda primals, tangents: jax.jvp(plain, primals, tangents))
    return lax.platform_dependent(x, kernel, cpu=product, default=plain)
