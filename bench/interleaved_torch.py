"""jaxdiff's and guided-diffusion's training steps alternated step by step in one process; prints JSON.

    python bench/interleaved_torch.py [--batches 16,64] [--steps 15] [--warmup 2] [--threads 2]

The fixture-A diffusion training step of both (jaxdiff: `training.make_train_step` compiled with
`jaxdiff.cpu.jit`, as bench/bench_training.py; PyTorch: bench/bench_torch_reference.py's
guided-diffusion step with hybrid loss, AdamW and EMA, on `--threads` threads) runs in turn:
jaxdiff step, PyTorch step, jaxdiff step, ... Each timed step waits for its result. This VM's
speed drifts by +-30 % within minutes; whole runs alternated in separate processes
(bench/compare_torch.py) spread that drift over many seconds, here the two sides meet the same
machine state within a second of each other. Reported per batch: both medians, their ratio, and
the median and quartiles of the per-pair ratios (jaxdiff step / the PyTorch step right after it).
PyTorch's model is checked against the guided-diffusion fixture first, as bench_torch_reference
does; the run stops if that check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

import bench_torch_reference as ref
import common
from bench_training import build_step, fixture_a_config


def _quartiles(values: list) -> list:
    q = statistics.quantiles(values, n=4)
    return [round(q[0], 3), round(statistics.median(values), 3), round(q[2], 3)]


def duel(fx, batch: int, steps: int, warmup: int) -> dict:
    """Alternate the two training steps at `batch`; per-step wall times and their ratios."""
    built = build_step(*fixture_a_config("diffusion", batch, "float32"))
    step, images, labels = built["step"], built["images"], built["labels"]
    carry = [built["state"], built["acc"]]

    def jax_step():
        carry[0], carry[1] = step(carry[0], images, labels, carry[1])
        jax.block_until_ready(carry[0])

    unet, _ = ref.build_models(fx, "random")
    torch_step, losses = ref.make_train_step(fx, unet, batch, ema=True, hybrid=True)
    times = {"jaxdiff": [], "torch": []}
    for i in range(warmup + steps):
        for name, fn in (("jaxdiff", jax_step), ("torch", torch_step)):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    pairs = [j / t for j, t in zip(times["jaxdiff"], times["torch"])]
    mj, mt = statistics.median(times["jaxdiff"]), statistics.median(times["torch"])
    return {"batch": batch, "steps": steps, "warmup": warmup,
            "jaxdiff_ms_median": round(mj, 1), "torch_ms_median": round(mt, 1), "ratio_of_medians": round(mj / mt, 3),
            "pair_ratio_q1_median_q3": _quartiles(pairs), "pairs_at_or_below_1": sum(r <= 1.0 for r in pairs),
            "jaxdiff_ms": [round(v, 1) for v in times["jaxdiff"]], "torch_ms": [round(v, 1) for v in times["torch"]],
            "torch_loss_last": round(losses[-1], 5),
            "jaxdiff_mean_loss": round(float(carry[1]["sums"]["loss"]) / max(int(carry[1]["count"]), 1), 5)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="16,64")
    p.add_argument("--steps", type=int, default=15, help="timed steps per side and batch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's torch.set_num_threads")
    args = p.parse_args(argv)
    batches = [v.strip() for v in args.batches.split(",") if v.strip()]
    if not batches or not all(v.isdigit() and int(v) > 0 for v in batches):
        p.error(f"--batches must be a comma list of positive integers, got {args.batches!r}")
    if args.steps < 2 or args.warmup < 0 or args.threads < 1:
        p.error(f"need --steps >= 2, --warmup >= 0, --threads >= 1; got {args.steps}, {args.warmup}, {args.threads}")
    ref.th.set_num_threads(args.threads)
    ref.th.manual_seed(0)
    fx = ref.load_fixture()
    report = ref.check_report(fx)
    if not report["passed"]:
        print(json.dumps({"check": report}))
        return 1
    start = common.machine()
    results = []
    for b in batches:
        results.append(duel(fx, int(b), args.steps, args.warmup))
        print(json.dumps({k: v for k, v in results[-1].items() if not k.endswith("_ms")}), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "training step, jaxdiff and guided-diffusion PyTorch interleaved",
                      "machine_at_start": start, "torch": ref.th.__version__, "torch_threads": ref.th.get_num_threads(),
                      "torch_step": "forward, hybrid loss, backward, AdamW(lr 1e-4), EMA 0.9999",
                      "load_average_at_end": list(os.getloadavg()), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    from jaxdiff import cpu

    cpu.use_huge_page_malloc()  # as train.py / bench_training.py do
    sys.exit(main())
