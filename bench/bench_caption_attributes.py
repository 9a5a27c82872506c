"""How balanced and how robust the captioned datasets' attributes are; prints JSON.

    python bench/bench_caption_attributes.py [--datasets digits fashion_mnist] [--max_test N]

Per dataset (read from the sources the tfds builders use: scikit-learn's digits, Fashion-MNIST's
idx files), per attribute: the share of each bin on train and test (train thresholds), the mean
within-class correlation between the attributes on train, and the oracle's agreement between the
bins of a test image and of a degraded copy (generated images are blurrier and noisier than real
ones): 2x box-downsampled then bilinearly upsampled (for the 8x8 digits a 4x4 image: a harsh
test), Gaussian blur of sigma 0.5 pixel at the stored size (reflected at the border, so no ink
is lost), additive Gaussian noise of sigma 8/255 clipped to 0..255 (so it also brightens the
background); and, as the chance check, the accuracy on shuffled (image, caption) pairs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import ndimage

from jaxdiff.data import captions
from jaxdiff.data.datasets import FASHION_MNIST_DEBIAN_DIR, digits_arrays, digits_split, find_idx_files, read_split


def _splits(name: str):
    if name == "digits":
        images, labels = digits_arrays()
        return {k: (images[v], labels[v]) for k, v in digits_split(labels).items()}
    files = find_idx_files(FASHION_MNIST_DEBIAN_DIR)
    return {k: read_split(*v) for k, v in files.items()}


def _degraded(images: np.ndarray, rng) -> dict[str, np.ndarray]:
    x = images[..., 0].astype(np.float64)
    n, h, w = x.shape
    down = x.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    out = {
        "down_up_2x": ndimage.zoom(down, (1, 2, 2), order=1, mode="nearest", grid_mode=True),
        "blur_0.5px": ndimage.gaussian_filter(x, (0, 0.5, 0.5), mode="reflect"),
        "noise_8": x + rng.normal(0.0, 8.0, x.shape),
    }
    return {k: np.clip(np.round(v), 0, 255).astype(np.uint8)[..., None] for k, v in out.items()}


def report(name: str, max_test: int | None) -> dict:
    s = captions.scheme(name)
    splits = _splits(name)
    train_x, train_y = splits["train"]
    test_x, test_y = splits["test"]
    if max_test:
        test_x, test_y = test_x[:max_test], test_y[:max_test]
    values = captions.measure(s, train_x)
    t = captions.tertile_thresholds(s, values, train_y)
    train_bins = captions.bins_of(values, train_y, t)
    test_bins = captions.measured_bins(s, t, test_x, test_y)
    corr = np.mean([np.corrcoef(values[train_y == c].T) for c in range(s.num_classes)], axis=0)
    rng = np.random.default_rng(0)
    degraded = {k: captions.measured_bins(s, t, v, test_y) for k, v in
                _degraded(test_x, rng).items()}
    shuffled = captions.attribute_accuracy(s, t, test_x, test_y, test_bins[rng.permutation(
        len(test_bins))])
    out = {"train": len(train_y), "test": len(test_y), "attributes": {}}
    for j, a in enumerate(s.attributes):
        out["attributes"][a.name] = {
            "words": list(a.words),
            "train_balance": np.round(np.bincount(train_bins[:, j], minlength=3) / len(train_y), 3
                                      ).tolist(),
            "test_balance": np.round(np.bincount(test_bins[:, j], minlength=3) / len(test_y), 3
                                     ).tolist(),
            "agreement": {k: round(float(np.mean(v[:, j] == test_bins[:, j])), 3)
                          for k, v in degraded.items()},
            "shuffled_accuracy": round(shuffled[a.name], 3),
        }
    out["within_class_correlation"] = {
        f"{a.name}~{b.name}": round(float(corr[i, k]), 2)
        for i, a in enumerate(s.attributes) for k, b in enumerate(s.attributes) if i < k}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"],
                        choices=sorted(captions.SCHEMES))
    parser.add_argument("--max_test", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps({name: report(name, args.max_test) for name in args.datasets}, indent=1))


if __name__ == "__main__":
    main()
