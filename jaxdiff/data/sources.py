"""Datasets as sources: the bundled datasets prepared offline, any prepared tfds dataset opened as
random-access records, their `DataInfo`, and whole splits loaded into memory.

Datasets
--------
* ``digits``: scikit-learn's bundled 8x8 digits (uint8 (8, 8, 1), 0..16 scaled to 0..255, labels
  0..9; fixed stratified 80/20 split: train 1438 / test 359). See `jaxdiff.data.datasets.digits`.
* ``fashion_mnist``: built from the idx files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``) or of a directory passed as ``manual_dir``; uint8
  (28, 28, 1), labels 0..9, train 60000 / test 10000. See `jaxdiff.data.datasets.fashion_mnist`.
* ``digits_text``, ``fashion_mnist_text``: the same images, labels and splits with captions
  built from measured attributes (``"a thick slanted seven"``), the attributes' bins and which
  ones the caption names; `Source.gather_text` reads them, ``DataInfo.captions`` holds the
  scheme, vocabulary and thresholds (see `jaxdiff.data.captions`, `jaxdiff.data.datasets.captioned`).
* any other tfds image dataset (``cifar10``, ...) already prepared in the tfds data_dir as
  array_record (``tfds build cifar10 --file_format=array_record`` on a machine with TensorFlow).

The bundled datasets are prepared on first use (no TensorFlow, no download) into ``data_dir``
(default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), under a file lock, and reused
afterwards; `prepare` does it explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxdiff.data import datasets as _ds
from jaxdiff.data.datasets._common import decode_png_simple
from jaxdiff.data.transforms import RESIZE_MODES, resize_images
from jaxdiff.util import config as config_util

__all__ = ["BUNDLED_DATASETS", "DataInfo", "Source", "default_data_dir", "load_split", "make_source", "prepare"]


#: Datasets jaxdiff prepares itself (no TensorFlow, no download).
BUNDLED_DATASETS = ("digits", "fashion_mnist", "digits_text", "fashion_mnist_text")


# Default augmentation / resizing per dataset (base tfds name, before "/" and ":").
_NO_FLIP = frozenset(
    {"digits", "digits_text", "mnist", "emnist", "kmnist", "svhn_cropped", "binary_alpha_digits",
     "omniglot", "mnist_corrupted", "cmaterdb"}
)


_PAD = frozenset({"fashion_mnist", "fashion_mnist_text", "mnist", "emnist", "kmnist",
                  "mnist_corrupted"})


_IN_MEMORY = frozenset(BUNDLED_DATASETS)


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a training or evaluation loop needs to know about one split of a dataset."""

    name: str  # as passed, e.g. "fashion_mnist" or "imagenet_resized/64x64"
    split: str
    num_examples: int
    image_shape: tuple[int, int, int] | None  # stored (H, W, C); None when images differ in size
    num_classes: int  # 0 for datasets without a ClassLabel (labels are then all 0)
    class_names: tuple[str, ...]
    random_flip: bool  # the default for `augment`
    resize_mode: str  # the default for `resize_mode`: "pad", "resize" or "center_crop"
    pad_value: int  # background value used by "pad"
    data_dir: str
    image_key: str = "image"
    label_key: str | None = "label"
    tfds_info: Any = dataclasses.field(default=None, repr=False, compare=False)
    # Captioned datasets: the Text feature and the caption metadata (`jaxdiff.data.captions.metadata`:
    # scheme, vocabulary, thresholds); None otherwise.
    caption_key: str | None = None
    captions: Mapping | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def channels(self) -> int | None:
        return None if self.image_shape is None else self.image_shape[-1]


