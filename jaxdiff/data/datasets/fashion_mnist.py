"""`fashion_mnist` built offline from idx files, e.g. Debian's `dataset-fashion-mnist` package.

Debian installs the four original Zalando files, gzipped, in ``/usr/share/datasets/fashion-mnist``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz    (60000 examples)
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz     (10000 examples)

Any directory with these files works as the tfds *manual dir*, gzipped or not (``*-ubyte`` and
MNIST's ``*.idx3-ubyte`` spelling are accepted as well; gzip is detected from the content).

The builder has tfds's own name, version (3.0.1) and features for Fashion-MNIST (uint8 image
(28, 28, 1), ClassLabel with the ten Zalando class names), so the prepared directory reads back
with ``tfds.data_source("fashion_mnist", data_dir=...)`` too. Unlike tfds's builder it downloads
nothing, stores the examples in idx-file order (no tfds shuffling) and writes array_record files.
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from jaxdiff.data.datasets._common import ImageArraysBuilder

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# split -> file prefix in the Zalando / LeCun naming.
_PREFIX = {"train": "train", "test": "t10k"}

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one idx file (plain or gzipped; gzip is detected from the magic bytes)."""
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic {raw[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: idx header says shape {shape} ({expected} bytes) but the file has "
            f"{len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def _candidates(prefix: str, kind: str, ndim: int) -> list[str]:
    names = []
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        names += [stem + ".gz", stem]
    return names


def find_idx_files(directory: str | os.PathLike) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """{"train": (images, labels), "test": (images, labels)} paths found in `directory`.

    Raises ValueError naming the directory and the missing files.
    """
    directory = pathlib.Path(directory).expanduser()
    if not directory.is_dir():
        raise ValueError(f"Fashion-MNIST directory {str(directory)!r} does not exist")
    found, missing = {}, []
    for split, prefix in _PREFIX.items():
        pair = []
        for kind, ndim in (("images", 3), ("labels", 1)):
            names = _candidates(prefix, kind, ndim)
            hit = next((directory / n for n in names if (directory / n).is_file()), None)
            if hit is None:
                missing.append(" or ".join(names[:2]))
            pair.append(hit)
        found[split] = tuple(pair)
    if missing:
        raise ValueError(
            f"Fashion-MNIST directory {str(directory)!r} lacks the idx file(s): "
            + "; ".join(missing)
        )
    return found


def read_split(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 28, 28, 1), int64 labels (N,)) of one split, validated."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, 28, 28), got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: {labels.shape} labels for {len(images)} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_path}: labels outside 0..9")
    return images[..., None], labels.astype(np.int64)


class FashionMnist(ImageArraysBuilder, skip_registration=True):
    """Fashion-MNIST from local idx files (pass the directory as the tfds manual_dir)."""

    name = "fashion_mnist"
    VERSION = tfds.core.Version("3.0.1")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Install Debian's `dataset-fashion-mnist` package (files in "
        f"{DEBIAN_DIR}) or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not) in a "
        "directory and pass it as manual_dir."
    )
    DESCRIPTION = (
        "Fashion-MNIST: Zalando article images, 28x28 grayscale, 10 classes; train 60000, "
        "test 10000. Built offline from idx files, in file order."
    )
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    IMAGE_SHAPE = (28, 28, 1)
    CLASS_NAMES = CLASS_NAMES

    def _split_arrays(self, dl_manager):
        files = find_idx_files(dl_manager.manual_dir)
        return {split: read_split(*paths) for split, paths in files.items()}
