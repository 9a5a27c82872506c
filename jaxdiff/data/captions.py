"""Captions from measured image attributes, and the attribute oracle that scores generated images.

NumPy only, pure functions. The captioned datasets ``digits_text`` and ``fashion_mnist_text``
(`jaxdiff.data.datasets.captioned`) are built with these functions, and the oracle uses the same
measurements and thresholds, so it gives back a real image's stored attributes exactly.

Scheme (`scheme(name)`, `SCHEMES`): three attributes per dataset, each one number per image, cut into
three bins at the per-class tertiles of the TRAIN split.
* ``digits`` (8x8): thickness (the ink, mean of ``x``), width (horizontal standard deviation of the
  ink), slant (the shear ``-cov(x, y) / var(y)``, positive leaning right as in "/").
* ``fashion_mnist`` (28x28): size (radius of gyration ``sqrt(var(x) + var(y))``), width (aspect ratio
  ``log(sd(x) / sd(y))``), brightness (``sum(w^2) / sum(w)``). All three are unchanged by the training
  pipeline's horizontal flip; slant or texture would not survive it or the blur of generated samples.
Measurements are smooth in the pixel values: ``x`` is the image in [0, 1] (Fashion-MNIST's first
blurred by a mass-preserving Gaussian of sigma 1 pixel); moments are of ``w = max(x - 0.1, 0)``, whose
floor removes faint background noise; coordinates are pixel centres in [0, 1].

Thresholds are the midpoints between the order statistics ``round(k n / 3) - 1`` and ``round(k n / 3)``
(k = 1, 2) of the class's n training values; a value above a threshold goes to the higher bin.

Captions: ``"a" | "an"`` + the words of the NAMED attributes in the scheme's order + the class's words
(``"a thick wide slanted seven"``, ``"a four"``). Each attribute is named with probability 1/2 by
`named_mask` from (seed, split, example index) with NumPy's legacy RandomState (a frozen stream).
`vocabulary(scheme)` lists every word the grammar produces, for `tokenizers.WordTokenizer`.

Oracle: `measured_bins` measures images (uint8, or float in [-1, 1]; at the stored size or the size
the training pipeline makes of it) and bins them with the thresholds of the REQUESTED class;
`attribute_accuracy` compares them with the requested bins, over the samples whose caption names each
attribute. Chance is 1/3 (`CHANCE`) whatever the images' own distribution of bins.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Mapping, Sequence

import numpy as np

__all__ = ["CHANCE", "DEFAULT_SEED", "NAME_PROBABILITY", "SCHEMES", "Attribute", "Scheme", "attribute_accuracy",
           "bins_of", "caption", "captions", "class_caption", "from_metadata", "measure", "measured_bins", "metadata",
           "named_mask", "parse_caption", "requested_bins", "scheme", "tertile_thresholds", "vocabulary"]

#: Expected attribute accuracy of images that ignore the caption.
CHANCE = 1.0 / 3.0
#: Seed of `named_mask` used by the tfds builders.
DEFAULT_SEED = 0
#: Probability that a caption names a given attribute.
NAME_PROBABILITY = 0.5

_EPS = 1e-12
_CHUNK = 2048  # images measured at once (bounds memory; results do not depend on it)
_METADATA_FORMAT = "jaxdiff.data.captions/1"


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One measured attribute: its name, the measured quantity and the words of bins 0, 1, 2."""

    name: str
    quantity: str  # key of _QUANTITIES
    words: tuple[str, str, str]
    floor: float = 0.1  # measured on w = max(x - floor, 0)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How one image dataset is measured and captioned."""

    dataset: str  # the image dataset: "digits" or "fashion_mnist"
    image_size: int  # stored square size
    resize_mode: str  # how the training pipeline changes the size: "resize" or "pad"
    class_words: tuple[str, ...]  # caption words of each class (may hold spaces)
    attributes: tuple[Attribute, ...]  # in caption order
    smooth: float = 0.0  # Gaussian sigma in pixels applied before measuring (0: none)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    @property
    def num_classes(self) -> int:
        return len(self.class_words)

    @property
    def max_words(self) -> int:
        """Words in the longest caption: the article, every attribute, the longest class phrase."""
        return 1 + len(self.attributes) + max(len(w.split()) for w in self.class_words)


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_WIDTH = ("narrow", "regular", "wide")

