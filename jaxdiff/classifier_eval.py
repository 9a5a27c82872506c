"""Classifier accuracy against the diffusion timestep, and the class accuracy of CFG samples.

    accuracy_vs_t(module, params, images, labels, sched, ts, *, noised=True, batch_size=256, seed=0)
        -> {t: accuracy}
    cfg_accuracy(diffusion_dir, classifier_dir, *, scale=3.0, steps=50, per_class=50, seed=0,
                 batch_size=250, diffusion_step=None) -> dict

Command line (prints JSON):

    python -m jaxdiff.classifier_eval accuracy --workdir W [--ts 0,100,250,500,750,999] [--split test]
    python -m jaxdiff.classifier_eval cfg --diffusion W_DIFF --classifier W_EVALCLS [--scale 3] [--steps 50]
        [--per_class 50] [--step N]

`accuracy` evaluates a classifier workdir on a split at fixed timesteps: the images are q_sample'd
to x_t with noise drawn from fold_in(key(seed), t) (the same for every run), and the classifier
sees the original timestep t. A classifier trained without noise (train.noised=False) is evaluated
on the clean images at t = 0 (`noised=False`). `cfg` draws `per_class` samples of every class with
classifier-free guidance (Imagen convention: s = 1 conditional; DDIM, `steps` steps) from a trained
diffusion workdir and reports the fraction the evaluation classifier assigns to the requested class.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import cpu
from jaxdiff import diffusion as diffusion_lib
from jaxdiff import schedules


def _logits_fn(module):
    @cpu.jit
    def fn(params, x, t):
        return module.apply({"params": params}, x, t).astype(jnp.float32)

    return fn


def accuracy_vs_t(module, params, images, labels, sched: schedules.Schedule, ts: Sequence[int], *,
                  noised: bool = True, batch_size: int = 256, seed: int = 0, logits=None) -> dict:
    """{t: top-1 accuracy} of a classifier on x_t = q_sample(images, t) for each schedule index t."""
    images = jnp.asarray(images, jnp.float32)
    labels = np.asarray(labels)
    logits = logits or _logits_fn(module)
    key = jax.random.key(int(seed))
    out = {}
    for t in ts:
        t = int(t)
        if not 0 <= t < sched.num_steps:
            raise ValueError(f"timestep {t} is outside the schedule's 0..{sched.num_steps - 1}")
        correct = 0
        for start in range(0, len(labels), batch_size):
            x0 = images[start: start + batch_size]
            b = x0.shape[0]
            tt = jnp.full((b,), t, jnp.int32)
            if noised:
                noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, t), start), x0.shape)
                x = diffusion_lib.q_sample(sched, x0, tt, noise)
            else:
                x = x0
            pred = np.asarray(jnp.argmax(logits(params, x, sched.timestep_map[tt]), -1))
            correct += int(np.sum(pred == labels[start: start + b]))
        out[t] = correct / max(len(labels), 1)
    return out


def default_ts(num_timesteps: int) -> list:
    T = int(num_timesteps)
    return sorted({0, T // 10, T // 4, T // 2, (3 * T) // 4, T - 1})


def make_eval_fn(resolved, module, split: str | None = None, ts: Sequence[int] | None = None):
    """fn(params) -> {"eval_acc_t<t>": accuracy} on the evaluation split, for the training loop."""
    from jaxdiff import data as data_lib

    split = split or (resolved.data.get("eval_split") or "test")
    images, labels = data_lib.load_split(resolved.data.name, split, resolved.data.data_dir,
                                         image_size=int(resolved.data.image_size))
    images = data_lib.to_model_range(images)
    sched = schedules.make_schedule(resolved.diffusion.schedule, int(resolved.diffusion.num_timesteps))
    noised = bool(resolved.train.get("noised", True))
    if ts is None:
        ts = default_ts(resolved.diffusion.num_timesteps) if noised else [0]
    logits = _logits_fn(module)

    def fn(params):
        params = jax.device_get(params) if jax.process_count() == 1 else params
        acc = accuracy_vs_t(module, params, images, labels, sched, ts, noised=noised, logits=logits)
        return {f"eval_acc_t{t}": a for t, a in acc.items()}

    return fn


def evaluate_workdir(workdir: str, *, split: str = "test", ts: Sequence[int] | None = None,
                     seed: int = 0) -> dict:
    """Accuracy against t of the classifier trained in `workdir` (EMA parameters)."""
    from jaxdiff import checkpoints
    from jaxdiff import data as data_lib

    module, params, cfg = checkpoints.load_model(workdir)
    d = cfg["diffusion"]
    sched = schedules.make_schedule(d["schedule"], int(d["num_timesteps"]))
    images, labels = data_lib.load_split(cfg["data"]["name"], split, cfg["data"]["data_dir"],
                                         image_size=int(cfg["model"]["image_size"]))
    noised = bool(cfg["train"].get("noised", True))
    if ts is None:
        ts = default_ts(d["num_timesteps"]) if noised else [0]
    acc = accuracy_vs_t(module, params, data_lib.to_model_range(images), labels, sched, ts,
                        noised=noised, seed=seed)
    return {"workdir": workdir, "split": split, "step": cfg.get("step"), "noised": noised,
            "num_examples": int(len(labels)), "accuracy": {str(t): a for t, a in acc.items()}}


def cfg_accuracy(diffusion_dir: str, classifier_dir: str, *, scale: float = 3.0, steps: int = 50,
                 per_class: int = 50, seed: int = 0, batch_size: int = 250,
                 diffusion_step: int | None = None) -> dict:
    """Fraction of CFG samples (DDIM `steps`, scale `scale`) classified as their requested class
    (EMA weights of the latest checkpoint, or of `diffusion_step`)."""
    from jaxdiff import checkpoints, guidance, parallel, samplers

    unet, uparams, ucfg = checkpoints.load_model(diffusion_dir, step=diffusion_step)
    clf, cparams, ccfg = checkpoints.load_model(classifier_dir)
    d = ucfg["diffusion"]
    num_classes = int(ucfg["model"]["num_classes"])
    null = bool(ucfg["model"].get("null_label"))
    if not null and scale != 1.0:
        raise ValueError(f"{diffusion_dir} was trained without label dropout (p_uncond = 0): "
                         "it cannot do classifier-free guidance")
    sched = schedules.make_schedule(d["schedule"], int(d["num_timesteps"]), f"ddim{steps}")
    s = int(ucfg["model"]["image_size"])
    shape = (s, s, int(ucfg["model"]["in_channels"]))

    def build(p):
        return guidance.build_guides("cfg" if null else "none", guidance.unet_fn(unet, p),
                                     null_label=num_classes if null else None,
                                     learned_sigma=bool(d["learned_sigma"]))

    run = samplers.make_sampler(build, samplers.SamplerSpec(sampler="ddim", prediction=d["prediction"],
                                                            learned_sigma=bool(d["learned_sigma"])), shape)
    y = np.repeat(np.arange(num_classes), per_class)
    ids = np.arange(len(y))
    key = jax.random.key(int(seed))
    logits = _logits_fn(clf)
    t0 = time.time()
    preds = []
    mesh = parallel.data_mesh()
    for start in range(0, len(y), batch_size):
        rows = slice(start, start + batch_size)
        cond = guidance.make_cond(len(y[rows]), y[rows], **({guidance.CFG_SCALE: scale} if null else {}))
        x = parallel.sample_batch_sharded(run, uparams, sched, cond, key, ids[rows], mesh=mesh)
        x = np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255) / 127.5 - 1.0  # as saved to uint8
        xt = jnp.asarray(x, jnp.float32)
        preds.append(np.asarray(jnp.argmax(logits(cparams, xt, jnp.zeros((xt.shape[0],), jnp.int32)), -1)))
    preds = np.concatenate(preds)
    per = {int(c): float(np.mean(preds[y == c] == c)) for c in range(num_classes)}
    return {"accuracy": float(np.mean(preds == y)), "per_class": per, "scale": scale, "steps": steps,
            "num_samples": int(len(y)), "sample_seconds": time.time() - t0,
            "diffusion_step": ucfg.get("step"), "classifier_step": ccfg.get("step")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdiff.classifier_eval")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy", help="classifier accuracy against t")
    a.add_argument("--workdir", required=True)
    a.add_argument("--split", default="test")
    a.add_argument("--ts", default=None, help="comma-separated timesteps (default: a spread over T)")
    c = sub.add_parser("cfg", help="class accuracy of classifier-free-guided samples")
    c.add_argument("--diffusion", required=True)
    c.add_argument("--classifier", required=True)
    c.add_argument("--scale", type=float, default=3.0)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--per_class", type=int, default=50)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--step", type=int, default=None, help="diffusion checkpoint step (default: latest)")
    args = p.parse_args(argv)
    if args.cmd == "accuracy":
        ts = None if args.ts is None else [int(v) for v in args.ts.split(",") if v.strip()]
        out = evaluate_workdir(args.workdir, split=args.split, ts=ts)
    else:
        out = cfg_accuracy(args.diffusion, args.classifier, scale=args.scale, steps=args.steps,
                           per_class=args.per_class, seed=args.seed, diffusion_step=args.step)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
