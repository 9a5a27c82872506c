"""Known-answer tests for jaxdiff.eval.metrics (FID, IS, precision/recall, density/coverage, extractors)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from scipy import linalg
from scipy.spatial.distance import cdist

from jaxdiff.eval import metrics as M
from jaxdiff.util import images as image_util

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def fid_scipy_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The classic pytorch-fid / guided-diffusion evaluator formula (scipy sqrtm + eps fallback)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def reference_stats_np(x):
    return np.mean(x, axis=0), np.cov(x, rowvar=False)


def naive_prdc(real, fake, k):
    """Full-matrix implementation following the papers' reference code."""
    rr = cdist(real, real)
    ff = cdist(fake, fake)
    rf = cdist(real, fake)
    r_rad = np.sort(rr, axis=1)[:, k]
    f_rad = np.sort(ff, axis=1)[:, k]
    precision = np.mean(np.any(rf <= r_rad[:, None], axis=0))
    recall = np.mean(np.any(rf <= f_rad[None, :], axis=1))
    density = np.sum(rf < r_rad[:, None]) / (k * fake.shape[0])
    coverage = np.mean(rf.min(axis=1) < r_rad)
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def correlated(rng, n, d, scale=1.0, shift=0.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ a + shift) * scale


# ----------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------


def test_fid_of_set_against_itself_is_zero():
    rng = np.random.default_rng(0)
    x = correlated(rng, 400, 48, scale=3.0, shift=1.0)
    assert M.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-6)
    s = M.FeatureStats.from_features(x)
    assert M.fid_from_stats(s, s) == pytest.approx(0.0, abs=1e-6)
    # Also for a badly conditioned covariance.
    y = x * np.logspace(-3, 1, 48)[None, :]
    assert M.fid_from_features(y, y) == pytest.approx(0.0, abs=1e-6)


def test_fid_closed_form_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a = rng.uniform(0.1, 4.0, size=d)
    b = rng.uniform(0.1, 4.0, size=d)
    a[:3] = 0.0  # singular covariance: the formula still holds
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q = random_orthogonal(rng, d)  # rotated: still commuting, same distance
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    # Rotating a singular matrix leaves ~1e-16 eigenvalues where 0 was; sqrt turns them into ~1e-8.
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_fid_closed_form_non_commuting_2d():
    # For 2x2: tr sqrtm(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_fid_large_samples_approach_closed_form():
    rng = np.random.default_rng(2)
    d, n = 4, 40_000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -1.0, 0.5])
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 0.5, 1.0, 1.0])
    q = random_orthogonal(rng, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    assert M.fid_from_features(x1, x2) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("n,d", [(600, 16), (300, 64), (220, 200)])
def test_fid_agrees_with_scipy_reference(n, d):
    rng = np.random.default_rng(n + d)
    x1 = correlated(rng, n, d, scale=2.0)
    x2 = correlated(rng, n, d, scale=1.5, shift=0.3) + rng.normal(size=(1, d))
    expected = fid_scipy_reference(*reference_stats_np(x1), *reference_stats_np(x2))
    got = M.fid_from_features(x1, x2)
    assert got == pytest.approx(expected, rel=1e-6)
    s1, s2 = M.FeatureStats.from_features(x1), M.FeatureStats.from_features(x2)
    np.testing.assert_allclose(s1.sigma, np.cov(x1, rowvar=False), rtol=1e-12, atol=1e-12)
    assert M.fid_from_stats(s1, s2) == pytest.approx(expected, rel=1e-6)


def test_fid_singular_covariance_is_finite_and_exact():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 30))  # N < D: rank-deficient covariance
    s = M.FeatureStats.from_features(x, require_full_rank=False)
    assert M.fid_from_stats(s, s) == pytest.approx(0.0, abs=1e-9)
    y = x.copy()
    y[:, :5] = 1.0  # zero-variance dimensions
    s2 = M.FeatureStats.from_features(y, require_full_rank=False)
    v = M.fid_from_stats(s, s2)
    assert np.isfinite(v) and v > 0


