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


def _checked(parse, ok, what: str):
    """An argparse ``type=``: ``parse`` the string, then require ``ok(value)``."""
    def check(s: str):
        x = parse(s)
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return x
    return check


positive_int = _checked(_int, lambda x: x > 0, "a positive integer")
non_negative_int = _checked(_int, lambda x: x >= 0, "an integer >= 0")
seed = _checked(_int, lambda x: 0 <= x <= SEED_MAX, "an integer in 0..2**63-1")
finite_float = _checked(_float, lambda x: True, "a finite number")
positive_float = _checked(_float, lambda x: x > 0, "a finite number > 0")
non_negative_float = _checked(_float, lambda x: x >= 0, "a finite number >= 0")
fraction = _checked(_float, lambda x: 0 <= x < 1, "a number in [0, 1)")  # finite, in [0, 1)
unit_float = _checked(_float, lambda x: 0 <= x <= 1, "a number in [0, 1]")


__all__ = ["unit_float", "positive_int", "non_negative_int", "seed", "finite_float", "positive_float", "non_negative_float",
           "fraction", "SEED_MAX"]
