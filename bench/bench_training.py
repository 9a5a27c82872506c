"""Milliseconds per training step (forward, backward, AdamW, EMA) of jaxdiff's train steps; prints JSON.

    python bench/bench_training.py [--batches 16,64] [--iters 10] [--warmup 2] [--which all]

Cases:
  fixture_a_unet         diffusion step (learned sigma, hybrid loss, label dropout) of the fixture-A
                         U-Net: image_size 32, in 3, model_channels 32, out 6, num_res_blocks 2,
                         attention ds (2, 4), channel_mult (1, 2, 2), num_classes 10, head channels 16,
                         scale-shift norm, BigGAN up/down
  fixture_a_classifier   noisy-classifier step of the same trunk (EncoderUNetModel, attention pool)
  digits_unet / digits_classifier / digits_eval_classifier
                         the shipped configs/digits*.py at their own batch size
Each case is the real jitted `training.make_train_step` on one device with synthetic data (no
dataset needed); the time is the median of `--iters` steps after `--warmup` steps, each step
waited for with block_until_ready. Compile time is reported separately. Steps are compiled with
`jaxdiff.util.cpu.jit` (what train.py runs); `--xla-defaults` compiles them with plain `jax.jit` for an
A/B comparison. Run it with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` set, as docs/benchmarks.md
says. GFLOP/s counts the step's convolution and matrix-product FLOPs (bench/common.py)
and is reported next to the machine's float32 2048^3 matrix-product rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import common  # first: puts this checkout's jaxdiff on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data.sources import DataInfo
from jaxdiff.diffusion import schedules
from jaxdiff.train import config as train_config
from jaxdiff.train import state as train_state
from jaxdiff.train import step as train_step
from jaxdiff.util import cpu

_ARCH_KEYS = ("model_channels", "num_res_blocks", "attention_resolutions", "channel_mult", "num_head_channels",
              "num_heads", "use_scale_shift_norm", "resblock_updown", "dropout", "use_new_attention_order")
FIXTURE_A = {k: common.UNET_FLAGS[k] for k in _ARCH_KEYS}


def _info(size, channels, num_classes=10):
    return DataInfo(name="synthetic", split="train", num_examples=10 ** 6, image_shape=(size, size, channels),
                    num_classes=num_classes, class_names=tuple(map(str, range(num_classes))), random_flip=False,
                    resize_mode="resize", pad_value=0, data_dir="")


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, common.ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def fixture_a_config(task: str, batch: int, dtype: str):
    c = train_config.default_config(task)
    c.model.update(FIXTURE_A)
    c.model.dtype = dtype
    if task == "classifier":
        c.model.pool = "attention"
    c.diffusion.update(schedule="linear", num_timesteps=1000, learned_sigma=True, p_uncond=0.1)
    c.train.batch_size = batch
    return c, _info(32, 3)


def build_step(config, info, *, xla_defaults: bool = False) -> dict:
    """The compiled train step of `config` on synthetic data, as a dict: run() (one step on a fixed
    batch, waited for; the state and metric accumulator it carries are donated each step), carry
    ([state, acc]), mean_loss() (over the steps run), resolved, flops, compile_s, init_s."""
    resolved = train_config.resolve_config(config, info)
    model = train_config.create_model(resolved)
    tx = train_state.make_optimizer(resolved.train)
    sched = schedules.make_schedule(resolved.diffusion.schedule, int(resolved.diffusion.num_timesteps))
    init_key, train_key, _ = train_state.root_keys(0)
    t0 = time.perf_counter()
    state = jax.jit(lambda k: train_state.init_state(resolved, model, tx, k))(init_key)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    b, s, c = int(resolved.train.batch_size), int(resolved.data.image_size), int(resolved.data.channels)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, int(resolved.data.num_classes), b).astype(np.int32))
    acc = train_step.zero_accumulator(train_step.metric_names(resolved))
    step_fn = train_step.make_train_step(resolved, model, tx, sched, train_key)
    flops = common.count_flops(step_fn, state, images, labels, acc)
    step = (jax.jit if xla_defaults else cpu.jit)(step_fn, donate_argnums=(0, 3))
    t0 = time.perf_counter()
    compiled = step.lower(state, images, labels, acc).compile()
    compile_s = time.perf_counter() - t0
    carry = [state, acc]

    def run():
        carry[0], carry[1] = compiled(carry[0], images, labels, carry[1])
        jax.block_until_ready(carry[0])

    def mean_loss():
        return float(carry[1]["sums"]["loss"]) / max(int(carry[1]["count"]), 1)

    return {"resolved": resolved, "run": run, "carry": carry, "mean_loss": mean_loss, "flops": flops,
            "compile_s": compile_s, "init_s": init_s}


def bench_case(name: str, config, info, *, warmup: int, iters: int, xla_defaults: bool = False) -> dict:
    built = build_step(config, info, xla_defaults=xla_defaults)
    resolved, flops = built["resolved"], built["flops"]
    times = common.interleaved({"step": built["run"]}, iters, warmup)["step"]
    b, s = int(resolved.train.batch_size), int(resolved.data.image_size)
    return {
        "case": name, "task": resolved.task, "batch": b, "image_size": s, "dtype": resolved.model.dtype,
        "params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(built["carry"][0].params))),
        "ms_per_step_median": common.median(times),
        "gflop_per_step": round(flops / 1e9, 2),
        "gflops_at_median": round(flops / common.median(times) / 1e6, 1),
        "compiled_with": "jax.jit (XLA defaults)" if xla_defaults else f"jaxdiff.util.cpu.jit {cpu.compiler_options()}",
        "ms_per_step_min": round(min(times), 3), "iters": iters, "warmup": warmup,
        "compile_s": round(built["compile_s"], 2), "init_s": round(built["init_s"], 2),
        "mean_loss": round(built["mean_loss"](), 5),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="16,64", help="fixture-A batch sizes")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=train_config.DTYPES, help="fixture-A compute dtype")
    p.add_argument("--xla-defaults", action="store_true",
                   help="compile with plain jax.jit (XLA's default CPU options) instead of jaxdiff.util.cpu.jit")
    p.add_argument("--which", default="all",
                   help="comma list of: fixture_a_unet, fixture_a_classifier, digits (all three digits configs)")
    args = p.parse_args(argv)
    which = set(args.which.split(",")) if args.which != "all" else {"fixture_a_unet", "fixture_a_classifier", "digits"}
    machine = common.machine()
    results = []
    for batch in [int(v) for v in args.batches.split(",") if v.strip()]:
        for task, case in (("diffusion", "fixture_a_unet"), ("classifier", "fixture_a_classifier")):
            if case in which:
                cfg, info = fixture_a_config(task, batch, args.dtype)
                results.append(bench_case(case, cfg, info, warmup=args.warmup, iters=args.iters,
                                           xla_defaults=args.xla_defaults))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if "digits" in which:
        for name in ("digits", "digits_classifier", "digits_eval_classifier"):
            cfg = _load_config(name)
            results.append(bench_case(name, cfg, _info(8, 1), warmup=args.warmup, iters=args.iters,
                                       xla_defaults=args.xla_defaults))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    out = {"benchmark": "training_step", "machine": machine, "matmul_f32_gflops": common.matmul_gflops(),
           "results": results}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