SCHEMES = {
    "digits": Scheme(
        dataset="digits", image_size=8, resize_mode="resize", class_words=_DIGIT_WORDS,
        attributes=(Attribute("thickness", "ink", ("thin", "medium", "thick"), floor=0.0),
                    Attribute("width", "spread_x", _WIDTH),
                    Attribute("slant", "slant", ("backslanted", "upright", "slanted"))),
    ),
    "fashion_mnist": Scheme(
        dataset="fashion_mnist", image_size=28, resize_mode="pad",
        # Fashion-MNIST's "T-shirt/top" is "top": "t-shirt" would be the words "t" and "shirt",
        # and "shirt" is another class.
        class_words=("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                     "bag", "ankle boot"),
        attributes=(Attribute("size", "size", ("small", "midsize", "large")),
                    Attribute("width", "aspect", _WIDTH),
                    Attribute("brightness", "brightness", ("dark", "grey", "light"))),
        smooth=1.0,
    ),
}


def scheme(name: str) -> Scheme:
    """The scheme of an image dataset or of its captioned variant ("digits", "digits_text", ...)."""
    key = name[: -len("_text")] if isinstance(name, str) and name.endswith("_text") else name
    if key not in SCHEMES:
        allowed = sorted(SCHEMES) + sorted(k + "_text" for k in SCHEMES)
        raise ValueError(f"no caption scheme for dataset {name!r}; allowed: {allowed}")
    return SCHEMES[key]


def _as_scheme(s) -> Scheme:
    return s if isinstance(s, Scheme) else scheme(s)


# --- Measurements ------------------------------------------------------------------------------------


def _check_images(images) -> np.ndarray:
    """(N, H, W) uint8 or float images, validated (not converted)."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"expected grayscale images (N, H, W) or (N, H, W, 1), got shape "
                         f"{np.shape(images)}")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0..255) or float (model range [-1, 1]), got "
                         f"{x.dtype}")
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    """float64 in [0, 1] of uint8 (x / 255) or model-range float ((x + 1) / 2, clipped)."""
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    return np.clip((x.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def _to_stored_size(x: np.ndarray, s: Scheme) -> np.ndarray:
    n, h, w = x.shape
    size = s.image_size
    if (h, w) == (size, size):
        return x
    if s.resize_mode == "pad" and h == w and h > size:
        top = (h - size) // 2  # as jaxdiff.data.transforms.resize_images pads
        return x[:, top: top + size, top: top + size]
    if s.resize_mode == "resize" and h == w and h % size == 0:
        k = h // size
        return x.reshape(n, size, k, size, k).mean(axis=(2, 4))
    allowed = ("larger square images, centre-cropped" if s.resize_mode == "pad"
               else f"square images of a multiple of {size}, box-averaged")
    raise ValueError(f"{s.dataset} attributes are measured at {size}x{size}; got {h}x{w} images "
                     f"(allowed: {size}x{size} or {allowed})")


def _gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) blur whose columns sum to 1 (each pixel's mass stays in the image)."""
    i = np.arange(size, dtype=np.float64)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return k / k.sum(axis=0, keepdims=True)


def _moments(w: np.ndarray) -> dict[str, np.ndarray]:
    """Mass and central second moments of (N, H, W) non-negative images, coordinates in [0, 1]."""
    n, h, wd = w.shape
    ys = (np.arange(h, dtype=np.float64) + 0.5) / h
    xs = (np.arange(wd, dtype=np.float64) + 0.5) / wd
    rows, cols = w.sum(axis=2), w.sum(axis=1)  # (N, H), (N, W) profiles
    mass = rows.sum(axis=1)
    m = mass + _EPS
    my = (rows * ys).sum(axis=1) / m
    mx = (cols * xs).sum(axis=1) / m
    dy = ys - my[:, None]
    dx = xs - mx[:, None]
    row_x = (w * xs).sum(axis=2) - mx[:, None] * rows  # sum over x of w * (x - mx), per row
    return {
        "mean": mass / (h * wd),
        "square_mean": (w * w).sum(axis=(1, 2)) / m,
        "vxx": (cols * dx * dx).sum(axis=1) / m,
        "vyy": (rows * dy * dy).sum(axis=1) / m,
        "vxy": (row_x * dy).sum(axis=1) / m,
    }


_QUANTITIES = {
    "ink": lambda mo, floor: mo["mean"],
    "spread_x": lambda mo, floor: np.sqrt(mo["vxx"]),
    "slant": lambda mo, floor: -mo["vxy"] / (mo["vyy"] + _EPS),
    "size": lambda mo, floor: np.sqrt(mo["vxx"] + mo["vyy"]),
    "aspect": lambda mo, floor: 0.5 * np.log((mo["vxx"] + _EPS) / (mo["vyy"] + _EPS)),
    "brightness": lambda mo, floor: mo["square_mean"] + floor,
}


def measure(s: Scheme | str, images) -> np.ndarray:
    """float64 (N, A): the attributes' measured values, in the scheme's attribute order.

    images: uint8 (0..255) or float (model range [-1, 1]), (N, H, W) or (N, H, W, 1), at the
    stored size or the training pipeline's size (see the module doc). A blank image measures 0
    (lowest bins) for every quantity but the slant and the aspect (0: middle values).
    """
    s = _as_scheme(s)
    x = _check_images(images)
    blur = _gaussian_matrix(s.image_size, s.smooth) if s.smooth > 0 else None
    out = np.empty((len(x), len(s.attributes)), np.float64)
    for start in range(0, len(x), _CHUNK):
        chunk = _to_stored_size(_unit(x[start: start + _CHUNK]), s)
        if blur is not None:
            chunk = blur @ chunk @ blur.T
        moments = {}  # by floor
        for j, a in enumerate(s.attributes):
            if a.floor not in moments:
                moments[a.floor] = _moments(np.maximum(chunk - a.floor, 0.0))
            out[start: start + len(chunk), j] = _QUANTITIES[a.quantity](moments[a.floor], a.floor)
    return out


def _check_labels(labels, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers (one per image), got {labels.dtype} "
                         f"{labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}.."
                         f"{labels.max()}")
    return labels.astype(np.int64)


def tertile_thresholds(s: Scheme | str, values: np.ndarray, labels) -> np.ndarray:
    """float64 (C, A, 2): per class and attribute, the two tertile cuts of the TRAIN split's
    measured `values` (N, A) (midpoints between order statistics; see the module doc)."""
    s = _as_scheme(s)
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[1] != len(s.attributes):
        raise ValueError(f"values must be (N, {len(s.attributes)}), got {values.shape}")
    labels = _check_labels(labels, len(values), s.num_classes)
    out = np.empty((s.num_classes, len(s.attributes), 2), np.float64)
    for c in range(s.num_classes):
        v = np.sort(values[labels == c], axis=0)
        n = len(v)
        if n < 3:
            raise ValueError(f"class {c} ({s.class_words[c]!r}) has {n} training images; "
                             "tertiles need at least 3")
        for k in (1, 2):
            j = int(np.floor(k * n / 3 + 0.5))
            out[c, :, k - 1] = (v[j - 1] + v[j]) / 2
    return out


def _check_thresholds(s: Scheme, thresholds) -> np.ndarray:
    t = np.asarray(thresholds, np.float64)
    shape = (s.num_classes, len(s.attributes), 2)
    if t.shape != shape:
        raise ValueError(f"thresholds for {s.dataset} must have shape {shape}, got {t.shape}")
    return t


def bins_of(values: np.ndarray, labels, thresholds) -> np.ndarray:
    """int32 (N, A) bins 0, 1, 2 of measured values with the thresholds of each row's class."""
    values = np.asarray(values, np.float64)
    t = np.asarray(thresholds, np.float64)[np.asarray(labels, np.int64)]  # (N, A, 2)
    return ((values > t[..., 0]).astype(np.int32) + (values > t[..., 1])).astype(np.int32)


def measured_bins(s: Scheme | str, thresholds, images, labels) -> np.ndarray:
    """int32 (N, A): the attribute bins of images, with the thresholds of class labels[i]."""
    s = _as_scheme(s)
    t = _check_thresholds(s, thresholds)
    values = measure(s, images)
    return bins_of(values, _check_labels(labels, len(values), s.num_classes), t)


def requested_bins(bins, named) -> np.ndarray:
    """int32 (N, A): the bins a caption asks for, -1 where it does not name the attribute."""
    return np.where(np.asarray(named, bool), np.asarray(bins), -1).astype(np.int32)


def attribute_accuracy(s: Scheme | str, thresholds, images, labels,
                       requested) -> dict[str, float]:
    """Per attribute: the fraction of images whose measured bin is the requested one, over the
    images whose caption names the attribute (NaN when none does). Chance is `CHANCE` (1/3).

    labels: the requested class of each image (its thresholds are used). requested: int (N, A)
    (e.g. `requested_bins(...)`) or {attribute name: int (N,)}, with -1 where not named.
    """
    s = _as_scheme(s)
    n = len(np.asarray(images))
    if isinstance(requested, Mapping):
        unknown = sorted(set(requested) - set(s.attribute_names))
        if unknown:
            raise ValueError(f"unknown attributes {unknown} for {s.dataset}; allowed: "
                             f"{list(s.attribute_names)}")
        requested = np.stack([np.asarray(requested.get(a, np.full(n, -1))).reshape(-1)
                              for a in s.attribute_names], axis=1) if n else \
            np.zeros((0, len(s.attributes)), np.int64)
    requested = np.asarray(requested)
    if requested.shape != (n, len(s.attributes)) or not (
            requested.size == 0 or np.issubdtype(requested.dtype, np.integer)):
        raise ValueError(f"requested must be integers of shape ({n}, {len(s.attributes)}), got "
                         f"{requested.dtype} {requested.shape}")
    if requested.size and (requested.min() < -1 or requested.max() > 2):
        raise ValueError("requested bins must be 0, 1, 2 or -1 (not named), got values in "
                         f"{requested.min()}..{requested.max()}")
    got = measured_bins(s, thresholds, images, labels)
    out = {}
    for j, a in enumerate(s.attribute_names):
        named = requested[:, j] >= 0
        out[a] = float(np.mean(got[named, j] == requested[named, j])) if named.any() \
            else float("nan")
    return out


# --- Captions ----------------------------------------------------------------------------------------


def named_mask(num_examples: int, *, num_attributes: int = 3, seed: int = DEFAULT_SEED,
               split: str = "train") -> np.ndarray:
    """bool (num_examples, num_attributes): which attributes each example's caption names.

    Row i depends only on (seed, split, i): the first rows of a longer mask are the same.
    """
    key = [int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode("utf-8"))]
    u = np.random.RandomState(key).random_sample((int(num_examples), int(num_attributes)))
    return u < NAME_PROBABILITY


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" and word != "one" else "a"


