"""Data parallelism for sampling: a ('data',) mesh over every device of every host.

Batches are `NamedSharding(mesh, P('data'))` along their first axis, parameters and the schedule are
replicated (`P()`); the jitted sampler is the single-device program and XLA's SPMD partitioner splits
it. Per-host batches become global arrays with `jax.make_array_from_process_local_data`, so the same
code runs on one process or many (call `initialize` first on multi-host runs).

Reproducibility: samplers draw sample i's noise from fold_in(seed, sample_ids[i]), so the same seed
gives the same images on 1 or 8 devices, with any batch size; a batch that does not divide the
number of devices is padded (repeating its last row) and trimmed afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """Join a multi-process run (`jax.distributed.initialize`) before any other JAX call.

    A no-op for a single process. On one CPU machine: initialize("localhost:PORT", n, i).
    """
    if num_processes is None or int(num_processes) <= 1:
        return
    jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id))


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D ('data',) mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sharding of an array split along `batch_axis` over the 'data' axis."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_device_count(mesh: Mesh) -> int:
    """Devices of `mesh` this process can address (the per-host batch must divide by it)."""
    return sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf on every device of `mesh` (works across hosts: each host passes the same values).

    Leaves already replicated on this mesh are left alone, so a pre-replicated parameter tree costs
    nothing per call.
    """
    rep = replicated_sharding(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(rep, x.ndim) \
                and set(x.sharding.device_set) == set(mesh.devices.flat):
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, rep)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, rep, lambda idx: a[idx])

    return jax.tree_util.tree_map(put, tree)


def shard_batch(tree: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Global arrays from this process's rows of each leaf (split along `batch_axis` over 'data')."""
    sh = batch_sharding(mesh, batch_axis)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), tree)


def pad_batch(tree: Any, multiple: int, batch_axis: int = 0) -> tuple[Any, int]:
    """Pad every leaf along `batch_axis` to a multiple of `multiple` by repeating its last row.

    Returns (padded tree, original batch size). Padded rows are real, valid inputs (labels stay in
    range), and are trimmed from the results.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return tree, 0
    n = int(np.shape(leaves[0])[batch_axis])
    if n == 0:
        raise ValueError("cannot sample an empty batch")
    pad = (-n) % int(multiple)

    def do(x):
        x = np.asarray(x)
        if x.shape[batch_axis] != n:
            raise ValueError(f"every batched input needs {n} rows along axis {batch_axis}, got {x.shape}")
        if pad == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[batch_axis] = (0, pad)
        return np.pad(x, widths, mode="edge")

    return jax.tree_util.tree_map(do, tree), n


def local_rows(arr: jax.Array, batch_axis: int = 0) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, as numpy."""
    if jax.process_count() == 1 or arr.is_fully_addressable:
        return np.asarray(arr)
    seen, parts = set(), []
    for shard in sorted(arr.addressable_shards, key=lambda s: s.index[batch_axis].start or 0):
        start = shard.index[batch_axis].start or 0
        if start in seen:  # replicated along another axis
            continue
        seen.add(start)
        parts.append(np.asarray(shard.data))
    return np.concatenate(parts, axis=batch_axis)


def process_rows(n: int) -> np.ndarray:
    """Indices of the rows of a global batch of `n` that this process handles (contiguous split)."""
    return np.array_split(np.arange(int(n)), jax.process_count())[jax.process_index()]


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Every process's `local` rows (split as `process_rows(n)`) concatenated on every process."""
    local = np.asarray(local)
    pc = jax.process_count()
    if pc == 1:
        return local
    from jax.experimental import multihost_utils

    sizes = [len(r) for r in np.array_split(np.arange(int(n)), pc)]
    m = max(sizes)
    padded = np.zeros((m,) + local.shape[1:], local.dtype)
    padded[:len(local)] = local
    allrows = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
    return np.concatenate([allrows[i * m: i * m + s] for i, s in enumerate(sizes)], axis=0)


def _common_local_size(n: int, ndev: int) -> int:
    """Per-process padded batch: a multiple of the local device count, equal on every process."""
    size = -(-int(n) // ndev) * ndev
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        size = int(np.max(multihost_utils.process_allgather(np.array([size]))))
    return size


def sample_batch_sharded(run: Callable, params: Any, sched: Any, cond: Any, key: jax.Array,
                         sample_ids, *, mesh: Optional[Mesh] = None, eta=0.0,
                         x_T: Optional[np.ndarray] = None,
                         noises: Optional[np.ndarray] = None) -> np.ndarray:
    """Run a sampler from `samplers.make_sampler` data-parallel over `mesh`; returns this process's samples.

    `cond`, `sample_ids` (and `x_T`, and `noises` on its axis 1) hold this process's rows. A batch
    that does not divide the process's device count is padded with copies of its last row and the
    result trimmed back, so any batch size works. `params`, `sched` and `key` are replicated.
    """
    mesh = data_mesh() if mesh is None else mesh
    ndev = local_device_count(mesh)
    if ndev == 0:
        raise ValueError("this process addresses no device of the mesh")
    sample_ids = np.asarray(sample_ids)
    if sample_ids.ndim != 1:
        raise ValueError(f"sample_ids must be 1-D, got shape {sample_ids.shape}")
    batched = {"cond": dict(cond), "ids": sample_ids}
    if x_T is not None:
        batched["x_T"] = np.asarray(x_T)
    size = _common_local_size(len(sample_ids), ndev)
    padded, n = pad_batch(batched, size)
    if noises is not None:
        noises, _ = pad_batch(np.asarray(noises), size, batch_axis=1)
        noises = shard_batch(noises, mesh, batch_axis=1)
    g = shard_batch(padded, mesh)
    params, sched, key = replicate((params, sched, key), mesh)
    out = run(params, sched, g["cond"], key, g["ids"], eta, g.get("x_T"), noises)
    bs = batch_sharding(mesh)
    if not out.sharding.is_equivalent_to(bs, out.ndim):
        out = jax.device_put(out, bs)
    return local_rows(out)[:n]


__all__ = [
    "DATA_AXIS", "batch_sharding", "data_mesh", "gather_rows", "initialize", "local_device_count",
    "local_rows", "pad_batch", "process_rows", "replicate", "replicated_sharding", "sample_batch_sharded", "shard_batch",
]
