"""argparse ``type=`` validators: every numeric flag is checked when it is parsed, so a bad
value is a one-line usage error (``rvclora train: error: argument --lr: ...``, exit 2)
before anything is loaded, compiled or written."""

from __future__ import annotations

import argparse
import math

SEED_MAX = 2 ** 63 - 1  # jax.random.key and numpy take a signed 64-bit seed


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _float(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
    return x


def positive_int(s: str) -> int:
    x = _int(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return x


def non_negative_int(s: str) -> int:
    x = _int(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s!r}")
    return x


def seed(s: str) -> int:
    x = _int(s)
    if not 0 <= x <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2**63-1, got {s!r}")
    return x


def finite_float(s: str) -> float:
    return _float(s)


def positive_float(s: str) -> float:
    x = _float(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s!r}")
    return x


def non_negative_float(s: str) -> float:
    x = _float(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s!r}")
    return x


def fraction(s: str) -> float:
    """A finite number in [0, 1)."""
    x = _float(s)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {s!r}")
    return x


__all__ = ["positive_int", "non_negative_int", "seed", "finite_float", "positive_float", "non_negative_float",
           "fraction", "SEED_MAX"]
