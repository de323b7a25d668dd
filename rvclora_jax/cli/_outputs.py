"""The one guard every writing command calls before any work: what it will write never
destroys what it reads, and never replaces an existing output unless ``--overwrite``.

Rules (paths compared after :func:`os.path.realpath`, so links and ``./x`` vs ``x`` agree):

* an output is never an input, an output directory (filled, or with ``--overwrite``
  replaced, as a whole) never holds an input, and an output is never an existing path inside an input directory
  (``--out RUN_DIR/adapter.safetensors`` while reading RUN_DIR) -- not even with
  ``--overwrite``: nothing the command reads may be replaced by what it writes;
* an existing output file, or an existing non-empty output directory, is refused unless
  ``overwrite`` (or the caller's resume path, which passes ``overwrite=True``);
* a file output that is an existing directory (or a directory output that is an existing
  file) is refused outright.

:meth:`OutputGuard.cleanup_on_failure` removes, when the command fails, the directories it
created (the missing ancestors of every output, recorded before any work): a failed
invocation leaves nothing behind, and never removes what it did not create.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable, Iterable


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
    """``child`` (a real path) is ``parent`` or below it."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _missing_ancestors(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    out = []
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        out.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return out[::-1]


class OutputGuard:
    """Checks a command's outputs against its inputs (see the module docstring)."""

    def __init__(self, inputs: Iterable[str | None], *, files: Iterable[str] = (), dirs: Iterable[str] = (),
                 into: Iterable[str] = (), overwrite: bool = False):
        self.inputs = [os.fspath(p) for p in inputs if p]
        self.files = [os.fspath(p) for p in files if p]
        self.dirs = [os.fspath(p) for p in dirs if p]
        self.into = [os.fspath(p) for p in into if p]  # folders written into (their files are listed later)
        self.overwrite = overwrite
        self.check()
        # The directories this invocation will create (outermost first), removed on failure.
        created: list[str] = []
        for p in self.dirs + self.into + [os.path.dirname(os.path.abspath(f)) for f in self.files]:
            for d in _missing_ancestors(p):
                if d not in created:
                    created.append(d)
        self.created = [d for d in created if not any(_inside(d, c) and d != c for c in created)]

    def check(self) -> None:
        real_in = [(p, _real(p), os.path.isdir(p)) for p in self.inputs if os.path.lexists(p)]
        outs = [(f, False) for f in self.files] + [(d, True) for d in self.dirs] + [(d, None) for d in self.into]
        for out, is_dir in outs:
            ro = _real(out)
            for p, ri, in_dir in real_in:
                if is_dir is None:
                    break  # a folder written into: only the files named in it can clash
                if ro == ri:
                    raise ValueError(f"{out}: is also an input of this command; write the output elsewhere")
                if is_dir and _inside(ri, ro):
                    raise ValueError(f"{out}: the output directory holds the input {p}; write the output "
                                     f"elsewhere")
                if in_dir and _inside(ro, ri) and os.path.lexists(out):
                    raise ValueError(f"{out}: is part of the input {p}; write the output elsewhere")
            if not os.path.lexists(out):
                continue
            if is_dir is None:
                if not os.path.isdir(out):
                    raise ValueError(f"{out}: exists and is not a directory")
            elif is_dir:
                if not os.path.isdir(out):
                    raise ValueError(f"{out}: exists and is not a directory")
                if os.listdir(out) and not self.overwrite:
                    raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite to replace "
                                          f"its contents, or choose a new output")
            else:
                if os.path.isdir(out):
                    raise IsADirectoryError(f"{out}: is a directory; the output is a file")
                if not self.overwrite:
                    raise FileExistsError(f"{out}: exists; pass --overwrite to replace it")

    def add_files(self, files: Iterable[str]) -> None:
        """More file outputs, known only after the inputs were read (render's per-clip WAVs)."""
        self.files += [os.fspath(f) for f in files]
        self.check()

    def remove_created(self, keep: Callable[[str], bool] | None = None) -> None:
        for d in reversed(self.created):
            if os.path.isdir(d) and not (keep and keep(d)):
                shutil.rmtree(d, ignore_errors=True)

    @contextlib.contextmanager
    def cleanup_on_failure(self, keep: Callable[[str], bool] | None = None):
        """On any exception (Ctrl-C included), remove the directories this command created,
        except those ``keep(dir)`` says hold something worth keeping (a run's checkpoints)."""
        try:
            yield self
        except BaseException:
            self.remove_created(keep)
            raise


def guard(inputs: Iterable[str | None], *, files: Iterable[str] = (), dirs: Iterable[str] = (),
          into: Iterable[str] = (), overwrite: bool = False) -> OutputGuard:
    """``files``: files to write; ``dirs``: directories to fill (refused when not empty unless
    ``overwrite``); ``into``: folders to write files into (name those with :meth:`add_files`)."""
    return OutputGuard(inputs, files=files, dirs=dirs, into=into, overwrite=overwrite)


def add_overwrite(parser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (never an input of the command)")


__all__ = ["OutputGuard", "guard", "add_overwrite"]