def caption(s: Scheme | str, label: int, bins: Sequence[int], named: Sequence[bool]) -> str:
    """One caption: "a"/"an", the named attributes' words in order, the class's words."""
    s = _as_scheme(s)
    if not 0 <= int(label) < s.num_classes:
        raise ValueError(f"label must lie in 0..{s.num_classes - 1}, got {label}")
    words = [a.words[int(b)] for a, b, on in zip(s.attributes, bins, named, strict=True) if on]
    words.append(s.class_words[int(label)])
    return " ".join([_article(words[0]), *words])


def class_caption(s: Scheme | str, label: int) -> str:
    """The caption naming the class alone ("a seven"): training grids, CLIP's zero-shot classes."""
    s = _as_scheme(s)
    return caption(s, label, [0] * len(s.attributes), [False] * len(s.attributes))


def captions(s: Scheme | str, labels, bins, named) -> list[str]:
    """Captions of many examples: labels (N,), bins (N, A), named (N, A)."""
    s = _as_scheme(s)
    return [caption(s, int(y), b, m) for y, b, m in zip(np.asarray(labels), np.asarray(bins),
                                                        np.asarray(named), strict=True)]


def parse_caption(s: Scheme | str, text: str) -> tuple[int, np.ndarray]:
    """(class, int32 (A,) requested bins with -1 where not named) of a caption of the grammar."""
    s = _as_scheme(s)
    words = text.split()
    if len(words) < 2 or words[0] not in ("a", "an"):
        raise ValueError(f"caption {text!r} is not of the form 'a|an [attribute words] class'")
    rest, requested = words[1:], np.full(len(s.attributes), -1, np.int32)
    for j, a in enumerate(s.attributes):
        if rest and rest[0] in a.words:
            requested[j] = a.words.index(rest.pop(0))
    phrase = " ".join(rest)
    if phrase not in s.class_words:
        raise ValueError(f"caption {text!r}: {phrase!r} is not a class of {s.dataset} (classes: "
                         f"{list(s.class_words)}; attribute words come before the class, in the "
                         f"order {list(s.attribute_names)})")
    return s.class_words.index(phrase), requested


