"""TensorFlow-free tfds builders for the datasets jaxdiff bundles.

The builders are ordinary `tfds.core.GeneratorBasedBuilder`s that write
array_record files (``file_format='array_record'``) in tfds's usual layout
(``<data_dir>/<name>/<version>/``), so the prepared data reads back with
``tfds.data_source`` / ``builder.as_data_source()`` and never needs TensorFlow:

* images are PNG-encoded by jaxdiff (tfds would encode a NumPy array with
  ``tf.image.encode_png``); tfds decodes them with Pillow (or OpenCV);
* the records are written by `ImageArraysBuilder._download_and_prepare` through
  tfds's array_record file adapter (tfds's generic writer is ~10x slower);
* nothing is downloaded.

``digits_text`` and ``fashion_mnist_text`` (`jaxdiff.data.datasets.captioned`) are the same images
with captions built from measured attributes (`jaxdiff.data.captions`).

The public entry point is `jaxdiff.data`; use this package directly only to
build or inspect the builders.
"""

from jaxdiff.data.datasets.captioned import DigitsText, FashionMnistText
from jaxdiff.data.datasets.digits import Digits, digits_arrays, digits_split
from jaxdiff.data.datasets.fashion_mnist import (
    DEBIAN_DIR as FASHION_MNIST_DEBIAN_DIR,
)
from jaxdiff.data.datasets.fashion_mnist import (
    FashionMnist,
    find_idx_files,
    read_idx,
    read_split,
)

#: Builders for the datasets that jaxdiff prepares itself, by tfds name.
BUILDERS = {
    Digits.name: Digits,
    FashionMnist.name: FashionMnist,
    DigitsText.name: DigitsText,
    FashionMnistText.name: FashionMnistText,
}

__all__ = ["BUILDERS", "Digits", "DigitsText", "FASHION_MNIST_DEBIAN_DIR", "FashionMnist", "FashionMnistText",
           "digits_arrays", "digits_split", "find_idx_files", "read_idx", "read_split"]
