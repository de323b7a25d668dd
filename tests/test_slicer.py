"""Our slicer against RVC's own (``rvc.lib.slicer2.Slicer``): the same chunks, sample for
sample, on real speech joined by pauses of every length class, on random signals with
random parameters, and on the edge cases (all silence, no silence, very short input)."""

import os

import numpy as np
import pytest

from rvclora_jax.frontend.audio_io import load_audio
from rvclora_jax.frontend.slicer import RVC_SLICER, Slicer

slicer2 = pytest.importorskip("rvc.lib.slicer2")

from tests.speech import speech_file  # noqa: E402


def assert_same(x, sr, **kw):
    ref = slicer2.Slicer(sr, **kw).slice(x)
    ours = Slicer(sr, **kw).slice(x)
    assert [len(c) for c in ours] == [len(c) for c in ref]
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    return ours


@pytest.fixture(scope="module")
def speech():
    return {sr: [load_audio(speech_file(f), sr).astype(np.float64) for f in ("arctic_a0007.wav", "arctic_a0009.wav")]
            for sr in (32000, 40000, 48000)}


@pytest.mark.parametrize("sr", [32000, 40000, 48000])
def test_real_speech_with_pauses(speech, sr):
    rng = np.random.default_rng(sr)
    a, b = speech[sr]
    # pauses shorter than min_interval, between min_interval and max_sil_kept, up to
    # 2·max_sil_kept, and longer; quiet noise (not digital zeros) like a real room
    parts = [0.002 * rng.standard_normal(int(0.7 * sr)), a]
    for k, gap in enumerate((0.2, 0.35, 0.45, 0.6, 0.9, 1.5, 3.0)):
        parts += [3e-4 * rng.standard_normal(int(gap * sr)), (a, b)[k % 2][: int(sr * rng.uniform(0.8, 2.5))]]
    parts.append(1e-4 * rng.standard_normal(int(1.2 * sr)))
    x = np.concatenate(parts)
    chunks = assert_same(x, sr, **RVC_SLICER)
    assert len(chunks) >= 4  # the long pauses were cut
    assert_same(a, sr, **RVC_SLICER)
    assert_same(x.astype(np.float32), sr, **RVC_SLICER)  # RVC computes the RMS in the input dtype


def test_random_signals_and_parameters():
    rng = np.random.default_rng(0)
    for t in range(20):
        sr = int(rng.choice([16000, 32000, 40000, 48000]))
        n = int(rng.integers(100, 8 * sr))
        env = np.repeat(rng.uniform(0, 1, n // 500 + 1) ** 4, 500)[:n]
        x = rng.standard_normal(n) * env * rng.uniform(0.001, 0.5)
        if t % 4 == 0:
            x[rng.integers(0, n):rng.integers(0, n)] = 0.0  # digital silence: argmin ties
        assert_same(x, sr, **RVC_SLICER)
        hop = int(rng.integers(5, 30))
        kw = dict(threshold=float(rng.uniform(-60, -20)), min_length=int(rng.integers(600, 3000)),
                  min_interval=int(rng.integers(hop, 500)), hop_size=hop, max_sil_kept=int(rng.integers(hop, 1000)))
        assert_same(x, sr, **kw)


@pytest.mark.parametrize("case", ["zeros", "quiet", "loud", "one", "empty", "short", "leading", "trailing"])
def test_edge_cases(case):
    sr = 40000
    rng = np.random.default_rng(1)
    loud = 0.3 * rng.standard_normal(3 * sr)
    x = {"zeros": np.zeros(5 * sr), "quiet": 1e-4 * rng.standard_normal(5 * sr), "loud": loud,
         "one": np.array([0.5]), "empty": np.zeros(0), "short": 0.3 * rng.standard_normal(90),
         "leading": np.concatenate([np.zeros(2 * sr), loud]),
         "trailing": np.concatenate([loud, np.zeros(2 * sr)])}[case]
    chunks = assert_same(x, sr, **RVC_SLICER)
    if case in ("loud", "one", "empty", "short"):
        assert len(chunks) == 1 and len(chunks[0]) == len(x)  # nothing to cut
    if case in ("leading", "trailing"):
        assert len(chunks) == 1 and len(chunks[0]) < len(x)


def test_channels_first_and_parameters():
    rng = np.random.default_rng(2)
    sr = 32000
    x = np.concatenate([0.2 * rng.standard_normal(2 * sr), np.zeros(sr), 0.2 * rng.standard_normal(2 * sr)])
    st = np.stack([x, 0.5 * x])
    ref = slicer2.Slicer(sr, **RVC_SLICER).slice(st)
    ours = Slicer(sr, **RVC_SLICER).slice(st)
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    s = Slicer(40000, **RVC_SLICER)
    assert (s.hop, s.win, s.min_length, s.min_interval, s.max_sil_kept) == (600, 2400, 100, 27, 33)
    with pytest.raises(ValueError):
        Slicer(40000, min_length=100, min_interval=400)
