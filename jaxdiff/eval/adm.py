"""guided-diffusion's evaluator (``evaluations/evaluator.py``): the ADM tables' metrics, streamed and sharded.

``evaluate(ref_path, sample_path, feature_fn, params)`` gives the Inception Score, FID, sFID, precision
and recall with the evaluator's semantics: FID / sFID from float32 means and float64 covariances of the
``pool3`` / ``spatial`` features (a reference batch's stored ``mu``, ``sigma``, ``mu_s``, ``sigma_s``
when present); the IS from the float32 softmax of ``logits_unbiased`` in consecutive parts of 5000
rows; precision / recall with k = 3 on ``pool3`` in the evaluator's float16 distances.

Images are streamed from the ``.npz`` files in chunks of rows, so a 50,000-image file is never in
memory. One compiled program runs over a ('data',) mesh of every device of every process, each
process reading only its rows of each global batch; the output is replicated, so every process
computes the same metrics. Host memory holds the samples' pool3 features and logits and the
reference's pool3 features (precision / recall and the IS need the rows), the spatial features only
as running sums.

``feature_fn(params, images_uint8 [B, H, W, 3]) -> {"pool3", "spatial", "logits_unbiased", ...}`` is
any jittable function with those keys (pass it un-jitted), e.g. ``inception.pure_feature_fn(mode)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import zipfile
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from jaxdiff.eval import metrics as M
from jaxdiff.util.files import Rows, write_npz
from jaxdiff.util.fingerprint import file_fingerprint

__all__ = ["FEATURE_KEYS", "NpzArrayReader", "Rows", "ShardedFeatures", "evaluate", "file_fingerprint", "npy_header",
           "write_npz", "write_reference_batch"]

PathLike = Union[str, os.PathLike]
FEATURE_KEYS = ("pool3", "spatial", "logits_unbiased")
IS_SPLIT_SIZE = 5000
DEFAULT_BATCH_SIZE = 256


# --- Reading .npz members in chunks of rows ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NpyHeader:
    shape: Tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def _read_npy_header(fp, where: str) -> NpyHeader:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"{where}: .npy format version {version} is not supported (1.0 and 2.0 are)")
    return NpyHeader(tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran))


def _missing(path: str, name: str, zf: zipfile.ZipFile) -> ValueError:
    have = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
    return ValueError(f"{path} has no array {name!r} (it holds {have})")


class NpzArrayReader:
    """Rows of one array of an ``.npz`` file, read on demand (``read(start, stop)``).

    Members stored uncompressed (``np.savez``) are read at their offset in the file; compressed ones
    (``np.savez_compressed``) through the zip stream, which decompresses forward (a backward read
    starts the stream again). Use as a context manager, or call ``close()``.
    """

    def __init__(self, path: PathLike, name: str = "arr_0"):
        self.path, self.name = os.fspath(path), str(name)
        self._file = open(self.path, "rb")
        try:
            try:
                self._zip = zipfile.ZipFile(self._file)
            except zipfile.BadZipFile:
                raise ValueError(f"{self.path} is not an .npz file (not a zip archive)") from None
            member = self.name + ".npy"
            if member not in self._zip.namelist():
                raise _missing(self.path, self.name, self._zip)
            self._info = self._zip.getinfo(member)
            self._stream = self._zip.open(self._info)
            self.header = _read_npy_header(self._stream, f"{self.path}:{self.name}")
            self._data_start = self._stream.tell()
            self._offset = None  # absolute file offset of the data when stored uncompressed
            if self._info.compress_type == zipfile.ZIP_STORED and not self._info.flag_bits & 1:
                self._file.seek(self._info.header_offset)
                local = self._file.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                self._offset = self._info.header_offset + 30 + name_len + extra_len + self._data_start
        except BaseException:
            self._file.close()
            raise

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.header.shape

    @property
    def dtype(self) -> np.dtype:
        return self.header.dtype

    @property
    def num_rows(self) -> int:
        return self.shape[0]

    @property
    def image_shape(self) -> Tuple[int, ...]:
        return self.shape[1:]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop (clipped to the array) as a fresh array."""
        if not self.shape:
            raise ValueError(f"{self.path}:{self.name} is a scalar; it has no rows")
        if self.header.fortran_order and len(self.shape) > 1:
            raise ValueError(f"{self.path}:{self.name} is stored in Fortran order; save it C-contiguous "
                             "(np.ascontiguousarray) to read it in rows")
        start, stop = max(0, int(start)), min(int(stop), self.shape[0])
        count = max(0, stop - start)
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        size = count * row_bytes
        if self._offset is not None:  # stored uncompressed: read in place
            self._file.seek(self._offset + start * row_bytes)
            data = self._file.read(size)
        else:
            self._stream.seek(self._data_start + start * row_bytes)
            data = self._stream.read(size)
        if len(data) != size:
            raise ValueError(f"{self.path}:{self.name} is truncated: rows {start}:{stop} need {size} bytes, "
                             f"got {len(data)}")
        return np.frombuffer(data, self.dtype).reshape((count,) + self.shape[1:]).copy()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "NpzArrayReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def npy_header(path: PathLike, name: str) -> Optional[NpyHeader]:
    """Shape, dtype and order of member ``name`` of an ``.npz`` (None when absent); reads the header only."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf:
            if name + ".npy" not in zf.namelist():
                return None
            with zf.open(name + ".npy") as f:
                return _read_npy_header(f, f"{path}:{name}")
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file (not a zip archive)") from None


def _read_member(path: str, name: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return np.asarray(z[name])


# --- Checks made before any work ---------------------------------------------------------------------


def _check_images(path: str, min_images: int, what: str) -> NpyHeader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist")
    h = npy_header(path, "arr_0")
    if h is None:
        with zipfile.ZipFile(path) as zf:
            raise ValueError(f"{what}: {_missing(path, 'arr_0', zf)}; arr_0 must hold the uint8 NHWC images")
    if h.dtype != np.uint8:
        raise ValueError(f"{what} {path}: arr_0 has dtype {h.dtype}; it must be uint8 (0..255) images")
    if len(h.shape) != 4:
        raise ValueError(f"{what} {path}: arr_0 has shape {h.shape}; it must be NHWC images [N, H, W, 3]")
    if h.shape[-1] != 3:
        hint = " (channels-first NCHW? transpose to NHWC)" if h.shape[1] == 3 else ""
        raise ValueError(f"{what} {path}: arr_0 has shape {h.shape} with {h.shape[-1]} channels; the "
                         f"evaluator needs RGB images [N, H, W, 3]{hint}")
    if h.fortran_order:
        raise ValueError(f"{what} {path}: arr_0 is stored in Fortran order; save it C-contiguous")
    if h.shape[0] < min_images:
        raise ValueError(f"{what} {path} holds {h.shape[0]} images; precision/recall with k = "
                         f"{min_images - 1} need at least {min_images}")
    return h


def _check_labels(path: str, n: int) -> bool:
    h = npy_header(path, "arr_1")
    if h is None:
        return False
    if len(h.shape) != 1 or h.dtype.kind not in "iu" or h.shape[0] != n:
        raise ValueError(f"samples {path}: arr_1 (labels) has shape {h.shape} dtype {h.dtype}; it must be "
                         f"{n} integers, one per image of arr_0")
    return True


def _stored_stats(path: str, dims: Mapping[str, int]) -> dict:
    """The reference batch's precomputed statistics, {"pool3": (mu, sigma), "spatial": (...)} as present."""
    out = {}
    for key, (mu_name, sigma_name) in {"pool3": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
        hm, hs = npy_header(path, mu_name), npy_header(path, sigma_name)
        if hm is None and hs is None:
            continue
        if hm is None or hs is None:
            raise ValueError(f"reference {path} holds only one of {mu_name!r} and {sigma_name!r}; it needs both or neither")
        d = dims[key]
        if hm.shape != (d,) or hs.shape != (d, d):
            raise ValueError(f"reference {path}: {mu_name} {hm.shape} / {sigma_name} {hs.shape} do not match the "
                             f"feature function's {key} dimension {d} (expected ({d},) and ({d}, {d}))")
        out[key] = (_read_member(path, mu_name), _read_member(path, sigma_name))
    return out


# --- Sharded feature extraction ----------------------------------------------------------------------


class ShardedFeatures:
    """``feature_fn`` compiled once for uint8 batches [batch_size, *image_shape] over a ('data',) mesh.

    ``run(rows, on_batch)`` feeds ``rows`` (anything with ``num_rows`` and ``read(start, stop)``) through
    it in global batches: each process reads only its rows of each batch (zeros past the end, so the
    last batch has the same shape), and ``on_batch(start, {key: float32 [valid, D]})`` gets every row's
    features, in order, on every process. Every process must call ``run`` with the same row count.
    """

    def __init__(
        self,
        feature_fn: Callable[[Any, Any], Mapping[str, Any]],
        params: Any,
        *,
        image_shape: Sequence[int],
        batch_size: int = DEFAULT_BATCH_SIZE,
        keys: Sequence[str] = FEATURE_KEYS,
        mesh: Any = None,
    ):
        import jax
        import jax.numpy as jnp

        from jaxdiff import parallel
        from jaxdiff.util import cpu

        self.mesh = parallel.data_mesh() if mesh is None else mesh
        self.batch_size, self.keys = int(batch_size), tuple(keys)
        ndev = self.mesh.size
        if self.batch_size < 1 or self.batch_size % ndev:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the device count {ndev}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self._global_shape = (self.batch_size,) + self.image_shape
        self._sharding = parallel.batch_sharding(self.mesh)
        self._lo, self._hi = _local_span(self._sharding, self._global_shape)

        def program(p, images):
            out = feature_fn(p, images)
            return {k: jnp.reshape(out[k], (images.shape[0], -1)).astype(jnp.float32) for k in self.keys}

        spec = jax.ShapeDtypeStruct(self._global_shape, jnp.uint8)
        try:
            shapes = jax.eval_shape(feature_fn, params, spec)
        except Exception as e:
            raise ValueError(f"feature_fn failed on uint8 images of shape {self._global_shape}: {e}") from e
        missing = [k for k in self.keys if k not in shapes]
        if missing:
            raise ValueError(f"feature_fn returns {sorted(shapes)}; it must return {list(self.keys)} (missing {missing})")
        self.dims = {k: int(np.prod(shapes[k].shape[1:], dtype=np.int64)) for k in self.keys}
        bad = {k: shapes[k].shape for k in self.keys if not shapes[k].shape or shapes[k].shape[0] != self.batch_size}
        if bad:
            raise ValueError(f"feature_fn outputs {bad} do not have one row per image ({self.batch_size})")
        self._params = parallel.replicate(params, self.mesh)
        self._fn = cpu.jit(program, out_shardings=parallel.replicated_sharding(self.mesh))

    def run(self, rows: Any, on_batch: Callable[[int, dict], None], *, progress: bool = True,
            desc: Optional[str] = None) -> None:
        import jax
        from tqdm import tqdm

        n, g = int(rows.num_rows), self.batch_size
        bar = tqdm(total=n, desc=desc, unit="img", disable=not progress or jax.process_index() != 0)
        pending = None
        try:
            for start in range(0, n, g):
                lo, hi = min(n, start + self._lo), min(n, start + self._hi)
                local = np.zeros((self._hi - self._lo,) + self.image_shape, np.uint8)
                if hi > lo:
                    local[: hi - lo] = rows.read(lo, hi)
                x = jax.make_array_from_process_local_data(self._sharding, local, self._global_shape)
                out = self._fn(self._params, x)  # dispatched asynchronously: the next read overlaps it
                if pending is not None:
                    self._deliver(*pending, on_batch, bar)
                pending = (start, min(g, n - start), out)
            if pending is not None:
                self._deliver(*pending, on_batch, bar)
        finally:
            bar.close()

    @staticmethod
    def _deliver(start: int, valid: int, out: dict, on_batch, bar) -> None:
        on_batch(start, {k: np.asarray(v)[:valid] for k, v in out.items()})
        bar.update(valid)


def _local_span(sharding, global_shape) -> Tuple[int, int]:
    """The rows [lo, hi) of a global batch that this process's devices hold (one contiguous run)."""
    spans = sorted({(s[0].start or 0, global_shape[0] if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map(global_shape).values()})
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if start != stop:
            raise ValueError(f"this process's devices hold non-contiguous rows {spans} of the batch; "
                             "order the mesh's devices by process")
    return spans[0][0], spans[-1][1]


class _Collect:
    """What the metrics need of a feature pass: FID moments of pool3 and spatial, and kept rows."""

    def __init__(self, n: int, dims: Mapping[str, int], keep: Sequence[str]):
        self.moments = {k: M.MomentAccumulator(np.float32) for k in ("pool3", "spatial")}
        self.kept = {k: np.empty((n, dims[k]), np.float32) for k in keep}

    def __call__(self, start: int, feats: dict) -> None:
        for k, acc in self.moments.items():
            acc.update(feats[k])
        for k, arr in self.kept.items():
            arr[start: start + feats[k].shape[0]] = feats[k]


def _all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))) == 1)


