"""Sampling speed on the fixture-A ADM architecture; prints one JSON object.

    python bench/bench_sampling.py [--batch 16|64] [--steps 10] [--repeats 5] [--weights fixture|random] [--plain-ops]

Measures (milliseconds, median of --repeats timed runs after a warm-up, block_until_ready; the
quantities are called in turn, one call each per round):
  unet_forward        one U-Net call (batch B)
  guidance_gradient   one classifier gradient s * grad log p(y | x_t) (batch B)
  step_unguided       one jitted DDIM step (U-Net + update + per-sample noise)
  step_cfg            one jitted DDIM step with classifier-free guidance (one call on 2B)
  step_classifier     one jitted classifier-guided DDIM step
  loop                the whole jitted lax.scan loop of N unguided DDIM steps
  loop_classifier     the same loop with classifier guidance (as sample.py builds it)
  loop_classifier_progress   the same with progress=True (a jax.debug.callback per step)
and checks the targets: loop <= 1.1 N step_unguided; step_cfg <= 2.1 step_unguided;
step_classifier <= 1.1 (step_unguided + guidance_gradient); loop_classifier <= 1.1 N
(unet_forward + guidance_gradient). `--plain-ops` adds unet_forward, guidance_gradient and
loop_classifier compiled with JAXDIFF_PLAIN_OPS=1 (XLA's own gradients, the convolutions' included:
the guided loop as it ran before jaxdiff.ops.conv, ~2x its parts). Timings are only meaningful on an
otherwise idle machine: the JSON records the load average at the start and the end. Run it with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` set, as docs/benchmarks.md says. Everything is compiled
with `jaxdiff.util.cpu.jit` (what sample.py runs); `--xla-defaults` uses plain `jax.jit`.
GFLOP/s counts convolution and matrix-product FLOPs (bench/common.py), next to the machine's
float32 matrix-product rate (`matmul_f32_gflops`).
"""

from __future__ import annotations

import argparse
import json
import os

import common  # first: puts this checkout's jaxdiff on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import guidance
from jaxdiff.diffusion import guides as G
from jaxdiff.diffusion import samplers as S
from jaxdiff.diffusion.schedules import make_schedule
from jaxdiff.util import cpu


def _random_params(module, *args, seed=0):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.05, s.dtype), shapes)


def load_models(weights: str):
    """(unet, unet_params, classifier, classifier_params): fixture A's weights, or random ones with
    a null label row in the U-Net (so CFG runs)."""
    from jaxdiff.models import create_model

    if weights == "fixture":
        from jaxdiff.convert.guided_diffusion import from_guided_diffusion

        fx = common.load_fixture()
        um, up = from_guided_diffusion(common.state_dict(fx, "unet"), "unet", **common.UNET_FLAGS)
        cm, cp = from_guided_diffusion(common.state_dict(fx, "classifier"), "classifier", **common.CLASSIFIER_FLAGS)
        return um, up, cm, cp
    x = jnp.zeros((1, 32, 32, 3))
    t = jnp.zeros((1,), jnp.int32)
    um = create_model("unet", **common.UNET_FLAGS, null_label=True)
    cm = create_model("classifier", **common.CLASSIFIER_FLAGS)
    return um, _random_params(um, x, t, t), cm, _random_params(cm, x, t, seed=1)


def compiled_with_plain_ops(fn, args):
    """`fn` (jitted) compiled for `args` with JAXDIFF_PLAIN_OPS=1, which is read at trace time."""
    old = os.environ.get("JAXDIFF_PLAIN_OPS")
    os.environ["JAXDIFF_PLAIN_OPS"] = "1"
    try:
        return fn.lower(*args).compile()
    finally:
        if old is None:
            del os.environ["JAXDIFF_PLAIN_OPS"]
        else:
            os.environ["JAXDIFF_PLAIN_OPS"] = old


