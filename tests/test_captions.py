"""Captioned datasets (digits_text, fashion_mnist_text) and the attribute oracle."""

import os
import pathlib

import numpy as np
import pytest

from jaxdiff.data import __main__ as data_cli
from jaxdiff.data import captions, datasets, transforms
from jaxdiff.data import sources as data_sources
from jaxdiff.data.tokenizers import WordTokenizer

DEBIAN_DIR = pathlib.Path(datasets.FASHION_MNIST_DEBIAN_DIR)
DIGITS = captions.scheme("digits")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds_text")


@pytest.fixture(scope="module")
def digits_text(data_dir):
    """{split: (source, info, images, labels, text)} of digits_text, prepared by the CLI."""
    data_cli.main(["prepare", "digits_text", "--data_dir", os.fspath(data_dir)])
    out = {}
    for split in ("train", "test"):
        source, info = data_sources.make_source("digits_text", split, data_dir)
        images, labels = source.arrays()
        out[split] = (source, info, images, labels, source.gather_text(np.arange(len(source))))
    return out


def _thresholds(info):
    s, t = captions.from_metadata(info.captions)
    assert s is captions.scheme(info.name)
    return t


def test_digits_text_is_digits_with_captions(digits_text):
    images, labels = datasets.digits_arrays()
    for split, idx in datasets.digits_split(labels).items():
        source, info, got_images, got_labels, text = digits_text[split]
        np.testing.assert_array_equal(got_images, images[idx])
        np.testing.assert_array_equal(got_labels, labels[idx])
        assert info.caption_key == "caption" and info.image_shape == (8, 8, 1)
        assert not info.random_flip and info.resize_mode == "resize"  # as digits
        assert text["caption"].shape == (len(idx),)
        assert text["attributes"].shape == text["named"].shape == (len(idx), 3)
        assert text["attributes"].dtype == np.int32 and text["named"].dtype == bool
        # read from the records (not in memory): the same
        lazy, _ = data_sources.make_source("digits_text", split, info.data_dir, in_memory=False)
        some = np.array([0, 5, len(idx) - 1])
        for key, value in lazy.gather_text(some).items():
            np.testing.assert_array_equal(value, text[key][some])
        got, got_lb = lazy.gather(some)  # images and labels as for any image dataset
        np.testing.assert_array_equal(got, images[idx][some])
    plain, _ = data_sources.make_source("digits", "test", digits_text["test"][1].data_dir)
    with pytest.raises(ValueError, match="has no captions; captioned datasets: digits_text"):
        plain.gather_text([0])


def test_thresholds_are_the_train_tertiles(digits_text):
    _, info, images, labels, text = digits_text["train"]
    t = _thresholds(info)
    values = captions.measure(DIGITS, images)
    np.testing.assert_array_equal(t, captions.tertile_thresholds(DIGITS, values, labels))
    bins = text["attributes"]
    np.testing.assert_array_equal(bins, captions.bins_of(values, labels, t))
    for c in range(10):  # each class: round(n/3) +- 1 per bin (ties could make it worse)
        n = int(np.sum(labels == c))
        for j in range(3):
            counts = np.bincount(bins[labels == c, j], minlength=3)
            assert np.all(np.abs(counts - n / 3) <= 1.5), (c, j, counts)
            v = np.sort(values[labels == c, j])
            k = round(n / 3)
            assert v[k - 1] < t[c, j, 0] < v[k]
    np.testing.assert_allclose(np.mean(bins[..., None] == np.arange(3), axis=0), 1 / 3, atol=0.01)


def test_captions_regenerate_identically(digits_text):
    for split in ("train", "test"):
        _, info, _, labels, text = digits_text[split]
        named = captions.named_mask(len(labels), seed=info.captions["seed"], split=split)
        np.testing.assert_array_equal(text["named"], named)
        again = captions.captions(DIGITS, labels, text["attributes"], named)
        assert again == text["caption"].tolist()
        for i in range(0, len(labels), 37):
            label, requested = captions.parse_caption(DIGITS, text["caption"][i])
            assert label == labels[i]
            np.testing.assert_array_equal(
                requested, captions.requested_bins(text["attributes"][i], text["named"][i]))
    # pinned: a change of the measurements, thresholds or mask stream shows here
    assert digits_text["train"][4]["caption"][:4].tolist() == [
        "a thin zero", "a medium narrow upright one", "a thick slanted two",
        "a four"]
    # row i depends on (seed, split, i) only
    long = captions.named_mask(5000, seed=3, split="train")
    np.testing.assert_array_equal(captions.named_mask(10, seed=3, split="train"), long[:10])
    assert not np.array_equal(captions.named_mask(5000, seed=3, split="test"), long)
    assert not np.array_equal(captions.named_mask(5000, seed=4, split="train"), long)