class Source:
    """Random access to one split: ``len``, ``src[i]`` / ``src.__getitems__(keys)`` giving
    ``{"image": uint8 (H, W, C), "label": int}`` like a tfds data source, and `gather`.

    In memory (the default for the bundled datasets) it holds the whole split as arrays;
    otherwise it reads records from tfds's array_record data source on demand. Captioned
    datasets also give `gather_text`.
    """

    def __init__(self, info: DataInfo, *, tfds_source=None, raw_source=None, images=None,
                 labels=None, text=None):
        self.info = info
        self._tfds_source = tfds_source
        self._raw_source = raw_source
        self._images = images
        self._labels = labels
        self._text = text

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    @property
    def tfds_source(self):
        """The underlying tfds data source (`builder.as_data_source(split)`)."""
        return self._tfds_source

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images NHWC, int32 labels) of the whole split (read-only if in memory).

        Needs images of one size (see `load_split` with image_size otherwise).
        """
        if self.in_memory:
            return self._images, self._labels
        images, labels = [], []
        for start in range(0, len(self), 4096):
            im, lb = self.gather(np.arange(start, min(len(self), start + 4096)))
            images.append(stack_images(im, self.info))
            labels.append(lb)
        return np.concatenate(images), np.concatenate(labels)

    def __len__(self) -> int:
        return self.info.num_examples

    def __getitem__(self, index) -> dict:
        images, labels = self.gather(np.asarray([int(index)]))
        return {"image": images[0], "label": int(labels[0])}

    def __getitems__(self, keys: Sequence[int]) -> list[dict]:
        images, labels = self.gather(np.asarray(keys, dtype=np.int64))
        return [{"image": im, "label": int(lb)} for im, lb in zip(images, labels)]

    def gather(self, indices) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """uint8 images (an (n, H, W, C) array, or a list when sizes differ) and int32 labels."""
        indices = self._indices(indices)
        if self.in_memory:
            return self._images[indices], self._labels[indices]
        decoded = self._read(indices, _decode_record, _from_tfds)
        images = [d[0] for d in decoded]
        labels = np.asarray([d[1] for d in decoded], dtype=np.int32)
        if self.info.image_shape is not None:
            images = (np.stack(images) if images else
                      np.zeros((0, *self.info.image_shape), np.uint8))
        return images, labels

    def gather_text(self, indices) -> dict[str, np.ndarray]:
        """The text features of examples: {"caption": str (n,), "attributes": int32 (n, A),
        "named": bool (n, A)} (the last two when the dataset has them). Captioned datasets only.
        """
        if self.info.caption_key is None:
            raise ValueError(
                f"dataset {self.info.name!r} has no captions; captioned datasets: "
                f"{', '.join(n for n in BUNDLED_DATASETS if n.endswith('_text'))}")
        indices = self._indices(indices)
        if self._text is not None:
            return {k: v[indices] for k, v in self._text.items()}
        return _stack_text(self._read(indices, _text_of_record, _text_of_example), self.info)

    def _indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"indices out of range for a split of {n} examples")
        return indices

    def _read(self, indices: np.ndarray, from_record, from_example) -> list:
        """from_record of each raw array_record record, or from_example of tfds's decoded example."""
        keys = [int(i) for i in indices]
        if not keys:
            return []
        if self._raw_source is not None:
            return [from_record(r, self.info) for r in self._raw_source.__getitems__(keys)]
        return [from_example(ex, self.info) for ex in self._tfds_source.__getitems__(keys)]

    def __repr__(self) -> str:
        i = self.info
        where = "in memory" if self.in_memory else "array_record"
        return f"Source({i.name!r}, split={i.split!r}, n={i.num_examples}, {where})"

def check_resize(info: DataInfo, image_size, resize_mode) -> str:
    mode = info.resize_mode if resize_mode is None else resize_mode
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES} (or None for the dataset's "
                         f"default), got {resize_mode!r}")
    if image_size is None:
        return mode
    if not config_util.is_int(image_size) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if mode == "pad" and info.image_shape is not None and max(info.image_shape[:2]) > image_size:
        raise ValueError(
            f"resize_mode='pad' cannot fit {info.name!r} images of size "
            f"{info.image_shape[0]}x{info.image_shape[1]} into image_size={image_size}; use a "
            "larger image_size or resize_mode='resize' / 'center_crop'")
    return mode


