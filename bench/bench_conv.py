"""The CPU convolutions jaxdiff runs, timed per shape; prints JSON.

    python bench/bench_conv.py [--quick] [--repeats 9] [--dtype bfloat16] [--shape B,H,Cin,Cout,k,stride,pad ...]
    python bench/bench_conv.py --torch --fixture-a --repeats 7      # the fixture-A U-Net's convolutions vs PyTorch

Per shape (NHWC x HWIO, `lax.conv_general_dilated`, what `jaxdiff.models.layers.Conv` calls), best and
median wall ms of the interleaved repeats and GFLOP/s, of
  fwd       the forward pass
  fwd_bwd   forward + backward (y, dL/dx and dL/dkernel for a fixed cotangent), jitted together
compiled two ways:
  plain       with `jaxdiff.util.cpu.jit` (convolutions on XLA's Eigen path; what jaxdiff runs)
  plain_ynn   with plain `jax.jit` (XLA's default CPU options: convolutions on YNNPACK)
and `speedup_fwd_bwd_vs_plain_ynn` with its geometric mean over the shapes.

--torch also times PyTorch's `torch.nn.functional.conv2d` on the same data in NCHW (fwd under
no_grad; fwd_bwd through autograd) and each gradient alone (`dx`, `dw`: jaxdiff's VJP with respect
to one argument; PyTorch's `aten.convolution_backward` with one output, what its autograd calls) on
--torch-threads threads, checks that PyTorch's y, dx and dw agree with jaxdiff's and reports
`torch_over_plain_*` (> 1: jaxdiff faster). PyTorch is not a jaxdiff requirement:
pip install torch==2.13.0 (CPU wheel).

--fixture-a times the convolutions of the fixture-A U-Net (found by tracing its forward pass) at
--fixture-a-batches and adds `fixture_a_totals`: per batch and variant, the sum over the network's
convolutions of count x best ms.

Variants are timed interleaved (one call each per round), so load from other processes hits them
alike; compare them only within one run. FLOPs: 2*B*Ho*Wo*k*k*Cin*Cout per pass, 3 passes for fwd_bwd.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import common  # first: puts this checkout's jaxdiff on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdiff.util import cpu

# (batch, height=width, cin, cout, kernel, stride, padding): the ADM U-Net's convolutions
SHAPES = [
    # 3x3 stride 1 (resblocks, up-sampling convs)
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


def conv(stride: int, pad: int):
    return lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))


def fwd_bwd(f, jit):
    """jit(x, w, g) -> (y, dL/dx, dL/dw) for the cotangent g."""
    def run(x, w, g):
        y, vjp = jax.vjp(f, x, w)
        return (y,) + vjp(g)

    return jit(run)


def one_grad(f, jit, i):
    """jit(x, w, g) -> the gradient with respect to argument i alone (the rest is dead code)."""
    return jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)[i])


def torch_fns(x, w, g, stride: int, padding: int, threads: int):
    """PyTorch's conv2d on NCHW copies of (x, w, g): ({name: fn}, (y, dx, dw) in jaxdiff's layout)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    tx = torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2))).requires_grad_()
    tw = torch.from_numpy(np.ascontiguousarray(np.asarray(w, np.float32).transpose(3, 2, 0, 1))).requires_grad_()
    tg = torch.from_numpy(np.ascontiguousarray(np.asarray(g, np.float32).transpose(0, 3, 1, 2)))

    def fwd():
        with torch.no_grad():
            F.conv2d(tx, tw, stride=stride, padding=padding)

    def fwd_bwd():
        y = F.conv2d(tx, tw, stride=stride, padding=padding)
        return (y,) + torch.autograd.grad(y, (tx, tw), tg)

    def grad_only(mask):
        return lambda: torch.ops.aten.convolution_backward(tg, tx, tw, None, [stride] * 2, [padding] * 2, [1, 1],
                                                           False, [0, 0], 1, mask)

    y, dx, dw = (a.detach().numpy() for a in fwd_bwd())
    fns = {"torch/fwd": fwd, "torch/fwd_bwd": fwd_bwd,
           "torch/dx": grad_only([True, False, False]), "torch/dw": grad_only([False, True, False])}
    return fns, (y.transpose(0, 2, 3, 1), dx.transpose(0, 2, 3, 1), dw.transpose(2, 3, 1, 0))


