"""The real speech the front-end tests share: two CMU ARCTIC clips in ``tests/data/``
(16 kHz mono; CMU's notice in ``tests/data/COPYING``)."""

import os

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")


def speech_file(name: str) -> str:
    """Path of the clip ``name``; the test fails (never skips) when it is missing."""
    p = os.path.join(DATA, name)
    if not os.path.exists(p):
        pytest.fail(f"{p} is missing (CMU ARCTIC clip, see tests/data/COPYING)")
    return p