def test_feature_stats_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 5)).astype(np.float32)
    s = M.FeatureStats.from_features(x, "abc", keep_features=True, image_shape=(8, 8, 3))
    path = tmp_path / "sub" / "stats.npz"
    s.save(path)
    assert sorted(os.listdir(tmp_path / "sub")) == ["stats.npz"]  # no temporary left behind
    t = M.FeatureStats.load(path)
    np.testing.assert_array_equal(t.mu, s.mu)
    np.testing.assert_array_equal(t.sigma, s.sigma)
    np.testing.assert_array_equal(t.features, x)
    assert (t.n, t.fingerprint, t.image_shape) == (50, "abc", (8, 8, 3))


def test_fid_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match=r"need at least D\+1 samples") as e:
        M.FeatureStats.from_features(rng.normal(size=(16, 16)))
    assert "need at least 17" in str(e.value)
    a = M.FeatureStats.from_features(rng.normal(size=(20, 3)), "aaa")
    b = M.FeatureStats.from_features(rng.normal(size=(20, 3)), "bbb")
    with pytest.raises(ValueError, match="different extractors"):
        M.fid_from_stats(a, b)
    c = M.FeatureStats.from_features(rng.normal(size=(20, 4)), "aaa")
    with pytest.raises(ValueError, match="dimensions differ"):
        M.fid_from_stats(a, c)
    with pytest.raises(ValueError, match="shape"):
        M.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        M.FeatureStats.from_features(np.full((20, 3), np.nan))


# ----------------------------------------------------------------------------------------------------
# Precision / recall / density / coverage
# ----------------------------------------------------------------------------------------------------


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 10))
    assert M.precision_recall(x, x, k=3) == (1.0, 1.0)
    far = rng.normal(size=(150, 10)) + 1000.0
    assert M.precision_recall(x, far, k=3) == (0.0, 0.0)
    assert M.density_coverage(x, far, k=3) == (0.0, 0.0)


def test_density_coverage_identical_sets():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 8))
    density, coverage = M.density_coverage(x, x, k=3)
    assert density == pytest.approx(1.0, abs=1e-2)
    assert coverage == 1.0
    # Two independent draws of one distribution: density and coverage near 1 too.
    d2, c2 = M.density_coverage(x, rng.normal(size=(300, 8)), k=5)
    assert 0.7 < d2 < 1.3 and 0.8 < c2 <= 1.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_full_matrix_reference_and_is_chunk_invariant(k):
    rng = np.random.default_rng(10 + k)
    real = rng.normal(size=(257, 6))
    fake = rng.normal(size=(193, 6)) * 1.3 + 0.4
    expected = naive_prdc(real, fake, k)
    for chunk in (7, 64, 10_000):
        got = M.prdc(real, fake, k=k, chunk_size=chunk)
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-12), (key, chunk)
    np.testing.assert_allclose(M.knn_radii(real, k, chunk_size=10), np.sort(cdist(real, real), 1)[:, k], rtol=1e-7)


