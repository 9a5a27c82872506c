"""guided-diffusion's evaluator semantics (jaxdiff.eval.metrics options, jaxdiff.eval.adm): parity with
tests/fixtures/adm_eval_a.npz, streaming npz reading, bad inputs, the reference cache, and sharded
extraction on 8 fake devices and on 2 processes x 2 devices."""

import json
import os
import pathlib
import subprocess
import sys

import _fake_features as F
import _training_helpers as H
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff.data import order as data_order
from jaxdiff.data import sources as data_sources
from jaxdiff.data.datasets._common import ImageArraysBuilder
from jaxdiff.eval import adm as A
from jaxdiff.eval import metrics as M

HERE = pathlib.Path(__file__).parent
BATCH = 16


# ----------------------------------------------------------------------------------------------------
# parity with guided-diffusion's evaluator on stored features
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fx():
    with np.load(HERE / "fixtures" / "adm_eval_a.npz") as z:
        return {k: z[k] for k in z.files}


def _rel(got, want):
    return abs(got - float(want)) / abs(float(want))


def test_fid_and_sfid_match_the_evaluator(fx):
    ref = M.FeatureStats.from_features(fx["ref_pool"], mean_dtype=np.float32, require_full_rank=False)
    np.testing.assert_array_equal(ref.mu, fx["ref_mu"])  # numpy's float32 mean, bit for bit
    np.testing.assert_allclose(ref.sigma, fx["ref_sigma"], rtol=1e-12, atol=1e-14)
    for pool, spatial, want in (("sample_pool", "ref_pool", "fid"), ("sample_spatial", "ref_spatial", "sfid")):
        acc = M.MomentAccumulator(np.float32)  # streamed in uneven chunks
        for rows in np.array_split(fx[pool], [1, 100, 613, 1000]):
            acc.update(rows)
        np.testing.assert_array_equal(acc.mean(), np.mean(fx[pool], axis=0))
        np.testing.assert_allclose(acc.covariance(), np.cov(fx[pool], rowvar=False), rtol=1e-10, atol=1e-13)
        other = M.FeatureStats.from_features(fx[spatial], mean_dtype=np.float32, require_full_rank=False)
        got = M.frechet_distance(acc.mean(), acc.covariance(), other.mu, other.sigma)
        assert _rel(got, fx[want]) < 1e-6, (want, got, float(fx[want]))


def test_inception_score_matches_the_evaluator(fx):
    logits = fx["is_acts"] @ fx["is_weights"]  # float32, as the evaluator's matmul before its softmax
    probs = M.softmax(logits, np.float32)
    assert probs.dtype == np.float32
    got, _ = M.inception_score(probs, split_size=5000, dtype=np.float32)  # parts of 5000, 5000, 2000
    assert _rel(got, fx["inception_score"]) < 1e-5
    whole, _ = M.inception_score(probs, split_size=12000, dtype=np.float32)
    assert abs(whole - got) > 1e-3  # the parts matter
    with pytest.raises(ValueError, match="not both"):
        M.inception_score(probs, splits=2, split_size=5000)


def test_precision_recall_and_radii_match_the_evaluator(fx):
    p, r = M.precision_recall(fx["ref_pool"], fx["sample_pool"], k=3, distance="float16")
    assert (p, r) == (float(fx["precision"]), float(fx["recall"]))  # 0.0425, 0.670667
    radii = M.knn_radii(fx["ref_pool"], 3, distance="float16")
    np.testing.assert_array_equal(radii, np.sqrt(fx["ref_radii_k3"].astype(np.float64)))
    p32, r32 = M.precision_recall(fx["ref_pool"], fx["sample_pool"], k=3, distance="float32")
    assert abs(p32 - fx["precision"]) <= 0.005 and abs(r32 - fx["recall"]) <= 0.005
    with pytest.raises(ValueError, match="distance must be one of"):
        M.precision_recall(fx["ref_pool"], fx["sample_pool"], distance="bfloat16")


@pytest.fixture(scope="module")
def pr_fx():
    with np.load(HERE / "fixtures" / "adm_pr_a.npz") as z:
        return {k: z[k] for k in z.files}


