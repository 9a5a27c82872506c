"""jaxdiff.conv.conv2d: the custom CPU gradient equals XLA's gradient of the plain convolution.

The fast path (`impl="fast"`, and `impl=None` on a CPU backend) must agree with
`jax.vjp` of `lax.conv_general_dilated` to float32 tolerance for every kernel/stride/padding the
ADM U-Net uses (3x3 s1 p1, 1x1 s1 p0, 3x3 s2 p1) and odd image sizes, under jit, vmap, remat and
nested differentiation; bfloat16 inputs work; and the switch to the plain path works.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxdiff import conv as C
from jaxdiff.conv import conv2d

ON_CPU = jax.default_backend() == "cpu"
# float32 tolerance; GPUs/TPUs run float32 convolutions in TF32/bf16 passes by default
TOL = 2e-5 if ON_CPU else 5e-3


def reference(x, w, stride, padding):
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((padding, padding), (padding, padding)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def inputs(b, h, wd, cin, cout, k, stride, padding, dtype=jnp.float32, seed=0):
    # numpy's generator: jax.random would compile a threefry program per shape (seconds each)
    rng = np.random.default_rng(seed)
    ho = (h + 2 * padding - k) // stride + 1
    wo = (wd + 2 * padding - k) // stride + 1
    x = rng.standard_normal((b, h, wd, cin), np.float32)
    w = rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin)
    g = rng.standard_normal((b, ho, wo, cout), np.float32)
    return tuple(jnp.asarray(a).astype(dtype) for a in (x, w, g))


def assert_close(a, b, tol=None, what=""):
    tol = TOL if tol is None else max(tol, TOL)
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = np.max(np.abs(a)) + 1e-12
    err = np.max(np.abs(a - b)) / scale
    assert err < tol, f"{what}: max error {err:.2e} relative to max |value| {scale:.3g}"


# (batch, H, W, Cin, Cout, k, stride, padding)
CASES = [
    (2, 8, 8, 4, 6, 3, 1, 1),  # 3x3 s1 p1 (resblock convs)
    (3, 7, 9, 5, 3, 3, 1, 1),  # odd sizes
    (2, 8, 8, 4, 6, 1, 1, 0),  # 1x1 (skip connections)
    (2, 8, 8, 4, 6, 3, 2, 1),  # 3x3 s2 p1 (downsampling)
    (2, 7, 9, 5, 3, 3, 2, 1),  # odd sizes at stride 2 (last row/column untouched by some taps)
    (2, 5, 5, 3, 2, 3, 1, 0),  # valid conv
    (2, 6, 6, 3, 2, 3, 1, 2),  # padding > k // 2
    (2, 9, 9, 3, 2, 5, 2, 2),  # 5x5 stride 2
    (2, 9, 9, 3, 2, 3, 3, 1),  # stride 3
    (2, 8, 8, 3, 2, 1, 2, 0),  # 1x1 stride 2
    (6, 32, 32, 8, 8, 3, 1, 1),  # several scan chunks in the filter gradient
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_{}to{}_k{}s{}p{}".format(*c))
def test_fast_matches_plain_values_and_gradients(case):
    b, h, wd, cin, cout, k, s, p = case
    x, w, g = inputs(*case)

    def both(x, w, g):
        out = []
        for impl in ("fast", "plain"):
            y, vjp = jax.vjp(lambda x, w: conv2d(x, w, stride=s, padding=p, impl=impl), x, w)
            out.append((y,) + vjp(g))
        return out

    # impl="plain" is lax.conv_general_dilated with XLA's own gradient: the reference
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = jax.jit(both)(x, w, g)  # one compilation per case
    for name, got, want in [("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)]:
        assert_close(got, want, what=f"fast {name}")


def test_realistic_sizes_match():
    """U-Net-sized cases, big enough for the chunked filter-gradient loop; impl=None (auto)."""
    cases = [(16, 16, 16, 32, 32, 3, 1, 1), (16, 16, 16, 32, 64, 1, 1, 0), (16, 16, 16, 32, 32, 3, 2, 1)]
    data = [inputs(*c, seed=1) for c in cases]

    def grads(conv):
        def run(data):
            out = []
            for (b, h, wd, cin, cout, k, s, p), (x, w, g) in zip(cases, data):
                loss = lambda x, w: jnp.vdot(conv(x, w, s, p), g)  # noqa: E731
                out.append(jax.grad(loss, (0, 1))(x, w))
            return out

        return jax.jit(run)

    got = grads(lambda x, w, s, p: conv2d(x, w, stride=s, padding=p))(data)
    want = grads(lambda x, w, s, p: reference(x, w, s, p))(data)
    for c, (dx, dw), (dx_ref, dw_ref) in zip(cases, got, want):
        assert_close(dx, dx_ref, what=f"{c} dx")
        assert_close(dw, dw_ref, what=f"{c} dw")


def test_every_backward_variant():
    """Each input-/filter-gradient variant (not only the ones the size rules pick today), with
    chunking over an awkward batch (zero-padded) and strides/paddings the rules may route
    elsewhere."""
    for case in [(5, 9, 9, 6, 4, 3, 2, 1), (3, 8, 8, 5, 3, 3, 1, 1)]:
        b, h, wd, cin, cout, k, s, p = case
        x, w, g = inputs(*case, seed=2)
        dx_ref, dw_ref = jax.vjp(lambda x, w: reference(x, w, s, p), x, w)[1](g)

        def all_variants(x, w, g):
            dxs = [C._dx(g, w, x.shape, s, p), C._dx_xla(g, w, x.shape, s, p)]
            if s > 1:
                dxs.append(C._dx_strided(g, w, x.shape, s, p))
            dws = [C._dw(x, g, w.shape, s, p, plan=(v, 2)) for v in C._DW_CHUNK]
            return dxs, dws

        dxs, dws = jax.jit(all_variants)(x, w, g)
        for i, dx in enumerate(dxs):
            assert_close(dx, dx_ref, what=f"{case} dx variant {i}")
        for i, dw in enumerate(dws):
            assert_close(dw, dw_ref, what=f"{case} dw variant {i}")
    assert [C._chunk_size(b, t) for b, t in [(128, 4), (100, 8), (7, 4), (64, 100), (5, 2)]] == [4, 5, 4, 64, 1]


def _network(conv):
    """Two convs and a nonlinearity: grad of a function that itself contains the conv."""

    def net(params, x):
        h = jax.nn.silu(conv(x, params["w1"], 1, 1))
        h = conv(h, params["w2"], 2, 1)
        return jnp.mean(h**2) + jnp.mean(conv(x, params["w3"], 1, 0))

    return net


def _params():
    rng = np.random.default_rng(3)
    return {
        "w1": jnp.asarray(rng.standard_normal((3, 3, 3, 8), np.float32) * 0.2),
        "w2": jnp.asarray(rng.standard_normal((3, 3, 8, 4), np.float32) * 0.2),
        "w3": jnp.asarray(rng.standard_normal((1, 1, 3, 4), np.float32) * 0.2),
    }


def _conv(impl):
    return lambda x, w, s, p: conv2d(x, w, stride=s, padding=p, impl=impl)


def test_vmap_jit_remat_and_nested_grad():
    params = _params()
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((2, 2, 9, 9, 3), np.float32))  # 2 independent batches
    fast, plain = _network(_conv("fast")), _network(_conv("plain"))

    # per-batch gradients with vmap, under jit, with and without remat
    want = jax.jit(jax.vmap(jax.grad(plain), in_axes=(None, 0)))(params, xs)
    for fn in (jax.grad, lambda f: jax.grad(jax.checkpoint(f))):
        got = jax.jit(jax.vmap(fn(fast), in_axes=(None, 0)))(params, xs)
        for k in params:
            assert_close(got[k], want[k], what=f"vmap grad {k}")

    # gradient w.r.t. the input (classifier guidance), vmapped over the parameters' batch too
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    gx = jax.jit(jax.vmap(jax.grad(fast, argnums=1), in_axes=(0, None)))(stacked, xs[0])
    gx_ref = jax.jit(jax.vmap(jax.grad(plain, argnums=1), in_axes=(0, None)))(stacked, xs[0])
    assert_close(gx, gx_ref, what="vmap over params, grad x")

    # reverse-over-reverse: the backward pass is itself differentiable
    def gnorm(net):
        return lambda p, x: sum(jnp.sum(v**2) for v in jax.tree.leaves(jax.grad(net)(p, x)))

    gg = jax.jit(jax.grad(gnorm(fast), argnums=1))(params, xs[0])
    gg_ref = jax.jit(jax.grad(gnorm(plain), argnums=1))(params, xs[0])
    assert_close(gg, gg_ref, tol=1e-4, what="grad of grad")


def test_bfloat16():
    # the first case sums 2048 pixels into each filter-gradient entry: float32 accumulation
    for case in [(8, 16, 16, 16, 8, 3, 1, 1), (2, 8, 8, 16, 8, 3, 2, 1), (2, 8, 8, 16, 8, 1, 1, 0)]:
        b, h, wd, cin, cout, k, s, p = case
        x, w, g = inputs(*case, dtype=jnp.bfloat16)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731

        def both(x, w, g):
            y, vjp = jax.vjp(lambda x, w: conv2d(x, w, stride=s, padding=p, impl="fast"), x, w)
            # float32 computation on the same (bf16-rounded) values
            y_ref, vjp_ref = jax.vjp(lambda x, w: reference(x, w, s, p), f32(x), f32(w))
            return (y,) + vjp(g), (y_ref,) + vjp_ref(f32(g))

        (y, dx, dw), (y_ref, dx_ref, dw_ref) = jax.jit(both)(x, w, g)
        assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
        assert_close(y, y_ref, tol=1e-2, what=f"{case} bf16 y")
        assert_close(dx, dx_ref, tol=1e-2, what=f"{case} bf16 dx")
        assert_close(dw, dw_ref, tol=1e-2, what=f"{case} bf16 dw")


def _primitives(jaxpr):
    """Names of all primitives in a jaxpr, nested ones (cond branches, custom_vjp) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for v in eqn.params.values():
            for j in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


