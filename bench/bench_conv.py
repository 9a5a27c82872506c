"""Benchmark of jaxdiff.conv.conv2d on the CPU: XLA's convolution compiled with jaxdiff's CPU
options (`jaxdiff.cpu.jit`, the default) and with XLA's default options (YNNPACK convolutions),
plain and with the custom gradient.

Prints one JSON document: the machine (CPU model, cores usable, load average before and after),
the date, versions, the measured float32 matmul rate (2048^3), and per shape the time (ms, best
of the interleaved repeats, plus the median) and GFLOP/s of

  fwd       forward pass alone
  fwd_bwd   forward + backward (y, dL/dx and dL/dkernel for a fixed cotangent), jitted together

for
  plain        impl="plain" under jaxdiff.cpu.jit (what jaxdiff's own programs run)
  plain_ynn    impl="plain" under jax.jit with XLA's default CPU options
  fast_ynn     impl="fast" (custom VJP) under jax.jit with XLA's default CPU options
and the speedups of plain over plain_ynn and over fast_ynn (forward + backward).

With --torch it also times PyTorch's `torch.nn.functional.conv2d` on the same data in NCHW
(fwd under no_grad; fwd_bwd: y, dL/dx and dL/dkernel for the same cotangent, via autograd) on
--torch-threads threads, and each gradient alone (`dx`, `dw`: jaxdiff's VJP with respect to one
argument under jaxdiff.cpu.jit; PyTorch's `aten.convolution_backward` with one output, which is
what its autograd calls), interleaved with the variants above; it checks that PyTorch's y, dx
and dw agree with jaxdiff's and reports plain's speed relative to it (`torch_over_plain_*`, > 1:
jaxdiff faster). PyTorch is not a jaxdiff requirement: pip install torch==2.13.0 (CPU wheel).

With --variants it also times, under XLA's default options, the pieces that went into choosing
the custom VJP, per shape:
forward as XLA conv / im2col matmul / sum of per-tap matmuls, input gradient (XLA's vs ours),
and filter gradient (XLA's vs taps / im2col, whole batch or scanned over chunks of images).

The variants are timed interleaved (round-robin, one call each per round) so that load from
other processes on a shared machine hits them alike; read the 'load' field before trusting a
number, and compare variants only within one run.

FLOP counts: 2*B*Ho*Wo*kh*kw*Cin*Cout per pass; forward + backward counts 3 passes.

    python bench/bench_conv.py                 # default shapes, plain vs fast
    python bench/bench_conv.py --variants      # and the per-variant breakdown
    python bench/bench_conv.py --quick         # fewer shapes and repeats
    python bench/bench_conv.py --dtype bfloat16
    python bench/bench_conv.py --torch --shape 64,32,64,64,3,1,1   # against PyTorch (oneDNN)
    python bench/bench_conv.py --torch --fixture-a --repeats 7      # the fixture-A U-Net's convolutions

--fixture-a times the convolutions of the fixture-A U-Net (bench_training.fixture_a_config),
found by tracing its forward pass, at batches --fixture-a-batches, and adds `fixture_a_totals`:
per batch and timed variant, the sum over the network's convolutions of count x time (ms), i.e.
one forward pass's (or forward + backward's) worth of convolutions timed one by one.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from jaxdiff import conv as C  # noqa: E402
from jaxdiff import cpu  # noqa: E402
from jaxdiff.cpu import l2_cache_bytes  # noqa: E402

from common import cpu_model  # noqa: E402

# (batch, height=width, cin, cout, kernel, stride, padding): the ADM U-Net's convolutions
SHAPES = [
    # 3x3 stride 1 (resblocks, up-sampling convs); the sizes
    (16, 32, 32, 32, 3, 1, 1),
    (64, 32, 32, 32, 3, 1, 1),
    (16, 16, 64, 64, 3, 1, 1),
    (64, 16, 64, 64, 3, 1, 1),
    (16, 8, 64, 64, 3, 1, 1),
    (64, 8, 64, 64, 3, 1, 1),
    # configs/digits.py (8x8, 64/128 ch, batch 64) and configs/fashion_mnist.py (32x32, 64/128, batch 128)
    (64, 4, 128, 128, 3, 1, 1),
    (128, 32, 64, 64, 3, 1, 1),
    (128, 16, 128, 128, 3, 1, 1),
    (128, 8, 128, 128, 3, 1, 1),
    (128, 32, 1, 64, 3, 1, 1),  # input conv, 1-channel images
    (128, 32, 64, 2, 3, 1, 1),  # output conv, learned sigma
    # wider ADM levels
    (16, 32, 128, 128, 3, 1, 1),
    (16, 8, 256, 256, 3, 1, 1),
    (16, 64, 3, 64, 3, 1, 1),  # input conv of a 64x64 RGB model
    # 1x1 (skip connections when channels change)
    (16, 32, 32, 64, 1, 1, 0),
    (128, 16, 64, 128, 1, 1, 0),
    (16, 8, 128, 256, 1, 1, 0),
    # 3x3 stride 2 pad 1 (downsampling with conv_resample, resblock_updown=False)
    (16, 32, 32, 32, 3, 2, 1),
    (64, 32, 32, 32, 3, 2, 1),
    (16, 16, 64, 64, 3, 2, 1),
    (64, 16, 128, 128, 3, 2, 1),
]
QUICK = [SHAPES[i] for i in (0, 1, 2, 5, 8, 15, 18, 19)]


def machine():
    model = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": model,
        "cores_online": os.cpu_count(),
        "cores_usable": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "l2_cache_bytes_used_by_conv": l2_cache_bytes(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def interleaved(fns, args, repeats):
    """{name: (best wall ms, median wall ms, best process-CPU ms)}.

    Every fn runs once per round, rounds repeated. Process CPU time (all threads) is the work
    done, which time-slicing with other processes barely changes; wall time is what a user
    waits, and on a quiet machine also shows how well the work spreads over the cores.
    """
    for f in fns.values():
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    ts = {n: [] for n in fns}
    cs = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            c = _cpu_s()
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts[n].append(time.perf_counter() - t)
            cs[n].append(_cpu_s() - c)
    return {n: (1e3 * min(v), 1e3 * float(np.median(v)), 1e3 * min(cs[n])) for n, v in ts.items()}


def matmul_gflops(repeats):
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (2048, 2048), jnp.float32)
    r = interleaved({"mm": jax.jit(jnp.matmul)}, (a, b), repeats)["mm"]
    return {"ms": round(r[0], 2), "gflops": round(2 * 2048**3 / r[0] / 1e6, 1), "cpu_ms": round(r[2], 2)}


def fwd_bwd(f, jit=jax.jit):
    def run(x, w, g):
        y, vjp = jax.vjp(f, x, w)
        return (y,) + vjp(g)

    return jit(run)


def variant_fns(shape, dtype):
    """Extra per-piece candidates (the ones measured to choose the fast path)."""
    b, h, cin, cout, k, s, p = shape
    ho = (h + 2 * p - k) // s + 1
    acc = C._acc_dtype(dtype)
    fns = {}

    def f_im2col(x, w, g):
        xp = C._pad_hw(x, p, p, p, p)
        pt = jnp.concatenate(C._tap_slices(xp, k, k, s, ho, ho), -1)
        return lax.dot_general(pt, w.reshape(-1, cout), (((3,), (0,)), ((), ())), preferred_element_type=acc)

    def f_taps(x, w, g):
        xp = C._pad_hw(x, p, p, p, p)
        out = 0
        for t, sl in enumerate(C._tap_slices(xp, k, k, s, ho, ho)):
            out = out + lax.dot_general(sl, w[t // k, t % k], (((3,), (0,)), ((), ())), preferred_element_type=acc)
        return out

    fns["fwd/xla_conv"] = lambda x, w, g: C.conv2d_plain(x, w, stride=s, padding=p)
    if k > 1:
        fns["fwd/im2col_matmul"] = f_im2col
        fns["fwd/tap_matmuls"] = f_taps
    else:
        fns["fwd/matmul"] = lambda x, w, g: lax.dot_general(
            x[:, ::s, ::s], w[0, 0], (((3,), (0,)), ((), ())), preferred_element_type=acc
        )

    def dx_xla(x, w, g):
        return jax.vjp(lambda x: C.conv2d_plain(x, w, stride=s, padding=p), x)[1](g)[0]

    def dw_xla(x, w, g):
        return jax.vjp(lambda w: C.conv2d_plain(x, w, stride=s, padding=p), w)[1](g)[0]

    fns["dx/xla"] = dx_xla
    fns["dx/fast"] = lambda x, w, g: C._dx(g, w, x.shape, s, p)
    fns["dw/xla"] = dw_xla
    if k > 1:
        for nb in (1, 2, 4, 8):
            if nb < b:
                fns[f"dw/conv/chunk{nb}"] = (
                    lambda nb: lambda x, w, g: C._dw(x, g, w.shape, s, p, plan=("conv", nb))
                )(nb)
        seen = set()
        for rows in (1024, 4096):
            nb = C._chunk_size(b, max(1, rows // (ho * ho)))
            if nb in seen:
                continue
            seen.add(nb)
            for variant in ("taps", "taps_t"):
                fns[f"dw/{variant}/chunk{nb}"] = (
                    lambda variant, nb: lambda x, w, g: C._dw(x, g, w.shape, s, p, plan=(variant, nb))
                )(variant, nb)
        if cin <= 8:
            fns[f"dw/im2col_t/chunk{b}"] = lambda x, w, g: C._dw(x, g, w.shape, s, p, plan=("im2col_t", b))
        fns["dw/fast(plan=%s/chunk%d)" % C._dw_plan((b, h, h, cin), (k, k, cin, cout), (b, ho, ho, cout), s)] = (
            lambda x, w, g: C._dw(x, g, w.shape, s, p)
        )
    else:
        fns["dw/fast(matmul)"] = lambda x, w, g: C._dw(x, g, w.shape, s, p)
    return {n: jax.jit(f) for n, f in fns.items()}


def torch_fns(x, w, g, stride: int, padding: int, threads: int):
    """PyTorch's conv2d on NCHW copies of (x, w, g): ({name: fn}, (y, dx, dw) back in jaxdiff's layout)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    tx = torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2))).requires_grad_()
    tw = torch.from_numpy(np.ascontiguousarray(np.asarray(w, np.float32).transpose(3, 2, 0, 1))).requires_grad_()
    tg = torch.from_numpy(np.ascontiguousarray(np.asarray(g, np.float32).transpose(0, 3, 1, 2)))

    def fwd(*_):
        with torch.no_grad():
            F.conv2d(tx, tw, stride=stride, padding=padding)

    def fwd_bwd(*_):
        y = F.conv2d(tx, tw, stride=stride, padding=padding)
        return (y,) + torch.autograd.grad(y, (tx, tw), tg)

    def fwd_bwd_timed(*_):
        fwd_bwd()

    def grad_only(mask):
        def run(*_):
            torch.ops.aten.convolution_backward(tg, tx, tw, None, [stride] * 2, [padding] * 2, [1, 1], False,
                                                [0, 0], 1, mask)
        return run

    y, dx, dw = (a.detach().numpy() for a in fwd_bwd())
    fns = {"torch/fwd": fwd, "torch/fwd_bwd": fwd_bwd_timed,
           "torch/dx": grad_only([True, False, False]), "torch/dw": grad_only([False, True, False])}
    return fns, (y.transpose(0, 2, 3, 1), dx.transpose(0, 2, 3, 1), dw.transpose(2, 3, 1, 0))


