"""Input-pipeline throughput (images/s of one process) with 1 and N decode workers; prints JSON.

    python bench/bench_data_loader.py [--workers 1,4] [--steps 20] [--batch 256] [--examples 4096]

Cases, each read from array_record files (the path a prepared tfds dataset takes: record read,
protobuf parse, PNG decode, resize, flips, scaling to [-1, 1]):
  fashion_mnist_32   Fashion-MNIST train (28x28x1 from Debian's dataset-fashion-mnist), padded to
                     32x32, flips on; in_memory=False so every batch is decoded
  synthetic_64       a tfds dataset written here: `--examples` smooth random 72x72x3 images (PNG,
                     zlib level 6), centre-cropped/resized to 64x64 as ImageNet-64 would be
Each case runs `jaxdiff.data.batching.batches` for `--steps` steps after one warm-up step, per worker
count, and checks that the batches are byte-identical to the 1-worker ones (`identical`). The
machine's core count bounds what more workers can give.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402

from jaxdiff.data import batching
from jaxdiff.data import sources as data_sources  # noqa: E402


def synthetic_source(directory: str, n: int):
    """A prepared tfds dataset of n smooth 72x72 RGB images (4 classes), opened from array_record."""
    import tensorflow_datasets as tfds

    from jaxdiff.data.datasets._common import ImageArraysBuilder

    class Synthetic64(ImageArraysBuilder, skip_registration=True):
        name = "synthetic64"
        VERSION = tfds.core.Version("1.0.0")
        PNG_LEVEL = 6

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(72, 72, 3)),
                "label": tfds.features.ClassLabel(num_classes=4)}), supervised_keys=("image", "label"))

        def _split_arrays(self, dl_manager):
            rng = np.random.default_rng(0)
            low = rng.uniform(0, 255, (n, 9, 9, 3))
            images = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2) + rng.normal(0, 8, (n, 72, 72, 3))
            return {"train": (np.clip(images, 0, 255).astype(np.uint8), np.arange(n) % 4)}

    Synthetic64(data_dir=directory, file_format="array_record").download_and_prepare()
    return data_sources.make_source("synthetic64", "train", directory, in_memory=False)[0]


def run_case(name: str, source, image_size: int, batch: int, steps: int, workers: list) -> dict:
    out = {"case": name, "examples": len(source), "image_size": image_size, "batch": batch, "steps": steps,
           "workers": {}}
    reference = None
    for w in workers:
        it = batching.batches(source, global_batch_size=batch, seed=0, start_step=0, num_steps=steps + 1,
                          process_index=0, process_count=1, image_size=image_size, workers=w, prefetch=2)
        first = next(it)  # warm-up: thread start, first records
        t0 = time.perf_counter()
        digest = [first[0].tobytes()[:4096]]
        for x, _ in it:
            digest.append(x.tobytes()[:4096])
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = digest
        out["workers"][str(w)] = {"images_per_sec": round(steps * batch / seconds, 1), "seconds": round(seconds, 3),
                                  "identical": digest == reference}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--examples", type=int, default=4096, help="images in the synthetic 64x64 dataset")
    p.add_argument("--data_dir", default=None, help="tfds data_dir of fashion_mnist (prepared there on first use)")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    results = []
    fashion, _ = data_sources.make_source("fashion_mnist", "train", args.data_dir, in_memory=False)
    results.append(run_case("fashion_mnist_32", fashion, 32, args.batch, args.steps, workers))
    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results.append(run_case("synthetic_64", synthetic_source(tmp, args.examples), 64, args.batch, args.steps,
                                workers))
    print(json.dumps({"benchmark": "data_loader", "machine": common.machine(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
