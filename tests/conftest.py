import os
import pathlib

import numpy as np
import pytest

# XLA's backend at -O0 for the programs the tests compile in this process (tiny models: compiling dominates,
# and -O0 compiles them about twice as fast; the suite 10.1 -> 9.2 min). Set before JAX starts its backend.
# Subprocesses choose their own level (_training_helpers.env).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _arrays(name: str) -> dict:
    with np.load(FIXTURES / name) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def adm():
    """openai/guided-diffusion reference outputs (see tests/fixtures/README.md)."""
    return _arrays("adm_tiny_a.npz")


@pytest.fixture(scope="session")
def if_a():
    """diffusers' DeepFloyd IF pipeline on tiny random models (tests/_cascade.py)."""
    return _arrays("if_tiny_a.npz")


@pytest.fixture(scope="session")
def unclip_a():
    """diffusers' unCLIP pipeline on tiny random models (tests/_cascade.py)."""
    return _arrays("unclip_tiny_a.npz")
