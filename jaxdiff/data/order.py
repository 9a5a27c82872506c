"""The example stream's deterministic order and flips: pure functions of (seed, position)."""

from __future__ import annotations

import functools

import numpy as np

_MASK64 = (1 << 64) - 1


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


_M1 = np.uint64(0xBF58476D1CE4E5B9)


_M2 = np.uint64(0x94D049BB133111EB)


_TAG_ORDER = 0x6F72646572  # "order"


_TAG_FLIP = 0x666C6970  # "flip"


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 with good avalanche."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _hash(*words) -> np.ndarray:
    """uint64 hash of a sequence of integers (the last may be an array: hashed elementwise)."""
    with np.errstate(over="ignore"):
        h = np.zeros((), np.uint64)
        for w in words:
            if isinstance(w, np.ndarray):
                w = w.astype(np.uint64)
            else:
                w = np.uint64(int(w) & _MASK64)
            h = _mix64(h + _GOLDEN + w)
        return np.asarray(h)


@functools.lru_cache(maxsize=4)
def _cached_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    perm = np.argsort(_hash(_TAG_ORDER, seed, epoch, np.arange(num_examples, dtype=np.int64)),
                      kind="stable")
    perm.setflags(write=False)
    return perm


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of epoch `epoch`: ``argsort(h(seed, epoch, i) for i < num_examples)``."""
    return _cached_permutation(int(seed), int(epoch), int(num_examples))


def step_start(step: int, global_batch_size: int, position) -> int:
    """Stream position where the global batch of `step` starts: `position`, default step * B."""
    return int(step) * int(global_batch_size) if position is None else int(position)


def _step_positions(step: int, global_batch_size: int, position) -> np.ndarray:
    """Stream positions of the global batch of `step`: B positions from `step_start`."""
    return step_start(step, global_batch_size, position) + np.arange(global_batch_size, dtype=np.int64)


def global_batch_indices(step: int, *, global_batch_size: int, num_examples: int,
                         seed: int, position: int | None = None) -> np.ndarray:
    """Dataset indices of the whole global batch of `step` (all processes), int64 (B,).

    `position`: the stream position the batch starts at (default step * global_batch_size).
    """
    return positions_to_indices(_step_positions(step, global_batch_size, position),
                                 num_examples, seed)


def positions_to_indices(positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(seed, int(e), num_examples)[offsets[sel]]
    return out


def position_flips(positions: np.ndarray, seed: int) -> np.ndarray:
    """bool: whether the examples at these stream positions are flipped (when augmenting)."""
    q = np.asarray(positions, dtype=np.int64)
    bits = _hash(_TAG_FLIP, seed, q >> 32, q & 0xFFFFFFFF)
    return (bits >> np.uint64(63)).astype(bool)


def flip_mask(step: int, *, global_batch_size: int, seed: int,
              position: int | None = None) -> np.ndarray:
    """bool (B,): which rows of the global batch of `step` are flipped (when augmenting)."""
    return position_flips(_step_positions(step, global_batch_size, position), seed)
