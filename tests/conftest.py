"""Shared, generic test fixtures."""

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded numpy generator per test (tests must not depend on run order)."""
    return np.random.default_rng(1234)