# The evaluator's float16 distances that differ from ours, all by one u.v: the exact u.v lies within 2.4
# float32 ulps of a float16 rounding midpoint and TensorFlow's float32 GEMM rounds to the other side
# (its summation order depends on Eigen's blocking, i.e. on shapes, threads and cache sizes).
_UV_NEAR_A_MIDPOINT = {"dist_ref_ref_64": [[23, 85]], "dist_sample_ref_64": [[11, 241], [57, 138]],
                       "dist_ref_sample_64": [[6, 84]]}


def test_float16_norms_equal_tensorflows(pr_fx):
    for name in ("ref", "sample"):
        got = M._Points(pr_fx[f"{name}_pool"], "float16").sq16
        np.testing.assert_array_equal(got, pr_fx[f"tf16_norm_{name}"].astype(np.float32))


def test_float16_distance_blocks_equal_the_evaluators(pr_fx):
    ref, sample = (M._Points(pr_fx[f"{name}_pool"], "float16") for name in ("ref", "sample"))
    tf_uv = pr_fx["tf16_uv_ref_ref_64"].astype(np.float32)
    uv = M._round16(M._exact_dot(ref.h[:64], ref.h))
    assert np.argwhere(uv != tf_uv).tolist() == [[23, 85]]  # of 19,200
    # TensorFlow's own norms and u.v through our float16 operations: every element
    d = np.maximum(M._tf16_distances(pr_fx["tf16_norm_ref"][:64].astype(np.float32), tf_uv,
                                     pr_fx["tf16_norm_ref"].astype(np.float32)), 0)
    np.testing.assert_array_equal(d, pr_fx["dist_ref_ref_64"])
    for name, u, v in (("dist_ref_ref_64", ref, ref), ("dist_sample_ref_64", sample, ref),
                       ("dist_ref_sample_64", ref, sample)):
        got, want = u.block(0, 64, v, 0, len(v)), pr_fx[name]
        assert np.argwhere(got != want).tolist() == _UV_NEAR_A_MIDPOINT[name], name
        assert np.abs(got - want).max() <= 2.0  # one float16 step of 2 u.v


def test_precision_recall_and_radii_match_the_evaluator_on_inception_features(pr_fx):
    ref, sample = pr_fx["ref_pool"], pr_fx["sample_pool"]
    for chunk_size in (1024, 37):
        p, r = M.precision_recall(ref, sample, k=3, distance="float16", chunk_size=chunk_size)
        assert (p, r) == (float(pr_fx["precision"]), float(pr_fx["recall"]))  # 0.664, 0.340
    for name in ("ref", "sample"):
        radii = M.knn_radii(pr_fx[f"{name}_pool"], 3, distance="float16")
        np.testing.assert_array_equal(radii, np.sqrt(pr_fx[f"{name}_radii_k3"].astype(np.float64)))
    assert M.precision_recall(ref, sample, k=3) == pytest.approx((0.528, 0.1633), abs=5e-5)  # exact arithmetic


def _eigen_sum_reference(vals: np.ndarray, first: int, lanes: int = 8, leaf: int = 200) -> np.float16:
    """Eigen's InnerMostDimReducer of float16 vals written out packet by packet (TensorFlow's AVX build)."""
    num = len(vals)
    if num > lanes * leaf:  # tree: split at a packet boundary of the flat index
        left = min(lanes * -(-(first + -(-num // 2)) // lanes) - first, num)
        acc = _eigen_sum_reference(vals[:left], first)
        return acc + _eigen_sum_reference(vals[left:], first + left) if left < num else acc
    accs, j = [np.zeros(lanes, np.float16) for _ in range(4)], 0
    while num >= 4 * lanes and j + 4 * lanes <= num:
        accs = [accs[q] + vals[j + q * lanes:j + (q + 1) * lanes] for q in range(4)]
        j += 4 * lanes
    acc = ((accs[0] + accs[1]) + accs[2]) + accs[3]
    while j + lanes <= num:
        acc = acc + vals[j:j + lanes]
        j += lanes
    tail = np.float16(0)
    for x in vals[j:]:
        tail = np.float16(tail + x)
    s = acc.astype(np.float32)
    s = s[:4] + s[4:]
    s = s[:2] + s[2:]
    return np.float16(tail + np.float16(s[0] + s[1]))


@pytest.mark.parametrize("dim", [3, 8, 33, 200, 1601, 1700, 2023, 3203])
def test_float16_norms_follow_eigens_reduction_at_any_dimension(dim):
    rng = np.random.default_rng(dim)
    x = rng.uniform(0, 1.5, (9, dim)).astype(np.float32)  # rows 0-8: every offset of a row modulo 8
    got = M._tf_sq_norms(x, np.float16)
    squares = x.astype(np.float16) ** 2
    want = [_eigen_sum_reference(squares[i], i * dim) for i in range(9)]
    np.testing.assert_array_equal(got, np.asarray(want, np.float32))


def test_float16_rounding_equals_numpy_casts():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100_000) * np.exp(rng.uniform(-25, 12, 100_000))).astype(np.float32)
    specials = [65504, 65519.99, 65520, -70000, 2.0**-14, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                0.0, -0.0, np.inf, -np.inf, np.nan]
    x = np.concatenate([x, np.asarray(specials, np.float32), np.uint32([0x7FFFFFFF, 0xFFFFFFFF]).view(np.float32)])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    got = M._round16(x)
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(x)], want.view(np.uint32)[~np.isnan(x)])
    assert np.isnan(got[np.isnan(x)]).all()