# --- Fingerprints and the reference cache ------------------------------------------------------------


def _features_fingerprint(params: Any, mode: str, dims: Mapping[str, int]) -> str:
    """Identifies the pool3 and spatial features: the weights, the preprocessing mode, the dimensions."""
    config = {"mode": str(mode), "dims": {k: int(dims[k]) for k in ("pool3", "spatial")}}
    return M.params_fingerprint(params, name="adm_eval", config=config)


def _reference_stats(ref_path: str, header: NpyHeader, extractor: ShardedFeatures, features_fp: str,
                     cache_dir: Optional[str], progress: bool) -> Tuple[dict, str]:
    """{"pool3": FeatureStats with features, "spatial": FeatureStats} of the reference images, and
    "hit" / "miss" / "off" for the cache (keyed by the features' and the file's fingerprints)."""
    key, paths = "", {}
    if cache_dir is not None:
        key = hashlib.sha256(f"{features_fp}\0{file_fingerprint(ref_path)}".encode()).hexdigest()
        base = "adm_ref-" + os.path.splitext(os.path.basename(ref_path))[0]
        paths = {k: M.reference_cache_path(cache_dir, f"{base}-{k}", key) for k in ("pool3", "spatial")}
        cached = {k: M.FeatureStats.load(p) for k, p in paths.items() if os.path.exists(p)}
        hit = (len(cached) == 2 and all(c.fingerprint == key for c in cached.values())
               and cached["pool3"].features is not None)
        # Every process must take the same branch: a process extracting alone would wait forever.
        if _all_processes(hit):
            return cached, "hit"
    collect = _Collect(header.shape[0], extractor.dims, keep=("pool3",))
    with NpzArrayReader(ref_path) as reader:
        extractor.run(reader, collect, progress=progress, desc="reference")
    stats = {k: collect.moments[k].stats(key, features=collect.kept.get(k), image_shape=header.shape[1:],
                                         require_full_rank=False) for k in ("pool3", "spatial")}
    for k, path in paths.items():
        stats[k].save(path)
    return stats, "miss" if paths else "off"