def _from_tfds(example: Mapping, info: DataInfo) -> tuple[np.ndarray, int]:
    image = np.asarray(example[info.image_key])
    if image.ndim == 2:
        image = image[..., None]
    label = int(example[info.label_key]) if info.label_key else 0
    return image, label


def _decode_image(data: bytes, channels: int | None) -> np.ndarray:
    image = decode_png_simple(data)
    if image is None or (channels is not None and image.shape[-1] != channels):
        with Image.open(io.BytesIO(data)) as pil:
            if channels == 1 and pil.mode != "L":
                pil = pil.convert("L")
            elif channels == 3 and pil.mode != "RGB":
                pil = pil.convert("RGB")
            image = np.asarray(pil)
        if image.ndim == 2:
            image = image[..., None]
    return image


def _decode_record(record: bytes, info: DataInfo) -> tuple[np.ndarray, int]:
    """Fast path for array_record tf.Examples: protobuf parse + PNG fast path / Pillow.

    tfds's own NumPy decoding spends ~0.1 ms of Python per example before it decodes the
    image; this reads the two features directly. `_make_raw_source` checks it against tfds.
    """
    from tensorflow_datasets.proto import tf_example_pb2

    feature = tf_example_pb2.Example.FromString(record).features.feature
    image = _decode_image(feature[info.image_key].bytes_list.value[0], info.channels)
    label = int(feature[info.label_key].int64_list.value[0]) if info.label_key else 0
    return image, label


_TEXT_ARRAYS = ("attributes", "named")  # with the caption, when the dataset has them


def _text_keys(info: DataInfo) -> list[str]:
    features = info.tfds_info.features
    return [info.caption_key] + [k for k in _TEXT_ARRAYS if k in features]


def _text_of_example(example: Mapping, info: DataInfo) -> dict:
    row = {k: example[k] for k in _text_keys(info)}
    caption = row[info.caption_key]
    row[info.caption_key] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return row


def _text_of_record(record: bytes, info: DataInfo) -> dict:
    from tensorflow_datasets.proto import tf_example_pb2

    feature = tf_example_pb2.Example.FromString(record).features.feature
    row = {k: list(feature[k].int64_list.value) for k in _text_keys(info)[1:]}
    row[info.caption_key] = feature[info.caption_key].bytes_list.value[0].decode("utf-8")
    return row


def _stack_text(rows: list[dict], info: DataInfo) -> dict[str, np.ndarray]:
    out = {info.caption_key: np.asarray([r[info.caption_key] for r in rows], dtype=str)}
    for k in _text_keys(info)[1:]:
        feature = info.tfds_info.features[k]
        out[k] = np.asarray([r[k] for r in rows], dtype=feature.np_dtype).reshape(
            len(rows), *feature.shape)
    return out


def _make_raw_source(builder, split: str, info: DataInfo, decoded_source):
    """A RAW_BYTES data source when the fast decoding path agrees with tfds on record 0."""
    if not isinstance(info.tfds_info.features[info.image_key], tfds.features.Image):
        return None
    try:
        raw = builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        if len(raw) == 0:
            return None
        fast = _decode_record(raw[0], info)
        ref = _from_tfds(decoded_source[0], info)
        if fast[1] != ref[1] or not np.array_equal(fast[0], ref[0]):
            return None
        if info.caption_key is not None:
            fast_text = _stack_text([_text_of_record(raw[0], info)], info)
            ref_text = _stack_text([_text_of_example(decoded_source[0], info)], info)
            if any(not np.array_equal(fast_text[k], ref_text[k]) for k in ref_text):
                return None
        return raw
    except Exception:  # any surprise: use tfds's own decoding
        return None


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (tfds's default)."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _resolve_data_dir(data_dir) -> str:
    if data_dir and "://" in os.fspath(data_dir):  # gs://...: tfds reads it through etils.epath
        return os.fspath(data_dir)
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir))) if data_dir else \
        os.path.abspath(default_data_dir())