def test_float16_distances_fall_back_to_float32_where_they_overflow():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    big = x * 1e3  # squared norms ~1e7 overflow float16 (max 65504)
    np.testing.assert_allclose(M.knn_radii(big, 3, distance="float16"), M.knn_radii(big, 3, distance="float32"),
                               rtol=1e-5)
    assert M.precision_recall(big, big[::-1], distance="float16") == (1.0, 1.0)


def test_float16_falls_back_to_float32_for_the_evaluators_whole_block(monkeypatch):
    monkeypatch.setattr(M, "_TF_BATCH", 8)  # the evaluator's 10,000-row batches, scaled down
    rng = np.random.default_rng(3)
    x = rng.uniform(1.0, 1.3, (24, 5)).astype(np.float32)
    x[0] = 300.0  # its squares overflow float16: every block of row batch 0 or column batch 0 falls back
    pts = M._Points(x, "float16")
    dense = np.empty((24, 24))
    for s in range(0, 24, 8):
        for cs in range(0, 24, 8):
            d16 = np.maximum(pts._block16(s, s + 8, pts, cs, cs + 8), 0)
            d32 = pts._block32(s, s + 8, pts, cs, cs + 8)
            assert (d16 != d32)[np.isfinite(d16)].any()  # float16 and float32 disagree in every block
            dense[s:s + 8, cs:cs + 8] = d32 if 0 in (s, cs) else d16
            np.testing.assert_array_equal(pts.block(s, s + 8, pts, cs, cs + 8), dense[s:s + 8, cs:cs + 8])
    want = np.sqrt(np.partition(dense, 3, axis=1)[:, 3])
    for chunk_size in (3, 8, 100):  # chunks never straddle a batch
        np.testing.assert_array_equal(M.knn_radii(x, 3, distance="float16", chunk_size=chunk_size), want)


def test_float16_2uv_overflow_clamps_to_zero_or_falls_back():
    u = np.full(4, 100.0, np.float32)  # |u|^2 = 40000 fits float16; 2 u.u = 80000 overflows to inf
    same = M._Points(np.stack([u, u]), "float16")  # |u|^2 - inf = -inf, clamped to 0: finite, no fallback
    np.testing.assert_array_equal(same.block(0, 2, same, 0, 2), np.zeros((2, 2)))
    opposite = M._Points(np.stack([u, -u]), "float16")  # |u|^2 + inf = inf: the block is float32
    np.testing.assert_array_equal(opposite.block(0, 2, opposite, 0, 2), [[0, 160000], [160000, 0]])


# ----------------------------------------------------------------------------------------------------
# npz files
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_streaming_reader_matches_np_load(tmp_path, save):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (13, 4, 5, 3), dtype=np.uint8)
    table = rng.normal(size=(9, 2)).astype(np.float32)
    path = tmp_path / "x.npz"
    save(path, images, table=table)
    with A.NpzArrayReader(path) as r:
        assert r.shape == images.shape and r.dtype == np.uint8
        np.testing.assert_array_equal(np.concatenate([r.read(s, s + 4) for s in range(0, 13, 4)]), images)
        np.testing.assert_array_equal(r.read(2, 5), images[2:5])  # backwards
        np.testing.assert_array_equal(r.read(11, 99), images[11:])
        assert r.read(5, 5).shape == (0, 4, 5, 3)
    with A.NpzArrayReader(path, "table") as r:
        np.testing.assert_array_equal(r.read(3, 7), table[3:7])
    with pytest.raises(ValueError, match=r"has no array 'arr_9' \(it holds \['arr_0', 'table'\]\)"):
        A.NpzArrayReader(path, "arr_9")


