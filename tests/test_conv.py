"""jaxdiff.ops.conv.conv2d: on the CPU, XLA's gradient in canonical form.

The values and gradients equal those of the plain convolution for every kernel/stride/padding the
ADM networks use and odd sizes, also under vmap, remat and nested differentiation; inside a
`lax.scan` body its gradient convolutions compile to the canonical form (where XLA's own do not);
GPU/TPU lowerings and `JAXDIFF_PLAIN_OPS=1` keep the plain convolution.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxdiff.ops import conv as C
from jaxdiff.ops.conv import conv2d

ON_CPU = jax.default_backend() == "cpu"
TOL = 1e-5 if ON_CPU else 5e-3  # GPUs/TPUs run float32 convolutions in TF32/bf16 passes by default
CANONICAL = "b01f_01io->b01f"  # NHWC x HWIO -> NHWC: the only form XLA:CPU runs on its fast path

# (batch, H, W, Cin, Cout, k, stride, padding)
CASES = [
    (2, 8, 8, 4, 6, 3, 1, 1),  # 3x3 s1 p1 (resblock convs)
    (3, 7, 9, 5, 3, 3, 1, 1),  # odd sizes
    (2, 8, 8, 4, 6, 1, 1, 0),  # 1x1 (skip connections, the classifier's head)
    (2, 8, 8, 4, 6, 3, 2, 1),  # 3x3 s2 p1 (downsampling)
    (2, 7, 9, 5, 3, 3, 2, 1),  # odd sizes at stride 2
    (2, 6, 6, 3, 2, 3, 1, 2),  # padding > k // 2
    (2, 9, 9, 3, 2, 3, 3, 1),  # stride 3 (rows no window reaches)
    (2, 8, 8, 3, 2, 1, 2, 0),  # 1x1 stride 2
]


def _inputs(b, h, wd, cin, cout, k, stride, padding, seed=0):
    rng = np.random.default_rng(seed)
    ho, wo = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    arrays = (rng.standard_normal((b, h, wd, cin)), rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin),
              rng.standard_normal((b, ho, wo, cout)))
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _close(a, b, what, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)
    assert err <= tol, f"{what}: max error {err:.2e} relative to max |value|"


def test_values_and_gradients_match_the_plain_convolution():
    data = [_inputs(*c) for c in CASES]

    def run(data):  # every case in one program: one compilation
        out = []
        for (_, _, _, _, _, _, s, p), (x, w, g) in zip(CASES, data):
            for f in (lambda x, w, s=s, p=p: conv2d(x, w, stride=s, padding=p),
                      lambda x, w, s=s, p=p: C._plain(x, w, s, p)):
                y, vjp = jax.vjp(f, x, w)
                out.append((y,) + vjp(g))
        return out

    out = jax.jit(run)(data)
    for case, got, want in zip(CASES, out[0::2], out[1::2]):
        for name, a, b in zip(("y", "dx", "dw"), got, want):
            _close(a, b, f"{case} {name}")
    # bfloat16: the same arithmetic as XLA's bfloat16 gradient
    x, w, g = (a.astype(jnp.bfloat16) for a in _inputs(2, 8, 8, 16, 8, 3, 1, 1))
    got = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: conv2d(x, w, padding=1), x, w)[1](g))(x, w, g)
    want = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: C._plain(x, w, 1, 1), x, w)[1](g))(x, w, g)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16
    for name, a, b in zip(("dx", "dw"), got, want):
        _close(a, b, f"bfloat16 {name}", tol=1e-2)
    with pytest.raises(ValueError, match="NHWC x HWIO"):
        conv2d(x[0], w)


def _network(conv):
    def net(params, x):
        h = jax.nn.silu(conv(x, params["w1"], 1, 1))
        h = conv(h, params["w2"], 2, 1)
        return jnp.mean(h**2) + jnp.mean(conv(x, params["w3"], 1, 0))

    return net


def _params():
    rng = np.random.default_rng(3)
    shapes = {"w1": (3, 3, 3, 8), "w2": (3, 3, 8, 4), "w3": (1, 1, 3, 4)}
    return {k: jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32) for k, s in shapes.items()}


OURS = _network(lambda x, w, s, p: conv2d(x, w, stride=s, padding=p))
PLAIN = _network(lambda x, w, s, p: C._plain(x, w, s, p))


def test_vmap_remat_and_nested_grad():
    params = _params()
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((2, 2, 9, 9, 3)), jnp.float32)

    def gnorm(net):  # reverse over reverse: the backward pass is itself differentiated
        return lambda p, x: sum(jnp.sum(v**2) for v in jax.tree.leaves(jax.grad(net)(p, x)))

    def run(xs):
        batched = [jax.vmap(jax.grad(net), in_axes=(None, 0))(params, xs) for net in (OURS, PLAIN)]
        remat = jax.vmap(jax.grad(jax.checkpoint(OURS)), in_axes=(None, 0))(params, xs)
        nested = [jax.grad(gnorm(net), argnums=1)(params, xs[0]) for net in (OURS, PLAIN)]
        return batched, remat, nested

    (got, want), remat, (gg, gg_want) = jax.jit(run)(xs)
    for k in params:
        _close(got[k], want[k], f"vmap grad {k}")
        _close(remat[k], want[k], f"remat grad {k}")
    _close(gg, gg_want, "grad of grad", tol=max(TOL, 1e-4))


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's convolution forms")
def test_gradient_in_a_loop_body_stays_canonical(monkeypatch):
    """XLA:CPU rewrites convolutions into canonical form only in a program's entry computation, so
    in a `lax.scan` body the gradient convolutions (input and filter) must already be canonical.
    XLA's own there are not (the second check), which made a guided sampling loop ~2x its parts."""
    monkeypatch.delenv("JAXDIFF_PLAIN_OPS", raising=False)
    params = _params()
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9, 9, 3)), jnp.float32)

    def loop_labels(net):
        def loop(params, x):
            def body(x, _):
                dp, dx = jax.grad(net, argnums=(0, 1))(params, x)
                return x - 0.1 * dx, dp

            return lax.scan(body, x, None, length=2)

        text = jax.jit(loop).lower(params, x).compile().as_text()
        return [ln.split("dim_labels=")[1].split(",")[0] for ln in text.splitlines() if " convolution(" in ln]

    ours = loop_labels(_network(lambda x, w, s, p: conv2d(x, w, stride=s, padding=p)))
    assert ours and set(ours) == {CANONICAL}, ours
    assert set(loop_labels(PLAIN)) != {CANONICAL}


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU-default process's choices")
def test_plain_ops_switch_and_accelerator_lowering(monkeypatch):
    """The custom VJP on the CPU unless JAXDIFF_PLAIN_OPS=1 (read at trace time); a program lowered
    for CUDA/TPU keeps XLA's own gradient: three convolutions (forward, dx, dw), no transposes."""
    x, w, g = _inputs(2, 8, 8, 4, 4, 3, 2, 1)

    def loss(x, w):
        return jnp.sum(jnp.tanh(conv2d(x, w, stride=2, padding=1)) * g)

    def custom_now():  # a new function each time: make_jaxpr caches traces per function
        return "custom_vjp" in str(jax.make_jaxpr(lambda x, w: loss(x, w))(x, w))

    monkeypatch.delenv("JAXDIFF_PLAIN_OPS", raising=False)
    assert custom_now()
    monkeypatch.setenv("JAXDIFF_PLAIN_OPS", "1")
    assert not custom_now()
    monkeypatch.delenv("JAXDIFF_PLAIN_OPS")

    f = jax.jit(jax.grad(loss, (0, 1)))
    assert "stablehlo.transpose" in jax.export.export(f, platforms=["cpu"])(x, w).mlir_module()
    for platform in ("cuda", "tpu"):
        try:
            text = jax.export.export(f, platforms=[platform])(x, w).mlir_module()
        except Exception as e:  # pragma: no cover - lowering support varies by jaxlib build
            pytest.skip(f"cannot lower for {platform} here: {e}")
        assert "stablehlo.transpose" not in text, platform
        assert text.count("stablehlo.convolution") == 3, platform


