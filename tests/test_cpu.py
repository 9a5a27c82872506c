"""jaxdiff.util.cpu: the XLA options jaxdiff compiles CPU programs with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.util import cpu

ON_CPU = jax.default_backend() == "cpu"


def _conv(x, w, stride, pad):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _net(params, x):
    h = jax.nn.silu(_conv(x, params["w1"], 1, 1))
    h = _conv(h, params["w2"], 2, 1)
    return jnp.sum(jnp.tanh(h) @ params["d"])


def _inputs():
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(3, 3, 3, 32)) * 0.2, "w2": rng.normal(size=(3, 3, 32, 32)) * 0.1,
              "d": rng.normal(size=(32, 8)) * 0.1}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    return params, jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)


@pytest.mark.parametrize("value, on, off", [
    (None, False, False), ("", False, False), ("1", True, False), ("yes", True, False), (" On ", True, False),
    ("0", False, True), ("false", False, True), (" OFF ", False, True), ("no", False, True),
])
def test_env_switches(monkeypatch, value, on, off):
    """env_on / env_off: unset and empty are neither; 0/false/no/off (any case, padded) are off."""
    if value is None:
        monkeypatch.delenv("JAXDIFF_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("JAXDIFF_TEST_SWITCH", value)
    assert cpu.env_on("JAXDIFF_TEST_SWITCH") is on
    assert cpu.env_off("JAXDIFF_TEST_SWITCH") is off


@pytest.mark.skipif(not ON_CPU, reason="CPU compiler options")
def test_options_on_cpu_and_switches(monkeypatch):
    monkeypatch.delenv("JAXDIFF_XLA_CPU_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    opts = cpu.compiler_options()
    assert opts == {cpu.YNN_OPTION: ",".join(cpu.YNN_TYPES)}
    assert cpu.compiler_options("gpu") == {} and cpu.compiler_options("tpu") == {}
    without_eltwise = ",".join(t for t in cpu.YNN_TYPES if t != "LIBRARY_FUSION_TYPE_ELTWISE")
    assert cpu.compiler_options(elementwise=False) == {cpu.YNN_OPTION: without_eltwise}
    assert cpu.compiler_options(partitioned=True) == {cpu.YNN_OPTION: without_eltwise}
    assert cpu.compiler_options("gpu", elementwise=False) == {}
    from jaxdiff.sample.unclip import prior_compiler_options  # the unCLIP prior's: a small convolution-free program

    assert prior_compiler_options() == {cpu.YNN_OPTION: without_eltwise}
    monkeypatch.setenv("JAXDIFF_XLA_CPU_OPTIONS", "0")
    assert cpu.compiler_options() == {}
    monkeypatch.delenv("JAXDIFF_XLA_CPU_OPTIONS")
    monkeypatch.setenv("XLA_FLAGS", f"--{cpu.YNN_OPTION}=")  # the user's own setting wins
    assert cpu.compiler_options() == {}


@pytest.mark.skipif(not ON_CPU, reason="CPU compiler options")
def test_jit_keeps_convolutions_out_of_ynnpack_and_results_unchanged(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    params, x = _inputs()
    fn = jax.value_and_grad(_net, argnums=(0, 1))
    ours = cpu.jit(fn).lower(params, x).compile()
    text = ours.as_text()
    # every convolution of the forward and backward pass is a plain XLA convolution
    conv_lines = [ln for ln in text.splitlines() if " convolution(" in ln]
    assert len(conv_lines) >= 4
    assert "__ynn_fusion" not in "\n".join(conv_lines)
    ref = jax.jit(fn)(params, x)
    got = ours(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err < 1e-5, err  # float32 rounding of a different summation order


def test_jit_merges_explicit_options_and_decorator_forms():
    @cpu.jit(static_argnums=1)
    def f(x, n):
        return x * n

    assert float(f(jnp.float32(2.0), 3)) == 6.0
    g = cpu.jit(lambda x: x + 1, compiler_options={"xla_embed_ir_in_executable": False})
    assert float(g(jnp.float32(1.0))) == 2.0