def test_write_npz_streams_rows_in_np_savez_layout(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (10, 3, 3, 3), dtype=np.uint8)
    path = tmp_path / "w.npz"
    A.write_npz(path, {"arr_0": A.Rows(images.shape, np.uint8, np.array_split(images, 3)), "mu": np.arange(3.0)})
    with np.load(path) as z:
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["mu"], np.arange(3.0))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="9 rows were written, the header says 10"):
        A.write_npz(path, {"arr_0": A.Rows(images.shape, np.uint8, [images[:9]])})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["w.npz"]  # nothing half-written


# ----------------------------------------------------------------------------------------------------
# evaluate() on tiny files with the fake feature function
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("adm_eval")
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    samples = (ref[:30] // 2 + rng.integers(0, 128, (30, 8, 8, 3))).astype(np.uint8)
    np.savez(d / "ref.npz", ref)
    np.savez_compressed(d / "samples.npz", samples, np.arange(30) % 4)
    return {"dir": d, "ref": ref, "samples": samples, "params": F.make_params()}


def _direct_features(params, images):
    """The fake features batch by batch (zero-padded to BATCH rows), as one device computes them."""
    fn = jax.jit(F.feature_fn)
    out = []
    for s in range(0, len(images), BATCH):
        batch = np.zeros((BATCH,) + images.shape[1:], np.uint8)
        part = images[s: s + BATCH]
        batch[: len(part)] = part
        out.append({k: np.asarray(v)[: len(part)] for k, v in fn(params, batch).items()})
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _direct_metrics(ref_feats, sample_feats, ref_stats=None):
    def stats(feats, key):
        return M.FeatureStats.from_features(feats[key], mean_dtype=np.float32, require_full_rank=False)

    def fid(key, stored):
        s = stats(sample_feats, key)
        r = stored if stored is not None else stats(ref_feats, key)
        return M.frechet_distance(s.mu, s.sigma, r[0] if stored is not None else r.mu,
                                  r[1] if stored is not None else r.sigma)

    ref_stats = ref_stats or {}
    probs = M.softmax(sample_feats["logits_unbiased"], np.float32)
    p, r = M.precision_recall(ref_feats["pool3"], sample_feats["pool3"], distance="float16")
    return {"fid": fid("pool3", ref_stats.get("pool3")), "sfid": fid("spatial", ref_stats.get("spatial")),
            "inception_score": M.inception_score(probs, split_size=5000, dtype=np.float32)[0],
            "precision": p, "recall": r}


def _assert_metrics(got, want, rtol=1e-9):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=1e-12), key


def test_evaluate_equals_the_metrics_computed_directly(files):
    d, params = files["dir"], files["params"]
    got = A.evaluate(d / "ref.npz", d / "samples.npz", F.feature_fn, params, batch_size=BATCH, progress=False)
    ref_f, sam_f = _direct_features(params, files["ref"]), _direct_features(params, files["samples"])
    _assert_metrics(got, _direct_metrics(ref_f, sam_f))
    assert got["num_samples"] == 30 and got["num_reference"] == 40 and got["has_labels"]
    assert got["reference_stats"] == "computed" and got["reference_cache"] == "off"
    assert got["distance"] == "float16" and got["k"] == 3

    # stored statistics in the reference batch are used (here: made from 20 of its images)
    part = {k: v[:20] for k, v in ref_f.items()}
    stored = {k: (np.mean(part[k], axis=0), np.cov(part[k], rowvar=False)) for k in ("pool3", "spatial")}
    np.savez(d / "ref_stats.npz", files["ref"], mu=stored["pool3"][0], sigma=stored["pool3"][1],
             mu_s=stored["spatial"][0], sigma_s=stored["spatial"][1])
    got = A.evaluate(d / "ref_stats.npz", d / "samples.npz", F.feature_fn, params, batch_size=BATCH, progress=False)
    _assert_metrics(got, _direct_metrics(ref_f, sam_f, stored))
    assert got["reference_stats"] == "file"