def _cfg_get(cfg, key, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    try:
        value = getattr(cfg, key)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def _resolve(config_or_name) -> tuple[str, dict]:
    """Dataset name and optional source settings from a name or a (data) config."""
    if isinstance(config_or_name, str):
        return config_or_name, {}
    cfg = config_or_name
    data = _cfg_get(cfg, "data")
    if data is not None and not isinstance(data, (str, bytes)):
        cfg = data
    name = _cfg_get(cfg, "name") or _cfg_get(cfg, "dataset")
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"cannot find a dataset name in {type(config_or_name).__name__}: expected a string, "
            "or a config with `name` (or `dataset`), possibly under `data`")
    extra = {k: _cfg_get(cfg, k) for k in ("data_dir", "manual_dir", "in_memory")}
    return name, {k: v for k, v in extra.items() if v is not None}


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


@contextlib.contextmanager
def _file_lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fashion_idx_dir(name: str, manual_dir, data_dir: str) -> str:
    directory = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else \
        _ds.FASHION_MNIST_DEBIAN_DIR
    how = (
        "Install Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`,"
        f" or run scripts/install_system_deps.sh as root), which puts the idx files in "
        f"{_ds.FASHION_MNIST_DEBIAN_DIR}, or pass manual_dir=<directory with "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz (gzipped or not)>."
    )
    if not os.path.isdir(directory):
        which = "manual_dir" if manual_dir else "the Debian dataset directory"
        raise ValueError(
            f"{name} is not prepared in data_dir {data_dir!r} and {which} "
            f"{directory!r} does not exist. {how}")
    try:
        _ds.find_idx_files(directory)
    except ValueError as e:
        raise ValueError(f"{name} is not prepared in data_dir {data_dir!r}: {e}. {how}") \
            from None
    return directory


def prepare(name: str, data_dir: str | os.PathLike | None = None, *,
            manual_dir: str | os.PathLike | None = None):
    """Prepares a bundled dataset in data_dir once (array_record) and returns its tfds builder.

    Idempotent: an already prepared dataset is reused as it is (manual_dir is then unused).
    """
    if name not in _ds.BUILDERS:
        raise ValueError(
            f"prepare() builds the bundled datasets {BUNDLED_DATASETS}, not {name!r}; prepare "
            "other tfds datasets with tfds (`tfds build NAME --file_format=array_record`)")
    data_dir = _resolve_data_dir(data_dir)
    cls = _ds.BUILDERS[name]
    builder = _bundled_builder(cls, data_dir)
    if builder.is_prepared():
        return builder
    download_config = None
    if issubclass(cls, _ds.FashionMnist):  # fashion_mnist, fashion_mnist_text
        download_config = tfds.download.DownloadConfig(
            manual_dir=_fashion_idx_dir(name, manual_dir, data_dir))
    os.makedirs(data_dir, exist_ok=True)
    with _file_lock(os.path.join(data_dir, f".{name}.jaxdiff.lock")):
        builder = _bundled_builder(cls, data_dir)
        if not builder.is_prepared():  # another process may have prepared it meanwhile
            builder.download_and_prepare(download_config=download_config)
            builder = _bundled_builder(cls, data_dir)
    return builder


def _bundled_builder(cls, data_dir: str):
    try:
        return cls(data_dir=data_dir, file_format="array_record")
    except ValueError as e:  # prepared before in another format, e.g. by tfds with TensorFlow
        if "file format" not in str(e).lower():
            raise
        path = os.path.join(data_dir, cls.name, str(cls.VERSION))
        raise ValueError(
            f"{cls.name} in {path} was prepared in another file format ({e}); jaxdiff reads "
            "array_record. Remove that directory or pass another data_dir.") from None