def test_default_is_plain_and_env_selects_the_custom_vjp_on_cpu(monkeypatch):
    x, w, _ = inputs(1, 8, 8, 2, 2, 3, 1, 1)

    def prims_now():  # a new function each time: jit/make_jaxpr cache traces per function
        return _primitives(jax.make_jaxpr(lambda x, w: conv2d(x, w, stride=1, padding=1))(x, w).jaxpr)

    monkeypatch.delenv("JAXDIFF_CONV_VJP", raising=False)
    assert not C.custom_vjp_active()
    prims = prims_now()
    assert not any("custom_vjp" in p for p in prims), prims
    assert "conv_general_dilated" in prims

    monkeypatch.setenv("JAXDIFF_CONV_VJP", "1")
    prims = prims_now()
    if ON_CPU:
        assert C.custom_vjp_active()
        assert any("custom_vjp" in p for p in prims), prims
    else:  # GPU/TPU default backend: XLA's own convolution and gradient, nothing else
        assert not C.custom_vjp_active()
        assert not any("custom_vjp" in p for p in prims), prims

    assert any("custom_vjp" in p for p in _primitives(jax.make_jaxpr(lambda x, w: conv2d(x, w, impl="fast"))(x, w).jaxpr))
    assert not any(
        "custom_vjp" in p for p in _primitives(jax.make_jaxpr(lambda x, w: conv2d(x, w, impl="plain"))(x, w).jaxpr)
    )
    with pytest.raises(ValueError):
        conv2d(x, w, impl="bogus")


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU-default process's lowering for an accelerator")
def test_accelerator_lowering_keeps_native_conv(monkeypatch):
    """In a CPU-default process, a program lowered for CUDA/TPU still uses XLA's own convolution
    gradient (platform_dependent picks the default branch): no scan, no matmuls."""
    monkeypatch.setenv("JAXDIFF_CONV_VJP", "1")
    x, w, g = inputs(4, 32, 32, 64, 64, 3, 1, 1)  # big enough for a chunked filter gradient
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv2d(x, w, stride=1, padding=1)) * g), (0, 1)))
    cpu_text = jax.export.export(f, platforms=["cpu"])(x, w).mlir_module()
    assert "stablehlo.while" in cpu_text  # the chunked filter gradient
    for platform in ("cuda", "tpu"):
        try:
            text = jax.export.export(f, platforms=[platform])(x, w).mlir_module()
        except Exception as e:  # pragma: no cover - lowering support varies by jaxlib build
            pytest.skip(f"cannot lower for {platform} here: {e}")
        assert "stablehlo.while" not in text, platform
        assert "dot_general" not in text, platform
        assert text.count("stablehlo.convolution") == 3, platform  # forward, dx, dw


def test_env_applies_at_trace_time(monkeypatch):
    x, w, g = inputs(2, 8, 8, 3, 3, 3, 2, 1)
    monkeypatch.setenv("JAXDIFF_CONV_VJP", "0")
    plain = jax.grad(lambda x: jnp.vdot(conv2d(x, w, stride=2, padding=1), g))(x)
    monkeypatch.setenv("JAXDIFF_CONV_VJP", "1")
    fast = jax.grad(lambda x: jnp.vdot(conv2d(x, w, stride=2, padding=1), g))(x)
    assert_close(fast, plain, what="env switch")
