"""Seeded random weights for the FID Inception-v3, by the rule of tests/fixtures/README.md
(inception_a.npz): one numpy default_rng(seed), float64 draws in state_dict order, cast to float32.
Used by tests/test_inception.py."""

from __future__ import annotations

import pathlib

import numpy as np

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "inception_a.npz"


def seeded_state_dict(keys, shapes, seed: int) -> dict:
    """{key: np.ndarray} in PyTorch layout; `shapes` as comma-separated strings ("" for a scalar)."""
    rng = np.random.default_rng(int(seed))
    sd = {}
    for key, text in zip(keys, shapes):
        key = str(key)
        shape = tuple(int(s) for s in str(text).split(",") if s)
        if key.endswith("num_batches_tracked"):
            sd[key] = np.zeros(shape, np.int64)
            continue
        if key.endswith("conv.weight"):
            a = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            a = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            a = rng.uniform(-0.2, 0.2, shape)
        elif key.endswith("bn.running_var"):
            a = rng.uniform(0.5, 2.0, shape)
        elif key == "fc.weight":
            a = rng.standard_normal(shape) * np.sqrt(1.0 / 2048)
        elif key == "fc.bias":
            a = rng.uniform(-0.1, 0.1, shape)
        else:
            raise ValueError(f"no weights rule for key {key!r}")
        sd[key] = a.astype(np.float32)
    return sd


def fixture_state_dict(fixture=None) -> dict:
    """The seeded state_dict the fixture's outputs were made with (its `keys`, `shapes`, `seed`)."""
    f = fixture if fixture is not None else np.load(FIXTURE)
    return seeded_state_dict(f["keys"], f["shapes"], int(f["seed"]))
