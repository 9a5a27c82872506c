"""What the benchmark scripts share: the fixture-A architecture, the machine's matrix-product rate,
FLOP counts of a jitted computation, and a description of the machine."""

from __future__ import annotations

import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "adm_tiny_a.npz"

# guided-diffusion's flags of fixture A, the architecture every speed comparison with PyTorch uses;
# defined once, next to the fixture (tests/_adm.py)
sys.path.insert(0, str(ROOT / "tests"))
from _adm import CLASSIFIER_FLAGS, UNET_FLAGS  # noqa: E402


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def machine() -> dict:
    """CPU model, core count, load average, versions."""
    dev = jax.devices()[0]
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            "device_count": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-product rate (best of `repeats` n x n x n products), GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - t0)
    return round(2 * n ** 3 / best / 1e9, 1)


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, _), (lb, _) = eqn.params["dimension_numbers"]
        a, out = eqn.invars[0].aval, eqn.outvars[0].aval
        k = np.prod([a.shape[d] for d in lc]) if lc else 1
        return 2.0 * float(np.prod(out.shape)) * float(k)
    if name == "conv_general_dilated":
        lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
        dn = eqn.params["dimension_numbers"]
        window = np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]])
        cin = lhs.shape[dn.lhs_spec[1]] // eqn.params["feature_group_count"]
        return 2.0 * float(np.prod(out.shape)) * float(window) * float(cin)
    return 0.0


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        subs = list(jex_core.jaxprs_in_params(eqn.params))
        if not subs:
            continue
        inner = [_jaxpr_flops(getattr(s, "jaxpr", s)) for s in subs]
        if eqn.primitive.name == "cond":  # platform_dependent / switch: the most expensive branch
            total += max(inner)
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


def count_flops(fn, *args) -> float:
    """Matrix-product and convolution FLOPs of `fn(*args)` (2 per multiply-add), from its jaxpr:
    scans counted `length` times, the costlier branch of a cond; element-wise work not counted."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