def vocabulary(s: Scheme | str) -> tuple[str, ...]:
    """Every word the grammar can produce, in a fixed order: articles, class words, attribute
    words (bins 0, 1, 2 of each attribute in order). For `WordTokenizer(vocabulary(s))`."""
    s = _as_scheme(s)
    words = ["a", "an"]
    for phrase in s.class_words:
        words += phrase.split()
    for a in s.attributes:
        words += a.words
    return tuple(dict.fromkeys(words))


# --- What a captioned dataset stores -----------------------------------------------------------------


def metadata(s: Scheme | str, thresholds, *, seed: int = DEFAULT_SEED) -> dict:
    """JSON-compatible record of a captioned dataset's scheme, vocabulary, seed and thresholds."""
    s = _as_scheme(s)
    t = _check_thresholds(s, thresholds)
    return {
        "format": _METADATA_FORMAT,
        "scheme": s.dataset,
        "seed": int(seed),
        "attributes": list(s.attribute_names),
        "attribute_words": [list(a.words) for a in s.attributes],
        "class_words": list(s.class_words),
        "vocabulary": list(vocabulary(s)),
        "thresholds": t.tolist(),  # (C, A, 2); JSON floats round-trip exactly
    }


def from_metadata(md: Mapping) -> tuple[Scheme, np.ndarray]:
    """(scheme, thresholds) from `metadata`'s record, checked against this version's scheme."""
    if not isinstance(md, Mapping) or md.get("format") != _METADATA_FORMAT:
        raise ValueError(f"not a caption metadata record ({_METADATA_FORMAT}): "
                         f"{str(md)[:200]}")
    s = scheme(md["scheme"])
    expected = metadata(s, np.zeros((s.num_classes, len(s.attributes), 2)), seed=md["seed"])
    for key in ("attributes", "attribute_words", "class_words", "vocabulary"):
        if list(md[key]) != expected[key]:
            raise ValueError(
                f"the dataset's caption {key} {md[key]} differ from this jaxdiff's "
                f"{expected[key]}: it was prepared with another caption scheme; prepare it again")
    return s, _check_thresholds(s, md["thresholds"])