def test_prdc_needs_more_than_k_samples():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match=r"more than k = 3 samples"):
        M.precision_recall(rng.normal(size=(3, 2)), rng.normal(size=(10, 2)), k=3)
    with pytest.raises(ValueError, match=r"more than k = 3 samples"):
        M.density_coverage(rng.normal(size=(10, 2)), rng.normal(size=(2, 2)), k=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        M.prdc(rng.normal(size=(10, 2)), rng.normal(size=(10, 2)), k=0)


# ----------------------------------------------------------------------------------------------------
# Inception Score and accuracy
# ----------------------------------------------------------------------------------------------------


def test_inception_score_known_values():
    k = 10
    uniform = np.full((100, k), 1.0 / k)
    assert M.inception_score(uniform) == pytest.approx((1.0, 0.0), abs=1e-12)
    confident = np.eye(k)[np.arange(100) % k]  # one-hot, balanced over classes
    assert M.inception_score(confident)[0] == pytest.approx(k, rel=1e-12)
    mean, std = M.inception_score(confident, splits=10)  # each split of 10 holds every class once
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    # Confident but all one class: IS 1.
    assert M.inception_score(np.eye(k)[np.zeros(50, int)])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        M.inception_score(np.ones((5, 3)))
    with pytest.raises(ValueError, match="splits"):
        M.inception_score(uniform, splits=0)


def test_classifier_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert M.classifier_accuracy(logits, [0, 1, 2, 0]) == 1.0
    assert M.classifier_accuracy(logits, [0, 1, 1, 2]) == 0.5
    with pytest.raises(ValueError, match=r"outside the allowed range \[0, 3\)"):
        M.classifier_accuracy(logits, [0, 1, 3, 0])
    with pytest.raises(ValueError, match="must be integers"):
        M.classifier_accuracy(logits, [0.5, 1, 2, 0])
    assert M.classifier_accuracy(logits, np.array([0.0, 1.0, 2.0, 0.0])) == 1.0


# ----------------------------------------------------------------------------------------------------
# Extractors, evaluation, caching, validation
# ----------------------------------------------------------------------------------------------------

K = 4
HWC = (4, 4, 3)


def pixel_extractor(counter=None, with_logits=True, name="pixels"):
    """Deterministic extractor: features are 6 pixel values; logits one-hot of pixel[0,0,0] % K."""

    def fn(images):
        if counter is not None:
            counter.append(len(images))
        flat = images.reshape(len(images), -1).astype(np.float32)
        feats = flat[:, :6] / 255.0
        logits = 50.0 * np.eye(K, dtype=np.float32)[images[:, 0, 0, 0] % K] if with_logits else None
        return feats, logits

    return M.FeatureExtractor(name=name, fingerprint=f"fp-{name}", fn=fn)


def random_images(rng, n, shape=HWC):
    return rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)


def test_evaluate_samples_known_answers():
    rng = np.random.default_rng(9)
    imgs = random_images(rng, 80)
    imgs[:, 0, 0, 0] = np.arange(80) % K  # balanced classes
    labels = imgs[:, 0, 0, 0].astype(np.int64) % K
    ext = pixel_extractor()
    r = M.evaluate_samples(imgs, labels, imgs, ext, num_classes=K)
    assert r["fid"] == pytest.approx(0.0, abs=1e-6)
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0
    assert r["density"] == pytest.approx(1.0, abs=0.05)
    assert r["inception_score"] == pytest.approx(K, rel=1e-6) and r["inception_score_std"] == 0.0
    assert r["accuracy"] == 1.0
    assert (r["num_samples"], r["num_reference"], r["extractor_fingerprint"]) == (80, 80, "fp-pixels")
    assert r["feature_dim"] == 6 and r["k"] == 3
    wrong = labels.copy()
    wrong[::2] = (wrong[::2] + 1) % K
    assert M.evaluate_samples(imgs, wrong, imgs, ext, num_classes=K)["accuracy"] == 0.5
    # Unconditional samples; extractor without logits; reference stats without features -> NaN entries.
    stats = M.FeatureStats.from_features(ext(imgs)[0], ext.fingerprint, image_shape=HWC)
    r2 = M.evaluate_samples(imgs, None, stats, pixel_extractor(), num_classes=K)
    assert np.isnan(r2["accuracy"]) and np.isnan(r2["precision"]) and r2["fid"] == pytest.approx(0.0, abs=1e-6)
    r3 = M.evaluate_samples(imgs, labels, imgs, pixel_extractor(with_logits=False), num_classes=K)
    assert np.isnan(r3["inception_score"]) and np.isnan(r3["accuracy"]) and r3["precision"] == 1.0