def fixture_a_convs(batch: int) -> dict:
    """{(B, H, Cin, Cout, k, stride, pad): count} over the fixture-A U-Net's forward pass (traced)."""
    import bench_training
    from jaxdiff import training

    cfg, info = bench_training.fixture_a_config("diffusion", batch, "float32")
    model = training.create_model(training.resolve_config(cfg, info))
    args = (jnp.zeros((batch,) + tuple(info.image_shape)), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    counts: dict = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                (b, h, _, cin), (k, _, _, cout) = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                key = (b, h, cin, cout, k, eqn.params["window_strides"][0], eqn.params["padding"][0][0])
                counts[key] = counts.get(key, 0) + 1
            for v in eqn.params.values():
                sub = getattr(v, "jaxpr", None)
                if sub is not None:
                    walk(sub if hasattr(sub, "eqns") else sub.jaxpr)

    walk(jax.make_jaxpr(lambda p: model.apply(p, *args))(params).jaxpr)
    return counts


def fixture_a_totals(results: list, counts: dict) -> dict:
    """{batch: {variant: sum of count x best ms}} over the timed shapes that are in `counts`."""
    totals: dict = {}
    for r in results:
        sh = r["shape"]
        n = counts.get((sh["B"], sh["H"], sh["Cin"], sh["Cout"], sh["k"], sh["stride"], sh["pad"]))
        if not n:
            continue
        per = totals.setdefault(str(sh["B"]), {"convolutions": 0})
        per["convolutions"] += n
        for name, v in r.items():
            if isinstance(v, dict) and "ms" in v:
                per[name] = round(per.get(name, 0.0) + n * v["ms"], 2)
    return totals


def bench_shape(shape, dtype, repeats, variants, torch_threads=None):
    b, h, cin, cout, k, s, p = shape
    ho = (h + 2 * p - k) // s + 1
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, h, h, cin), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, k, cin, cout), jnp.float32) / np.sqrt(k * k * cin)).astype(dtype)
    g = jax.random.normal(kg, (b, ho, ho, cout), jnp.float32).astype(dtype)
    gflop = 2 * b * ho * ho * k * k * cin * cout / 1e9

    def conv(impl):
        return lambda x, w: C.conv2d(x, w, stride=s, padding=p, impl=impl)

    fns = {
        "plain/fwd": cpu.jit(lambda x, w, g: conv("plain")(x, w)),
        "plain_ynn/fwd": jax.jit(lambda x, w, g: conv("plain")(x, w)),
        "plain/fwd_bwd": fwd_bwd(conv("plain"), cpu.jit),
        "plain_ynn/fwd_bwd": fwd_bwd(conv("plain")),
        "fast_ynn/fwd_bwd": fwd_bwd(conv("fast")),
    }
    # numerical agreement of the paths (float32 tolerance, looser for bf16)
    yp, dxp, dwp = fns["plain/fwd_bwd"](x, w, g)
    yf, dxf, dwf = fns["fast_ynn/fwd_bwd"](x, w, g)
    yy, dxy, dwy = fns["plain_ynn/fwd_bwd"](x, w, g)

    def rel(a, b):
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))

    if variants:
        fns.update(variant_fns(shape, dtype))
    if torch_threads:
        tfns, (yt, dxt, dwt) = torch_fns(x, w, g, s, p, torch_threads)
        fns.update(tfns)
        fns["plain/dx"] = cpu.jit(lambda x, w, g: jax.vjp(lambda x: conv("plain")(x, w), x)[1](g)[0])
        fns["plain/dw"] = cpu.jit(lambda x, w, g: jax.vjp(lambda w: conv("plain")(x, w), w)[1](g)[0])
    t = interleaved(fns, (x, w, g), repeats)
    out = {
        "shape": {"B": b, "H": h, "W": h, "Cin": cin, "Cout": cout, "k": k, "stride": s, "pad": p},
        "gflop_per_pass": round(gflop, 4),
        "max_rel_diff_fast_ynn_vs_plain": {"y": rel(yp, yf), "dx": rel(dxp, dxf), "dw": rel(dwp, dwf)},
        "max_rel_diff_plain_ynn_vs_plain": {"y": rel(yp, yy), "dx": rel(dxp, dxy), "dw": rel(dwp, dwy)},
    }
    for name, (best, med, cpu_ms) in t.items():
        passes = 3 if name.endswith("fwd_bwd") else 1
        out[name] = {
            "ms": round(best, 3),
            "median_ms": round(med, 3),
            "gflops": round(passes * gflop / best * 1e3, 1),
            "cpu_ms": round(cpu_ms, 3),
        }
    out["speedup_fwd_bwd_vs_plain_ynn"] = round(t["plain_ynn/fwd_bwd"][0] / t["plain/fwd_bwd"][0], 2)
    out["speedup_fwd_bwd_vs_fast_ynn"] = round(t["fast_ynn/fwd_bwd"][0] / t["plain/fwd_bwd"][0], 2)
    if torch_threads:
        out["max_rel_diff_torch_vs_plain"] = {"y": rel(yp, yt), "dx": rel(dxp, dxt), "dw": rel(dwp, dwt)}
        for part in ("fwd", "fwd_bwd", "dx", "dw"):
            out[f"torch_over_plain_{part}"] = round(t[f"torch/{part}"][0] / t[f"plain/{part}"][0], 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--variants", action="store_true", help="also time the candidate pieces")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shape", action="append", default=None, help="B,H,Cin,Cout,k,stride,pad (repeatable)")
    ap.add_argument("--torch", action="store_true", help="also time PyTorch's conv2d (needs torch)")
    ap.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads with --torch")
    ap.add_argument("--fixture-a", action="store_true", help="the fixture-A U-Net's convolutions, with totals")
    ap.add_argument("--fixture-a-batches", default="16,64", help="comma-separated batch sizes for --fixture-a")
    args = ap.parse_args(argv)
    if args.torch and args.dtype != "float32":
        ap.error(f"--torch compares float32 only, got --dtype {args.dtype}")
    if args.torch and importlib.util.find_spec("torch") is None:
        ap.error("--torch needs PyTorch, which is not installed: pip install torch==2.13.0 (CPU wheel)")
    if args.torch_threads < 1:
        ap.error(f"--torch-threads must be >= 1, got {args.torch_threads}")
    shapes = QUICK if args.quick else SHAPES
    if args.shape:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
    counts: dict = {}
    if args.fixture_a:
        try:
            batches = [int(b) for b in args.fixture_a_batches.split(",")]
        except ValueError:
            batches = []
        if not batches or min(batches) < 1:
            ap.error(f"--fixture-a-batches must be positive integers separated by commas, got {args.fixture_a_batches!r}")
        for b in batches:
            counts.update(fixture_a_convs(b))
        shapes = sorted(counts)
    repeats = args.repeats or (5 if args.quick else 9)
    dtype = jnp.dtype(args.dtype)

    report = {
        "benchmark": "jaxdiff.conv.conv2d: jaxdiff CPU options vs XLA defaults",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "conv_custom_vjp_by_default": C.custom_vjp_active(),
        "compiler_options": cpu.compiler_options(),
        "dtype": str(dtype),
        "repeats": repeats,
        "load_before": os.getloadavg(),
        "matmul_f32_2048": matmul_gflops(repeats),
        "results": [],
    }
    for shape in shapes:
        report["results"].append(bench_shape(shape, dtype, repeats, args.variants, args.torch_threads if args.torch else None))
        print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    report["load_after"] = os.getloadavg()
    if counts:
        report["fixture_a_convs"] = {",".join(map(str, k)): n for k, n in sorted(counts.items())}
        report["fixture_a_totals"] = fixture_a_totals(report["results"], counts)
    keys = ["speedup_fwd_bwd_vs_plain_ynn", "speedup_fwd_bwd_vs_fast_ynn"]
    if args.torch:
        import torch

        report["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
        keys += [f"torch_over_plain_{part}" for part in ("fwd", "fwd_bwd", "dx", "dw")]
    for key in keys:
        sp = [r[key] for r in report["results"]]
        report[key + "_geomean"] = round(float(np.exp(np.mean(np.log(sp)))), 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
