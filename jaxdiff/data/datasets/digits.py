"""`digits`: scikit-learn's bundled 8x8 handwritten digits as a tfds dataset.

Source: `sklearn.datasets.load_digits()` (1797 images, ships inside scikit-learn, no download).

* Images: uint8 (8, 8, 1). scikit-learn stores ink counts 0..16; they are mapped linearly to
  0..255 with ``round(v * 255 / 16)`` (half rounded up), so 0 -> 0, 8 -> 128, 16 -> 255. The
  background is 0 (black), the strokes are bright.
* Labels: 0..9 (ClassLabel names "0".."9").
* Split (fixed, version 1.0.0): stratified 80/20. For each class c = 0..9 in turn, the indices of
  class c (ascending) are shuffled with one ``numpy.random.RandomState(0)`` shared across the
  classes (the legacy RandomState stream is frozen by NumPy's compatibility policy), and the first
  ``floor(0.2 * n_c + 0.5)`` go to ``test``. Result: train 1438, test 359. Each split is stored in
  ascending order of the original scikit-learn index (no tfds shuffling), so record i of a split
  is `digits_arrays()[..][digits_split()[split][i]]`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxdiff.data.datasets._common import ImageArraysBuilder

SPLIT_SEED = 0
TEST_FRACTION = 0.2
NUM_TRAIN = 1438
NUM_TEST = 359


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (uint8 images (N, 8, 8, 1) in 0..255, int64 labels (N,))."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.floor(d.images * (255.0 / 16.0) + 0.5).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


def digits_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed stratified split: {"train": indices, "test": indices}, each ascending."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(SPLIT_SEED)
    test = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(idx)
        test.append(perm[: int(np.floor(TEST_FRACTION * len(idx) + 0.5))])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test)] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


class Digits(ImageArraysBuilder, skip_registration=True):
    """scikit-learn's 8x8 digits, split 80/20 (see the module docstring)."""

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn load_digits, 0..16 scaled to 0..255, stratified 80/20."}
    DESCRIPTION = (
        "scikit-learn's 8x8 handwritten digits (UCI optical recognition of handwritten "
        "digits, test part), ink 0..16 scaled to uint8 0..255; fixed stratified 80/20 "
        "split with RandomState(0)."
    )
    HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset"
    IMAGE_SHAPE = (8, 8, 1)
    CLASS_NAMES = tuple(str(i) for i in range(10))

    def _split_arrays(self, dl_manager):
        del dl_manager  # nothing to download
        images, labels = digits_arrays()
        return {split: (images[idx], labels[idx]) for split, idx in digits_split(labels).items()}