def test_named_subset_frequency(digits_text):
    named = np.concatenate([digits_text[s][4]["named"] for s in ("train", "test")])
    assert abs(named.mean() - 0.5) < 0.03  # 5391 draws: 4.4 sigma
    mask = captions.named_mask(60000, seed=0, split="train")
    np.testing.assert_allclose(mask.mean(axis=0), 0.5, atol=0.01)
    assert abs(np.mean(~mask.any(axis=1)) - 1 / 8) < 0.01  # class-only captions
    assert abs(np.mean(mask[:, 0] & mask[:, 1]) - 1 / 4) < 0.01  # independent
    text = digits_text["train"][4]
    assert all(len(c.split()) == 2 for c in text["caption"][~text["named"].any(axis=1)])


def test_every_caption_tokenizes_with_the_vocabulary(digits_text, tmp_path):
    info = digits_text["train"][1]
    assert tuple(info.captions["vocabulary"]) == captions.vocabulary(DIGITS)
    path = WordTokenizer(info.captions["vocabulary"]).save(tmp_path / "vocab.json")
    tok = WordTokenizer.load(path)
    all_captions = np.concatenate([digits_text[s][4]["caption"] for s in ("train", "test")])
    tokens, mask = tok.tokens_and_mask(all_captions.tolist(), text_ctx=8)
    assert mask.sum(1).max() == 5  # article + 3 attributes + class
    used = set(tokens[mask].tolist())
    assert used == set(range(len(tok.words)))  # every word of the vocabulary occurs
    assert tok.decode(tokens[1]) == all_captions[1]
    with pytest.raises(ValueError, match="'purple'.*not in the vocabulary"):
        tok.encode("a purple seven")
    fashion = captions.vocabulary("fashion_mnist_text")
    WordTokenizer(fashion).encode("an ankle boot")
    assert "t" not in fashion and "top" in fashion


def test_oracle_recovers_stored_bins_and_is_chance_on_shuffled_pairs(digits_text):
    _, info, images, labels, text = digits_text["train"]
    t = _thresholds(info)
    requested = captions.requested_bins(text["attributes"], text["named"])
    acc = captions.attribute_accuracy(DIGITS, t, images, labels, requested)
    assert acc == {"thickness": 1.0, "width": 1.0, "slant": 1.0}
    np.testing.assert_array_equal(captions.measured_bins(DIGITS, t, images, labels),
                                  text["attributes"])
    # one image's values do not depend on the batch it is measured in
    np.testing.assert_array_equal(captions.measure(DIGITS, images[5:9]),
                                  captions.measure(DIGITS, images)[5:9])
    # the same request as a dict, and as the model produces images: floats in [-1, 1], 16x16
    as_dict = {a: requested[:, j] for j, a in enumerate(DIGITS.attribute_names)}
    model = transforms.to_model_range(np.repeat(np.repeat(images, 2, 1), 2, 2))
    acc = captions.attribute_accuracy(DIGITS, t, model, labels, as_dict)
    assert min(acc.values()) > 0.99  # float32 rounding may move values right at a threshold
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(images))
    shuffled = captions.attribute_accuracy(DIGITS, t, images[perm], labels, requested)
    for a, v in shuffled.items():
        assert abs(v - captions.CHANCE) < 0.08, (a, v)  # ~720 named per attribute: 4 sigma
    none = captions.attribute_accuracy(DIGITS, t, images[:3], labels[:3], {"slant": [0, -1, 2]})
    assert np.isnan(none["width"]) and set(none) == set(DIGITS.attribute_names)


