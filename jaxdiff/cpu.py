"""What jaxdiff does differently when it runs on the CPU backend, in one place.

XLA compiler options (`compiler_options`, `jit`)
------------------------------------------------
XLA's CPU backend hands convolutions, matrix products and reductions to YNNPACK by default. For
the convolutions of jaxdiff's networks that is the slow choice: on the 2-core Xeon we develop on,
forward + backward of the U-Net's convolutions ran 1.1-2.8x faster (geometric mean 1.56x,
`bench/bench_conv.py`) on XLA's other convolution path (Eigen) than on YNNPACK, while YNNPACK's products,
reductions and element-wise fusions stay faster than XLA's own (turning YNNPACK off altogether
made GroupNorm's reductions several times slower). So every program jaxdiff compiles itself goes
through `jit`, which on the CPU adds the per-compilation option

    xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,
                                           LIBRARY_FUSION_TYPE_REDUCE, LIBRARY_FUSION_TYPE_ELTWISE

(YNNPACK for everything it handles except convolutions; with ELTWISE the fixture-A training step
ran ~5 % faster than without, interleaved A/B, batch 16 and 64). It is a compile option of those
programs only: nothing global is changed, other programs in the process are compiled as before,
and GPU/TPU compilations get no extra options. It is left out when

* the default backend is not the CPU;
* the user's `XLA_FLAGS` already set `--xla_cpu_experimental_ynn_fusion_type` (theirs wins);
* `JAXDIFF_XLA_CPU_OPTIONS=0`;
* the installed jaxlib does not accept the option (probed once by compiling a tiny program).

Code that jits jaxdiff's functions itself (`jax.jit(training.make_train_step(...))`) gets these
options by using `jaxdiff.cpu.jit` instead, or by passing `compiler_options=compiler_options()`.

Not done here: glibc's huge-page malloc. Each run of a compiled program allocates its temporary
buffers afresh (~300 MB for a fixture-A training step at batch 16); with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment (glibc >= 2.35, transparent huge pages
not "never") the step took ~1,000 page faults instead of ~76,000 and ran 5-10 % faster. glibc reads
it only at process start, so it is set by the shell scripts (scripts/main.sh) and the documented
bench invocations (docs/benchmarks.md), not by any Python entry point.

Hand-written gradients (`custom_gradients_active`)
--------------------------------------------------
GroupNorm (`norm.py`) and attention (`attention.py`) have CPU-specific custom VJPs; they are used
when the default backend is the CPU, unless `JAXDIFF_PLAIN_OPS=1` (the plain formulas and XLA's
derivatives, e.g. for A/B tests). Both switches are read when a function is traced.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

__all__ = ["compiler_options", "custom_gradients_active", "jit", "l2_cache_bytes"]

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE", "LIBRARY_FUSION_TYPE_ELTWISE")
_ENV_OPTIONS = "JAXDIFF_XLA_CPU_OPTIONS"
_ENV_PLAIN_OPS = "JAXDIFF_PLAIN_OPS"


def env_off(name: str) -> bool:
    """Whether environment variable `name` is set to 0 / false / no / off."""
    return os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off")


def env_on(name: str) -> bool:
    """Whether environment variable `name` is set to anything but empty / 0 / false / no / off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple) -> bool:
    """Whether this jaxlib compiles a tiny CPU program with `options` (cached per process)."""
    try:
        jax.jit(jnp.sin).lower(jnp.zeros((2,), jnp.float32)).compile(compiler_options=dict(options))
        return True
    except Exception:  # an unknown option or enum value: an older/newer jaxlib
        return False


def compiler_options(backend: Optional[str] = None) -> dict[str, Any]:
    """The XLA options jaxdiff compiles with on `backend` (default: JAX's default backend).

    {} except on the CPU, where YNNPACK is kept for products, reductions and element-wise
    fusions but not for convolutions (see the module doc for when it is left out).
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or env_off(_ENV_OPTIONS) or YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    options = ((YNN_OPTION, ",".join(YNN_TYPES)),)
    return dict(options) if _accepted(options) else {}


def jit(fn: Optional[Callable] = None, **kwargs) -> Callable:
    """`jax.jit` with `compiler_options()` merged under any `compiler_options` given explicitly.

    Usable as `jit(fn, ...)`, `@jit` or `@jit(static_argnums=...)`. The options are chosen when
    `jit` is called, so call it after `jax.distributed.initialize` (not at import time).
    """
    if fn is None:
        return functools.partial(jit, **kwargs)
    opts = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fn, compiler_options=opts or None, **kwargs)


def custom_gradients_active() -> bool:
    """Whether GroupNorm and attention traced now use their CPU custom VJPs."""
    return jax.default_backend() == "cpu" and not env_on(_ENV_PLAIN_OPS)


@functools.lru_cache(maxsize=None)
def l2_cache_bytes() -> int:
    """Per-core L2 cache size from sysfs (Linux), else 1 MiB; clamped to [256 KiB, 4 MiB]."""
    size = 1 << 20
    try:
        base = "/sys/devices/system/cpu/cpu0/cache"
        for index in sorted(os.listdir(base)):
            path = os.path.join(base, index)
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(path, "size")) as f:
                    text = f.read().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
                size = int(text.rstrip("KM")) * mult
                break
    except (OSError, ValueError):
        pass
    return min(max(size, 1 << 18), 1 << 22)
