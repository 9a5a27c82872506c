import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def load_npz(name: str) -> dict:
    with np.load(FIXTURES / name) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def adm():
    """openai/guided-diffusion reference outputs (see tests/fixtures/README.md)."""
    return load_npz("adm_tiny_a.npz")


@pytest.fixture(scope="session")
def if_a():
    """diffusers' DeepFloyd IF cascade on tiny random weights (/work/shared/fixtures/cascade/README.md)."""
    return load_npz("if_tiny_a.npz")


@pytest.fixture(scope="session")
def unclip_a():
    """diffusers' unCLIP (Karlo) pipeline on tiny random weights (/work/shared/fixtures/cascade/README.md)."""
    return load_npz("unclip_tiny_a.npz")
