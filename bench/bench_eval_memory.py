"""Peak host memory of jaxdiff.eval.adm.evaluate on a 50,000-image sample file.

Writes synthetic files to a temporary directory (random uint8 images: 50,000 samples and a 10,000-image
reference batch at 64x64 by default, streamed to disk so writing them takes little memory), runs the
streaming, sharded evaluation and prints JSON: the metrics, the times, and the process's peak resident
memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: everything the process held at its peak, Python,
numpy, XLA's buffers and the JAX runtime; not tracemalloc, which sees only Python's allocations) before
and after the evaluation. The issue's target is under 4 GB.

The feature function is a parameter of ``run``; the command line uses a stand-in (fixed random
projections of the pixels, ``projection_features``) with ``--dims`` output sizes, e.g.
``--dims 2048,2023,1008`` for Inception's (slow on a CPU).

    python bench/bench_eval_memory.py [--num-samples 50000] [--num-ref 10000] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import common  # first: puts this checkout's jaxdiff on sys.path
import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def projection_features(dims: tuple, image_size: int, seed: int = 0):
    """(feature_fn, params): fixed random projections of the pixels to `dims` = (pool3, spatial,
    logits) sizes, with the keys adm_eval reads; a stand-in for Inception (memory is measured, not
    the metrics)."""
    import jax
    import jax.numpy as jnp

    d_in = image_size * image_size * 3
    params = (np.random.default_rng(seed).standard_normal((d_in, sum(dims))) / np.sqrt(d_in)).astype(np.float32)
    splits = list(np.cumsum(dims)[:-1])

    def feature_fn(w, images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 127.5 - 1.0
        pool3, spatial, logits = jnp.split(x @ w, splits, axis=1)
        return {"pool3": jax.nn.relu(pool3), "spatial": spatial, "logits_unbiased": logits, "logits": logits}

    return feature_fn, params


def write_random_images(path: str, n: int, size: int, seed: int) -> None:
    """n random uint8 [size, size, 3] images as arr_0, written 1000 at a time."""
    from jaxdiff.eval import adm as adm_eval

    rng = np.random.default_rng(seed)
    chunks = (rng.integers(0, 256, (min(1000, n - s), size, size, 3), dtype=np.uint8) for s in range(0, n, 1000))
    adm_eval.write_npz(path, {"arr_0": adm_eval.Rows((n, size, size, 3), np.uint8, chunks)})


def run(feature_fn, params, *, num_samples: int, num_ref: int, image_size: int, batch_size: int,
        distance: str, workdir: str) -> dict:
    from jaxdiff.eval import adm as adm_eval

    ref, samples = os.path.join(workdir, "ref.npz"), os.path.join(workdir, "samples.npz")
    t0 = time.perf_counter()
    write_random_images(ref, num_ref, image_size, 0)
    write_random_images(samples, num_samples, image_size, 1)
    t1 = time.perf_counter()
    before = _peak_rss_mb()
    metrics = adm_eval.evaluate(ref, samples, feature_fn, params, batch_size=batch_size, distance=distance,
                                progress=False)
    t2 = time.perf_counter()
    return {"metrics": metrics, "num_samples": num_samples, "num_reference": num_ref, "image_size": image_size,
            "samples_file_mb": os.path.getsize(samples) / 2**20, "write_s": t1 - t0, "evaluate_s": t2 - t1,
            "peak_rss_mb_before_evaluate": before, "peak_rss_mb": _peak_rss_mb(),
            "memory_measure": "ru_maxrss (peak resident set of the whole process)"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--num-ref", type=int, default=10_000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dims", default="64,48,32", help="pool3,spatial,logits sizes of the stand-in features")
    p.add_argument("--distance", default="float16", choices=("float16", "float32"))
    args = p.parse_args(argv)

    dims = tuple(int(d) for d in args.dims.split(","))
    feature_fn, params = projection_features(dims, args.image_size)
    with tempfile.TemporaryDirectory(prefix="bench_eval_memory-") as workdir:
        out = run(feature_fn, params, num_samples=args.num_samples, num_ref=args.num_ref,
                  image_size=args.image_size, batch_size=args.batch_size, distance=args.distance,
                  workdir=workdir)
    out.update(features="random projections of the pixels (projection_features)", dims=dims,
               machine=common.machine())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
