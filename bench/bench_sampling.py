"""Sampling speed on the fixture-A ADM architecture; prints one JSON object.

    python bench/bench_sampling.py [--batch 16|64] [--steps 10] [--repeats 5] [--weights fixture|random]

Measures (milliseconds, median of --repeats timed runs after a warm-up, block_until_ready):
  unet_forward        one U-Net call (batch B)
  guidance_gradient   one classifier gradient s * grad log p(y | x_t) (batch B)
  step_unguided       one jitted DDIM step (U-Net + update + per-sample noise)
  step_cfg            one jitted DDIM step with classifier-free guidance (one call on 2B)
  step_classifier     one jitted classifier-guided DDIM step
  loop                the whole jitted lax.scan loop of N unguided DDIM steps
and checks the targets: loop <= 1.1 N step_unguided; step_cfg <= 2.1 step_unguided;
step_classifier <= 1.1 (step_unguided + guidance_gradient). Timings are only meaningful on an
otherwise idle machine: the JSON records the load average at the start and the end. Everything is
compiled with `jaxdiff.cpu.jit` (what sample.py runs); `--xla-defaults` uses plain `jax.jit`.
GFLOP/s counts convolution and matrix-product FLOPs (bench/common.py), next to the machine's
float32 matrix-product rate (`matmul_f32_gflops`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxdiff import cpu  # noqa: E402
from jaxdiff import guidance as G  # noqa: E402
from jaxdiff import samplers as S  # noqa: E402
from jaxdiff.schedules import make_schedule  # noqa: E402

from common import CLASSIFIER_FLAGS, FIXTURE, UNET_FLAGS, count_flops, machine, matmul_gflops  # noqa: E402


def _random_params(module, *args, seed=0):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.05, s.dtype), shapes)


def load_models(weights: str, null_label: bool):
    """(unet, unet_params, classifier, classifier_params). The U-Net gets a null label row for CFG."""
    from jaxdiff.models import create_model

    if weights == "fixture" and not null_label:
        from jaxdiff.convert import from_guided_diffusion

        with np.load(FIXTURE) as f:
            d = {k: f[k] for k in f.files}
        sd = lambda p: {k[len(p) + 1:]: v for k, v in d.items() if k.startswith(p + "/")}
        um, up = from_guided_diffusion(sd("unet"), "unet", **UNET_FLAGS)
        cm, cp = from_guided_diffusion(sd("classifier"), "classifier", **CLASSIFIER_FLAGS)
        return um, up, cm, cp
    x = jnp.zeros((1, 32, 32, 3))
    t = jnp.zeros((1,), jnp.int32)
    um = create_model("unet", **UNET_FLAGS, null_label=null_label)
    cm = create_model("classifier", **CLASSIFIER_FLAGS)
    return um, _random_params(um, x, t, t), cm, _random_params(cm, x, t, seed=1)


def timeit(fn, *args, repeats: int) -> float:
    """Median wall time in ms of fn(*args) (blocked until ready), after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="batch size (16; 64 for the larger setting)")
    ap.add_argument("--steps", type=int, default=10, help="N, steps of the whole-loop measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", choices=("random", "fixture"), default="random",
                    help="random parameters (with a null label, so CFG runs) or the fixture's (no CFG)")
    ap.add_argument("--xla-defaults", action="store_true",
                    help="compile with plain jax.jit (XLA's default CPU options) instead of jaxdiff.cpu.jit")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    B, N = args.batch, args.steps
    um, up, cm, cp = load_models(args.weights, null_label=args.weights == "random")
    params = {"unet": up, "classifier": cp}
    sched = make_schedule("cosine", 1000, str(N))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, 32, 32, 3)), jnp.float32)
    y = np.arange(B) % 10
    ids = np.arange(B)
    key = jax.random.key(0)
    cond = G.make_cond(B, y, cfg_scale=3.0, classifier_scale=1.0)
    i = jnp.full((B,), N // 2, jnp.int32)
    t = sched.timestep_map[i]

    def guides(p, kind):
        return G.build_guides(kind, G.unet_fn(um, p["unet"]), logits_fn=G.logits_fn(cm, p["classifier"]),
                              null_label=10 if args.weights == "random" else None, learned_sigma=True)

    jit = jax.jit if args.xla_defaults else cpu.jit
    forward_fn = lambda p, x, t, cond: G.unet_fn(um, p["unet"])(x, t, cond)
    gradient_fn = lambda p, x, t, cond: G.classifier_guide(G.logits_fn(cm, p["classifier"]))(x, t, cond)
    unet_forward, gradient = jit(forward_fn), jit(gradient_fn)

    def one_step(kind):
        x0_fn = G.make_x0_fn()

        def step(p, x, i, cond, key, ids):
            model_fn, cond_fn = guides(p, kind)
            d = S.denoise(model_fn, sched, x, i, cond, learned_sigma=True, x0_fn=x0_fn, cond_fn=cond_fn)
            noise = S.step_noise(S.sample_keys(key, ids), i[0], x.shape[1:])
            return S.ddim_step(sched, x, i, d, noise, jnp.float32(0.0))

        return step

    gflop = {"unet_forward": count_flops(forward_fn, params, x, t, cond) / 1e9,
             "guidance_gradient": count_flops(gradient_fn, params, x, t, cond) / 1e9,
             "step_classifier": count_flops(one_step("classifier"), params, x, i, cond, key, ids) / 1e9}

    res = {"device": str(jax.devices()[0]), "device_count": jax.device_count(), "platform": platform.platform(),
           "jax": jax.__version__, "batch": B, "steps": N, "repeats": args.repeats, "weights": args.weights}
    res["compiled_with"] = "jax.jit (XLA defaults)" if args.xla_defaults else f"jaxdiff.cpu.jit {cpu.compiler_options()}"
    res["machine"] = machine()
    res["matmul_f32_gflops"] = matmul_gflops()
    res["unet_forward_ms"] = timeit(unet_forward, params, x, t, cond, repeats=args.repeats)
    res["guidance_gradient_ms"] = timeit(gradient, params, x, t, cond, repeats=args.repeats)
    res["step_unguided_ms"] = timeit(jit(one_step("none")), params, x, i, cond, key, ids, repeats=args.repeats)
    if args.weights == "random":
        res["step_cfg_ms"] = timeit(jit(one_step("cfg")), params, x, i, cond, key, ids, repeats=args.repeats)
    res["step_classifier_ms"] = timeit(jit(one_step("classifier")), params, x, i, cond, key, ids, repeats=args.repeats)
    loop = S.make_sampler(lambda p: guides(p, "none"), S.SamplerSpec("ddim", learned_sigma=True), (32, 32, 3))
    res["loop_ms"] = timeit(loop, params, sched, cond, key, ids, 0.0, x, repeats=args.repeats)

    for name, g in gflop.items():
        res[f"{name}_gflop"] = round(g, 3)
        res[f"{name}_gflops"] = round(g / res[f"{name}_ms"] * 1e3, 1)
    res["loop_over_steps_x_step"] = res["loop_ms"] / (N * res["step_unguided_ms"])
    res["cfg_over_unguided"] = res.get("step_cfg_ms", float("nan")) / res["step_unguided_ms"]
    res["classifier_over_unguided_plus_gradient"] = res["step_classifier_ms"] / (
        res["step_unguided_ms"] + res["guidance_gradient_ms"])
    res["targets_met"] = {
        "loop <= 1.1 x steps x step": res["loop_over_steps_x_step"] <= 1.1,
        "cfg step <= 2.1 x unguided": (res["cfg_over_unguided"] <= 2.1) if "step_cfg_ms" in res else None,
        "classifier step <= 1.1 x (unguided + gradient)": res["classifier_over_unguided_plus_gradient"] <= 1.1,
    }
    res["loadavg_1min_start"] = load_start
    res["loadavg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    cpu.use_huge_page_malloc()  # as train.py / sample.py do
    main()
