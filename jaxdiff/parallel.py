"""Device meshes, shardings and multi-host helpers: data parallelism for sampling, a 2-D
('data', 'fsdp') mesh for training.

Sampling: batches are `NamedSharding(mesh, P('data'))` along their first axis, parameters and the
schedule replicated; XLA's SPMD partitioner splits the single-device program. Per-host batches
become global arrays (`jax.make_array_from_process_local_data`), so the same code runs on one
process or many (call `initialize` first on multi-host runs).

Sampling is reproducible across device counts and batch sizes (noise keyed by sample id,
`jaxdiff.diffusion.samplers`); a batch that does not divide the devices is padded and trimmed afterwards.

Training (`make_mesh`, `fsdp_spec`, `state_shardings`): a (data, fsdp) mesh; the batch is split
over both axes (every device sees different examples), and each array of the train state is
split along its largest dimension divisible by the fsdp size (arrays smaller than `min_size`
elements, or with no such dimension, are replicated). fsdp = 1 is plain data parallelism.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.util import config as config_util

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_MIN_SHARD_SIZE = 2 ** 14  # elements: smaller arrays stay replicated


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto_detect: bool = False) -> None:
    """Join a multi-process run (`jax.distributed.initialize`) before any other JAX call.

    With num_processes > 1: the explicit coordinator address and process id (on one CPU machine:
    initialize("localhost:PORT", n, i)). Otherwise, with `auto_detect`, JAX's own cluster
    detection (TPU pods, SLURM, Open MPI, Kubernetes): a no-op where none is found. Else a no-op.
    """
    import os

    explicit = num_processes is not None and int(num_processes) > 1
    if not explicit and not auto_detect:
        return
    # cross-process collectives of CPU devices (read when the backend starts; other backends ignore it)
    previous = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id))
        return
    try:
        jax.distributed.initialize()
    except ValueError:
        # No cluster environment found ("coordinator_address should be defined"); a set
        # coordinator address means a half-configured cluster: say so.
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            raise
        jax.config.update("jax_cpu_collectives_implementation", previous)


def mesh_shape(data: int, fsdp: int, device_count: int, prefix: str = "mesh ") -> tuple[int, int]:
    """(data, fsdp) sizes for `device_count` devices; data = -1 takes the devices fsdp leaves.

    Raises ValueError naming the sizes (as `prefix` + name) when they cannot tile the devices.
    """
    for name, v in (("data", data), ("fsdp", fsdp)):
        if not config_util.is_int(v) or (v < 1 and not (name == "data" and v == -1)):
            raise ValueError(f"{prefix}{name}={v!r}: expected a positive integer"
                             + (" or -1 (the devices fsdp leaves)" if name == "data" else ""))
    if device_count % fsdp:
        divisors = ", ".join(str(d) for d in range(1, device_count + 1) if device_count % d == 0)
        raise ValueError(f"{prefix}fsdp={fsdp} does not divide the {device_count} devices; allowed: {divisors}")
    if data == -1:
        data = device_count // fsdp
    if data * fsdp != device_count:
        raise ValueError(f"{prefix}data={data} x {prefix}fsdp={fsdp} = {data * fsdp} devices, but there are "
                         f"{device_count}: the product must be {device_count} ({prefix}data=-1 takes the devices "
                         "fsdp leaves)")
    return int(data), int(fsdp)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 2-D ('data', 'fsdp') mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def axis_size(mesh, name: str) -> int:
    """Size of mesh axis `name` (1 when the mesh has no such axis)."""
    return int(dict(mesh.shape).get(name, 1))


def batch_axes(mesh) -> Any:
    """The mesh axes a batch is split over: 'data', or ('data', 'fsdp') on a training mesh."""
    names = tuple(a for a in MESH_AXES if a in mesh.axis_names)
    return names[0] if len(names) == 1 else names


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
    """PartitionSpec of an array of `shape` on a mesh with fsdp size `fsdp`: its largest dimension
    divisible by fsdp (the last of equal ones) over 'fsdp'; P() (replicated) when fsdp = 1, when
    the array has fewer than `min_size` elements, or when no dimension divides."""
    shape = tuple(int(d) for d in shape)
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < int(min_size):
        return P()
    dims = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], i))
    return P(*[FSDP_AXIS if i == best else None for i in range(len(shape))])


def state_shardings(tree: Any, mesh, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
    """NamedSharding of every array of `tree` (arrays or ShapeDtypeStructs) by `fsdp_spec`;
    replicated over 'data'. `mesh` may be a Mesh or an AbstractMesh (for memory estimates)."""
    fsdp = axis_size(mesh, FSDP_AXIS)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)), tree)


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` laid out as `shardings` (every shard has the same shape)."""
    total = 0
    for x, sh in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        total += int(np.prod(sh.shard_shape(np.shape(x)), dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def addressable_bytes(tree: Any) -> dict:
    """{device: bytes of `tree`'s global arrays stored on it} over this process's devices."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def process_values(local) -> np.ndarray:
    """Every process's value of a small int32 array, stacked: shape [process_count, ...].

    A collective: every process must call it, in the same order.
    """
    local = np.asarray(local, np.int32)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=False)).reshape((-1,) + local.shape)


def process_strings(text: str, max_len: int = 1024) -> list[str]:
    """Every process's `text` (UTF-8, cut to max_len bytes), in process order. A collective."""
    raw = text.encode()[:max_len]
    codes = np.full(max_len + 1, -1, np.int32)
    codes[0] = len(raw)
    codes[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
    return [bytes(row[1:1 + row[0]].astype(np.uint8)).decode(errors="replace") for row in process_values(codes)]


def broadcast_from_first(value: int) -> int:
    """Process 0's integer `value` on every process (a collective decision)."""
    if jax.process_count() == 1:
        return int(value)
    return int(process_values(np.array(value))[0])


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D ('data',) mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sharding of an array split along `batch_axis` over the batch axes ('data', and 'fsdp' when
    the mesh has it: every device holds different rows)."""
    return NamedSharding(mesh, P(*([None] * batch_axis), batch_axes(mesh)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_device_count(mesh: Mesh) -> int:
    """Devices of `mesh` this process can address (the per-host batch must divide by it)."""
    return sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf on every device of `mesh` (works across hosts: each host passes the same values).
    Leaves already replicated on this mesh are left alone (a pre-replicated tree costs nothing)."""
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


def place(tree: Any, shardings: Any) -> Any:
    """Put every leaf of `tree` with its sharding from `shardings` (a tree of the same structure, e.g.
    `state_shardings(tree, mesh)`); works across hosts: each host passes the same values."""
    def put(x, sh):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sh, x.ndim):
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sh)
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return jax.tree_util.tree_map(put, tree, shardings)


def shard_batch(tree: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Global arrays from this process's rows of each leaf (split along `batch_axis` over 'data')."""
    sh = batch_sharding(mesh, batch_axis)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), tree)


