"""jaxdiff.ops.norm.group_norm: values against torch's GroupNorm formula (then SiLU or the exact GELU), and
the custom CPU gradient against XLA's gradient of the plain formula (JAXDIFF_PLAIN_OPS switch included)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.ops import norm


def numpy_reference(x, p, q, groups, eps, silu):
    """torch.nn.GroupNorm in float64, then * p + q per (sample, channel), then SiLU (silu True / "silu") or
    the exact GELU (silu "gelu")."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    xhat = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    bc = (b,) + (1,) * (x.ndim - 2) + (c,)
    z = xhat * np.asarray(p, np.float64).reshape(bc) + np.asarray(q, np.float64).reshape(bc)
    if silu == "gelu":
        return z * 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return z / (1 + np.exp(-z)) if silu else z


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    b, c = shape[0], shape[-1]
    # a large common offset: a one-pass E[x^2] - E[x]^2 variance would lose digits here
    x = rng.standard_normal(shape).astype(np.float32) * 2 + 30
    p = rng.uniform(0.5, 1.5, (b, c)).astype(np.float32)
    q = rng.standard_normal((b, c)).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(p), jnp.asarray(q), jnp.asarray(w)


SHAPES = [(2, 6, 5, 64), (3, 16, 32), (2, 4, 4, 96), (1, 8, 8, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("silu", [False, True, "gelu"])
def test_values_match_torch_formula(shape, silu):
    x, p, q, _ = inputs(shape)
    y = norm.group_norm(x, p, q, groups=32, silu=silu is True, gelu=silu == "gelu")
    ref = numpy_reference(x, p, q, 32, 1e-5, silu)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("silu", [False, True, "gelu"])
def test_custom_gradient_matches_autodiff(shape, silu):
    x, p, q, w = inputs(shape, seed=1)

    def loss(fn):
        return lambda x, p, q: jnp.sum(fn(x, p, q) * w)

    fused = jax.jit(jax.grad(loss(lambda x, p, q: norm._fused(x, p, q, 32, 1e-5, silu)), (0, 1, 2)))
    plain = jax.jit(jax.grad(loss(lambda x, p, q: norm._plain(x, p, q, 32, 1e-5, silu)), (0, 1, 2)))
    for name, a, b in zip("xpq", fused(x, p, q), plain(x, p, q)):
        err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
        assert err < 1e-4, f"d/d{name}: relative error {err:.2e}"


def test_public_function_uses_the_custom_rule_on_cpu_and_switch_turns_it_off(monkeypatch):
    x, p, q, _ = inputs((2, 4, 4, 32))
    f = lambda x: jnp.sum(norm.group_norm(x, p, q, silu=True))
    jaxpr = str(jax.make_jaxpr(jax.grad(f))(x))
    if jax.default_backend() == "cpu":
        assert "custom_vjp" in jaxpr or "platform_index" in jaxpr
    monkeypatch.setenv("JAXDIFF_PLAIN_OPS", "1")
    assert "custom_vjp" not in str(jax.make_jaxpr(jax.grad(f))(x))


def test_bfloat16_input_keeps_dtype_and_float32_statistics():
    x, p, q, _ = inputs((2, 4, 4, 64))
    y = norm.group_norm(x.astype(jnp.bfloat16), p, q, silu=True)
    assert y.dtype == jnp.bfloat16
    ref = numpy_reference(x.astype(jnp.bfloat16).astype(jnp.float32), p, q, 32, 1e-5, True)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)
    g = jax.grad(lambda x: jnp.sum(norm.group_norm(x, p, q)).astype(jnp.float32))(x.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16


def test_gelu_is_the_exact_gelu_of_the_plain_norm():
    # the fused GELU (z/2 + z/2 erf(z/sqrt 2), both affine in x) equals jax.nn.gelu of the normalised
    # tensor to float32 round-off
    x, p, q, _ = inputs((4, 8, 8, 64), seed=3)
    y = norm.group_norm(x, p, q, gelu=True)
    ref = jax.nn.gelu(norm.group_norm(x, p, q), approximate=False)
    assert float(jnp.max(jnp.abs(y - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))
    with pytest.raises(ValueError, match="exclusive"):
        norm.group_norm(x, p, q, silu=True, gelu=True)


def test_bad_channel_count_is_refused():
    with pytest.raises(ValueError, match="divisible by groups=32"):
        norm.group_norm(jnp.zeros((2, 4, 4, 48)), jnp.ones((2, 48)), jnp.zeros((2, 48)))
