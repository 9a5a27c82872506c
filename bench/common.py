"""What the benchmark scripts share: fixture A (flags and arrays), a description of the machine,
interleaved timing, the machine's matrix-product rate and FLOP counts of a traced computation.

Importing it puts the repository root first on sys.path, so `python bench/X.py` runs this
checkout's jaxdiff.

The comparisons with PyTorch (`reference_arguments`, `import_reference`) set GOMP_SPINCOUNT to 10,000 before
torch loads libgomp: after each parallel region libgomp's idle threads spin-wait (300,000 rounds by default)
before they sleep, so in an alternated comparison PyTorch's second thread went on spinning into the next
jaxdiff call, taking one of this machine's two cores from it (IF's CFG step, same process, 2026-12-04:
jaxdiff 33.4-33.6 ms alone, 36.3-37.5 ms right after PyTorch). At 10,000 rounds PyTorch's own step is as fast
as at the default (39.4-41.8 ms alone, against 41.2-42.6) and the carry-over is gone (jaxdiff 33.1-34.0 ms
after PyTorch); at 0 PyTorch's step took 70 ms. `--gomp-spincount -1` keeps libgomp's default.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "adm_tiny_a.npz"
GOMP_SPINCOUNT = 10_000  # PyTorch's OpenMP idle spin in the reference comparisons (module doc)


def _fixture_flags(kind: str) -> dict:
    """guided-diffusion's keyword arguments of fixture A's `kind` ("unet" or "classifier")."""
    with open(ROOT / "tests" / "fixtures" / "adm_tiny_a_flags.json") as f:
        flags = json.load(f)[kind]
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}


# the architecture every speed comparison with guided-diffusion uses
UNET_FLAGS = _fixture_flags("unet")
CLASSIFIER_FLAGS = _fixture_flags("classifier")


def load_fixture() -> dict:
    """Every array of tests/fixtures/adm_tiny_a.npz by name."""
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def state_dict(fx: dict, prefix: str) -> dict:
    """The `prefix/...` arrays of the fixture with the prefix removed (a guided-diffusion state_dict)."""
    return {k[len(prefix) + 1:]: v for k, v in fx.items() if k.startswith(prefix + "/")}


def machine() -> dict:
    """CPU model, cores, load average, versions and the environment settings that change speed."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        cpu = "unknown"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores_online": os.cpu_count(), "cores_usable": usable,
            "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "device_count": jax.device_count(),
            "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", ""),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall milliseconds of each call, {name: [ms] * repeats}: the functions run in turn (one call
    each per round), so a slow spell of a shared machine hits them alike. Each fn must wait for its
    own result (`jax.block_until_ready`)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def blocking(fn: Callable, *args) -> Callable[[], object]:
    """A no-argument call of fn(*args) that waits for the result."""
    return lambda: jax.block_until_ready(fn(*args))


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-product rate (best of `repeats` n x n x n products), GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    best = min(interleaved({"mm": blocking(jax.jit(jnp.matmul), a, a)}, repeats)["mm"])
    return round(2 * n ** 3 / best / 1e6, 1)


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
        if eqn.primitive.name == "cond":  # the most expensive branch
            total += max(inner)
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


def count_flops(fn, *args) -> float:
    """Matrix-product and convolution FLOPs of `fn(*args)` (2 per multiply-add), from its jaxpr:
    scans counted `length` times, the costlier branch of a cond; element-wise work not counted.
    A jitted `fn` is traced through its body (a jit with compiler options cannot be nested)."""
    return _jaxpr_flops(jax.make_jaxpr(getattr(fn, "__wrapped__", fn))(*args).jaxpr)


def duel(jax_fn, torch_fn, repeats: int, warmup: int) -> dict:
    """jax_fn and torch_fn alternated: medians, their ratio, the quartiles and extremes of the per-round ratios,
    and every round's times."""
    times = interleaved({"jaxdiff": jax_fn, "torch": torch_fn}, repeats, warmup)
    pairs = [j / t for j, t in zip(times["jaxdiff"], times["torch"])]
    mj, mt = median(times["jaxdiff"]), median(times["torch"])
    q = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else pairs * 3
    return {"jaxdiff_ms": mj, "torch_ms": mt, "ratio": round(mj / mt, 3),
            "pair_ratio_q1_median_q3": [round(q[0], 3), round(statistics.median(pairs), 3), round(q[-1], 3)],
            "round_ratio_min_q1_median_q3_max": [round(min(pairs), 3), round(q[0], 3), round(statistics.median(pairs), 3),
                                                 round(q[-1], 3), round(max(pairs), 3)],
            "jaxdiff_min_max_ms": [round(min(times["jaxdiff"]), 2), round(max(times["jaxdiff"]), 2)],
            "torch_min_max_ms": [round(min(times["torch"]), 2), round(max(times["torch"]), 2)],
            "jaxdiff_all_ms": [round(v, 2) for v in times["jaxdiff"]],
            "torch_all_ms": [round(v, 2) for v in times["torch"]]}