def _unknown_dataset(name: str, data_dir: str, cause: str) -> ValueError:
    return ValueError(
        f"unknown dataset {name!r} ({cause}). Known without preparation: "
        f"{', '.join(BUNDLED_DATASETS)}. Any other tfds image dataset works once prepared in "
        f"data_dir {data_dir!r} as array_record files, e.g. on a machine with TensorFlow: "
        f"`tfds build {_base_name(name) or 'NAME'} --data_dir={data_dir} "
        "--file_format=array_record` (or tfds.builder(NAME, data_dir=..., "
        "file_format='array_record').download_and_prepare()); then pass data_dir here.")


def _open_builder(name: str, data_dir: str, manual_dir):
    if name in _ds.BUILDERS:
        return prepare(name, data_dir, manual_dir=manual_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, bad config/version, ...
        raise _unknown_dataset(name, data_dir, f"tfds: {str(e).splitlines()[0]}") from None
    if not builder.is_prepared():
        raise _unknown_dataset(name, data_dir, f"it is not prepared in data_dir {data_dir!r}")
    return builder


def _check_split(name: str, split, builder) -> str:
    available = sorted(builder.info.splits.keys())
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}; "
                         f"{name!r} has splits {available}")
    for part in split.split("+"):
        base = part.split("[")[0].strip()
        if base not in available:
            raise ValueError(
                f"unknown split {split!r} for dataset {name!r}: {base!r} is not one of "
                f"{available} (tfds slicing such as 'train[:90%]' or 'train+test' is allowed)")
    return split


def _keys(features, supervised_keys) -> tuple[str, str | None]:
    names = list(features.keys())
    image_key = label_key = None
    if supervised_keys and len(supervised_keys) == 2 and all(
            isinstance(k, str) for k in supervised_keys):
        image_key, label_key = supervised_keys
    if image_key not in names:
        image_key = "image" if "image" in names else next(
            (k for k in names if isinstance(features[k], tfds.features.Image)), None)
    if label_key not in names or not isinstance(features[label_key], tfds.features.ClassLabel):
        label_key = "label" if "label" in names and isinstance(
            features["label"], tfds.features.ClassLabel) else None
    return image_key, label_key


