"""Small file helpers shared by the library and the converters."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], object], *, suffix: str = "") -> str:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    Nothing is ever half-written: on any error the temporary file is removed and
    ``path`` is left as it was."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-rvclora-", suffix=suffix, dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def require_torch(what: str = "reading and writing .pth files") -> None:
    """A clear error when the optional torch extra is missing (without importing torch)."""
    if importlib.util.find_spec("torch") is None:
        raise ValueError(f"{what} needs PyTorch: pip install 'rvclora-jax[torch]'")
