import pathlib

import numpy as np
import pytest

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
