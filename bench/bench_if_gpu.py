"""DeepFloyd IF at full size on one accelerator: T5-v1.1-XXL's encoder on 64 captions of 77 tokens, and one
classifier-free-guided step of IF-I-XL stage I at batch 16 (64x64: the U-Net on 32 rows [empty caption;
caption], eps = eps_u + s (eps_c - eps_u), the DDPM update), bfloat16 parameters and compute, random weights
(the timings do not depend on their values); prints JSON.

    python bench/bench_if_gpu.py [--rounds 10] [--small]

--small runs the same program on the test fixture's tiny configurations (a CPU smoke run). Times are medians
of `--rounds` calls after one warm-up (compile) call, each ended by block_until_ready.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import common  # noqa: E402  (puts this checkout first on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_if_memory import IF_I_XL, T5_XXL  # noqa: E402

from jaxdiff.convert.diffusers import unet2d_config, unet2d_module  # noqa: E402
from jaxdiff.models import t5  # noqa: E402


def _median_ms(fn, rounds: int) -> tuple[float, float]:
    """(compile + first call ms, median ms of `rounds` further calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return first, float(np.median(times))


def _bf16_params(module, *args):
    """Random parameters made on the device, then cast to bfloat16 (float32 init, as the converters store)."""
    init = jax.jit(lambda k: jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16),
                                                    module.init(k, *args)["params"]))
    return init(jax.random.key(0))


def _n(tree) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--small", action="store_true", help="the tiny fixture configurations (CPU smoke run)")
    a = p.parse_args(argv)
    if a.small:
        import json

        with np.load(os.path.join(REPO, "tests", "fixtures", "if_tiny_a.npz")) as z:
            t5_json, unet_json = json.loads(str(z["t5_config"])), json.loads(str(z["unet1_config"]))
        batch, captions, size = 2, 4, unet_json.get("sample_size", 16)
    else:
        t5_json, unet_json, batch, captions, size = T5_XXL, IF_I_XL, 16, 64, 64
    length = 77
    out = {"machine": common.machine(), "device": str(jax.devices()[0]), "backend": jax.default_backend()}

    # T5 encoder: 64 captions of 77 tokens, a third of them padding
    enc = t5.T5Encoder(t5.t5_config_from_json(t5_json), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(2, t5_json["vocab_size"], (captions, length)), jnp.int32)
    mask = jnp.asarray(np.arange(length)[None] < rng.integers(length // 3, length, (captions, 1)))
    tp = _bf16_params(enc, tokens[:1], mask[:1])
    encode = jax.jit(lambda p, tok, m: enc.apply({"params": p}, tok, m))
    first, ms = _median_ms(lambda: encode(tp, tokens, mask), a.rounds)
    out["t5"] = {"parameters": _n(tp), "captions": captions, "tokens": length, "first_ms": first, "median_ms": ms}
    states = encode(tp, tokens[:batch + 1], mask[:batch + 1])


    # one CFG step of stage I: the U-Net on [empty caption rows; caption rows]
    cfg = unet2d_config(unet_json)
    unet = unet2d_module(cfg, "bfloat16")
    c = cfg.in_channels
    x = jax.random.normal(jax.random.key(1), (batch, size, size, c), jnp.float32)
    t = jnp.full((batch,), 500, jnp.int32)
    ctx = jnp.concatenate([jnp.repeat(states[-1:], batch, 0), states[:batch]], 0)  # [uncond; cond]
    up = _bf16_params(unet, x[:1], t[:1], ctx[:1])
    alpha_bar, alpha_bar_prev, beta = 0.5, 0.55, 0.1

    def cfg_step(p, x, t, ctx, key, scale=7.0):
        out = unet.apply({"params": p}, jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), ctx)
        out = out.astype(jnp.float32)
        (eps_u, _), (eps_c, var_c) = (jnp.split(h, [c], -1) for h in jnp.split(out, 2, 0))
        eps = eps_u + scale * (eps_c - eps_u)
        x0 = jnp.clip((x - jnp.sqrt(1 - alpha_bar) * eps) / jnp.sqrt(alpha_bar), -1, 1)
        mean = (jnp.sqrt(alpha_bar_prev) * beta * x0 + jnp.sqrt(1 - beta) * (1 - alpha_bar_prev) * x) / (1 - alpha_bar)
        log_var = (var_c + 1) / 2 * jnp.log(beta)  # learned range (the lower end, for the timing only)
        return mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, x.shape)

    step = jax.jit(cfg_step)
    first, ms = _median_ms(lambda: step(up, x, t, ctx, jax.random.key(2)), a.rounds)
    out["if_stage1_cfg_step"] = {"parameters": _n(up), "batch": batch, "unet_rows": 2 * batch, "size": size,
                                 "first_ms": first, "median_ms": ms}
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats:
        out["peak_bytes_in_use"] = int(stats.get("peak_bytes_in_use", 0))
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=1))