# --- the reference stack (PyTorch, diffusers, transformers) and its comparisons ---------------------------

def config_of(fx: dict, key: str) -> dict:
    return json.loads(str(fx[key]))


def rel(a, b) -> float:
    """max |a - b| / max |b| (the cascade tests' measure)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(a) -> np.ndarray:
    return np.moveaxis(np.asarray(a), -1, 1)


def nhwc(a) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), 1, -1))


def import_reference(refstack: str | None, gomp_spincount: int | None = None):
    """(torch, diffusers, transformers), `refstack` appended to sys.path (after site-packages); with
    `gomp_spincount` >= 0, GOMP_SPINCOUNT set to it before torch loads its OpenMP runtime (libgomp)."""
    if gomp_spincount is not None and gomp_spincount >= 0:
        if "torch" in sys.modules:
            raise SystemExit("--gomp-spincount must be set before torch is imported")
        os.environ["GOMP_SPINCOUNT"] = str(int(gomp_spincount))
    path = str(pathlib.Path(refstack).expanduser().resolve()) if refstack else None
    if path and path not in sys.path:
        sys.path.append(path)
    try:
        import diffusers
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"{e}; the reference stack is needed: pip install --target /opt/refstack torch==2.13.0 "
                         "diffusers==0.42.1 transformers==5.23.0 (then --refstack /opt/refstack)") from None
    if path and np.__file__.startswith(path + "/"):
        raise SystemExit(f"numpy was imported from {np.__file__}: the reference stack shadows the environment")
    return torch, diffusers, transformers


def cpu_idle_percent(seconds: float = 3.0) -> float:
    """The whole machine's idle share of CPU time over `seconds` (/proc/stat; -1 where unreadable)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
        return sum(v[:8]), v[3] + v[4]
    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return -1.0
    return round(100.0 * (i1 - i0) / max(t1 - t0, 1), 1)


def wait_idle(percent: float, max_seconds: float) -> dict:
    """Wait until cpu_idle_percent() >= percent or max_seconds pass; what was found."""
    start = time.monotonic()
    while True:
        idle = cpu_idle_percent()
        waited = time.monotonic() - start
        if idle >= percent or idle < 0 or waited >= max_seconds:
            return {"wanted_percent": percent, "idle_percent": idle, "waited_s": round(waited, 1),
                    "reached": idle >= percent}


def stop_at_gate(out: dict, args) -> int | None:
    """After a comparison's gate (out["gate"]): with `--check` or a failed gate, print `out` and return the exit
    status (0 / 1); else wait for idle CPUs as `--wait-idle` asks, note the machine, and return None (time it)."""
    if args.check or not out["gate"]["passed"]:
        print(json.dumps(out, indent=1))
        return 0 if out["gate"]["passed"] else 1
    if args.wait_idle > 0:
        out["wait_idle"] = wait_idle(args.wait_idle, args.wait_max)
    out["machine_at_start"] = {**machine(), "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    return None


def report(out: dict, table: dict, markdown: bool) -> None:
    """A reference comparison's results: `out` (with out["table"] = `table` and the machine at the end) as JSON on
    stdout, each quantity's summary on stderr, and with `markdown` the table as markdown on stderr."""
    out["table"] = table
    out["machine_at_end"] = {**machine(), "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    for q, r in table.items():
        print(json.dumps({"quantity": q, **{k: v for k, v in r.items() if not k.endswith("all_ms")}}),
              file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    if markdown:
        lines = ["| ms | jaxdiff | PyTorch | ratio | per-round ratios (min, q1, median, q3, max) |", "|---|---|---|---|---|"]
        for q, r in table.items():
            lines.append(f"| {q} | {r['jaxdiff_ms']:.1f} | {r['torch_ms']:.1f} | **{r['ratio']:.2f}** | "
                         + ", ".join(f"{v:.2f}" for v in r["round_ratio_min_q1_median_q3_max"]) + " |")
        print("\n".join(lines), file=sys.stderr)


def reference_arguments(doc: str):
    """The argument parser every comparison with the reference stack starts from (`--refstack`, the rounds,
    PyTorch's threads, `--wait-idle`, `--check`, `--markdown`); the script adds its own sizes."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refstack", default="/opt/refstack", help="pip --target folder of torch / diffusers / "
                   "transformers, appended to sys.path ('' : use the environment's)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (one call per side each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (>= 1: jaxdiff's first call compiles)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch's torch.set_num_threads")
    p.add_argument("--gomp-spincount", type=int, default=GOMP_SPINCOUNT, metavar="N",
                   help="GOMP_SPINCOUNT for PyTorch's OpenMP threads (-1: libgomp's default, 300000; module doc)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="P",
                   help="before timing, wait until the CPUs are >= P %% idle over 3 s (0: do not wait)")
    p.add_argument("--wait-max", type=float, default=1800.0, help="longest wait for --wait-idle, seconds")
    p.add_argument("--check", action="store_true", help="only the gate")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown (stderr)")
    return p