def fixture_a_convs(batch: int) -> dict:
    """{(B, H, Cin, Cout, k, stride, pad): count} over the fixture-A U-Net's forward pass (traced)."""
    from jaxdiff.models import create_model

    model = create_model("unet", **common.UNET_FLAGS)
    args = (jnp.zeros((batch, 32, 32, 3)), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    counts: dict = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                (b, h, _, cin), (k, _, _, cout) = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                key = (b, h, cin, cout, k, eqn.params["window_strides"][0], eqn.params["padding"][0][0])
                counts[key] = counts.get(key, 0) + 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(getattr(sub, "jaxpr", sub))

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


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))


def bench_shape(shape, dtype, repeats, torch_threads=None):
    b, h, cin, cout, k, s, p = shape
    ho = (h + 2 * p - k) // s + 1
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, h, h, cin), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, k, cin, cout), jnp.float32) / np.sqrt(k * k * cin)).astype(dtype)
    g = jax.random.normal(kg, (b, ho, ho, cout), jnp.float32).astype(dtype)
    gflop = 2 * b * ho * ho * k * k * cin * cout / 1e9
    f = conv(s, p)
    fns = {"plain/fwd": cpu.jit(f), "plain_ynn/fwd": jax.jit(f),
           "plain/fwd_bwd": fwd_bwd(f, cpu.jit), "plain_ynn/fwd_bwd": fwd_bwd(f, jax.jit)}
    ours = fns["plain/fwd_bwd"](x, w, g)
    out = {"shape": {"B": b, "H": h, "W": h, "Cin": cin, "Cout": cout, "k": k, "stride": s, "pad": p},
           "gflop_per_pass": round(gflop, 4),
           "max_rel_diff_plain_ynn_vs_plain": dict(zip(("y", "dx", "dw"),
                                                       map(_rel, ours, fns["plain_ynn/fwd_bwd"](x, w, g))))}
    calls = {n: common.blocking(fn, x, w) if n.endswith("/fwd") else common.blocking(fn, x, w, g)
             for n, fn in fns.items()}
    if torch_threads:
        tfns, theirs = torch_fns(x, w, g, s, p, torch_threads)
        out["max_rel_diff_torch_vs_plain"] = dict(zip(("y", "dx", "dw"), map(_rel, ours, theirs)))
        calls.update(tfns)
        calls["plain/dx"] = common.blocking(one_grad(f, cpu.jit, 0), x, w, g)
        calls["plain/dw"] = common.blocking(one_grad(f, cpu.jit, 1), x, w, g)
    times = common.interleaved(calls, repeats, warmup=2)
    for name, ms in times.items():
        passes = 3 if name.endswith("fwd_bwd") else 1
        out[name] = {"ms": round(min(ms), 3), "median_ms": common.median(ms),
                     "gflops": round(passes * gflop / min(ms) * 1e3, 1)}
    out["speedup_fwd_bwd_vs_plain_ynn"] = round(out["plain_ynn/fwd_bwd"]["ms"] / out["plain/fwd_bwd"]["ms"], 2)
    if torch_threads:
        for part in ("fwd", "fwd_bwd", "dx", "dw"):
            out[f"torch_over_plain_{part}"] = round(out[f"torch/{part}"]["ms"] / out[f"plain/{part}"]["ms"], 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
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
    if args.torch_threads < 1 or (args.repeats is not None and args.repeats < 1):
        ap.error(f"--torch-threads and --repeats must be >= 1, got {args.torch_threads}, {args.repeats}")
    shapes = QUICK if args.quick else SHAPES
    if args.shape:
        try:
            shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != 7 or min(s[:6]) < 1 or s[6] < 0 for s in shapes):
            ap.error(f"--shape takes B,H,Cin,Cout,k,stride,pad (positive, pad >= 0), got {args.shape}")
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
    report = {"benchmark": "CPU convolutions: jaxdiff.util.cpu.jit vs XLA's default options", "machine": common.machine(),
              "compiler_options": cpu.compiler_options(), "dtype": args.dtype, "repeats": repeats,
              "matmul_f32_gflops": common.matmul_gflops(), "results": []}
    for shape in shapes:
        report["results"].append(bench_shape(shape, jnp.dtype(args.dtype), repeats,
                                             args.torch_threads if args.torch else None))
        print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    report["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if counts:
        report["fixture_a_convs"] = {",".join(map(str, k)): n for k, n in sorted(counts.items())}
        report["fixture_a_totals"] = fixture_a_totals(report["results"], counts)
    keys = ["speedup_fwd_bwd_vs_plain_ynn"]
    if args.torch:
        import torch

        report["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
        keys += [f"torch_over_plain_{part}" for part in ("fwd", "fwd_bwd", "dx", "dw")]
    for key in keys:
        report[key + "_geomean"] = round(float(np.exp(np.mean(np.log([r[key] for r in report["results"]])))), 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
