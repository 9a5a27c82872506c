"""`digits_text` and `fashion_mnist_text`: the bundled image datasets with captions.

The images, labels, splits and example order are those of `digits` / `fashion_mnist`; each
example adds (see `jaxdiff.data.captions` for the scheme):

* ``caption``: Text, e.g. "a thick slanted seven" (the class plus the named attributes);
* ``attributes``: int32 (3,), the measured bin (0, 1, 2) of each attribute, named or not;
* ``named``: bool (3,), which attributes the caption names (each with probability 1/2, from
  (seed 0, split, example index)).

The dataset's metadata (``builder.info.metadata``, saved as metadata.json next to
dataset_info.json, so `tfds.data_source` gives it too) holds `jaxdiff.data.captions.metadata`: the
scheme, the seed, the vocabulary and the per-class tertile thresholds measured on the train split.
They are also derivable: `jaxdiff.data.captions.tertile_thresholds` of the train split's measurements
gives the same numbers, and `jaxdiff.data.captions.vocabulary` the same words.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxdiff.data import captions
from jaxdiff.data.datasets.digits import Digits
from jaxdiff.data.datasets.fashion_mnist import FashionMnist

_FEATURES_NOTE = (
    " With captions built from measured attributes (jaxdiff.data.captions): caption, attributes "
    "(bins 0..2), named (which the caption names); thresholds and vocabulary in the metadata."
)


class CaptionedMixin:
    """Put before an `ImageArraysBuilder` subclass: adds the caption features and metadata.

    `SCHEME` names the `jaxdiff.data.captions` scheme; the split "train" sets the thresholds.
    """

    SCHEME: str = ""
    CAPTION_SEED: int = captions.DEFAULT_SEED

    def _features(self) -> dict:
        n = len(captions.scheme(self.SCHEME).attributes)
        return {
            **super()._features(),
            "caption": tfds.features.Text(),
            "attributes": tfds.features.Tensor(shape=(n,), dtype=np.int32),
            "named": tfds.features.Tensor(shape=(n,), dtype=np.bool_),
        }

    def _metadata(self) -> tfds.core.MetadataDict:
        return tfds.core.MetadataDict()

    def _extra_features(self, arrays):
        s = captions.scheme(self.SCHEME)
        if "train" not in arrays:
            raise ValueError(f"{self.name}: the thresholds come from the train split, which is "
                             f"missing (splits: {sorted(arrays)})")
        values = {split: captions.measure(s, images) for split, (images, _) in arrays.items()}
        thresholds = captions.tertile_thresholds(s, values["train"], arrays["train"][1])
        self.info.metadata.update(captions.metadata(s, thresholds, seed=self.CAPTION_SEED))
        out = {}
        for split, (_, labels) in arrays.items():
            bins = captions.bins_of(values[split], labels, thresholds)
            named = captions.named_mask(len(labels), num_attributes=len(s.attributes),
                                        seed=self.CAPTION_SEED, split=split)
            out[split] = {"caption": captions.captions(s, labels, bins, named),
                          "attributes": bins, "named": named}
        return out


class DigitsText(CaptionedMixin, Digits, skip_registration=True):
    """`digits` with captions (see the module docstring)."""

    name = "digits_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "digits 1.0.0 with thickness / width / slant captions."}
    DESCRIPTION = Digits.DESCRIPTION + _FEATURES_NOTE
    SCHEME = "digits"


class FashionMnistText(CaptionedMixin, FashionMnist, skip_registration=True):
    """`fashion_mnist` with captions (see the module docstring); needs the idx files."""

    name = "fashion_mnist_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "fashion_mnist 3.0.1 with size / width / brightness captions."}
    DESCRIPTION = FashionMnist.DESCRIPTION + _FEATURES_NOTE
    SCHEME = "fashion_mnist"
