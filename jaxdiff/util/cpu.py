"""What jaxdiff does differently when it runs on the CPU backend, in one place (measurements:
docs/benchmarks.md).

XLA compiler options (`compiler_options`, `jit`): XLA's CPU backend hands convolutions, matrix
products and reductions to YNNPACK; for jaxdiff's convolutions XLA's other path (Eigen) is faster,
while YNNPACK's products, reductions and element-wise fusions stay faster than XLA's own. So every
program jaxdiff compiles goes through `jit`, which on the CPU adds the per-compilation option

    xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,
                                           LIBRARY_FUSION_TYPE_REDUCE, LIBRARY_FUSION_TYPE_ELTWISE

(YNNPACK for everything but convolutions). Nothing global changes and GPU/TPU compilations get no
extra options. It is left out when the default backend is not the CPU, when the user's `XLA_FLAGS`
already set the option, with `JAXDIFF_XLA_CPU_OPTIONS=0`, or when the installed jaxlib refuses it
(probed once). Code that jits jaxdiff's functions itself gets the options from `jaxdiff.util.cpu.jit` or
`compiler_options=compiler_options()`.

glibc's huge-page malloc (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`) is read only at process start, so
the shell scripts set it, not any Python entry point.

Hand-written gradients (`custom_gradients_active`): GroupNorm (`norm.py`), attention
(`attention.py`) and convolutions (`conv.py`: XLA's own gradient in the form XLA's CPU backend runs
fast inside loop bodies too) have CPU-specific custom VJPs, used when the default backend is the CPU
unless `JAXDIFF_PLAIN_OPS=1`. Both switches are read when a function is traced.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
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


def compiler_options(backend: Optional[str] = None, *, partitioned: bool = False,
                     elementwise: bool = True) -> dict[str, Any]:
    """The XLA options jaxdiff compiles with on `backend` (default: JAX's default backend).

    {} except on the CPU, where YNNPACK is kept for products, reductions and element-wise
    fusions but not for convolutions (see the module doc for when it is left out).
    `partitioned`: for programs whose parameters are split over devices (FSDP sampling), element-wise
    fusions stay with XLA too: XLA's CPU backend fails at run time ("Instruction with unsupported layout
    in YNN fusion") on YNNPACK element-wise fusions of the transposed layouts the partitioner picks.
    `elementwise=False`: element-wise fusions stay with XLA too, for small programs without convolutions,
    where a YNNPACK fusion's fixed cost exceeds what it saves (unCLIP's prior CFG step at 128 rows:
    2.25 -> 1.5 ms; the U-Nets' steps are faster with them: the decoder's 47 vs 55 ms).
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or env_off(_ENV_OPTIONS) or YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    types = tuple(t for t in YNN_TYPES if not ((partitioned or not elementwise) and t == "LIBRARY_FUSION_TYPE_ELTWISE"))
    options = ((YNN_OPTION, ",".join(types)),)
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
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").iterdir()):
            level, kind = ((index / name).read_text().strip() for name in ("level", "type"))
            if level == "2" and kind in ("Unified", "Data"):
                text = (index / "size").read_text().strip().upper()
                size = int(text.rstrip("KM")) * {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
                break
    except (OSError, ValueError):
        pass
    return min(max(size, 1 << 18), 1 << 22)