def test_reference_stats_cached_atomically(tmp_path):
    rng = np.random.default_rng(10)
    imgs = random_images(rng, 40)
    calls = []
    ext = pixel_extractor(counter=calls)
    s1 = M.reference_stats(imgs, ext, tmp_path, "toy/train")
    assert calls == [40]
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("toy_train-") and files[0].endswith(".npz")
    loaded_calls = []

    def loader():
        loaded_calls.append(1)
        return imgs

    s2 = M.reference_stats(loader, ext, tmp_path, "toy/train")
    assert calls == [40] and loaded_calls == []  # cache hit: neither extractor nor dataset touched
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    assert s2.fingerprint == ext.fingerprint and s2.n == 40 and s2.image_shape == HWC
    assert s2.features is not None and s2.features.shape == (40, 6)
    # Another extractor -> another cache entry, never the stale one.
    other = pixel_extractor(name="other")
    s3 = M.reference_stats(imgs, other, tmp_path, "toy/train")
    assert s3.fingerprint == "fp-other" and len(os.listdir(tmp_path)) == 2
    with pytest.raises(ValueError, match="n = 40"):
        M.reference_stats(imgs[:30], ext, tmp_path, "toy/train")
    # Evaluation against cached stats uses the stored features.
    r = M.evaluate_samples(imgs, None, s2, ext, num_classes=K)
    assert r["fid"] == pytest.approx(0.0, abs=1e-6) and r["precision"] == 1.0
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_validation_errors():
    rng = np.random.default_rng(11)
    imgs = random_images(rng, 30)
    labels = np.arange(30) % K
    ext = pixel_extractor()
    stats = M.FeatureStats.from_features(ext(imgs)[0], ext.fingerprint, image_shape=HWC)
    ev = lambda im, lb, ref=imgs, e=ext: M.evaluate_samples(im, lb, ref, e, num_classes=K)  # noqa: E731
    with pytest.raises(ValueError, match="shape \\[N, H, W, C\\]"):
        ev(imgs[0], labels)
    with pytest.raises(ValueError, match="dtype uint8"):
        ev(imgs.astype(np.float32), labels)
    with pytest.raises(ValueError, match=r"match the reference image shape"):
        ev(random_images(rng, 30, (8, 8, 3)), labels)
    with pytest.raises(ValueError, match=r"match the reference image shape"):
        ev(random_images(rng, 30, (8, 8, 3)), labels, stats)
    with pytest.raises(ValueError, match="channels"):
        ev(np.transpose(random_images(rng, 30, (8, 8, 3)), (0, 3, 1, 2)).copy(), labels)
    with pytest.raises(ValueError, match=r"contain 4, outside the allowed range \[0, 4\)"):
        ev(imgs, labels + 1)
    with pytest.raises(ValueError, match=r"contain -1, outside the allowed range"):
        ev(imgs, labels - 1)
    with pytest.raises(ValueError, match=r"count 29 != samples count 30"):
        ev(imgs, labels[:-1])
    with pytest.raises(ValueError, match=r"need at least D\+1 samples"):
        ev(imgs[:6], labels[:6])  # 6 features need 7 samples
    with pytest.raises(ValueError, match=r"more than k = 3 samples"):
        ev(imgs[:3], labels[:3])
    with pytest.raises(ValueError, match="fingerprint"):
        ev(imgs, labels, stats, pixel_extractor(name="other"))
    with pytest.raises(ValueError, match="num_classes = 5"):
        M.evaluate_samples(imgs, labels, imgs, ext, num_classes=5)


def test_load_samples_npz(tmp_path):
    rng = np.random.default_rng(12)
    imgs = random_images(rng, 10)
    labels = np.arange(10) % K
    good = tmp_path / "samples_10x4x4x3.npz"
    np.savez(good, imgs, labels)
    im, lb = image_util.load_samples_npz(good, num_classes=K, image_shape=HWC)
    np.testing.assert_array_equal(im, imgs)
    np.testing.assert_array_equal(lb, labels)
    uncond = tmp_path / "uncond.npz"
    np.savez(uncond, imgs)
    assert image_util.load_samples_npz(uncond)[1] is None
    cases = {
        "float.npz": ((imgs / 255.0).astype(np.float32), labels, "dtype uint8"),
        "nchw.npz": (np.transpose(random_images(rng, 10, (8, 8, 3)), (0, 3, 1, 2)).copy(), labels, "channels"),
        "flat.npz": (imgs.reshape(10, -1), labels, r"\[N, H, W, C\]"),
        "range.npz": (imgs, labels + K, r"outside the allowed range \[0, 4\)"),
        "count.npz": (imgs, labels[:5], r"count 5 != samples count 10"),
    }
    for name, (a0, a1, msg) in cases.items():
        np.savez(tmp_path / name, a0, a1)
        with pytest.raises(ValueError, match=msg):
            image_util.load_samples_npz(tmp_path / name, num_classes=K)
    with pytest.raises(ValueError, match="match the reference image shape"):
        image_util.load_samples_npz(good, image_shape=(8, 8, 3))
    np.savez(tmp_path / "noarr.npz", images=imgs)
    with pytest.raises(ValueError, match="arr_0"):
        image_util.load_samples_npz(tmp_path / "noarr.npz")
    with pytest.raises(ValueError, match="count 5 != samples count 10"):
        image_util.load_samples_npz(tmp_path / "count.npz")  # checked without num_classes too


