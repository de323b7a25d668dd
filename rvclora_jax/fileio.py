"""Small file helpers shared by the library and the converters: the one way to write a
file (atomically, honouring the umask) and the one way to accept an input file (a regular
file of bounded size, never a FIFO, device or directory)."""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Callable


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str) -> str:
    """Give ``path`` and everything below it the modes a plain ``open``/``mkdir`` would
    have given them under the current umask (0777/0666 minus the umask). For trees built
    in a ``tempfile.mkdtemp`` (0700) or by writers that create 0600 files, before they are
    renamed into place."""
    mask = _umask()
    for d, dirs, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [path])]:
        if os.path.isdir(path):
            os.chmod(d, 0o777 & ~mask)
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)
    return path


def require_regular_file(path: str, what: str = "input file", *, max_bytes: int | None = None) -> str:
    """``path`` if it is an existing regular file of at most ``max_bytes``; otherwise a
    one-line error naming it. Inputs are untrusted: a FIFO or ``/dev/zero`` would be read
    without end, and a format with a natural size bound (a config file) never needs more."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as e:
        raise OSError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path}: is a directory, not a regular file ({what})")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file but a FIFO, socket or device ({what})")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ValueError(f"{path}: {st.st_size:,} bytes is too large ({what}: at most {max_bytes:,})")
    return path


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
        # mkstemp creates 0600 files; the result gets what any tool would give it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
