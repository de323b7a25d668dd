"""``rvclora`` command line: the composition root over the importable functions.

Each command lives in its own module here and exposes ``register(subparsers)``, which adds
its sub-parser(s) and sets ``func`` to its handler. A new command is one new module plus one
entry in :data:`COMMANDS`. This package is the only place that imports ``rvclora_convert``
(the torch side), and only inside handlers, so ``rvclora --help`` needs no torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .. import __version__
from . import adapters, convert, example, index, infer, prepare, render, train

# Registration order is the order of `rvclora --help`.
COMMANDS = (adapters, render, example, convert, prepare, train, index, infer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rvclora", description="Exact LoRA fine-tuning of RVC voice models in JAX.")
    p.add_argument("--version", action="version", version=f"rvclora-jax {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (exit 2, its last stderr line names the flag), --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    # SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C, so every temporary file and
    # every directory this invocation created is removed (training saves a checkpoint first).
    old_term = _terminate_as_interrupt()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:
        print(f"rvclora: error: out of memory ({' '.join(str(e).split()) or 'MemoryError'})", file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError, ImportError) as e:  # ImportError: an optional extra missing
        msg = " ".join(str(e).split()) or type(e).__name__  # always one line
        print(f"rvclora: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if old_term is not False:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)


def _terminate_as_interrupt():
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return False


def entry() -> None:
    """The ``rvclora`` program: :func:`main`, then exit. After a refused command (exit 2)
    the process ends without the interpreter's teardown: Orbax/tensorstore worker threads
    of a failed read may still call into an event loop that is closing, and would print
    "Event loop is closed" tracebacks after the one-line error. Nothing is left to write
    by then (temporary files were removed when the error propagated)."""
    rc = main()
    if rc == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


__all__ = ["main", "entry", "build_parser", "COMMANDS"]
