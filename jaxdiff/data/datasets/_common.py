"""Helpers shared by the bundled builders and the input pipeline: PNG coding, tfds glue."""

from __future__ import annotations

import os
import struct
import sys
import zlib
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import utils as tfds_utils

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, gray+alpha, RGB, RGBA)
_CHANNELS = {v: k for k, v in _COLOR_TYPE.items()}


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image: np.ndarray, level: int = 6) -> bytes:
    """Standard PNG bytes (8-bit, no interlace, filter type 0) of a uint8 (H, W, C) image.

    Written directly with zlib: tfds's `Image` feature stores encoded bytes as they are (an array
    would need TensorFlow), and Pillow's encoder is slower. Any PNG reader decodes these. `level`
    is the zlib level (0 = stored: faster to write and read, larger).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in _COLOR_TYPE:
        raise ValueError(f"expected a uint8 (H, W, 1|2|3|4) image, got {image.dtype} {image.shape}")
    h, w, c = image.shape
    rows = np.zeros((h, 1 + w * c), np.uint8)  # leading 0 per row = filter type "None"
    rows[:, 1:] = image.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return (_PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
            + _chunk(b"IEND", b""))


def decode_png_simple(data: bytes) -> np.ndarray | None:
    """Fast path for PNGs like `encode_png` writes: uint8 (H, W, C), or None for anything else.

    Handles 8-bit gray / gray+alpha / RGB / RGBA, non-interlaced, every row filtered with type 0.
    Returns None (the caller falls back to Pillow) for other PNGs and for non-PNG data.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, n = 8, len(data)
    idat, ihdr = [], None
    while pos + 8 <= n:
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if ihdr is None:
        return None
    w, h, depth, color_type, _, _, interlace = ihdr
    if depth != 8 or interlace != 0 or color_type not in _CHANNELS:
        return None
    c = _CHANNELS[color_type]
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error:
        return None
    if len(raw) != h * (1 + w * c):
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w * c)
    if rows[:, 0].any():  # some row uses a Sub/Up/Average/Paeth filter
        return None
    return rows[:, 1:].reshape(h, w, c).copy()


class OfflineBuilderMixin:
    """Put first in the bases of a `tfds.core.GeneratorBasedBuilder` defined in jaxdiff.

    tfds 4.9.x's `DatasetBuilder.code_path` needs the `importlib_resources` backport (declared only
    for Python < 3.9) for builders in an installed package; it only locates `checksums.tsv`, so the
    module's own file is the answer.
    """

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(sys.modules[cls.__module__].__file__)


def serialize_example(png: bytes, label: int, extra: Mapping[str, Any] | None = None) -> bytes:
    """The tf.train.Example tfds writes for {"image": Image(), "label": ClassLabel()} and `extra`.

    Extra features as tfds writes them: str as UTF-8 bytes, bytes as they are, integer or bool
    arrays as flat int64 lists (bools 0/1), float arrays as flat float lists.
    """
    from tensorflow_datasets.proto import tf_example_pb2

    example = tf_example_pb2.Example()
    feature = example.features.feature
    feature["image"].bytes_list.value.append(png)
    feature["label"].int64_list.value.append(int(label))
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            feature[key].bytes_list.value.append(value.encode("utf-8"))
        elif isinstance(value, bytes):
            feature[key].bytes_list.value.append(value)
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            feature[key].int64_list.value.extend([int(v) for v in value])  # bool -> 0/1
        else:
            v = np.asarray(value)
            if v.dtype == np.bool_ or np.issubdtype(v.dtype, np.integer):
                feature[key].int64_list.value.extend(v.astype(np.int64).ravel().tolist())
            elif np.issubdtype(v.dtype, np.floating):
                feature[key].float_list.value.extend(v.astype(np.float32).ravel().tolist())
            else:
                raise ValueError(f"feature {key!r}: cannot serialize {v.dtype} values")
    return example.SerializeToString()


