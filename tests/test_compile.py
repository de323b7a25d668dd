"""Compile once, remember it (rvclora_jax.compilation).

* The cache directory: ``RVCLORA_COMPILE_CACHE`` (``off`` disables) over
  ``$XDG_CACHE_HOME/rvclora-jax/xla`` over ``~/.cache/rvclora-jax/xla``.
* ``precompile`` compiles the step once per padded batch shape, printing a ``compiling…``
  line for each; the steps that follow run those executables (the jit path compiles
  nothing more).
* With the persistent cache on, a second trainer of the same configuration (as a second
  run of ``rvclora train`` would) reads every shape's executable from the cache
  directory instead of compiling it. The cache lives in a temporary directory and is
  switched off again afterwards: tests never write into the user's cache.
"""

from __future__ import annotations

import os

import jax
import pytest

from rvclora_jax import compilation
from rvclora_jax.data import Batches
from rvclora_jax.train import TrainConfig, Trainer

from . import train_worker as W
from .test_precision import build_models


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(compilation.ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.default_cache_dir() == str(tmp_path / "mine")
    for off in ("off", "0", "OFF", ""):
        monkeypatch.setenv(compilation.ENV, off)
        assert compilation.default_cache_dir() is None
        assert compilation.enable_persistent_cache() is None
    monkeypatch.delenv(compilation.ENV)
    assert compilation.default_cache_dir() == str(tmp_path / "xdg" / "rvclora-jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation.default_cache_dir() == str(tmp_path / "home" / ".cache" / "rvclora-jax" / "xla")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """The persistent cache on in a temporary directory for one test, off afterwards."""
    d = tmp_path / "xla"
    monkeypatch.setenv(compilation.ENV, str(d))
    old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                "jax_persistent_cache_min_compile_time_secs")}
    assert compilation.enable_persistent_cache() == str(d)
    yield d
    compilation.disable_persistent_cache()
    for k, v in old.items():
        jax.config.update(k, v)


def _two_shape_batches():
    """The example clips (64..118 frames) in two buckets: two padded batch shapes."""
    b = W.example_batches()
    return Batches(b.items, b.batch_size, b.segment_frames, seed=0, buckets=(90, 120), data=b.data)


def _trainer(batches):
    g, d = build_models(0)
    cfg = TrainConfig(batch_size=batches.batch_size, segment_frames=batches.segment_frames)
    return Trainer(g, d, cfg, steps_per_epoch=len(batches))


@pytest.mark.slow  # two compiles of the tiny train step: ~80 CPU-seconds
def test_precompile_every_shape_then_a_second_run_reads_the_cache(cache_dir):
    batches = _two_shape_batches()
    assert batches.shapes == [90, 120]
    events = []

    def listener(event, **kw):
        if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
            events.append(event.rsplit("/", 1)[1])

    jax.monitoring.register_event_listener(listener)
    try:
        lines = []
        tr = _trainer(batches)
        secs = compilation.precompile(tr, batches, log=lines.append)
        assert sorted(secs) == [90, 120]
        assert [ln for ln in lines if ln.startswith("compiling")] == [
            "compiling the train step for batch shape 1/2 (T=90 frames)…",
            "compiling the train step for batch shape 2/2 (T=120 frames)…"]
        assert compilation.precompile(tr, batches, log=lines.append) == {}  # nothing left to compile
        # every shape's step runs its ahead-of-time executable: the jit path never compiles
        state = tr.init_state()
        for T, b in compilation.sample_batches(batches).items():
            state, m = tr.step(state, b)
            assert b["phone"].shape[1] == T and bool(jax.numpy.isfinite(m["loss_g"]))
        assert tr._step._cache_size() == 0
        entries = [n for n in os.listdir(cache_dir) if not n.startswith(".")]
        assert len(entries) >= 2, entries
        misses = events.count("cache_misses")
        assert misses >= 2 and events.count("cache_hits") == 0

        # "run 2": a new trainer of the same configuration, in-memory caches dropped
        jax.clear_caches()
        tr2 = _trainer(batches)
        events.clear()  # (building the models may read small eager ops' entries too)
        secs2 = compilation.precompile(tr2, batches, log=None)
        assert events.count("cache_hits") == 2 and events.count("cache_misses") == 0, events
        print(f"compile s per shape: first {secs}, from the cache {secs2}")
    finally:
        jax.monitoring.unregister_event_listener(listener)