def build(batch: int, steps: int = 10, weights: str = "random", xla_defaults: bool = False,
          plain_ops: bool = False) -> dict:
    """{name: (fn, args)} for the measured quantities at `batch`, respacing `steps`, step index
    steps // 2; fns are jitted with `jaxdiff.util.cpu.jit` (plain `jax.jit` with `xla_defaults`).
    step_cfg only with random weights (the fixture's U-Net has no null label); the *_plain_ops
    controls with `plain_ops`."""
    um, up, cm, cp = load_models(weights)
    params = {"unet": up, "classifier": cp}
    sched = make_schedule("cosine", 1000, str(steps))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    y = np.arange(batch) % 10
    ids = np.arange(batch)
    key = jax.random.key(0)
    cond = G.make_cond(batch, y, cfg_scale=3.0, classifier_scale=1.0)
    i = jnp.full((batch,), steps // 2, jnp.int32)
    t = sched.timestep_map[i]
    null_label = 10 if weights == "random" else None

    def guides(p, kind):
        return guidance.build_guides(kind, G.unet_fn(um, p["unet"]), logits_fn=G.logits_fn(cm, p["classifier"]),
                              null_label=null_label, learned_sigma=True)

    def one_step(kind):
        x0_fn = G.make_x0_fn()

        def step(p, x, i, cond, key, ids):
            model_fn, cond_fn = guides(p, kind)[:2]
            d = S.denoise(model_fn, sched, x, i, cond, learned_sigma=True, x0_fn=x0_fn, cond_fn=cond_fn)
            noise = S.step_noise(S.sample_keys(key, ids), i[0], x.shape[1:])
            return S.ddim_step(sched, x, i, d, noise, jnp.float32(0.0))

        return step

    jit = jax.jit if xla_defaults else cpu.jit
    # each call makes new functions: jit caches a trace per function, whatever JAXDIFF_PLAIN_OPS said
    forward = lambda: jit(lambda p, x, t, cond: G.unet_fn(um, p["unet"])(x, t, cond))  # noqa: E731
    gradient = lambda: jit(lambda p, x, t, cond: G.classifier_guide(G.logits_fn(cm, p["classifier"]))(x, t, cond))  # noqa: E731

    def loop(kind, progress=False):
        return S.make_sampler(lambda p: guides(p, kind), S.SamplerSpec("ddim", learned_sigma=True, progress=progress),
                              (32, 32, 3))

    step_args, part_args = (params, x, i, cond, key, ids), (params, x, t, cond)
    loop_args = (params, sched, cond, key, ids, 0.0, x)
    fns = {
        "unet_forward": (forward(), part_args),
        "guidance_gradient": (gradient(), part_args),
        "step_unguided": (jit(one_step("none")), step_args),
        "step_classifier": (jit(one_step("classifier")), step_args),
        "loop": (loop("none"), loop_args),
        "loop_classifier": (loop("classifier"), loop_args),
        "loop_classifier_progress": (loop("classifier", progress=True), loop_args),
    }
    if weights == "random":
        fns["step_cfg"] = (jit(one_step("cfg")), step_args)
    if plain_ops:
        for name, fn in (("unet_forward", forward()), ("guidance_gradient", gradient()),
                         ("loop_classifier", loop("classifier"))):
            fns[f"{name}_plain_ops"] = (compiled_with_plain_ops(fn, fns[name][1]), fns[name][1])
    return fns


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="batch size (16; 64 for the larger setting)")
    ap.add_argument("--steps", type=int, default=10, help="N, steps of the whole-loop measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", choices=("random", "fixture"), default="random",
                    help="random parameters (with a null label, so CFG runs) or the fixture's (no CFG)")
    ap.add_argument("--xla-defaults", action="store_true",
                    help="compile with plain jax.jit (XLA's default CPU options) instead of jaxdiff.util.cpu.jit")
    ap.add_argument("--plain-ops", action="store_true",
                    help="also the forward, gradient and guided loop compiled with JAXDIFF_PLAIN_OPS=1 (control)")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.steps < 2 or args.repeats < 1:
        ap.error(f"need --batch >= 1, --steps >= 2, --repeats >= 1; got {args.batch}, {args.steps}, {args.repeats}")

    N = args.steps
    res = {"benchmark": "sampling", "machine": common.machine(), "batch": args.batch, "steps": N,
           "repeats": args.repeats, "weights": args.weights,
           "compiled_with": "jax.jit (XLA defaults)" if args.xla_defaults else f"jaxdiff.util.cpu.jit {cpu.compiler_options()}",
           "matmul_f32_gflops": common.matmul_gflops()}
    fns = build(args.batch, N, args.weights, args.xla_defaults, args.plain_ops)
    times = common.interleaved({n: common.blocking(f, *a) for n, (f, a) in fns.items()}, args.repeats)
    for name, ms in times.items():
        res[f"{name}_ms"] = common.median(ms)
    for name in ("unet_forward", "guidance_gradient", "step_classifier"):
        gflop = common.count_flops(fns[name][0], *fns[name][1]) / 1e9
        res[f"{name}_gflop"] = round(gflop, 3)
        res[f"{name}_gflops"] = round(gflop / res[f"{name}_ms"] * 1e3, 1)
    res["loop_over_steps_x_step"] = res["loop_ms"] / (N * res["step_unguided_ms"])
    res["cfg_over_unguided"] = res.get("step_cfg_ms", float("nan")) / res["step_unguided_ms"]
    res["classifier_over_unguided_plus_gradient"] = res["step_classifier_ms"] / (
        res["step_unguided_ms"] + res["guidance_gradient_ms"])
    for sfx in ("", "_plain_ops") if args.plain_ops else ("",):
        parts = res[f"unet_forward{sfx}_ms"] + res[f"guidance_gradient{sfx}_ms"]
        res[f"loop_classifier{sfx}_per_step_ms"] = round(res[f"loop_classifier{sfx}_ms"] / N, 3)
        res[f"loop_classifier{sfx}_over_forward_plus_gradient"] = res[f"loop_classifier{sfx}_ms"] / (N * parts)
    res["loop_classifier_progress_over_loop_classifier"] = res["loop_classifier_progress_ms"] / res["loop_classifier_ms"]
    res["targets_met"] = {
        "loop <= 1.1 x steps x step": res["loop_over_steps_x_step"] <= 1.1,
        "cfg step <= 2.1 x unguided": (res["cfg_over_unguided"] <= 2.1) if "step_cfg_ms" in res else None,
        "classifier step <= 1.1 x (unguided + gradient)": res["classifier_over_unguided_plus_gradient"] <= 1.1,
        "classifier loop <= 1.1 x steps x (forward + gradient)": res["loop_classifier_over_forward_plus_gradient"] <= 1.1,
    }
    res["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
