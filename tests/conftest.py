"""Shared, generic test fixtures, and memory hygiene for the whole suite.

The suite builds many full-size RVC models (and their PyTorch references) and compiles
many jitted functions whose executables hold the model weights as constants. Without
care the test process grows past 11 GB; the module-scoped fixture below drops every
compiled executable and returns freed heap pages to the OS after each test module, so
the peak is set by the largest single module, not by the sum of all of them. The peak
RSS is printed at the end of the run (``peak RSS`` line)."""

import atexit
import ctypes
import ctypes.util
import gc
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import pytest


# One persistent XLA compilation cache per test session, shared with every subprocess a
# test starts (they inherit the environment): a worker compiling the narrow train step an
# in-process fixture already compiled loads it instead (about a minute per GAN step on 2
# cores), and so does a module compiling again after the caches were released. Set
# before jax is imported; never the user's own cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="rvclora-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["RVCLORA_COMPILE_CACHE"] = _XLA_CACHE
    # Every compile, however short: the parity modules' eager ops (hundreds of sub-second
    # compiles) are released with each module's caches and compiled again by the next;
    # read back from disk instead (measured: two parity modules 64 s -> 51 s wall).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
if _LIBC is not None and hasattr(_LIBC, "mallopt"):
    # glibc gives each thread (XLA's thread pool, torch's) its own malloc arena; freed
    # memory in idle arenas is never returned. Few arenas keep the heap compact.
    _LIBC.mallopt(-8, 2)  # M_ARENA_MAX


def release_memory() -> None:
    """Drop jit caches (executables + their baked-in constants) and trim the heap."""
    gc.collect()
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _rss_gb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_module(request):
    t0, c0 = time.perf_counter(), _cpu_s()
    yield
    before = _rss_gb()
    release_memory()
    if request.config.getoption("verbose") > 0 or "RVCLORA_MEMLOG" in os.environ:
        # CPU seconds (user + sys, this process and the subprocesses it waited for) say more
        # than wall time on a shared machine
        print(f"\n[memory] {request.module.__name__}: RSS {before:.2f} GB -> {_rss_gb():.2f} GB after release, "
              f"peak so far {_peak_gb(resource.RUSAGE_SELF):.2f} GB; {time.perf_counter() - t0:.1f} s wall, "
              f"{_cpu_s() - c0:.1f} s CPU", file=sys.stderr)


def _cpu_s() -> float:
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)))


def _log_compiles() -> None:
    """``RVCLORA_COMPILELOG=SECONDS``: print every XLA compile that took longer than
    SECONDS (default 2) with its function name, so the budget can be kept by making test
    modules share programs: an identical program in a later module is read from the
    session's persistent cache in well under a second and is not printed."""
    import time

    import jax

    limit = float(os.environ["RVCLORA_COMPILELOG"] or 2.0)
    t0 = time.perf_counter()

    def on_duration(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and duration >= limit:
            print(f"\n[compile] {time.perf_counter() - t0:7.1f}s {kw.get('fun_name')}: {duration:.1f} s",
                  file=sys.stderr)

    jax.monitoring.register_event_duration_secs_listener(on_duration)


if "RVCLORA_COMPILELOG" in os.environ:
    _log_compiles()


def _peak_gb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"peak RSS: test process {_peak_gb(resource.RUSAGE_SELF):.2f} GB, "
        f"largest child process {_peak_gb(resource.RUSAGE_CHILDREN):.2f} GB")


@pytest.fixture
def exp(tmp_path):
    """A writable copy of the built-in example experiment, without its filelist."""
    import shutil

    from rvclora_jax import data

    dst = tmp_path / "exp"
    shutil.copytree(data.example_dir(), dst)
    (dst / "filelist.txt").unlink()
    return dst


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
