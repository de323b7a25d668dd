"""Shared, generic test fixtures."""

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded numpy generator per test (tests must not depend on run order)."""
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch with one thread for a module: whole-model passes are ~5x slower with torch's
    thread pool competing with XLA's on a 2-core machine. Restored afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def no_torch_grad():
    """Reference forwards only; autograd is restored for the other test modules."""
    import torch

    with torch.no_grad():
        yield