def make_source(config_or_name, split: str, data_dir: str | os.PathLike | None = None, *,
                manual_dir: str | os.PathLike | None = None,
                in_memory: bool | None = None) -> tuple[Source, DataInfo]:
    """Opens one split of a dataset: ``(source, info)``.

    Args:
      config_or_name: a dataset name ("digits", "fashion_mnist", or a prepared tfds dataset such
        as "cifar10" or "imagenet_resized/64x64"), or a config (ml_collections / dict) with
        ``name`` (or ``dataset``), optionally ``data_dir``, ``manual_dir``, ``in_memory``, either
        at top level or under ``data``. Explicit arguments win over the config.
      split: "train", "test", ... or tfds slicing ("train[:90%]").
      data_dir: tfds data directory (default `default_data_dir()`), where the bundled datasets
        are prepared on first use.
      manual_dir: fashion_mnist(_text), when it still has to be prepared: the idx files' directory
        (default: Debian's /usr/share/datasets/fashion-mnist).
      in_memory: decode the whole split into arrays once (default: True for the bundled
        datasets, False otherwise).

    Raises:
      ValueError: unknown dataset, dataset not prepared, fashion_mnist idx files missing,
        unknown split, not an uint8 image dataset.
    """
    name, cfg = _resolve(config_or_name)
    data_dir = _resolve_data_dir(data_dir if data_dir is not None else cfg.get("data_dir"))
    manual_dir = manual_dir if manual_dir is not None else cfg.get("manual_dir")
    if in_memory is None:
        in_memory = cfg.get("in_memory")
    base = _base_name(name)
    if in_memory is None:
        in_memory = name in _IN_MEMORY
    builder = _open_builder(name, data_dir, manual_dir)
    split = _check_split(name, split, builder)
    tinfo = builder.info
    features = tinfo.features
    image_key, label_key = _keys(features, tinfo.supervised_keys)
    if image_key is None:
        raise ValueError(f"dataset {name!r} has no image feature (features: {list(features)})")
    image_feature = features[image_key]
    shape = tuple(image_feature.shape)
    if np.dtype(image_feature.np_dtype) != np.uint8 or len(shape) != 3 or shape[-1] not in (1, 3):
        raise ValueError(
            f"dataset {name!r}: feature {image_key!r} is {image_feature.np_dtype} {shape}; jaxdiff "
            "needs uint8 images with 1 or 3 channels")
    image_shape = shape if all(d is not None for d in shape) else None
    caption_key = "caption" if "caption" in features.keys() and isinstance(
        features["caption"], tfds.features.Text) else None
    caption_metadata = None
    if caption_key is not None and tinfo.metadata is not None and "vocabulary" in tinfo.metadata:
        caption_metadata = dict(tinfo.metadata)
    if label_key is not None:
        label_feature = features[label_key]
        num_classes, class_names = label_feature.num_classes, tuple(label_feature.names)
    else:
        num_classes, class_names = 0, ()
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    if tinfo.file_format not in random_access:
        raise ValueError(
            f"dataset {name!r} in {data_dir!r} is stored as {tinfo.file_format}, which has no "
            f"random access; prepare it with file_format='array_record' (tfds build {name} "
            "--file_format=array_record).")
    try:
        decoded = builder.as_data_source(split=split)
    except (NotImplementedError, ValueError, AssertionError) as e:
        raise ValueError(f"cannot read split {split!r} of dataset {name!r}: "
                         f"{str(e).splitlines()[0]}") from None
    info = DataInfo(
        name=name,
        split=split,
        num_examples=len(decoded),
        image_shape=image_shape,
        num_classes=num_classes,
        class_names=class_names,
        random_flip=base not in _NO_FLIP,
        resize_mode="pad" if base in _PAD else (
            "resize" if base in ("digits", "digits_text") else "center_crop"),
        pad_value=0,
        data_dir=data_dir,
        image_key=image_key,
        label_key=label_key,
        tfds_info=tinfo,
        caption_key=caption_key,
        captions=caption_metadata,
    )
    if info.num_examples == 0:
        raise ValueError(f"split {split!r} of dataset {name!r} is empty")
    raw = _make_raw_source(builder, split, info, decoded)
    source = Source(info, tfds_source=decoded, raw_source=raw)
    if in_memory:
        images, labels = source.arrays()
        images.setflags(write=False)
        labels.setflags(write=False)
        text = source.gather_text(np.arange(len(source))) if caption_key else None
        for v in (text or {}).values():
            v.setflags(write=False)
        source = Source(info, tfds_source=decoded, images=images, labels=labels, text=text)
    return source, info


def stack_images(images, info: DataInfo) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images of {info.name!r} differ in size ({sorted(shapes)[:3]}...); pass image_size "
            "to get them at one size")
    return np.stack(images) if images else np.zeros((0, 1, 1, info.channels or 3), np.uint8)


def load_split(config_or_name, split: str, data_dir: str | os.PathLike | None = None, *,
               manual_dir: str | os.PathLike | None = None, image_size: int | None = None,
               resize_mode: str | None = None,
               max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as ``(uint8 images NHWC, int32 labels)``, in stored order, no augmentation.

    For evaluation and reference statistics. ``image_size`` / ``resize_mode`` as in `batches`
    (so reference images can match what the model is trained on); ``max_examples`` keeps the
    first ones.
    """
    source, info = make_source(config_or_name, split, data_dir, manual_dir=manual_dir,
                               in_memory=False)
    mode = check_resize(info, image_size, resize_mode)
    n = len(source) if max_examples is None else min(int(max_examples), len(source))
    images, labels = [], []
    for start in range(0, n, 4096):
        im, lb = source.gather(np.arange(start, min(n, start + 4096)))
        images.append(resize_images(im, image_size, mode, info.pad_value)
                      if image_size else stack_images(im, info))
        labels.append(lb)
    if not images:
        return np.zeros((0, *(info.image_shape or (1, 1, 3))), np.uint8), np.zeros(0, np.int32)
    return np.concatenate(images), np.concatenate(labels)
