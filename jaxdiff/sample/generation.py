"""The one sampling path: a compiled sampler run over every device of every process, quantised to
uint8 as guided-diffusion's sample scripts do (`generate_batches`), gathered to every process (`generate`)."""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from jaxdiff.diffusion import guides, samplers


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 exactly as guided-diffusion's sample scripts ((x + 1) * 127.5, clamp, trunc)."""
    return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)


def generate_batches(sampler_fn, params, sched, *, num_samples: int, labels: Optional[np.ndarray] = None,
                     scales: Optional[Mapping[str, float]] = None,
                     per_sample: Optional[Mapping[str, np.ndarray]] = None, seed: int = 0,
                     batch_size: int = 16, eta: float = 0.0, mesh=None, progress: bool = False,
                     desc: str = "sampling", batches: Optional[Sequence[int]] = None,
                     key=None, param_shardings=None, batch_inputs=None,
                     convert=to_uint8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (sample ids, uint8 images) of THIS process's rows, batch by batch.

    `sampler_fn` comes from `samplers.make_sampler`; samples 0..num_samples-1 are drawn in global
    batches of `batch_size` (only those numbered `batches`, when given), each split over the
    processes and sharded over `mesh`. Sample i's noise depends only on (seed, i) (on (key, i) when a
    random `key` is given instead). `labels`, `per_sample` arrays [num_samples, ...] and `scales` (cond
    keys -> float) go into each batch's cond, and so do `batch_inputs(ids)`'s arrays (per-sample inputs made
    for the batch's ids, e.g. noise drawn sample by sample). `param_shardings` (a tree like `params`, e.g.
    `parallel.state_shardings(params, mesh)` on a ('data', 'fsdp') mesh) places the parameters split
    over devices instead of replicated. `convert` maps each batch's output (default `to_uint8`).
    """
    import contextlib

    import jax

    from jaxdiff import parallel

    mesh = parallel.data_mesh() if mesh is None else mesh
    key = jax.random.key(int(seed)) if key is None else key
    if param_shardings is not None:
        params = parallel.place(params, param_shardings)
    else:
        params = parallel.replicate(params, mesh)
    sched = parallel.replicate(sched, mesh)
    starts = range(0, int(num_samples), int(batch_size))
    if batches is not None:
        starts = [starts[int(b)] for b in batches]
    show = progress and jax.process_index() == 0
    ctx = samplers.progress_bar(len(starts) * sched.num_steps, desc=f"{desc} x{len(starts)} batches") \
        if show else contextlib.nullcontext()
    with ctx as advance:
        for b0 in starts:
            ids = np.arange(b0, min(b0 + int(batch_size), int(num_samples)))[parallel.process_rows(
                min(int(batch_size), int(num_samples) - b0))]
            cond = guides.make_cond(len(ids), None if labels is None else labels[ids], **dict(scales or {}))
            made = {} if batch_inputs is None else batch_inputs(ids)
            for k, v in [(k, v[ids]) for k, v in (per_sample or {}).items()] + list(made.items()):
                v = np.asarray(v)
                cond[k] = v.astype(np.float32) if v.dtype.kind == "f" else v
            out = parallel.sample_batch_sharded(sampler_fn, params, sched, cond, key, ids, mesh=mesh, eta=eta,
                                                params_placed=True)
            if show:
                advance(sched.num_steps)
            yield ids, convert(out)


def check_process_split(num_samples: int, batch_size: int) -> None:
    """Every global batch must give each process at least one row (an empty one cannot be sharded)."""
    import jax

    smallest = min(batch_size, num_samples - (num_samples - 1) // batch_size * batch_size)
    if smallest < jax.process_count():
        raise ValueError(f"sample.num_samples={num_samples} with sample.batch_size={batch_size} makes a global "
                         f"batch of {smallest} samples, fewer than the {jax.process_count()} processes: every "
                         "batch needs at least one sample per process")


def generate(sampler_fn, params, sched, *, num_samples: int, batch_size: int = 16, **kwargs) -> np.ndarray:
    """uint8 [num_samples, H, W, C] of every process's rows (see `generate_batches` for the arguments)."""
    from jaxdiff import parallel

    n, bs = int(num_samples), int(batch_size)
    batches = generate_batches(sampler_fn, params, sched, num_samples=n, batch_size=bs, **kwargs)
    return np.concatenate([parallel.gather_rows(images, min(bs, n - b0))
                           for b0, (_, images) in zip(range(0, n, bs), batches)], axis=0)
