"""Evaluating samples: the default feature extractor and metrics of a sample set against a split.

The default extractor for the bundled datasets is a classifier trained on clean real images
(`configs/*_eval_classifier.py`, trained by `train.py` like any other model): its penultimate
features feed FID, precision/recall and density/coverage, its logits IS and accuracy.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoints, data, metrics


def extractor_from_workdir(workdir: str, *, batch_size: int = 256) -> tuple[metrics.FeatureExtractor, dict]:
    """A FeatureExtractor from a trained classifier workdir (EMA weights), and that workdir's config.

    The classifier is evaluated at t = 0 (clean images); features are its penultimate representation
    (`return_features=True`), logits its class scores.
    """
    module, params, cfg = checkpoints.load_model(workdir)
    if cfg["model"].get("kind") != "classifier":
        raise ValueError(f"{workdir} holds a {cfg['model'].get('kind')!r} model; the evaluation "
                         "extractor must be a classifier (train configs/*_eval_classifier.py)")

    def feature_fn(p, x):
        t = jnp.zeros((x.shape[0],), jnp.int32)
        logits, feats = module.apply({"params": p}, x, t, return_features=True)
        return feats, logits

    extractor = metrics.classifier_extractor(
        None, params, feature_fn=feature_fn, batch_size=batch_size,
        name=f"classifier:{os.path.basename(os.path.normpath(workdir))}",
        config={"model": cfg["model"], "features": "penultimate", "t": 0})
    return extractor, cfg


def dataset_of(cfg: Mapping[str, Any]) -> dict:
    """The data settings (name, data_dir, image size) a trained workdir's config was made with."""
    d = dict(cfg.get("data", {}))
    model = cfg.get("model", {})
    return {"name": d.get("name"), "data_dir": d.get("data_dir"), "image_size": model.get("image_size"),
            "num_classes": model.get("num_classes") if model.get("kind") != "classifier"
            else model.get("out_channels")}


def reference_for(extractor: metrics.FeatureExtractor, *, dataset: str, split: str, image_size: int,
                  data_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> metrics.FeatureStats:
    """Cached reference statistics (with features) of a dataset split at the model's image size."""
    cache_dir = cache_dir or os.path.join(data_dir or data.default_data_dir(), "jaxdiff_reference_stats")
    return metrics.reference_stats(
        lambda: data.load_split(dataset, split, data_dir, image_size=image_size)[0],
        extractor, cache_dir, f"{dataset}/{split}/{image_size}")


def evaluate_npz(samples_path: str, *, classifier_dir: str, dataset: Optional[str] = None,
                 split: str = "train", data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                 k: int = 3) -> dict:
    """Metrics of a guided-diffusion-layout samples.npz against a dataset split, as a dict."""
    extractor, cfg = extractor_from_workdir(classifier_dir)
    ds = dataset_of(cfg)
    dataset = dataset or ds["name"]
    data_dir = data_dir or ds["data_dir"]
    images, labels = metrics.load_samples_npz(samples_path, num_classes=ds["num_classes"])
    image_size = images.shape[1]
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"samples must be square images, got {images.shape[1:3]}")
    ref = reference_for(extractor, dataset=dataset, split=split, image_size=image_size,
                        data_dir=data_dir, cache_dir=cache_dir)
    if tuple(ref.image_shape) != tuple(images.shape[1:]):
        raise ValueError(f"samples have shape {images.shape[1:]} but {dataset}/{split} images are "
                         f"{tuple(ref.image_shape)}")
    result = metrics.evaluate_samples(images, labels, ref, extractor, num_classes=ds["num_classes"], k=k)
    result.update(dataset=dataset, split=split, samples=os.path.abspath(samples_path))
    return result


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (nothing half-written on a crash)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Metrics (FID, IS, precision/recall, density/coverage, "
                                "accuracy) of a samples.npz against a dataset split, as JSON.")
    p.add_argument("--samples", required=True, help="samples.npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--classifier", required=True, help="workdir of the evaluation classifier")
    p.add_argument("--dataset", default=None, help="dataset name (default: the classifier's)")
    p.add_argument("--split", default="train", help="reference split (default: train)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--cache_dir", default=None, help="where reference statistics are cached")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default 3)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args(argv)
    result = evaluate_npz(a.samples, classifier_dir=a.classifier, dataset=a.dataset, split=a.split,
                          data_dir=a.data_dir, cache_dir=a.cache_dir, k=a.k)
    if a.out:
        write_json(a.out, result)
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