def pad_batch(tree: Any, multiple: int, batch_axis: int = 0) -> tuple[Any, int]:
    """(padded tree, original batch size): every leaf padded along `batch_axis` to a multiple of
    `multiple` by repeating its last row (valid inputs, trimmed from the results)."""
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
    return int(process_values(np.array(-(-int(n) // ndev) * ndev)).max())


def sample_batch_sharded(run: Callable, params: Any, sched: Any, cond: Any, key: jax.Array,
                         sample_ids, *, mesh: Optional[Mesh] = None, eta=0.0,
                         x_T: Optional[np.ndarray] = None,
                         noises: Optional[np.ndarray] = None, params_placed: bool = False) -> np.ndarray:
    """Run a sampler from `samplers.make_sampler` data-parallel over `mesh`; returns this process's samples.

    `cond`, `sample_ids` (and `x_T`, and `noises` on its axis 1) hold this process's rows; any
    batch size works (padded to the process's device count, trimmed back). `params`, `sched` and
    `key` are replicated, or, with `params_placed`, `params` are used as placed (e.g. split over the
    mesh's 'fsdp' axis by `place(params, state_shardings(params, mesh))`).
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
    if not params_placed:
        params = replicate(params, mesh)
    sched, key = replicate((sched, key), mesh)
    out = run(params, sched, g["cond"], key, g["ids"], eta, g.get("x_T"), noises)
    bs = batch_sharding(mesh)
    if not out.sharding.is_equivalent_to(bs, out.ndim):
        out = jax.device_put(out, bs)
    return local_rows(out)[:n]


__all__ = [
    "DATA_AXIS", "FSDP_AXIS", "MESH_AXES", "addressable_bytes", "axis_size", "batch_axes", "batch_sharding",
    "broadcast_from_first", "bytes_per_device", "data_mesh", "fsdp_spec", "gather_rows", "initialize",
    "local_device_count", "local_rows", "make_mesh", "mesh_shape", "pad_batch", "place", "process_rows", "process_strings",
    "process_values", "replicate", "replicated_sharding", "sample_batch_sharded", "shard_batch", "state_shardings",
]


def define_flags() -> None:
    """absl flags for multi-process runs and the persistent compilation cache (once per program)."""
    from absl import flags

    if "num_processes" in flags.FLAGS:
        return
    flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0")
    flags.DEFINE_integer("num_processes", 1, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", 0, "multi-process: index of this process")
    flags.DEFINE_enum("distributed", "auto", ["auto", "off"],
                      "multi-process without the flags above: 'auto' joins the cluster JAX detects (TPU pod "
                      "slices, SLURM, Open MPI, Kubernetes) with jax.distributed.initialize(), and runs as "
                      "one process where none is found; 'off' never does")
    flags.DEFINE_string("jax_cache_dir", "~/.cache/jaxdiff/xla",
                        "persistent XLA compilation cache (a rerun skips compiling); '' = off. "
                        "$JAX_COMPILATION_CACHE_DIR wins when set")


def setup_from_flags() -> None:
    """Apply the flags of `define_flags` (call first in main, before any other JAX work)."""
    import jax
    from absl import flags
    from absl import logging as absl_logging

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxdiff").setLevel(logging.INFO)
    if FLAGS.jax_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.jax_cache_dir))
        if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                        auto_detect=FLAGS.distributed == "auto")