def test_one_compiled_program_for_every_batch_of_both_files(files):
    d = files["dir"]
    ext = A.ShardedFeatures(F.feature_fn, files["params"], image_shape=(8, 8, 3), batch_size=BATCH)
    assert ext.dims == {"pool3": 16, "spatial": 12, "logits_unbiased": 10}
    F.TRACES[0] = 0
    starts = []
    for name in ("ref.npz", "samples.npz"):  # 40 rows (last batch 8 of 16) and 30 rows (14 of 16)
        with A.NpzArrayReader(d / name) as r:
            ext.run(r, lambda s, f: starts.append((s, f["pool3"].shape[0])), progress=False)
    assert F.TRACES[0] == 1
    assert starts == [(0, 16), (16, 16), (32, 8), (0, 16), (16, 14)]


def test_reference_cache_is_used_and_invalidated(files, tmp_path, monkeypatch):
    d, params = files["dir"], files["params"]
    ref = tmp_path / "ref.npz"
    np.savez(ref, files["ref"])
    runs = []
    real_run = A.ShardedFeatures.run
    monkeypatch.setattr(A.ShardedFeatures, "run", lambda self, rows, *a, **k: (runs.append(rows.path),
                                                                               real_run(self, rows, *a, **k)))

    def ev(p=params):
        runs.clear()
        return A.evaluate(ref, d / "samples.npz", F.feature_fn, p, batch_size=BATCH,
                          cache_dir=tmp_path / "cache", progress=False)

    first = ev()
    assert first["reference_cache"] == "miss" and len(runs) == 2
    second = ev()
    assert second["reference_cache"] == "hit" and runs == [str(d / "samples.npz")]  # reference not read
    assert {k: second[k] for k in ("fid", "sfid", "precision", "recall")} == \
        {k: first[k] for k in ("fid", "sfid", "precision", "recall")}
    np.savez(ref, files["ref"][::-1])  # same size, other content
    assert ev()["reference_cache"] == "miss" and len(runs) == 2
    assert ev(F.make_params(seed=1))["reference_cache"] == "miss"  # other weights
    assert ev()["reference_cache"] == "hit"


def _save(path, *arrays, **named):
    np.savez(path, *arrays, **named)
    return path


def test_bad_inputs_are_refused_before_any_work(files, tmp_path):
    d, params = files["dir"], files["params"]
    good, ref = d / "samples.npz", d / "ref.npz"
    u8 = lambda *shape: np.zeros(shape, np.uint8)  # noqa: E731
    cases = [
        (_save(tmp_path / "a.npz", images=u8(10, 8, 8, 3)), "has no array 'arr_0'"),
        (_save(tmp_path / "b.npz", np.zeros((10, 8, 8, 3), np.float32)), "dtype float32; it must be uint8"),
        (_save(tmp_path / "c.npz", u8(10, 8, 8, 1)), "1 channels"),
        (_save(tmp_path / "d.npz", u8(10, 3, 8, 8)), "channels-first NCHW"),
        (_save(tmp_path / "e.npz", u8(10, 8, 8)), r"NHWC images \[N, H, W, 3\]"),
        (_save(tmp_path / "f.npz", u8(3, 8, 8, 3)), "holds 3 images; precision/recall with k = 3 need at least 4"),
        (_save(tmp_path / "g.npz", u8(10, 16, 16, 3)), "16x16 images but the reference batch holds 8x8"),
        (_save(tmp_path / "h.npz", u8(10, 8, 8, 3), np.arange(9)), r"arr_1 \(labels\) has shape \(9,\)"),
    ]
    (tmp_path / "i.npz").write_text("not a zip")
    cases.append((tmp_path / "i.npz", "not an .npz file"))
    F.TRACES[0] = 0
    for samples, message in cases:
        with pytest.raises(ValueError, match=message):
            A.evaluate(ref, samples, F.feature_fn, params, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        A.evaluate(tmp_path / "missing.npz", good, F.feature_fn, params)
    with pytest.raises(ValueError, match="distance must be 'float16'"):
        A.evaluate(ref, good, F.feature_fn, params, distance="float64")
    assert F.TRACES[0] == 0  # refused on the files' headers alone
    with pytest.raises(ValueError, match="positive multiple of the device count"):
        A.evaluate(ref, good, F.feature_fn, params, batch_size=0)
    partial = lambda p, x: {k: v for k, v in F.feature_fn(p, x).items() if k != "spatial"}  # noqa: E731
    with pytest.raises(ValueError, match=r"missing \['spatial'\]"):
        A.evaluate(ref, good, partial, params, batch_size=BATCH)
    bad_mu = _save(tmp_path / "j.npz", files["ref"], mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"do not match the feature function's pool3 dimension 16"):
        A.evaluate(bad_mu, good, F.feature_fn, params, batch_size=BATCH)


# ----------------------------------------------------------------------------------------------------
# reference batches from a dataset split
# ----------------------------------------------------------------------------------------------------


class ToyRgb8(ImageArraysBuilder, skip_registration=True):
    """A prepared tfds dataset of 30 RGB 8x8 images."""

    name = "toy_rgb8"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(num_classes=3)}),
            supervised_keys=("image", "label"))

    def _split_arrays(self, dl_manager):
        rng = np.random.default_rng(4)
        return {"train": (list(rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)), np.arange(30) % 3)}


