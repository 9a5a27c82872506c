"""jaxdiff.ops.attention.attention: the chunked custom-VJP CPU path equals the plain softmax attention
and XLA's gradient of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.ops import attention as A


def inputs(n, t, s, c, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for shape in ((n, t, c), (n, s, c), (n, s, c)))
    w = jnp.asarray(rng.standard_normal((n, t, c)).astype(np.float32))
    return q * 2, k, v, w  # larger scores: a softmax far from uniform


def numpy_attention(q, k, v):
    s = np.einsum("ntc,nsc->nts", np.float64(q), np.float64(k))
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("nts,nsc->ntc", w / w.sum(-1, keepdims=True), np.float64(v))


# (N, T, S, C): ADM's 16x16 / 8x8 self-attention, the classifier's attention pool (S = T = HW + 1),
# and sizes that force several chunks with a non-power-of-two chunk
CASES = [(8, 64, 64, 16), (6, 65, 65, 8), (12, 256, 256, 4), (5, 3, 7, 2)]


@pytest.mark.parametrize("case", CASES)
def test_values(case):
    q, k, v, _ = inputs(*case)
    np.testing.assert_allclose(np.asarray(A.attention(q, k, v)), numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_fast_gradient_matches_autodiff_of_plain(case, monkeypatch):
    monkeypatch.setattr(A, "l2_cache_bytes", lambda: 4 * 64 * 64 * 2)  # tiny chunks: exercise lax.map
    q, k, v, w = inputs(*case, seed=1)
    loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * w))
    fast = jax.grad(loss(A._fast), (0, 1, 2))(q, k, v)
    plain = jax.grad(loss(A._plain), (0, 1, 2))(q, k, v)
    assert A._chunks(case[0], case[1], case[2]) > 1 or case[0] == 1 or case[1] * case[2] < 64
    for name, a, b in zip("qkv", fast, plain):
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err < 1e-5, f"d/d{name}: relative error {err:.2e}"


def test_chunks_divide_the_heads():
    for n, t in [(64, 256), (60, 256), (7, 1024), (1, 4096), (64, 64)]:
        c = A._chunks(n, t, t)
        assert n % c == 0 and c >= 1
        c = A._inference_chunks(n, t, t)
        assert n % c == 0 and c >= 1


def test_inference_chunks_bound_the_scores():
    # forward-only calls write all heads' scores at once up to INFERENCE_SCORES_BYTES, then chunk
    assert A._inference_chunks(256, 64, 141) == 1  # IF stage I's 8x8 attention at 2 x 16 rows
    assert A._inference_chunks(256, 256, 256) == 1  # 64 MiB exactly
    assert A._inference_chunks(512, 256, 256) == 2
    n, t = 32 * 44, 1024 + 77  # IF-I-XL-like 32x32 attention: 6 GB of scores in one piece otherwise
    c = A._inference_chunks(n, t, t)
    assert n % c == 0 and (n // c) * t * t * 4 <= A.INFERENCE_SCORES_BYTES


@pytest.mark.parametrize("case", CASES)
def test_inference_path_in_chunks(case, monkeypatch):
    monkeypatch.setattr(A, "INFERENCE_SCORES_BYTES", 4 * case[1] * case[2])  # one head per chunk: lax.map
    q, k, v, _ = inputs(*case, seed=2)
    assert A._inference_chunks(*case[:3]) == case[0]
    np.testing.assert_allclose(np.asarray(jax.jit(A._fast)(q, k, v)), numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected q"):
        A.attention(jnp.zeros((2, 4, 8)), jnp.zeros((2, 5, 8)), jnp.zeros((2, 6, 8)))
