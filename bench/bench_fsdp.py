"""Training-step time and memory with FSDP vs data parallelism on 8 CPU devices; prints JSON.

    python bench/bench_fsdp.py [--batch 32] [--iters 5] [--warmup 2] [--meshes 8x1,1x8,2x4] [--accum 1]
                               [--min-shard-size N]

The fixture-A diffusion step (bench_training.fixture_a_config: 32x32x3, learned sigma, hybrid
loss) as train.py runs it (`training.lower_train_step`: explicit in/out shardings, state donated),
on a (data, fsdp) mesh of 8 host-platform CPU devices per case ("8x1" = data parallel, "1x8" =
FSDP over all, "2x4" = both). Reports the median step time, XLA's temporary bytes per device and
the train state's bytes per device. The 8 devices share this machine's cores: the figures compare
layouts and show the collectives' cost, not a pod's speed. XLA_FLAGS gets
--xla_force_host_platform_device_count=8 when it has no device count (set before JAX starts).
"""

from __future__ import annotations

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
from bench_training import fixture_a_config  # noqa: E402

from jaxdiff import parallel
from jaxdiff.train import config as train_config
from jaxdiff.train import state as train_state
from jaxdiff.train import step as train_step  # noqa: E402


def bench_mesh(data: int, fsdp: int, batch: int, accum: int, warmup: int, iters: int, min_size: int) -> dict:
    cfg, info = fixture_a_config("diffusion", batch, "float32")
    cfg.mesh.update(data=data, fsdp=fsdp, min_shard_size=min_size)
    cfg.train.grad_accum_steps = accum
    resolved = train_config.resolve_config(cfg, info)
    model, tx = train_config.create_model(resolved), train_state.make_optimizer(resolved.train)
    mesh = train_step.train_mesh(resolved)
    t0 = time.perf_counter()
    compiled = train_step.lower_train_step(resolved, mesh).compile()
    compile_s = time.perf_counter() - t0
    _, shardings, init_fn = train_step.state_layout(resolved, model, tx, mesh)
    state = init_fn(jax.random.key(0))
    repl = parallel.replicated_sharding(mesh)
    acc = jax.device_put(train_step.zero_accumulator(train_step.metric_names(resolved)), repl)
    batch_sh = parallel.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32), batch_sh)
    labels = jax.device_put(rng.integers(0, 10, batch).astype(np.int32), batch_sh)
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        state, acc = compiled(state, images, labels, acc)
        jax.block_until_ready(state)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    mem = compiled.memory_analysis()
    return {"mesh": f"data={data} x fsdp={fsdp}", "batch": batch, "grad_accum_steps": accum, "min_shard_size": min_size,
            "ms_per_step_median": round(statistics.median(times), 2), "ms_per_step_min": round(min(times), 2),
            "temp_bytes_per_device": int(mem.temp_size_in_bytes),
            "state_bytes_per_device": int(max(parallel.addressable_bytes(state).values())),
            "state_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))),
            "compile_s": round(compile_s, 2), "iters": iters, "warmup": warmup}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--accum", type=int, default=1, help="train.grad_accum_steps")
    p.add_argument("--meshes", default="8x1,1x8,2x4", help="data x fsdp sizes")
    p.add_argument("--min-shard-size", type=int, default=parallel.DEFAULT_MIN_SHARD_SIZE,
                   help="config.mesh.min_shard_size (fixture A is small: most of its arrays are below the default)")
    args = p.parse_args(argv)
    results = []
    for m in args.meshes.split(","):
        data, fsdp = (int(v) for v in m.split("x"))
        results.append(bench_mesh(data, fsdp, args.batch, args.accum, args.warmup, args.iters, args.min_shard_size))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "fsdp_vs_data_parallel", "machine": common.machine(), "results": results},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
