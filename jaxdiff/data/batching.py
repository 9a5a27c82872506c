"""Per-process batches of the example stream: sharded by process, decoded by worker threads, prefetched.

Batches
-------
`batches` yields, per process, ``(images, labels)``: float32 NHWC images in [-1, 1]
(``x / 127.5 - 1``) and int32 labels (with ``text=True``, captioned datasets: ``(images, labels,
text)``, text the rows' caption strings, attribute bins and named masks), read from one endless
stream of examples:

* order: epoch ``e`` visits the examples in the order ``argsort(h(seed, e, i))``, ``h`` a 64-bit
  splitmix hash (pure NumPy); epochs are concatenated into one stream. Step ``s`` of a run that
  started at step ``s0`` at position ``q0`` takes positions ``[q0 + (s - s0)*B, q0 + (s - s0 + 1)*B)``
  (``q0 = s0*B`` unless given); there is no partial last batch.
* sharding: process ``p`` of ``P`` takes positions ``[q + p*B/P, q + (p+1)*B/P)`` of the step
  starting at ``q``; the concatenation over processes is the single-process batch.
* augmentation: a horizontal flip of position ``q`` iff the top bit of ``h(seed, q)`` is set
  (independent of process layout and batch size). Default on for Fashion-MNIST and natural-image
  datasets, off for digit/character sets (``augment=`` overrides).
* workers: ``workers`` threads decode contiguous chunks of a step's rows, joined in order, so the
  batches are byte-identical for any number of workers.

Everything is a pure function of ``(seed, position)``, so a run resumed from the position stored
with its checkpoint (also with another global batch size) continues the same stream. The change
from flips keyed by (step, row) to flips keyed by position: docs/training.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Iterator

import numpy as np

from jaxdiff.data.order import position_flips, positions_to_indices, step_start
from jaxdiff.data.sources import Source, check_resize, stack_images
from jaxdiff.data.transforms import resize_images, to_model_range
from jaxdiff.util import config as config_util


def _check_batching(source, global_batch_size, seed, step, process_index, process_count):
    if not isinstance(source, Source):
        raise ValueError(f"source must be a jaxdiff.data.sources.Source from make_source, got "
                         f"{type(source).__name__}")
    for name, value, low in (("global_batch_size", global_batch_size, 1),
                             ("process_count", process_count, 1), ("start_step", step, 0),
                             ("process_index", process_index, 0)):
        if not config_util.is_int(value) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not config_util.is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if process_index >= process_count:
        raise ValueError(f"process_index={process_index} is not below process_count="
                         f"{process_count}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} cannot be shared by process_count="
            f"{process_count} processes: it must be a multiple of {process_count}")


def _processes(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _check_position(name: str, value) -> None:
    if value is not None and (not config_util.is_int(value) or value < 0):
        raise ValueError(f"{name} must be None or an integer >= 0 (a stream position), got {value!r}")


def _check_workers(workers) -> int:
    if not config_util.is_int(workers) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 (decoding threads), got {workers!r}")
    return int(workers)


def _rows(source: Source, positions: np.ndarray, seed: int, augment: bool, image_size,
          mode: str, text: bool = False) -> tuple:
    """(float32 images, int32 labels) of the examples at these stream positions, and with `text`
    their text fields (`Source.gather_text`)."""
    indices = positions_to_indices(positions, len(source), seed)
    images, labels = source.gather(indices)
    images = resize_images(images, image_size, mode, source.info.pad_value) if image_size \
        else stack_images(images, source.info)
    if augment:
        flip = position_flips(positions, seed)
        if flip.any():
            images = images.copy()
            images[flip] = images[flip][:, :, ::-1]
    out = (to_model_range(images), labels.astype(np.int32))
    return out + (source.gather_text(indices),) if text else out


def _check_text(source: Source, text) -> bool:
    if not isinstance(text, bool):
        raise ValueError(f"text must be True or False, got {text!r}")
    if text and source.info.caption_key is None:
        source.gather_text([])  # raises naming the captioned datasets
    return text


def _local_positions(step_start: int, b: int, p: int, count: int) -> np.ndarray:
    local = b // count
    return step_start + p * local + np.arange(local, dtype=np.int64)


def batch_at(source: Source, step: int, *, global_batch_size: int, seed: int,
             process_index: int | None = None, process_count: int | None = None,
             augment: bool | None = None, image_size: int | None = None,
             resize_mode: str | None = None, position: int | None = None, text: bool = False) -> tuple:
    """This process's part of the global batch of `step`: (float32 NHWC in [-1, 1], int32), and
    with `text=True` (captioned datasets) the rows' text fields (`Source.gather_text`).

    Shape ``(global_batch_size // process_count, H, W, C)``; a pure function of (seed, position),
    `position` (where the step starts in the stream) defaulting to step * global_batch_size.
    """
    process_index, process_count = _processes(process_index, process_count)
    _check_batching(source, global_batch_size, seed, step, process_index, process_count)
    mode = check_resize(source.info, image_size, resize_mode)
    augment = source.info.random_flip if augment is None else bool(augment)
    _check_position("position", position)
    text = _check_text(source, text)
    first = step_start(step, global_batch_size, position)
    return _rows(source, _local_positions(first, int(global_batch_size), int(process_index), int(process_count)),
                 int(seed), augment, image_size, mode, text)


def batches(source: Source, *, global_batch_size: int, seed: int, start_step: int = 0,
            process_index: int | None = None, process_count: int | None = None,
            augment: bool | None = None, image_size: int | None = None,
            resize_mode: str | None = None, num_steps: int | None = None,
            prefetch: int = 2, start_position: int | None = None,
            workers: int = 1, text: bool = False) -> Iterator[tuple]:
    """Iterates this process's batches for steps start_step, start_step + 1, ... (see `batch_at`).

    Args:
      source: from `make_source`.
      global_batch_size: examples per step over all processes; a multiple of process_count.
      seed: data seed (order and flips).
      start_step: first step to yield (the step a resumed run continues from).
      process_index, process_count: default `jax.process_index()` / `jax.process_count()`.
      augment: random horizontal flips; None = the dataset's default (`info.random_flip`).
      image_size: square size the model takes (None = as stored); resize_mode: "pad",
        "resize", "center_crop" or None (the dataset's default).
      num_steps: stop after that many batches (None = never).
      prefetch: batches prepared ahead in background threads (0 = none).
      start_position: stream position of start_step's batch (default start_step *
        global_batch_size); a resumed run passes the one stored with its checkpoint.
      workers: threads decoding each batch (the batches are the same for any number).
      text: captioned datasets only: each batch also holds its rows' text fields (see `batch_at`).

    Arguments are checked when this is called, not at the first `next`.
    """
    process_index, process_count = _processes(process_index, process_count)
    _check_batching(source, global_batch_size, seed, start_step, process_index, process_count)
    mode = check_resize(source.info, image_size, resize_mode)
    if num_steps is not None and (not config_util.is_int(num_steps) or num_steps < 0):
        raise ValueError(f"num_steps must be None or an integer >= 0, got {num_steps!r}")
    _check_position("start_position", start_position)
    workers = _check_workers(workers)
    text = _check_text(source, text)
    augment = source.info.random_flip if augment is None else bool(augment)
    b, start = int(global_batch_size), int(start_step)
    q0 = step_start(start, b, start_position)
    positions = functools.partial(_local_positions, b=b, p=int(process_index), count=int(process_count))
    rows = functools.partial(_rows, source, seed=int(seed), augment=augment, image_size=image_size, mode=mode,
                             text=text)

    def make(step: int, part: slice):
        return rows(positions(q0 + (step - start) * b)[part])

    local = b // int(process_count)
    parts = [slice(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(local), min(workers, local))]
    stop = None if num_steps is None else start + int(num_steps)
    return _iterate(make, parts, start, stop, int(prefetch))


def _join(chunks: list) -> tuple:
    """The workers' row chunks of one batch joined in order (arrays, or dicts of arrays)."""
    if len(chunks) == 1:
        return chunks[0]

    def cat(parts):
        if isinstance(parts[0], dict):
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return np.concatenate(parts)

    return tuple(cat([c[i] for c in chunks]) for i in range(len(chunks[0])))


def _iterate(make, parts: list, start: int, stop: int | None, prefetch: int):
    """Yields make(step, part) joined over `parts`, steps start..stop-1, `prefetch` steps ahead
    on len(parts) threads."""
    step = start
    if prefetch <= 0 and len(parts) == 1:
        while stop is None or step < stop:
            yield make(step, parts[0])
            step += 1
        return
    pool = concurrent.futures.ThreadPoolExecutor(len(parts), thread_name_prefix="jaxdiff-data")
    pending: collections.deque = collections.deque()
    try:
        while True:
            while len(pending) < max(prefetch, 1) and (stop is None or step < stop):
                pending.append([pool.submit(make, step, part) for part in parts])
                step += 1
            if not pending:
                return
            yield _join([f.result() for f in pending.popleft()])
    finally:
        for fs in pending:
            for f in fs:
                f.cancel()
        try:
            pool.shutdown(wait=False, cancel_futures=True)
        except Exception:  # finalised during interpreter shutdown: modules already torn down
            pass
