"""Datasets (tfds builders without TensorFlow) and the deterministic per-host input pipeline."""

import gzip
import os
import pathlib
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff.data import batching, datasets, transforms
from jaxdiff.data import order as data_order
from jaxdiff.data import sources as data_sources
from jaxdiff.data.datasets._common import ImageArraysBuilder, decode_png_simple, encode_png

DEBIAN_DIR = pathlib.Path(datasets.FASHION_MNIST_DEBIAN_DIR)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def digits(data_dir):
    return data_sources.make_source("digits", "train", data_dir)


def _write_idx(path, array, gz):
    array = np.asarray(array, np.uint8)
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


@pytest.fixture(scope="session")
def fake_fashion(tmp_path_factory):
    """Tiny idx directory: gzipped train files (as Debian ships them) and plain test files."""
    root = tmp_path_factory.mktemp("fake_fashion")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, n, gz in (("train", "train", 40, True), ("test", "t10k", 12, False)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[split] = (images[..., None], labels)
    return root, arrays


@pytest.fixture(scope="session")
def fashion(tmp_path_factory, fake_fashion):
    root, arrays = fake_fashion
    dd = tmp_path_factory.mktemp("tfds_fake_fashion")
    source, info = data_sources.make_source("fashion_mnist", "train", dd, manual_dir=root)
    return source, info, arrays


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------


def test_digits_builds_and_loads(digits, data_dir):
    source, info = digits
    assert info.num_examples == len(source) == 1438
    assert info.image_shape == (8, 8, 1) and info.num_classes == 10
    assert not info.random_flip and info.resize_mode == "resize"
    images, labels = source.arrays()
    assert images.shape == (1438, 8, 8, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() == 0 and labels.max() == 9
    assert images.max() == 255 and images.min() == 0  # 0..16 scaled to 0..255
    test_images, test_labels = data_sources.load_split("digits", "test", data_dir)
    assert test_images.shape == (359, 8, 8, 1) and test_labels.shape == (359,)
    # Stored in scikit-learn order: exactly the documented split of the scaled arrays.
    all_images, all_labels = datasets.digits_arrays()
    split = datasets.digits_split(all_labels)
    np.testing.assert_array_equal(images, all_images[split["train"]])
    np.testing.assert_array_equal(test_labels, all_labels[split["test"]])
    # The same files read back with plain tfds.
    ds = tfds.data_source("digits", split="test", data_dir=os.fspath(data_dir))
    assert len(ds) == 359
    np.testing.assert_array_equal(ds[5]["image"], test_images[5])


def test_digits_split_is_fixed():
    _, labels = datasets.digits_arrays()
    split = datasets.digits_split(labels)
    assert len(split["train"]) == 1438 and len(split["test"]) == 359
    assert not np.intersect1d(split["train"], split["test"]).size
    # Stratified: every class has floor(0.2 n + 0.5) test examples.
    np.testing.assert_array_equal(np.bincount(labels[split["test"]]),
                                  [36, 36, 35, 37, 36, 36, 36, 36, 35, 36])
    assert split["test"][:8].tolist() == [3, 7, 13, 19, 36, 38, 43, 48]
    assert int(split["test"].sum()) == 311827


def test_preparation_is_idempotent(digits, data_dir):
    shard = next((pathlib.Path(data_dir) / "digits" / "1.0.0").glob("digits-train.array_record*"))
    mtime = shard.stat().st_mtime_ns
    source, _ = data_sources.make_source("digits", "train", data_dir)
    assert shard.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(source.arrays()[0], digits[0].arrays()[0])


def test_fast_writer_matches_tfds_generic_writer(tmp_path, digits):
    class SlowDigits(datasets.Digits, skip_registration=True):
        name = "digits"
        FAST_WRITE = False

    builder = SlowDigits(data_dir=os.fspath(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    ds = builder.as_data_source(split="train")
    images, labels = digits[0].arrays()
    assert len(ds) == len(images)
    for i in (0, 1, 700, len(ds) - 1):
        np.testing.assert_array_equal(ds[i]["image"], images[i])
        assert ds[i]["label"] == labels[i]


def test_png_codec_round_trip():
    rng = np.random.default_rng(1)
    for shape in ((28, 28, 1), (5, 7, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for level in (0, 6):
            np.testing.assert_array_equal(decode_png_simple(encode_png(image, level)), image)
    assert decode_png_simple(b"not a png") is None


def test_fashion_mnist_from_fake_idx_directory(fashion):
    source, info, arrays = fashion
    assert info.image_shape == (28, 28, 1) and info.num_classes == 10
    assert info.class_names[0] == "T-shirt/top" and info.random_flip
    images, labels = source.arrays()
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])
    test_images, test_labels = data_sources.load_split("fashion_mnist", "test", info.data_dir)
    np.testing.assert_array_equal(test_images, arrays["test"][0])  # read from plain idx files
    np.testing.assert_array_equal(test_labels, arrays["test"][1])
    # Padding 28 -> 32 with the black background (-1 after scaling).
    padded, _ = data_sources.load_split("fashion_mnist", "test", info.data_dir, image_size=32)
    assert padded.shape == (12, 32, 32, 1)
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], arrays["test"][0])
    assert not padded[:, :2].any() and not padded[:, :, 30:].any()
    x, _ = batching.batch_at(source, 0, global_batch_size=4, seed=0, process_index=0,
                         process_count=1, image_size=32, augment=False)
    assert x.shape == (4, 32, 32, 1) and np.all(x[:, :2] == -1.0)


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(),
                    reason=f"{DEBIAN_DIR} absent: Debian package dataset-fashion-mnist not "
                           "installed (scripts/install_system_deps.sh installs it)")
def test_fashion_mnist_real_debian_files(tmp_path):
    source, info = data_sources.make_source("fashion_mnist", "train", tmp_path)
    assert len(source) == 60000 and info.image_shape == (28, 28, 1)
    images, labels = source.arrays()
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
    test_source, test_info = data_sources.make_source("fashion_mnist", "test", tmp_path, in_memory=False)
    assert len(test_source) == test_info.num_examples == 10000
    files = datasets.find_idx_files(DEBIAN_DIR)
    ref_images, ref_labels = datasets.read_split(*files["test"])
    idx = np.array([0, 1, 4321, 9999])
    got_images, got_labels = test_source.gather(idx)
    np.testing.assert_array_equal(got_images, ref_images[idx])
    np.testing.assert_array_equal(got_labels, ref_labels[idx])
    ds = tfds.data_source("fashion_mnist", split="test", data_dir=os.fspath(tmp_path))
    np.testing.assert_array_equal(ds[4321]["image"], ref_images[4321])


# ---------------------------------------------------------------------------------------------
# order, sharding, augmentation
# ---------------------------------------------------------------------------------------------


def test_order_is_pinned():
    # Part of the reproducibility contract: changing these changes every run's data order.
    assert data_order.epoch_permutation(0, 0, 10).tolist() == [1, 3, 4, 5, 9, 8, 6, 7, 2, 0]
    assert data_order.epoch_permutation(0, 1, 10).tolist() == [2, 7, 5, 3, 4, 1, 0, 9, 6, 8]
    assert data_order.flip_mask(0, global_batch_size=16, seed=0).astype(int).tolist() == [
        0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1]


def test_epochs_are_permutations():
    n, b = 1438, 64
    steps = -(-3 * n // b)
    pos = np.concatenate([data_order.global_batch_indices(s, global_batch_size=b, num_examples=n,
                                                    seed=7) for s in range(steps)])
    for e in range(3):
        np.testing.assert_array_equal(np.sort(pos[e * n:(e + 1) * n]), np.arange(n))
    assert not np.array_equal(pos[:n], pos[n:2 * n])  # a fresh order each epoch


def test_resume_sees_the_same_batches(digits):
    source, _ = digits
    kw = dict(global_batch_size=64, seed=3, process_index=0, process_count=1)
    from_zero = list(batching.batches(source, start_step=0, num_steps=25, **kw))
    resumed = list(batching.batches(source, start_step=20, num_steps=5, prefetch=0, **kw))
    for (x0, y0), (x1, y1) in zip(from_zero[20:], resumed):  # step 22 straddles epochs 0 and 1
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
    x, y = batching.batch_at(source, 22, **kw)
    np.testing.assert_array_equal(x, from_zero[22][0])
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (64, 8, 8, 1)
    assert x.min() == -1.0 and x.max() == 1.0
    other_seed = batching.batch_at(source, 22, **{**kw, "seed": 4})[1]
    assert not np.array_equal(other_seed, y)


def test_process_slices_partition_the_global_batch(digits):
    source, _ = digits
    for step in (0, 22):
        x, y = batching.batch_at(source, step, global_batch_size=64, seed=1, process_index=0,
                             process_count=1)
        parts = [batching.batch_at(source, step, global_batch_size=64, seed=1, process_index=p,
                               process_count=2) for p in range(2)]
        assert all(px.shape == (32, 8, 8, 1) for px, _ in parts)
        np.testing.assert_array_equal(np.concatenate([px for px, _ in parts]), x)
        np.testing.assert_array_equal(np.concatenate([py for _, py in parts]), y)
        idx = data_order.global_batch_indices(step, global_batch_size=64, num_examples=len(source),
                                        seed=1)
        perms = np.concatenate([data_order.epoch_permutation(1, e, len(source)) for e in (0, 1)])
        np.testing.assert_array_equal(idx, perms[step * 64:(step + 1) * 64])
        if step == 0:  # within one epoch the two slices hold different examples
            assert len(set(idx[:32]) & set(idx[32:])) == 0 and len(set(idx)) == 64
        images, labels = source.arrays()
        np.testing.assert_array_equal(y, labels[idx])
        np.testing.assert_array_equal(x, images[idx] / np.float32(127.5) - 1)  # digits: no flips


def test_flips_only_where_configured(fashion, digits):
    source, _, _ = fashion
    images, _ = source.arrays()
    b = 16
    kw = dict(global_batch_size=b, seed=5, process_count=1, process_index=0)
    for step in range(3):
        idx = data_order.global_batch_indices(step, global_batch_size=b, num_examples=len(source),
                                        seed=5)
        plain = images[idx] / np.float32(127.5) - 1
        mask = data_order.flip_mask(step, global_batch_size=b, seed=5)
        x, _ = batching.batch_at(source, step, **kw)  # fashion_mnist: flips on by default
        np.testing.assert_array_equal(x[~mask], plain[~mask])
        np.testing.assert_array_equal(x[mask], plain[mask][:, :, ::-1])
        assert 0 < mask.sum() < b
        np.testing.assert_array_equal(batching.batch_at(source, step, augment=False, **kw)[0], plain)
        # Per host: each process flips its own slice of the same global mask.
        x1, _ = batching.batch_at(source, step, **{**kw, "process_count": 2, "process_index": 1})
        np.testing.assert_array_equal(x1, x[b // 2:])
    dsource, _ = digits
    x_on, _ = batching.batch_at(dsource, 0, augment=True, **kw)
    x_off, _ = batching.batch_at(dsource, 0, **kw)
    mask = data_order.flip_mask(0, global_batch_size=b, seed=5)
    np.testing.assert_array_equal(x_on[mask], x_off[mask][:, :, ::-1])


def test_resize_modes(digits):
    source, _ = digits
    x, _ = batching.batch_at(source, 0, global_batch_size=8, seed=0, process_index=0,
                         process_count=1, image_size=16)  # digits default: bicubic resize
    assert x.shape == (8, 16, 16, 1) and x.min() >= -1 and x.max() <= 1
    images = [np.zeros((40, 60, 3), np.uint8), np.full((64, 48, 3), 200, np.uint8)]
    out = transforms.resize_images(images, 16, "center_crop")
    assert out.shape == (2, 16, 16, 3) and np.all(out[1] == 200)


# ---------------------------------------------------------------------------------------------
# any prepared tfds dataset
# ---------------------------------------------------------------------------------------------


class ToyRgb(ImageArraysBuilder, skip_registration=True):
    """Stands in for a user-prepared tfds dataset (like cifar10) with images of varying size."""

    name = "toy_rgb"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_arrays(self, dl_manager):
        rng = np.random.default_rng(0)
        sizes = [(20, 24), (24, 20), (32, 32), (18, 30), (40, 20), (16, 16)]
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
        return {"train": (images, np.arange(6) % 3), "validation": (images[:2], np.zeros(2))}


def test_other_prepared_tfds_dataset(tmp_path):
    ToyRgb(data_dir=os.fspath(tmp_path), file_format="array_record").download_and_prepare()
    config = ml_collections.ConfigDict({"data": {"name": "toy_rgb", "data_dir": str(tmp_path)}})
    source, info = data_sources.make_source(config, "train")  # read by tfds from the files alone
    assert info.image_shape is None and info.num_classes == 3 and info.random_flip
    assert info.resize_mode == "center_crop" and not source.in_memory
    x, y = batching.batch_at(source, 0, global_batch_size=4, seed=0, process_index=0,
                         process_count=1, image_size=16)
    assert x.shape == (4, 16, 16, 3) and y.dtype == np.int32
    with pytest.raises(ValueError, match="image_size"):
        batching.batch_at(source, 0, global_batch_size=4, seed=0, process_index=0, process_count=1)
    images, labels = data_sources.load_split("toy_rgb", "validation", tmp_path, image_size=8)
    assert images.shape == (2, 8, 8, 3) and labels.tolist() == [0, 0]
    src_slice, info_slice = data_sources.make_source("toy_rgb", "train[:50%]", tmp_path)
    assert len(src_slice) == info_slice.num_examples == 3


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'") as e:
        data_sources.make_source("no_such_dataset", "train", tmp_path)
    assert "digits" in str(e.value) and "fashion_mnist" in str(e.value)
    assert "tfds build" in str(e.value) and "array_record" in str(e.value)
    with pytest.raises(ValueError, match="not prepared"):  # a tfds dataset nobody prepared here
        data_sources.make_source("cifar10", "train", tmp_path)


def test_missing_fashion_mnist_directory(tmp_path):
    with pytest.raises(ValueError, match="dataset-fashion-mnist") as e:
        data_sources.make_source("fashion_mnist", "train", tmp_path / "tfds",
                         manual_dir=tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and "manual_dir" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        data_sources.make_source("fashion_mnist", "train", tmp_path / "tfds", manual_dir=tmp_path / "empty")


def test_bad_batching_arguments(digits):
    source, _ = digits
    with pytest.raises(ValueError, match="global_batch_size=10 cannot be shared by "
                                         "process_count=3"):
        batching.batches(source, global_batch_size=10, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2"):
        batching.batches(source, global_batch_size=8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start_step"):
        batching.batches(source, global_batch_size=8, seed=0, start_step=-1, process_index=0,
                     process_count=1)
    with pytest.raises(ValueError, match="resize_mode"):
        batching.batches(source, global_batch_size=8, seed=0, process_index=0, process_count=1,
                     image_size=16, resize_mode="stretch")


def test_pad_cannot_shrink(fashion):
    source = fashion[0]
    with pytest.raises(ValueError, match="image_size=16"):
        batching.batches(source, global_batch_size=8, seed=0, process_index=0, process_count=1,
                     image_size=16)


def test_unknown_split(data_dir, digits):
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
        data_sources.make_source("digits", "validation", data_dir)
