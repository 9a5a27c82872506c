"""ops.quantile: order statistics by binary search over float bits, against numpy's sort-based quantile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.ops.quantile import quantile_nonnegative


def _torch_quantile(a, q):
    """torch.quantile's linear interpolation, in numpy float32: position q (n - 1), lerp of the neighbours."""
    s = np.sort(a, axis=1)
    pos = np.float32(q) * np.float32(a.shape[1] - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, a.shape[1] - 1)
    w = np.float32(pos - np.float32(lo))
    low, high = s[:, lo], s[:, hi]
    if w == 0:
        return low
    d = high - low
    return np.where(w < 0.5, low + w * d, high - (1 - w) * d).astype(np.float32)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 0.995, 1.0])
def test_matches_sorting(q):
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal((5, 777))).astype(np.float32) * np.float32([[1], [1e-3], [1e3], [1], [0]])
    a[3, ::3] = a[3, 0]  # many ties
    a[0, :5] = [0.0, np.inf, 1e-42, 3e38, 0.0]  # zero, infinity, a subnormal, a huge value
    got = np.asarray(jax.jit(quantile_nonnegative, static_argnums=1)(jnp.asarray(a), q))
    np.testing.assert_array_equal(got, _torch_quantile(a, q))
    np.testing.assert_allclose(got[1:], np.quantile(a[1:], q, axis=1), rtol=1e-6)


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="quantile 1.5 must lie in"):
        quantile_nonnegative(jnp.ones((2, 3)), 1.5)
    with pytest.raises(ValueError, match=r"expects \[batch, n\]"):
        quantile_nonnegative(jnp.ones((3,)), 0.5)