# ----------------------------------------------------------------------------------------------------
# classifier_extractor over a Flax model
# ----------------------------------------------------------------------------------------------------


def test_classifier_extractor_flax():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class TinyClassifier(nn.Module):
        num_classes: int = K

        def setup(self):
            self.conv = nn.Conv(4, (3, 3))
            self.hidden = nn.Dense(5)
            self.head = nn.Dense(self.num_classes)

        def features(self, x):
            h = nn.silu(self.conv(x)).mean(axis=(1, 2))
            return nn.silu(self.hidden(h))

        def __call__(self, x):
            return self.head(self.features(x))

    model = TinyClassifier()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + HWC))
    apply_fn = lambda p, x: model.apply(p, x)  # noqa: E731
    feature_fn = lambda p, x: model.apply(p, x, method=TinyClassifier.features)  # noqa: E731
    ext = M.classifier_extractor(apply_fn, params, feature_fn=feature_fn, batch_size=16, name="tiny")
    rng = np.random.default_rng(13)
    imgs = random_images(rng, 37)  # not a multiple of the batch size: last batch padded
    feats, logits = ext(imgs)
    x = imgs.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(feats, np.asarray(feature_fn(params, x)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, np.asarray(apply_fn(params, x)), rtol=1e-4, atol=1e-5)
    assert feats.shape == (37, 5) and logits.shape == (37, K)

    # Features and logits from one pass via capture_intermediates.
    def both(p, x):
        only_features = lambda mdl, method_name: method_name == "features"  # noqa: E731
        logits, state = model.apply(p, x, capture_intermediates=only_features, mutable=["intermediates"])
        return state["intermediates"]["features"][0], logits

    ext2 = M.classifier_extractor(apply_fn, params, feature_fn=both, batch_size=64, name="tiny",
                                  config={"layer": "features"})
    f2, l2 = ext2(imgs)
    np.testing.assert_allclose(f2, feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l2, logits, rtol=1e-4, atol=1e-5)

    # Images are mapped to [-1, 1]: an "identity" classifier returns per-image channel means.
    ident = M.classifier_extractor(lambda p, x: x.mean(axis=(1, 2)), {}, batch_size=8)
    f3, _ = ident(np.stack([np.zeros(HWC, np.uint8), np.full(HWC, 255, np.uint8)]))
    np.testing.assert_allclose(f3, [[-1.0] * 3, [1.0] * 3], atol=1e-6)

    # Fingerprint: stable for equal params/config, sensitive to params, name and config.
    same = M.classifier_extractor(apply_fn, jax.tree_util.tree_map(np.array, params), feature_fn=feature_fn,
                                  batch_size=7, name="tiny")
    assert same.fingerprint == ext.fingerprint and len(ext.fingerprint) == 64
    bumped = jax.tree_util.tree_map(lambda a: a + 1e-3, params)
    assert M.classifier_extractor(apply_fn, bumped, feature_fn=feature_fn, name="tiny").fingerprint != ext.fingerprint
    assert M.classifier_extractor(apply_fn, params, feature_fn=feature_fn, name="t2").fingerprint != ext.fingerprint
    assert ext2.fingerprint != ext.fingerprint

    # End to end: evaluate_samples with the Flax extractor.
    ref = random_images(rng, 40)
    labels = np.asarray(np.argmax(logits, axis=1))
    r = M.evaluate_samples(imgs, labels, ref, ext, num_classes=K)
    assert r["accuracy"] == 1.0 and r["num_samples"] == 37 and r["num_reference"] == 40
    assert np.isfinite(r["fid"]) and r["fid"] >= 0 and 1.0 <= r["inception_score"] <= K
    for key in ("precision", "recall", "coverage"):
        assert 0.0 <= r[key] <= 1.0
    assert 0.0 <= r["density"] <= 40 / 3  # at most M / k
    with pytest.raises(ValueError, match="batch_size"):
        M.classifier_extractor(apply_fn, params, batch_size=0)