# --- The evaluation ----------------------------------------------------------------------------------


def evaluate(ref_path: PathLike, sample_path: PathLike, feature_fn: Callable[[Any, Any], Mapping[str, Any]],
             params: Any, *, mode: str = "", batch_size: int = DEFAULT_BATCH_SIZE,
             cache_dir: Optional[PathLike] = None, distance: str = "float16", k: int = 3,
             chunk_size: int = M.DEFAULT_CHUNK_SIZE, mesh: Any = None, progress: bool = True) -> dict:
    """guided-diffusion's evaluator on a reference batch and a sample file (see the module doc).

    ref_path: ``arr_0`` uint8 [N, H, W, 3], and ``mu``/``sigma``, ``mu_s``/``sigma_s`` used for FID /
    sFID when present. sample_path: ``arr_0`` of the same H, W; optional ``arr_1`` labels (checked, not
    used). ``mode`` (the feature function's preprocessing) is part of the cache key and the result.
    batch_size: global, a multiple of the device count. cache_dir: where the reference's features and
    statistics are cached, keyed by (weights, mode, output dims, reference file fingerprint); None: no
    cache. distance: "float16" (the evaluator's) or "float32" for precision/recall, over k neighbours,
    in blocks of chunk_size^2 distances. mesh: a ('data',) mesh (default every device of every process).

    Returns a dict: inception_score, fid, sfid, precision, recall, num_samples, num_reference, has_labels,
    mode, distance, k, is_split_size, reference_stats ("file", "computed", or "mixed" when the file holds
    only one of the two pairs), reference_cache ("hit", "miss" or "off"). Every process returns the same.
    """
    ref_path, sample_path = os.fspath(ref_path), os.fspath(sample_path)
    if distance not in ("float16", "float32"):
        raise ValueError(f"distance must be 'float16' (the evaluator's) or 'float32', got {distance!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    ref_h = _check_images(ref_path, k + 1, "reference")
    sample_h = _check_images(sample_path, k + 1, "samples")
    if ref_h.shape[1:3] != sample_h.shape[1:3]:
        raise ValueError(f"the samples are {sample_h.shape[1]}x{sample_h.shape[2]} images but the reference "
                         f"batch holds {ref_h.shape[1]}x{ref_h.shape[2]} ones; use the reference batch of "
                         "the samples' resolution")
    has_labels = _check_labels(sample_path, sample_h.shape[0])
    extractor = ShardedFeatures(feature_fn, params, image_shape=sample_h.shape[1:], batch_size=batch_size,
                                mesh=mesh)
    stored = _stored_stats(ref_path, extractor.dims)
    features_fp = _features_fingerprint(params, mode, extractor.dims)
    tagged = npy_header(ref_path, "features_fingerprint")
    if stored and tagged is not None:
        tag = str(_read_member(ref_path, "features_fingerprint"))
        if tag != features_fp:
            raise ValueError(f"reference {ref_path} stores statistics made with other feature weights or mode "
                             f"({tag[:16]}... vs {features_fp[:16]}... for mode {mode!r}); write it again with "
                             "these weights and mode")

    ref, cache = _reference_stats(ref_path, ref_h, extractor, features_fp,
                                  None if cache_dir is None else os.fspath(cache_dir), progress)
    n = sample_h.shape[0]
    collect = _Collect(n, extractor.dims, keep=("pool3", "logits_unbiased"))
    with NpzArrayReader(sample_path) as reader:
        extractor.run(reader, collect, progress=progress, desc="samples")

    def fid(key: str) -> float:
        mine = collect.moments[key]
        mu, sigma = stored[key] if key in stored else (ref[key].mu, ref[key].sigma)
        return M.frechet_distance(mine.mean(), mine.covariance(), mu, sigma)

    probs = M.softmax(collect.kept["logits_unbiased"], np.float32)
    inception, _ = M.inception_score(probs, split_size=IS_SPLIT_SIZE, dtype=np.float32)
    precision, recall = M.precision_recall(ref["pool3"].features, collect.kept["pool3"], k=k,
                                           chunk_size=chunk_size, distance=distance)
    return {
        "inception_score": inception,
        "fid": fid("pool3"),
        "sfid": fid("spatial"),
        "precision": precision,
        "recall": recall,
        "num_samples": int(n),
        "num_reference": int(ref_h.shape[0]),
        "has_labels": has_labels,
        "mode": str(mode),
        "distance": distance,
        "k": k,
        "is_split_size": IS_SPLIT_SIZE,
        "reference_stats": {0: "computed", 1: "mixed", 2: "file"}[len(stored)],
        "reference_cache": cache,
    }


# --- Writing a reference batch from a dataset split --------------------------------------------------


class _SplitRows:
    """Rows ``indices`` of a jaxdiff.data Source, at one image size, read on demand."""

    def __init__(self, source: Any, info: Any, indices: np.ndarray, image_size: Optional[int], resize_mode: str):
        self.source, self.info, self.indices = source, info, np.asarray(indices, np.int64)
        self.image_size, self.resize_mode = image_size, resize_mode
        self.num_rows = int(self.indices.shape[0])

    def read_labeled(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        from jaxdiff.data import transforms

        images, labels = self.source.gather(self.indices[start:stop])
        return transforms.resize_images(images, self.image_size, self.resize_mode, self.info.pad_value), labels

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.read_labeled(start, stop)[0]


def write_reference_batch(
    out_path: PathLike,
    dataset: Any,
    split: str,
    feature_fn: Callable[[Any, Any], Mapping[str, Any]],
    params: Any,
    *,
    num_images: int = 10_000,
    stats_images: Optional[int] = None,
    seed: int = 0,
    mode: str = "",
    image_size: Optional[int] = None,
    resize_mode: Optional[str] = None,
    data_dir: Optional[PathLike] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mesh: Any = None,
    progress: bool = True,
) -> dict:
    """Writes a reference batch in the evaluator's layout from a prepared dataset split (``jaxdiff.data``).

    ``arr_0``: ``num_images`` uint8 images chosen by ``data.epoch_permutation(seed, 0, N)`` (its first
    num_images, in stored order), ``arr_1`` their labels; ``mu``, ``sigma`` (pool3) and ``mu_s``,
    ``sigma_s`` (spatial) over the whole split, or over the permutation's first ``stats_images``
    (float32 means, float64 covariances, as the evaluator's); ``features_fingerprint`` (the weights,
    mode and dims those statistics came from; ``evaluate`` refuses the statistics of other ones). The
    split is streamed (the statistics need no stored features); images are resized to ``image_size``
    with ``resize_mode`` as in ``data.load_split``. Every process runs the extraction; process 0 writes
    the file (to a temporary file, renamed when complete). Returns a summary dict.
    """
    import jax

    from jaxdiff.data import order as data_order
    from jaxdiff.data import sources as data_sources

    source, info = data_sources.make_source(dataset, split, data_dir, in_memory=False)
    rmode = data_sources.check_resize(info, image_size, resize_mode)
    if image_size is None and info.image_shape is None:
        raise ValueError(f"images of {info.name!r} differ in size; pass image_size")
    channels = info.channels
    if channels != 3:
        raise ValueError(f"{info.name!r} has {channels}-channel images; the evaluator's Inception needs RGB")
    n = len(source)
    num_images = int(num_images)
    stats_n = n if stats_images is None else int(stats_images)
    if not 1 <= num_images <= n:
        raise ValueError(f"num_images must be in [1, {n}] (the split's size), got {num_images}")
    if not 2 <= stats_n <= n:
        raise ValueError(f"stats_images must be in [2, {n}] (the split's size) or None, got {stats_images}")
    order = data_order.epoch_permutation(int(seed), 0, n)
    chosen = np.sort(order[:num_images])
    stats_rows = np.arange(n) if stats_n == n else np.sort(order[:stats_n])
    shape = (int(image_size), int(image_size), 3) if image_size is not None else tuple(info.image_shape)

    extractor = ShardedFeatures(feature_fn, params, image_shape=shape, batch_size=batch_size,
                                keys=("pool3", "spatial"), mesh=mesh)
    collect = _Collect(stats_n, extractor.dims, keep=())
    extractor.run(_SplitRows(source, info, stats_rows, image_size, rmode), collect, progress=progress,
                  desc=f"{info.name} {split}")
    arrays = {"arr_0": None, "arr_1": None}
    for key, (mu_name, sigma_name) in {"pool3": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
        arrays[mu_name] = collect.moments[key].mean().astype(np.float32)
        arrays[sigma_name] = collect.moments[key].covariance()
    arrays["features_fingerprint"] = np.asarray(_features_fingerprint(params, mode, extractor.dims))
    out_path = os.fspath(out_path)
    if jax.process_index() == 0:
        rows = _SplitRows(source, info, chosen, image_size, rmode)
        labels = []

        def image_chunks():
            for s in range(0, num_images, 1024):
                im, lb = rows.read_labeled(s, s + 1024)
                labels.append(np.asarray(lb, np.int64))
                yield im

        arrays["arr_0"] = Rows((num_images,) + shape, np.uint8, image_chunks())
        arrays["arr_1"] = Rows((num_images,), np.int64, _deferred(labels))
        write_npz(out_path, arrays)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxdiff.eval.adm.write_reference_batch")
    return {"path": out_path, "num_images": num_images, "stats_images": stats_n, "image_shape": shape,
            "dataset": info.name, "split": split, "seed": int(seed), "mode": str(mode)}


def _deferred(chunks: list) -> Iterable[np.ndarray]:
    """Yields the items of ``chunks`` when iterated (after the members written before have filled it)."""
    yield from chunks