def test_write_reference_batch_from_a_split(files, tmp_path):
    ToyRgb8(data_dir=os.fspath(tmp_path), file_format="array_record").download_and_prepare()
    images, labels = data_sources.load_split("toy_rgb8", "train", tmp_path)
    params, out = files["params"], tmp_path / "ref" / "toy.npz"
    summary = A.write_reference_batch(out, "toy_rgb8", "train", F.feature_fn, params, num_images=10, seed=5,
                                      data_dir=tmp_path, batch_size=BATCH, progress=False)
    assert summary["num_images"] == 10 and summary["stats_images"] == 30
    chosen = np.sort(data_order.epoch_permutation(5, 0, 30)[:10])
    feats = _direct_features(params, images)
    with np.load(out) as z:
        assert set(z.files) == {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s", "features_fingerprint"}
        np.testing.assert_array_equal(z["arr_0"], images[chosen])
        np.testing.assert_array_equal(z["arr_1"], labels[chosen])
        for mu, sigma, key in (("mu", "sigma", "pool3"), ("mu_s", "sigma_s", "spatial")):
            assert z[mu].dtype == np.float32 and z[sigma].dtype == np.float64
            np.testing.assert_array_equal(z[mu], np.mean(feats[key], axis=0))
            np.testing.assert_allclose(z[sigma], np.cov(feats[key], rowvar=False), rtol=1e-10, atol=1e-13)
    got = A.evaluate(out, files["dir"] / "samples.npz", F.feature_fn, params, batch_size=BATCH, progress=False)
    assert got["reference_stats"] == "file" and got["num_reference"] == 10
    with pytest.raises(ValueError, match="other feature weights or mode"):
        A.evaluate(out, files["dir"] / "samples.npz", F.feature_fn, params, mode="other", batch_size=BATCH)
    with pytest.raises(ValueError, match=r"num_images must be in \[1, 30\]"):
        A.write_reference_batch(out, "toy_rgb8", "train", F.feature_fn, params, num_images=31, data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------
# 8 devices, 2 processes x 2 devices
# ----------------------------------------------------------------------------------------------------


def _env(devices):
    return H.env(devices=devices, opt0=False)


def test_eight_devices_and_two_processes_match_one_device(files, tmp_path):
    d = files["dir"]
    args = [sys.executable, str(HERE / "_adm_eval_worker.py"), str(d / "ref.npz"), str(d / "samples.npz")]
    port = H.free_port()
    procs = [subprocess.Popen(args + [str(tmp_path / "eight")], env=_env(8), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    procs += [subprocess.Popen(args + [str(tmp_path / f"proc{i}"), str(port), "2", str(i)], env=_env(2),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        # meanwhile, here on one device
        one = A.evaluate(d / "ref.npz", d / "samples.npz", F.feature_fn, files["params"], batch_size=BATCH,
                         progress=False)
        pool = _direct_features(files["params"], files["samples"])["pool3"]
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]
    for name, devices, processes in (("eight", 8, 1), ("proc0", 4, 2), ("proc1", 4, 2)):
        with np.load(tmp_path / f"{name}.npz") as z:
            assert int(z["devices"]) == devices and int(z["processes"]) == processes
            np.testing.assert_allclose(z["pool3"], pool, rtol=1e-6, atol=1e-6)
        got = json.loads((tmp_path / f"{name}.json").read_text())
        for key in ("fid", "sfid", "inception_score"):
            assert got[key] == pytest.approx(one[key], rel=1e-6), (name, key)
        # float16 distances of features equal to float32 round-off: at most one point may flip
        assert abs(got["precision"] - one["precision"]) <= 1 / 30 and abs(got["recall"] - one["recall"]) <= 1 / 40