class ImageArraysBuilder(OfflineBuilderMixin, tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
    """Base for builders whose splits are uint8 image arrays with integer labels.

    Subclasses implement `_split_arrays(dl_manager) -> {split: (images NHWC uint8, labels)}` and
    `_info` with features {"image": Image(shape), "label": ClassLabel(...)}.

    tfds's generic writer (`_split_generators` / `_generate_examples`, kept and equivalent) is
    slow, so `_download_and_prepare` writes the same tf.train.Examples itself (one array_record
    shard per split, in array order), leaving the rest to tfds; the first record is decoded back
    with tfds's features as a check.

    `_info` is built from the class attributes below; subclasses add features by overriding
    `_features` and `_extra_features` (their values, from all splits' arrays), and store
    dataset-level facts in `_metadata` (a `tfds.core.MetadataDict`, saved as metadata.json).
    """

    DESCRIPTION: str = ""
    HOMEPAGE: str | None = None
    IMAGE_SHAPE: tuple[int, int, int] | None = None
    CLASS_NAMES: tuple[str, ...] = ()

    #: False: use tfds's generic (slow) writer instead.
    FAST_WRITE = True
    #: zlib level of the PNGs: 0 (stored) is faster to write and to decode than 6.
    PNG_LEVEL = 0

    def _split_arrays(self, dl_manager) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def _features(self) -> dict:
        return {"image": tfds.features.Image(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES))}

    def _metadata(self) -> tfds.core.MetadataDict | None:
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=tfds.features.FeaturesDict(self._features()),
                                     supervised_keys=("image", "label"), homepage=self.HOMEPAGE,
                                     disable_shuffling=True, metadata=self._metadata())

    def _extra_features(self, arrays: dict[str, tuple]) -> dict[str, dict[str, Any]]:
        """{split: {feature: one value per example}} beyond image and label ({}: none)."""
        del arrays
        return {}

    def _split_generators(self, dl_manager):
        arrays = self._split_arrays(dl_manager)
        extra = self._extra_features(arrays)
        return {split: self._generate_examples(images, labels, extra.get(split, {}))
                for split, (images, labels) in arrays.items()}

    def _generate_examples(self, images, labels, extra=None):
        extra = extra or {}
        for i in range(len(images)):
            yield i, {"image": encode_png(images[i], self.PNG_LEVEL), "label": int(labels[i]),
                      **{k: v[i] for k, v in extra.items()}}

    def _download_and_prepare(self, dl_manager, download_config):
        if not self.FAST_WRITE:
            return super()._download_and_prepare(dl_manager, download_config)
        adapter = file_adapters.ADAPTER_FOR_FORMAT[self.info.file_format]
        split_infos = []
        arrays = self._split_arrays(dl_manager)
        extras = self._extra_features(arrays)
        for split, (images, labels) in arrays.items():
            # rows as Python values (lists of ints from integer arrays): faster to serialize
            extra = {k: v.tolist() if isinstance(v, np.ndarray) else v
                     for k, v in extras.get(split, {}).items()}
            n = len(images)
            if n == 0:
                raise ValueError(f"{self.name}: split {split!r} is empty")
            template = self._get_filename_template(split_name=split)
            path = template.sharded_filepath(shard_index=0, num_shards=1)
            examples = ((i, serialize_example(encode_png(images[i], self.PNG_LEVEL), labels[i],
                                              {k: v[i] for k, v in extra.items()}))
                        for i in range(n))
            adapter.write_examples(path, examples)
            split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n],
                                                   num_bytes=os.path.getsize(os.fspath(path)),
                                                   filename_template=template))
            self._check_first_record(path, images[0], labels[0], {k: v[0] for k, v in extra.items()})
        self.info.set_splits(tfds.core.SplitDict(split_infos))

    def _check_first_record(self, path, image, label, extra) -> None:
        from array_record.python import array_record_data_source

        with array_record_data_source.ArrayRecordDataSource([os.fspath(path)]) as source:
            example = self.info.features.deserialize_example_np(source[0])
        got = np.asarray(example["image"]).reshape(np.shape(image))
        same = int(example["label"]) == int(label) and np.array_equal(got, image)
        for key, want in extra.items():
            value = example[key]
            if isinstance(want, str):
                same &= (value.decode("utf-8") if isinstance(value, bytes) else value) == want
            else:
                same &= np.array_equal(np.asarray(value), np.asarray(want))
        if not same:
            raise RuntimeError(f"{self.name}: {path} does not decode to what was written")
