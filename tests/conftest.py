import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def adm():
    """openai/guided-diffusion reference outputs (see tests/fixtures/README.md)."""
    with np.load(FIXTURES / "adm_tiny_a.npz") as f:
        return {k: f[k] for k in f.files}