# --- conv2d_inference --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_{}x{}_c{}-{}_k{}_s{}_p{}".format(*c))
def test_inference_form_values_and_exact_gradients(case):
    """conv2d_inference: conv2d's values (a 1x1 convolution at stride 1 without padding as a product, within
    float32 rounding; any other kernel bit for bit) and, under differentiation, conv2d's gradients bit for
    bit (its derivative rule is the plain form's)."""
    b, h, wd, cin, cout, k, stride, padding = case
    x, w, g = _inputs(*case)
    conv = lambda f: jax.jit(lambda x, w: f(x, w, stride=stride, padding=padding))  # noqa: E731
    got, want = conv(C.conv2d_inference)(x, w), conv(conv2d)(x, w)
    if (k, stride, padding) == (1, 1, 0):
        _close(got, want, "1x1 values", tol=1e-6)
    else:
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()

    def grads(f):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w, stride=stride, padding=padding)) * g),
                                (0, 1)))(x, w)

    for a, r in zip(grads(C.conv2d_inference), grads(conv2d)):
        assert np.asarray(a).tobytes() == np.asarray(r).tobytes()


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU-default process's choices")
def test_inference_form_is_a_product_on_the_cpu_only_when_not_differentiated(monkeypatch):
    """On the CPU a 1x1 convolution compiles to a dot without differentiation and to convolutions under it;
    JAXDIFF_PLAIN_OPS=1 and a CUDA/TPU lowering keep the convolution."""
    x, w, g = _inputs(2, 8, 8, 4, 6, 1, 1, 0)
    fwd = jax.jit(lambda x, w: C.conv2d_inference(x, w))
    bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(C.conv2d_inference(x, w)) * g), (0, 1)))

    def ops(f, platform="cpu"):
        text = jax.export.export(f, platforms=[platform])(x, w).mlir_module()
        return text.count("stablehlo.dot_general"), text.count("stablehlo.convolution")

    monkeypatch.delenv("JAXDIFF_PLAIN_OPS", raising=False)
    assert ops(fwd) == (1, 0)
    assert ops(bwd)[1] == 3  # forward, dx, dw: conv2d's own gradient
    monkeypatch.setenv("JAXDIFF_PLAIN_OPS", "1")
    assert ops(jax.jit(lambda x, w: C.conv2d_inference(x, w))) == (0, 1)
    monkeypatch.delenv("JAXDIFF_PLAIN_OPS")
    for platform in ("cuda", "tpu"):
        try:
            assert ops(fwd, platform) == (0, 1), platform
        except AssertionError:
            raise
        except Exception as e:  # pragma: no cover - lowering support varies by jaxlib build
            pytest.skip(f"cannot lower for {platform} here: {e}")


def test_inference_form_checks_its_inputs():
    with pytest.raises(ValueError, match=r"conv2d_inference expects NHWC x HWIO with matching channels"):
        C.conv2d_inference(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 1, 4, 2)))
