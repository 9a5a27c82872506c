"""Helpers for the guided-diffusion fixture adm_tiny_a.npz (see tests/fixtures/README)."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np


def _flags(kind):
    """guided-diffusion's keyword arguments of fixture A's `kind` model (lists as tuples)."""
    with open(pathlib.Path(__file__).parent / "fixtures" / "adm_tiny_a_flags.json") as f:
        flags = json.load(f)[kind]
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}


UNET_FLAGS = _flags("unet")
CLASSIFIER_FLAGS = _flags("classifier")


def state_dict(adm, prefix):
    return {k[len(prefix) + 1:]: v for k, v in adm.items() if k.startswith(prefix + "/")}


def nhwc(a):
    """NCHW (or [S, B, C, H, W]) numpy -> channels-last jnp."""
    a = np.asarray(a)
    return jnp.asarray(np.moveaxis(a, -3, -1))


def nchw(a):
    return np.moveaxis(np.asarray(a), -1, -3)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
