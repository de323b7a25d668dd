"""Compile once, remember it: XLA's persistent compilation cache and up-front compiles.

Life cycle, as ``rvclora train`` uses it:

1. :func:`enable_persistent_cache` once per process, before anything is compiled (it
   resets JAX's cache state if something was): compiled executables are written to
   :func:`default_cache_dir` and read back by the next run of the same configuration,
   which then skips XLA's compile. ``RVCLORA_COMPILE_CACHE`` overrides the directory
   (``off`` disables it; tests point it at a temporary directory so they never write
   into the user's cache); ``rvclora train --no-compile-cache`` turns it off.
2. :func:`precompile` before the first step: the train step is compiled for every padded
   batch shape the data uses, with a visible ``compiling…`` line per shape, so no step in
   the middle of a run stops for a compile.

The cache holds executable code that the process runs: like JAX's own, it is trusted
and lives in the user's private cache directory (created 0700); never point it at a
directory other users can write.
"""

from __future__ import annotations

import os
from typing import Callable

ENV = "RVCLORA_COMPILE_CACHE"
_OFF = ("off", "0", "none", "false", "no")
# Compiles faster than this are not worth a disk entry (jax's own default, made explicit).
MIN_COMPILE_SECS = 1.0


def default_cache_dir() -> str | None:
    """``$RVCLORA_COMPILE_CACHE`` (``off`` → None), else ``$XDG_CACHE_HOME/rvclora-jax/xla``,
    else ``~/.cache/rvclora-jax/xla``."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF or not env.strip() else os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rvclora-jax", "xla")


def enable_persistent_cache(directory: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``directory`` (default:
    :func:`default_cache_dir`). Returns the directory in use, or None when disabled
    (``RVCLORA_COMPILE_CACHE=off``) or when the directory cannot be created (a warning
    line is printed; training goes on without the cache)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    d = directory or default_cache_dir()
    if d is None:
        return None
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as e:
        print(f"compile cache: cannot create {d} ({e.strerror}); compiling without a cache")
        return None
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether the cache is used (at its first compile):
    # start that decision afresh so a compile that happened before this call does not
    # leave the cache off.
    cc.reset_cache()
    return d


def disable_persistent_cache() -> None:
    """Turn the persistent cache off for the rest of the process (``--no-compile-cache``)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()


def sample_batches(batches) -> dict[int, dict]:
    """One real batch per padded length T that ``batches`` (a
    :class:`rvclora_jax.data.Batches`) produces, ``{T: batch}``; ``{}`` for an iterable that
    does not expose its buckets (then the step compiles on first use)."""
    groups = getattr(batches, "groups", None)
    if not isinstance(groups, dict) or not hasattr(batches, "collate"):
        return {}
    B = batches.batch_size
    return {T: batches.collate(T, (idx * B)[:B]) for T, idx in sorted(groups.items())}


def precompile(trainer, batches, log: Callable[[str], None] | None = print) -> dict[int, float]:
    """Compile ``trainer``'s step for every batch shape of ``batches`` before training,
    printing one ``compiling…`` line per shape. Returns ``{T: seconds}`` (shapes already
    compiled by this trainer are skipped)."""
    samples = sample_batches(batches)
    todo = {T: b for T, b in samples.items() if not trainer.is_compiled(b)}
    out = {}
    for i, (T, b) in enumerate(todo.items(), 1):
        if log:
            log(f"compiling the train step for batch shape {i}/{len(todo)} (T={T} frames)…")
        out[T] = trainer.compile(b)
    if log and out:
        log("compiled: " + ", ".join(f"T={T} {s:.1f} s" for T, s in out.items()))
    return out


def peak_memory() -> dict:
    """``{"peak_rss_mb": host peak RSS of this process}`` plus ``"peak_device_mb"`` (the
    largest ``peak_bytes_in_use`` over the local devices) where the backend reports it
    (GPU/TPU do; ``memory_stats()`` is None on CPU)."""
    import resource

    import jax

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    peaks = []
    for d in jax.local_devices():
        try:
            st = d.memory_stats()
        except Exception:  # noqa: BLE001 - a backend without the API
            st = None
        if st and "peak_bytes_in_use" in st:
            peaks.append(st["peak_bytes_in_use"])
    if peaks:
        out["peak_device_mb"] = round(max(peaks) / 2**20, 1)
    return out


def describe_memory(mem: dict) -> str:
    s = f"peak host RSS {mem['peak_rss_mb'] / 1024:.2f} GB"
    if "peak_device_mb" in mem:
        return s + f", peak device memory {mem['peak_device_mb'] / 1024:.2f} GB"
    return s + " (this backend reports no device memory statistics)"


# --------------------------------------------------------------------------- host heap


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(n: int = 2) -> bool:
    """glibc gives each thread (XLA's pools, the prefetch thread) its own malloc arena and
    never returns freed memory of idle arenas; capping them keeps the heap compact. Call
    before the threads start. Returns False where this is not glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(-8, int(n)))  # M_ARENA_MAX


def trim_host_memory() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), e.g. the compiler's
    working memory after the ahead-of-time compiles, before the steps allocate theirs."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True