def test_fast_writer_matches_tfds_generic_writer(digits_text, tmp_path):
    class SlowDigitsText(datasets.DigitsText, skip_registration=True):
        name = "digits_text"
        FAST_WRITE = False

    builder = SlowDigitsText(data_dir=os.fspath(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    ds = builder.as_data_source(split="test")
    images, text = digits_text["test"][2], digits_text["test"][4]
    for i in (0, 100, len(ds) - 1):
        np.testing.assert_array_equal(ds[i]["image"], images[i])
        assert ds[i]["caption"].decode() == text["caption"][i]
        np.testing.assert_array_equal(ds[i]["attributes"], text["attributes"][i])
        np.testing.assert_array_equal(ds[i]["named"], text["named"][i])
    reread = type(builder)(data_dir=os.fspath(tmp_path), file_format="array_record")
    assert dict(reread.info.metadata) == digits_text["test"][1].captions


@pytest.mark.parametrize("name", ["digits", "fashion_mnist"])
def test_class_caption_and_longest_caption(name):
    s = captions.scheme(name)
    for c in range(s.num_classes):
        text = captions.class_caption(s, c)
        label, requested = captions.parse_caption(s, text)
        assert label == c and (requested == -1).all() and text.split()[-1] == s.class_words[c].split()[-1]
    every = [captions.caption(s, c, [2] * len(s.attributes), [True] * len(s.attributes))
             for c in range(s.num_classes)]
    assert s.max_words == max(len(t.split()) for t in every)


def test_bad_input():
    t = np.zeros((10, 3, 2))
    ok = np.zeros((2, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="uint8 .* or float"):
        captions.measure(DIGITS, ok.astype(np.int32))
    with pytest.raises(ValueError, match="measured at 8x8; got 12x12"):
        captions.measure(DIGITS, np.zeros((2, 12, 12), np.uint8))
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        captions.measured_bins(DIGITS, t, ok, [0, 10])
    with pytest.raises(ValueError, match="shape \\(10, 3, 2\\)"):
        captions.measured_bins(DIGITS, t[:9], ok, [0, 1])
    with pytest.raises(ValueError, match="0, 1, 2 or -1"):
        captions.attribute_accuracy(DIGITS, t, ok, [0, 1], np.full((2, 3), 3))
    with pytest.raises(ValueError, match="unknown attributes \\['colour'\\]"):
        captions.attribute_accuracy(DIGITS, t, ok, [0, 1], {"colour": [0, 1]})
    with pytest.raises(ValueError, match="no caption scheme for dataset 'cifar10'"):
        captions.scheme("cifar10")
    with pytest.raises(ValueError, match="'purple seven' is not a class"):
        captions.parse_caption(DIGITS, "a purple seven")
    md = captions.metadata(DIGITS, t)
    md["vocabulary"] = md["vocabulary"][::-1]
    with pytest.raises(ValueError, match="another caption scheme"):
        captions.from_metadata(md)


def test_fashion_mnist_text_needs_the_idx_files(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist_text is not prepared.*dataset-fashion"):
        data_sources.make_source("fashion_mnist_text", "train", tmp_path / "tfds",
                         manual_dir=tmp_path / "nowhere")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(),
                    reason=f"{DEBIAN_DIR} absent: Debian package dataset-fashion-mnist not "
                           "installed (scripts/install_system_deps.sh installs it as root)")
def test_fashion_mnist_text_real_files(data_dir):
    s = captions.scheme("fashion_mnist")
    source, info = data_sources.make_source("fashion_mnist_text", "test", data_dir)
    assert len(source) == 10000 and info.random_flip and info.resize_mode == "pad"
    files = datasets.find_idx_files(DEBIAN_DIR)
    train_images, train_labels = datasets.read_split(*files["train"])
    values = captions.measure(s, train_images)
    t = _thresholds(info)
    np.testing.assert_array_equal(t, captions.tertile_thresholds(s, values, train_labels))
    train_bins = captions.bins_of(values, train_labels, t)
    np.testing.assert_allclose(np.mean(train_bins[..., None] == np.arange(3), axis=0), 1 / 3,
                               atol=0.001)
    images, labels = source.arrays()
    np.testing.assert_array_equal(images, datasets.read_split(*files["test"])[0])
    np.testing.assert_array_equal(captions.measure(s, images[2047:2050]),
                                  captions.measure(s, images)[2047:2050])
    text = source.gather_text(np.arange(len(source)))
    WordTokenizer(info.captions["vocabulary"]).tokens_and_mask(text["caption"].tolist(), 8)
    requested = captions.requested_bins(text["attributes"], text["named"])
    padded = transforms.resize_images(images, 32, "pad")  # what the model is trained on
    acc = captions.attribute_accuracy(s, t, padded, labels, requested)
    assert acc == {"size": 1.0, "width": 1.0, "brightness": 1.0}
    # the pipeline flips Fashion-MNIST horizontally: the attributes must not change
    np.testing.assert_array_equal(captions.measured_bins(s, t, images[:, :, ::-1], labels),
                                  text["attributes"])
    # test-split balance with the train thresholds: near a third
    np.testing.assert_allclose(np.mean(text["attributes"][..., None] == np.arange(3), axis=0),
                               1 / 3, atol=0.03)
