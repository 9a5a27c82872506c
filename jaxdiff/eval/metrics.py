"""Sample-quality metrics: FID, Inception Score, precision/recall, density/coverage, classifier
accuracy, and the feature extractors they are computed with.

* Images are uint8 NHWC at the boundary (guided-diffusion's ``arr_0``); extractors map them to
  float32 ``x / 127.5 - 1``. Statistics are float64 numpy on the host; only extraction runs in JAX.
* FID: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2)``, the last trace as the sum of the
  singular values of ``F1^T F2`` with ``Fi = Ui Li^{1/2}`` (symmetric eigendecompositions): exact for
  singular covariances, 0 for a set against itself. N features of dimension D need N >= D + 1
  unless ``require_full_rank=False``.
* Precision / recall (Kynkaenniemi et al. 2019; inside a ball when the distance is ``<=`` the
  radius) and density / coverage (Naeem et al. 2020; strict ``<``) with k-NN radii that count the
  point itself, as their reference code. Distances come in ``chunk_size`` blocks, float64 by
  default; ``distance="float16"`` is guided-diffusion's evaluator's (see ``_Points``).
* Inception Score over ``splits`` numpy.array_split parts (default 1: all samples); the evaluator's
  (``jaxdiff.eval.adm``) is ``split_size=5000, dtype=np.float32`` on ``softmax(logits, np.float32)``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from jaxdiff.util import files
from jaxdiff.util.fingerprint import params_fingerprint
from jaxdiff.util.images import validate_images, validate_labels

__all__ = ["FeatureStats", "FeatureExtractor", "frechet_distance", "fid_from_stats", "fid_from_features",
           "inception_score", "softmax", "MomentAccumulator", "knn_radii", "precision_recall", "density_coverage",
           "prdc", "classifier_accuracy", "classifier_extractor", "reference_stats",
           "evaluate_samples"]

Array = np.ndarray
DEFAULT_CHUNK_SIZE = 1024


# --- Validation --------------------------------------------------------------------------------------


def _validate_features(features: Any, what: str = "features") -> Array:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [N, D], got shape {features.shape}")
    if features.dtype.kind not in "fiu":
        raise ValueError(f"{what} must be numeric, got dtype {features.dtype}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{what} contain NaN or inf values")
    return features


def check_full_rank(n: int, d: int, what: str = "features") -> None:
    """Refuse N samples of dimension D for FID when N <= D (a singular sample covariance)."""
    if n < d + 1:
        raise ValueError(f"FID: need at least D+1 samples for a full-rank covariance (N must exceed the feature "
                         f"dimension D; a sample covariance has rank <= N - 1), but {what} have N = {n} samples of "
                         f"dimension D = {d}: need at least {d + 1}")


def _check_knn(n: int, k: int, what: str) -> None:
    if int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if n <= k:
        raise ValueError(f"precision/recall/density/coverage need more than k = {k} samples in {what}, got {n}; "
                         f"need at least k+1 = {k + 1}")


# --- FID ---------------------------------------------------------------------------------------------

def _psd_factor(sigma: Array) -> Array:
    """F with F F^T = sigma (F = U sqrt(max(L, 0))), from a symmetric eigendecomposition in float64."""
    sigma = np.asarray(sigma, np.float64)
    sigma = 0.5 * (sigma + sigma.T)
    evals, evecs = np.linalg.eigh(sigma)
    return evecs * np.sqrt(np.clip(evals, 0.0, None))[None, :]


def _trace_sqrt_product(sigma1: Array, sigma2: Array) -> float:
    """tr sqrtm(sigma1 @ sigma2) for symmetric PSD matrices (singular ones included)."""
    f1 = _psd_factor(sigma1)
    f2 = _psd_factor(sigma2)
    return float(np.sum(np.linalg.svd(f1.T @ f2, compute_uv=False)))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed stably in float64.

    Covariances must be symmetric positive semi-definite (singular is fine). The result is clamped at 0
    (it can only go negative by round-off).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-D vectors of the same dimension, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} contains NaN or inf")
    if not (np.all(np.isfinite(mu1)) and np.all(np.isfinite(mu2))):
        raise ValueError("means contain NaN or inf")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


class MomentAccumulator:
    """Mean and covariance of feature rows fed in chunks (in order), without keeping the rows.

    The covariance is float64 with ddof=1 (``np.cov(x, rowvar=False)``), from sums of the rows shifted
    by the first chunk's mean, which keeps round-off near that of the two-pass formula. ``mean_dtype``
    float32 keeps the float32 running sum ``np.mean(x, axis=0)`` makes of float32 rows, so the mean is
    bit for bit guided-diffusion's evaluator's however the rows are chunked (default float64).
    """

    def __init__(self, mean_dtype: Any = np.float64):
        self.mean_dtype = np.dtype(mean_dtype)
        if self.mean_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"mean_dtype must be float32 or float64, got {self.mean_dtype}")
        self.n = 0
        self._shift: Optional[Array] = None
        self._s1: Optional[Array] = None  # sum of (x - shift)
        self._s2: Optional[Array] = None  # sum of (x - shift)^T (x - shift)
        self._sum32: Optional[Array] = None

    @property
    def dim(self) -> Optional[int]:
        return None if self._shift is None else int(self._shift.shape[0])

    def update(self, rows: Any) -> None:
        """Adds rows [B, D] (the next ones in order)."""
        rows = _validate_features(rows)
        if rows.shape[0] == 0:
            return
        x = rows.astype(np.float64)
        if self._shift is None:
            d = x.shape[1]
            self._shift = x.mean(axis=0)
            self._s1, self._s2 = np.zeros(d), np.zeros((d, d))
            if self.mean_dtype == np.float32:
                self._sum32 = np.zeros(d, np.float32)
        elif x.shape[1] != self.dim:
            raise ValueError(f"rows have dimension {x.shape[1]}, earlier ones had {self.dim}")
        xc = x - self._shift
        self._s1 += xc.sum(axis=0)
        self._s2 += xc.T @ xc
        if self._sum32 is not None:
            stacked = np.concatenate([self._sum32[None], rows.astype(np.float32, copy=False)])
            self._sum32 = np.add.reduce(stacked, axis=0)
        self.n += int(x.shape[0])

    def mean(self) -> Array:
        if self.n == 0:
            raise ValueError("the mean of zero rows is undefined")
        if self._sum32 is not None:
            return (self._sum32 / np.float32(self.n)).astype(np.float64)
        return self._shift + self._s1 / self.n

    def covariance(self) -> Array:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        offset = self._s1 / self.n  # mean - shift
        sigma = (self._s2 - self.n * np.outer(offset, offset)) / (self.n - 1)
        return 0.5 * (sigma + sigma.T)

    def stats(self, fingerprint: str = "", *, features: Optional[Array] = None,
              image_shape: Optional[Sequence[int]] = None, require_full_rank: bool = True) -> "FeatureStats":
        """FeatureStats of the rows seen so far (``features``: the rows themselves, to keep)."""
        if self.n == 0:
            raise ValueError("no feature rows were accumulated")
        if require_full_rank:
            check_full_rank(self.n, self.dim)
        return FeatureStats(mu=self.mean(), sigma=self.covariance(), n=self.n, fingerprint=str(fingerprint),
                            features=None if features is None else np.asarray(features, np.float32),
                            image_shape=None if image_shape is None else tuple(int(s) for s in image_shape))


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStats:
    """Gaussian statistics of a feature set, computed once.

    mu: [D] float64 mean. sigma: [D, D] float64 covariance (ddof=1). n: number of samples.
    fingerprint: the extractor's ("" if unknown). features: the [N, D] float32 features, kept for
    precision/recall/density/coverage, else None. image_shape: (H, W, C) of the images, or None.
    """

    mu: Array
    sigma: Array
    n: int
    fingerprint: str = ""
    features: Optional[Array] = None
    image_shape: Optional[Tuple[int, int, int]] = None

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: Any, fingerprint: str = "", *, keep_features: bool = False,
                      image_shape: Optional[Sequence[int]] = None, require_full_rank: bool = True,
                      mean_dtype: Any = np.float64) -> "FeatureStats":
        """Statistics of [N, D] features; ``mean_dtype=np.float32`` gives guided-diffusion's evaluator's
        mean (numpy's float32 mean of float32 features; see MomentAccumulator), the covariance is float64."""
        features = _validate_features(features)
        if require_full_rank:
            check_full_rank(*features.shape)
        acc = MomentAccumulator(mean_dtype)
        acc.update(features)
        return acc.stats(fingerprint, features=features if keep_features else None, image_shape=image_shape,
                         require_full_rank=False)

    # --- persistence -------------------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes an .npz atomically (temporary file in the same directory, then os.replace)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.asarray(self.n, np.int64),
                  "fingerprint": np.asarray(self.fingerprint)}
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, np.float32)
        if self.image_shape is not None:
            arrays["image_shape"] = np.asarray(self.image_shape, np.int64)
        files.atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FeatureStats":
        with np.load(os.fspath(path), allow_pickle=False) as z:
            missing = {"mu", "sigma", "n", "fingerprint"} - set(z.files)
            if missing:
                raise ValueError(f"{os.fspath(path)} is not a FeatureStats file: missing {sorted(missing)}")
            return cls(mu=np.asarray(z["mu"], np.float64), sigma=np.asarray(z["sigma"], np.float64), n=int(z["n"]),
                       fingerprint=str(z["fingerprint"]),
                       features=np.asarray(z["features"], np.float32) if "features" in z.files else None,
                       image_shape=tuple(int(s) for s in z["image_shape"]) if "image_shape" in z.files else None)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two FeatureStats; refuses statistics of different extractors."""
    if a.fingerprint and b.fingerprint and a.fingerprint != b.fingerprint:
        raise ValueError(f"feature statistics come from different extractors (fingerprints {a.fingerprint[:16]}... and "
                         f"{b.fingerprint[:16]}...); FID is only defined between features of the same extractor")
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid_from_features(features1: Any, features2: Any) -> float:
    """FID between two [N, D] feature sets (each needs at least D+1 samples)."""
    return fid_from_stats(FeatureStats.from_features(features1), FeatureStats.from_features(features2))


# --- Inception Score and accuracy --------------------------------------------------------------------

def softmax(logits: Any, dtype: Any = np.float64) -> Array:
    """Softmax over the last axis, computed in ``dtype`` (float32 as TensorFlow's in the ADM evaluator)."""
    x = np.asarray(logits, dtype)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def inception_score(probs: Any, *, splits: int = 1, split_size: Optional[int] = None,
                    dtype: Any = np.float64) -> Tuple[float, float]:
    """Inception Score from class probabilities [N, K]: (mean, std) over parts of the samples.

    Each part scores exp(mean_x KL(p(y|x) || p(y))), p(y) the part's mean prediction. The parts are
    ``splits`` numpy.array_split parts (default 1: std 0), or consecutive runs of ``split_size`` rows
    (the last shorter). ``dtype`` float32 with split_size=5000 is guided-diffusion's evaluator's.
    0 log 0 counts as 0 (the evaluator would give NaN).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    p = np.asarray(probs, dtype)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"probs must be a 2-D array [N, K] of class probabilities, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    row = p.sum(axis=1)
    if not np.allclose(row, 1.0, atol=1e-3):
        raise ValueError(f"probs rows must sum to 1 (got sums between {row.min():.4g} and {row.max():.4g}); "
                         "pass softmax(logits), not logits")
    if split_size is not None:
        split_size = int(split_size)
        if split_size < 1:
            raise ValueError(f"split_size must be a positive integer, got {split_size}")
        if int(splits) != 1:
            raise ValueError(f"give splits or split_size, not both (got splits={splits}, split_size={split_size})")
        bounds = list(_chunks(p.shape[0], split_size))
    else:
        splits = int(splits)
        if splits < 1 or splits > p.shape[0]:
            raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
        bounds = [(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(p.shape[0]), splits)]
    p = p / row[:, None]
    scores = []
    for start, stop in bounds:
        part = p[start:stop]
        py = part.mean(axis=0, keepdims=True)
        # xlogy-style: 0 * log 0 = 0.
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def classifier_accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy of logits (or probabilities) [N, K] on integer labels [N]."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D array [N, K], got shape {logits.shape}")
    labels = validate_labels(labels, num_samples=logits.shape[0], num_classes=logits.shape[1])
    if labels.size == 0:
        raise ValueError("accuracy of zero samples is undefined")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# --- Precision / recall / density / coverage ---------------------------------------------------------

DISTANCES = ("float64", "float32", "float16")


def _sq_norms(x: Array) -> Array:
    return np.einsum("ij,ij->i", x, x)


def _sq_dist_block(a: Array, a2: Array, b: Array, b2: Array) -> Array:
    d = a2[:, None] + b2[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


_F16_MAX = np.float32(65504.0)

# guided-diffusion's evaluator (ManifoldEstimator) computes distances in blocks of 10,000 x 10,000 rows;
# TensorFlow falls back to float32 for a whole block, and Eigen's sums depend on a row's offset in it.
_TF_BATCH = 10_000
# TensorFlow's x86 build vectorises Eigen with AVX: 8 lanes of float16 (Packet8h) or float32 (Packet8f).
_EIGEN_LANES = 8
# Eigen's LeafSize<T>(): a sum of more than lanes x leaf values is split in two, recursively.
_EIGEN_LEAF = {np.dtype(np.float16): 200, np.dtype(np.float32): 1024}


def _round16(x: Array) -> Array:
    """float32 x rounded to the nearest float16 (ties to even), kept in float32 (every float16 is one).

    Bit for bit ``x.astype(np.float16).astype(np.float32)``, faster than numpy's scalar float16 casts:
    keeps 10 mantissa bits with integer operations, then mends float16's subnormals, overflow and NaNs.
    """
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32)
    half_even = np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))
    y = ((u + half_even) & np.uint32(0xFFFFE000)).view(np.float32)
    a = np.abs(x)
    tiny = a < np.float32(2.0**-14)
    if tiny.any():
        y = np.where(tiny, np.round(x * np.float32(2.0**24)) * np.float32(2.0**-24), y)
    big = a > _F16_MAX
    if big.any():
        y = np.where(big & (np.abs(y) > _F16_MAX), np.copysign(np.float32(np.inf), x), y)
    nan = np.isnan(x)
    if nan.any():
        y = np.where(nan, x, y)
    return y


def _lanes_sum(acc: Array, dtype: np.dtype) -> Array:
    """Eigen's predux of [n, 8] packets: lanes 0-3 + 4-7, then 0-1 + 2-3, then 0 + 1, in float32."""
    a = acc.astype(np.float32)
    while a.shape[1] > 1:
        h = a.shape[1] // 2
        a = a[:, :h] + a[:, h:]
    return a[:, 0].astype(dtype)


def _eigen_leaf_sum(v: Array, start: int, num: int) -> Array:
    """Eigen's vectorised InnerMostDimReducer of columns start:start+num of v, per row, in v's dtype.

    Four packet accumulators take interleaved packets, are added in order (0 + 1, + 2, + 3), take the
    remaining whole packets; the last values go to a scalar accumulator, added to the lanes' sum.
    """
    n, p = v.shape[0], _EIGEN_LANES
    acc, done = np.zeros((n, p), v.dtype), 0
    if num >= 4 * p:
        done = num // (4 * p) * 4 * p
        quads = v[:, start:start + done].reshape(n, -1, 4, p)
        accs = np.zeros((n, 4, p), v.dtype)
        for j in range(quads.shape[1]):
            accs += quads[:, j]
        acc = ((accs[:, 0] + accs[:, 1]) + accs[:, 2]) + accs[:, 3]
    for j in range(done, num - p + 1, p):
        acc = acc + v[:, start + j:start + j + p]
        done = j + p
    tail = np.zeros(n, v.dtype)
    for j in range(done, num):
        tail = tail + v[:, start + j]
    return tail + _lanes_sum(acc, v.dtype)


def _eigen_row_sums(v: Array, offset: int, start: int = 0, num: int | None = None) -> Array:
    """Eigen's tree reduction (InnerMostDimReducer) of each row of v in v's dtype, each addition rounded.

    Above lanes x leaf values the range splits at a packet boundary of the flat index, which is why the
    row's flat offset (its index in TensorFlow's batch x the feature dimension) matters.
    """
    num = v.shape[1] if num is None else num
    p = _EIGEN_LANES
    if num <= p * _EIGEN_LEAF[v.dtype]:
        return _eigen_leaf_sum(v, start, num)
    first = offset + start
    left = min(p * -(-(first + -(-num // 2)) // p) - first, num)
    acc = _eigen_row_sums(v, offset, start, left)
    if left < num:
        acc = acc + _eigen_row_sums(v, offset, start + left, num - left)
    return acc


def _tf_sq_norms(x: Array, dtype: Any, rows: int = 4096) -> Array:
    """TensorFlow's ``reduce_sum(square(x), 1)`` in dtype (float16 or float32) on CPU, as float32.

    Squares rounded to dtype, summed as Eigen does (``_eigen_row_sums``) at each row's offset in the
    evaluator's batch of ``_TF_BATCH`` rows; rows go through in chunks to bound the temporaries.
    """
    dtype = np.dtype(dtype)
    n, dim = x.shape
    out = np.empty(n, np.float32)
    offsets = (np.arange(n) % _TF_BATCH) * dim % _EIGEN_LANES
    with np.errstate(over="ignore", invalid="ignore"):
        for s, e in _chunks(n, rows):
            v = x[s:e].astype(dtype)
            v = v * v
            for off in np.unique(offsets[s:e]):
                sel = offsets[s:e] == off
                out[s:e][sel] = _eigen_row_sums(v[sel], int(off))
    return out


def _exact_dot(a: Array, b: Array) -> Array:
    """a @ b.T of float16-valued rows, rounded once to float32: float64 holds each product exactly."""
    return (a.astype(np.float64) @ b.astype(np.float64).T).astype(np.float32)


def _tf16_distances(nu: Array, uv: Array, nv: Array) -> Array:
    """The DistanceBlock's float16 ``(|u|^2 - 2 u.v) + |v|^2`` from float16 norms [m], [n] and u.v [m, n]
    (float16 values in float32 arrays), each operation rounded to float16; inf and NaN where they arise."""
    with np.errstate(over="ignore", invalid="ignore"):
        two_uv = 2.0 * uv
        if (np.abs(uv) > _F16_MAX / 2).any():
            two_uv = _round16(two_uv)  # 2 u.v overflows float16 to inf
        return _round16(_round16(nu[:, None] - two_uv) + nv[None, :])


class _Points:
    """Feature rows prepared for squared euclidean distances in one arithmetic (``DISTANCES``).

    float64 / float32: ``|u|^2 + |v|^2 - 2 u.v`` in that dtype, clamped at 0. float16 is guided-diffusion's
    evaluator's DistanceBlock on TensorFlow's CPU: float16 features; squared norms summed in float16 as
    Eigen does (``_tf_sq_norms``); u.v accumulated in float32 (TensorFlow casts float16 matmuls to
    float32) and rounded to float16, here from its exact value; then ``max((|u|^2 - 2 u.v) + |v|^2, 0)``
    with every operation rounded to float16. Where any element of one of the evaluator's 10,000 x 10,000
    blocks is not finite, the whole block is the float32 DistanceBlock instead. float16 values are held
    in float32 arrays (exact radius comparisons).
    """

    def __init__(self, x: Array, distance: str):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        self.x = np.asarray(x, np.float64 if distance == "float64" else np.float32)
        if distance != "float16":
            self.sq = _sq_norms(self.x)
            return
        with np.errstate(over="ignore", invalid="ignore"):
            self.h = self.x.astype(np.float16)  # half the memory of the float32 features
        self.sq16 = _tf_sq_norms(self.h, np.float16)
        self.abs16 = np.empty(len(self))  # |u| of the float16 features, for the overflow bound
        for s, e in _chunks(len(self), DEFAULT_CHUNK_SIZE):
            h = self.h[s:e].astype(np.float64)
            self.abs16[s:e] = np.sqrt(np.einsum("ij,ij->i", h, h))
        self.sq32: Array | None = None  # float32 norms, computed for the first float32 block
        self.fallback_blocks: dict = {}  # (id(other), row batch, column batch) -> bool

    def __len__(self) -> int:
        return self.x.shape[0]

    def chunks(self, chunk_size: int):
        """Row chunks of at most chunk_size; for float16 none straddles one of the evaluator's batches."""
        if self.distance != "float16":
            yield from _chunks(len(self), chunk_size)
            return
        for b, be in _chunks(len(self), _TF_BATCH):
            for s, e in _chunks(be - b, chunk_size):
                yield b + s, b + e

    def block(self, s: int, e: int, other: "_Points", cs: int, ce: int, uv: Array | None = None) -> Array:
        """Squared distances between rows s:e of self and rows cs:ce of other (for float16, chunks; uv:
        their ``uv16`` if already computed)."""
        if self.distance != "float16":
            return _sq_dist_block(self.x[s:e], self.sq[s:e], other.x[cs:ce], other.sq[cs:ce])
        if self._falls_back(other, s // _TF_BATCH, cs // _TF_BATCH):
            return self._block32(s, e, other, cs, ce)
        return np.maximum(self._block16(s, e, other, cs, ce, uv), 0.0)

    def uv16(self, s: int, e: int, other: _Points, cs: int, ce: int) -> Array:
        """float16 u.v of rows s:e and other's cs:ce: float32 accumulation (here exact) rounded to float16."""
        return _round16(_exact_dot(self.h[s:e], other.h[cs:ce]))

    def _block16(self, s: int, e: int, other: _Points, cs: int, ce: int, uv: Array | None = None) -> Array:
        """The float16 distances of rows s:e and other's cs:ce before the clamp at 0."""
        uv = self.uv16(s, e, other, cs, ce) if uv is None else uv
        return _tf16_distances(self.sq16[s:e], uv, other.sq16[cs:ce])

    def _block32(self, s: int, e: int, other: _Points, cs: int, ce: int) -> Array:
        """The evaluator's float32 DistanceBlock: ``max((|u|^2 - 2 u.v) + |v|^2, 0)`` in float32."""
        for p in (self, other):
            if p.sq32 is None:
                p.sq32 = _tf_sq_norms(p.x, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            uv = (self.x[s:e].astype(np.float64) @ other.x[cs:ce].astype(np.float64).T).astype(np.float32)
            d = (self.sq32[s:e, None] - 2.0 * uv) + other.sq32[None, cs:ce]
        return np.maximum(d, 0.0, out=d)

    def _falls_back(self, other: _Points, rb: int, cb: int) -> bool:
        """Whether the evaluator's block (row batch rb of self, column batch cb of other) has a float16
        element that is not finite (then TensorFlow recomputes the whole block in float32)."""
        key = (id(other), rb, cb)
        if key not in self.fallback_blocks:
            rows = slice(rb * _TF_BATCH, min((rb + 1) * _TF_BATCH, len(self)))
            cols = slice(cb * _TF_BATCH, min((cb + 1) * _TF_BATCH, len(other)))
            nu, nv = self.sq16[rows], other.sq16[cols]
            if not (np.isfinite(nu).all() and np.isfinite(nv).all()):
                self.fallback_blocks[key] = True
            else:
                # |u.v| <= |u||v|, so no intermediate can reach float16's overflow below this bound.
                bound = float(nu.max()) + float(nv.max()) + 2.002 * self.abs16[rows].max() * other.abs16[cols].max()
                self.fallback_blocks[key] = bound * 1.002 >= _F16_MAX and any(
                    not np.isfinite(np.maximum(self._block16(s, e, other, cs, ce), 0.0)).all()
                    for s, e in _chunks_in(rows, DEFAULT_CHUNK_SIZE) for cs, ce in _chunks_in(cols, DEFAULT_CHUNK_SIZE))
        return self.fallback_blocks[key]


def _chunks(n: int, chunk_size: int):
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _chunks_in(rows: slice, chunk_size: int):
    """_chunks of the rows rows.start:rows.stop, as absolute (start, stop) pairs."""
    for s, e in _chunks(rows.stop - rows.start, chunk_size):
        yield rows.start + s, rows.start + e


def _knn_sq_radii(x: _Points, k: int, chunk_size: int) -> Array:
    """Squared distance of each row of x to its k-th nearest neighbour in x ((k+1)-th incl. itself).

    Blocks of chunk_size x chunk_size distances; each row keeps its k+1 smallest so far.
    """
    if x.distance == "float16":
        return _knn16_sq_radii(x, k, chunk_size)
    n = len(x)
    out = np.empty(n, np.float64)
    for s, e in x.chunks(chunk_size):
        best = np.empty((e - s, 0), np.float64)
        for cs, ce in x.chunks(chunk_size):
            cand = np.concatenate([best, x.block(s, e, x, cs, ce)], axis=1)
            best = np.partition(cand, k, axis=1)[:, : k + 1] if cand.shape[1] > k + 1 else cand
        out[s:e] = np.partition(best, k, axis=1)[:, k]
    return out


def _knn16_sq_radii(x: _Points, k: int, chunk_size: int) -> Array:
    """``_knn_sq_radii`` in float16 with each u.v block computed once for chunks (i, j) and (j, i): u.v
    is symmetric, the distances ``(|u|^2 - 2 u.v) + |v|^2`` are not, so both are rounded from it."""
    chunks = list(x.chunks(chunk_size))
    best = [np.empty((e - s, 0), np.float64) for s, e in chunks]

    def keep(i: int, d: Array) -> None:
        cand = np.concatenate([best[i], d], axis=1)
        # a copy: a view would keep every chunk's whole partitioned block alive until its turn
        best[i] = np.partition(cand, k, axis=1)[:, : k + 1].copy() if cand.shape[1] > k + 1 else cand

    for i, (s, e) in enumerate(chunks):
        for j in range(i, len(chunks)):
            cs, ce = chunks[j]
            uv = x.uv16(s, e, x, cs, ce)
            keep(i, x.block(s, e, x, cs, ce, uv))
            if j > i:
                keep(j, x.block(cs, ce, x, s, e, uv.T))
    out = np.empty(len(x), np.float64)
    for (s, e), b in zip(chunks, best):
        out[s:e] = np.partition(b, k, axis=1)[:, k]
    return out


def knn_radii(features: Any, k: int = 3, *, chunk_size: int = DEFAULT_CHUNK_SIZE, distance: str = "float64") -> Array:
    """Euclidean distance from each feature to its k-th nearest neighbour within the same set.

    ``distance`` is the arithmetic of the squared distances (``DISTANCES``; float16 is guided-diffusion's
    evaluator's, see ``_Points``); the square root is taken in float64.
    """
    x = _validate_features(features)
    _check_knn(x.shape[0], k, "features")
    return np.sqrt(_knn_sq_radii(_Points(x, distance), int(k), chunk_size))


def _manifold_pass(real_features: Any, fake_features: Any, k: int, chunk_size: int, distance: str, *,
                   want_pr: bool = True, want_dc: bool = True) -> dict:
    """Precision/recall and/or density/coverage in one pass over the real x fake distances."""
    real = _validate_features(real_features, "reference features")
    fake = _validate_features(fake_features, "sample features")
    k = int(k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {real.shape[1]} vs samples {fake.shape[1]}")
    _check_knn(real.shape[0], k, "the reference features")
    _check_knn(fake.shape[0], k, "the sample features")
    real, fake = _Points(real, distance), _Points(fake, distance)
    r_rad = _knn_sq_radii(real, k, chunk_size)
    f_rad = _knn_sq_radii(fake, k, chunk_size) if want_pr else None
    m, n = len(real), len(fake)
    fake_in_real = np.zeros(n, bool)  # precision
    real_in_fake = np.zeros(m, bool)  # recall
    density_counts = np.zeros(n, np.int64)
    covered = np.zeros(m, bool)  # min distance < radius <=> some distance < radius
    for s, e in real.chunks(chunk_size):
        rr = r_rad[s:e, None]
        for cs, ce in fake.chunks(chunk_size):
            d = real.block(s, e, fake, cs, ce)  # [real chunk, fake chunk]
            if want_pr:
                fake_in_real[cs:ce] |= np.any(d <= rr, axis=0)
                real_in_fake[s:e] |= np.any(d <= f_rad[None, cs:ce], axis=1)
            if want_dc:
                inside = d < rr
                density_counts[cs:ce] += inside.sum(axis=0)
                covered[s:e] |= inside.any(axis=1)
    out = {}
    if want_pr:
        out.update(precision=float(fake_in_real.mean()), recall=float(real_in_fake.mean()))
    if want_dc:
        out.update(density=float(density_counts.sum() / (k * n)), coverage=float(covered.mean()))
    return out


def precision_recall(real_features: Any, fake_features: Any, *, k: int = 3, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     distance: str = "float64") -> Tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN radii; returns (precision, recall).

    ``distance="float16"`` gives guided-diffusion's evaluator's squared distances (see ``_Points``).
    """
    r = _manifold_pass(real_features, fake_features, k, chunk_size, distance, want_dc=False)
    return r["precision"], r["recall"]


def density_coverage(real_features: Any, fake_features: Any, *, k: int = 3, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     distance: str = "float64") -> Tuple[float, float]:
    """Density and coverage (Naeem et al. 2020); returns (density, coverage)."""
    r = _manifold_pass(real_features, fake_features, k, chunk_size, distance, want_pr=False)
    return r["density"], r["coverage"]


def prdc(real_features: Any, fake_features: Any, *, k: int = 3, chunk_size: int = DEFAULT_CHUNK_SIZE,
         distance: str = "float64") -> dict:
    """Precision, recall, density and coverage in one pass over the real x fake distances."""
    return _manifold_pass(real_features, fake_features, k, chunk_size, distance)


# --- Feature extractors ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A named feature extractor: ``extractor(images uint8 [N,H,W,C]) -> (features [N,D], logits [N,K] | None)``.

    ``fn`` receives validated uint8 NHWC numpy images and batches and jits as it likes
    (``classifier_extractor`` does both). ``fingerprint`` must change whenever the features could;
    cached reference statistics are keyed by it.
    """

    name: str
    fingerprint: str
    fn: Callable[[Array], Tuple[Any, Optional[Any]]]

    def __call__(self, images: Any) -> Tuple[Array, Optional[Array]]:
        images = validate_images(images)
        out = [None if a is None else np.asarray(a) for a in self.fn(images)]
        for what, a, shape in zip(("features", "logits"), out, ("[N, D]", "[N, K]")):
            if a is not None and (a.ndim != 2 or a.shape[0] != images.shape[0]):
                raise ValueError(f"extractor {self.name!r} returned {what} of shape {a.shape} for "
                                 f"{images.shape[0]} images; expected {shape}")
        return out[0], out[1]


def classifier_extractor(apply_fn: Callable[[Any, Any], Any], params: Any, *,
                         feature_fn: Optional[Callable[[Any, Any], Any]] = None, batch_size: int = 256,
                         name: str = "classifier", config: Optional[Mapping[str, Any]] = None) -> FeatureExtractor:
    """Wraps a Flax classifier as a FeatureExtractor.

    apply_fn(params, x) -> logits [B, K], with x float32 NHWC in [-1, 1] (uint8 / 127.5 - 1).
    feature_fn(params, x) -> features [B, ...] (flattened to [B, D]), e.g. the penultimate layer, or
    ``(features, logits)`` from one forward pass; without it the logits are the features.
    Images go through in fixed-size batches (the last one padded) under one jit. ``config`` (JSON-able)
    is folded into the fingerprint: put there whatever distinguishes feature_fn choices (functions
    cannot be hashed stably).
    """
    import jax.numpy as jnp

    from jaxdiff.util import cpu

    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    config = {"input": "uint8/127.5-1", "feature_fn": feature_fn is not None, **dict(config or {})}

    @cpu.jit
    def forward(p, images_u8):
        x = images_u8.astype(jnp.float32) / 127.5 - 1.0
        if feature_fn is None:
            feats = logits = apply_fn(p, x)
        else:
            out = feature_fn(p, x)
            feats, logits = out if isinstance(out, (tuple, list)) and len(out) == 2 else (out, apply_fn(p, x))
        return feats.reshape(feats.shape[0], -1), logits

    def fn(images: Array):
        if not len(images):
            raise ValueError("cannot extract features of zero images")
        parts = []
        for s in range(0, len(images), batch_size):
            batch = images[s: s + batch_size]
            padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)])
            parts.append([np.asarray(a, np.float32)[:len(batch)] for a in forward(params, padded)])
        return tuple(np.concatenate(a) for a in zip(*parts))

    return FeatureExtractor(name=name, fingerprint=params_fingerprint(params, name=name, config=config), fn=fn)


# --- Reference statistics cache and evaluation -------------------------------------------------------

def reference_cache_path(cache_dir: str, key: str, fingerprint: str) -> str:
    """The reference-statistics cache file of `key` (made filename-safe) and the extractor's fingerprint."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(key)).strip("._") or "reference"
    return os.path.join(os.fspath(cache_dir), f"{safe}-{fingerprint[:20]}.npz")


def reference_stats(images: Union[Array, Callable[[], Array]], extractor: FeatureExtractor,
                    cache_dir: Union[str, os.PathLike], key: str, *, keep_features: bool = True) -> FeatureStats:
    """Reference statistics of a dataset split, computed once and cached on disk.

    The cache file is ``cache_dir/<key>-<fingerprint[:20]>.npz`` (key sanitised), so a new extractor
    never reads stale statistics. ``images`` may be a zero-argument callable returning the uint8 NHWC
    array (a cache hit never loads the dataset). keep_features stores the features PRDC needs.
    """
    path = reference_cache_path(os.fspath(cache_dir), key, extractor.fingerprint)
    if os.path.exists(path):
        stats = FeatureStats.load(path)
        if stats.fingerprint != extractor.fingerprint:
            raise ValueError(f"cached statistics {path} were made by extractor {stats.fingerprint[:16]}..., not "
                             f"{extractor.fingerprint[:16]}...; delete the file")
        n = None if callable(images) else np.shape(images)[:1]
        if n and n[0] != stats.n:
            raise ValueError(f"cached statistics {path} for key {key!r} hold n = {stats.n} images but {n[0]} were "
                             "given; use a different key for a different dataset/split or delete the file")
        if not (keep_features and stats.features is None):  # else recompute, with the features
            return stats
    arr = validate_images(images() if callable(images) else images, what="reference images")
    stats = FeatureStats.from_features(extractor(arr)[0], extractor.fingerprint, keep_features=keep_features,
                                       image_shape=arr.shape[1:])
    stats.save(path)
    return stats


def evaluate_samples(sample_images: Any, sample_labels: Any, reference: Union[FeatureStats, Array],
                     extractor: FeatureExtractor, *, num_classes: int, k: int = 3, is_splits: int = 1,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
    """All sample-quality metrics of uint8 NHWC samples against a reference (FeatureStats or images).

    Returns fid, inception_score, inception_score_std, precision, recall, density, coverage, accuracy
    (top-1 of the extractor's logits on the requested labels), extractor_fingerprint, num_samples,
    num_reference, feature_dim, k, is_splits. NaN where not computable: IS and accuracy without
    logits, accuracy without sample_labels, PRDC against FeatureStats without stored features.
    """
    if isinstance(reference, FeatureStats):
        if reference.fingerprint != extractor.fingerprint:
            raise ValueError(f"reference statistics were computed with extractor fingerprint "
                             f"{reference.fingerprint[:16]}... but the extractor {extractor.name!r} has "
                             f"{extractor.fingerprint[:16]}...; recompute them")
        ref_shape = reference.image_shape
    else:
        ref_images = validate_images(reference, what="reference images")
        ref_shape = ref_images.shape[1:]
    images = validate_images(sample_images, image_shape=ref_shape, what="sample images")
    n = images.shape[0]
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    labels = None
    if sample_labels is not None:
        labels = validate_labels(sample_labels, num_samples=n, num_classes=num_classes, what="sample labels")
    k = int(k)
    _check_knn(n, k, "the samples")

    if not isinstance(reference, FeatureStats):
        ref_feats, _ = extractor(ref_images)
        reference = FeatureStats.from_features(ref_feats, extractor.fingerprint, keep_features=True,
                                               image_shape=ref_shape)

    features, logits = extractor(images)
    d = features.shape[1]
    if d != reference.dim:
        raise ValueError(f"sample features have dimension {d} but the reference has {reference.dim}")
    check_full_rank(n, d, "the sample features")
    sample_stats = FeatureStats.from_features(features, extractor.fingerprint)

    nan = float("nan")
    result = {"fid": fid_from_stats(sample_stats, reference), "inception_score": nan, "inception_score_std": nan}
    if logits is not None:
        if logits.shape[1] != num_classes:
            raise ValueError(f"extractor {extractor.name!r} gives {logits.shape[1]} logits per image but "
                             f"num_classes = {num_classes}; they must agree")
        result["inception_score"], result["inception_score_std"] = inception_score(softmax(logits), splits=is_splits)
    if reference.features is not None:
        result.update(prdc(reference.features, features, k=k, chunk_size=chunk_size))
    else:
        result.update(precision=nan, recall=nan, density=nan, coverage=nan)
    result.update(accuracy=classifier_accuracy(logits, labels) if logits is not None and labels is not None else nan,
                  extractor_fingerprint=extractor.fingerprint, num_samples=int(n), num_reference=int(reference.n),
                  feature_dim=int(d), k=k, is_splits=int(is_splits))
    return result


