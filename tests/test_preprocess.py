"""RVC's preprocessing of one recording, against RVC's semantics built in this test from
RVC's own slicer (``rvc.lib.slicer2``), scipy's filter design and ``librosa.resample``
(RVC's 16 kHz resampler); and the reader (formats, bit depths, stereo, bad files)."""

import os
import sys

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from rvclora_jax.frontend import audio_io
from rvclora_jax.frontend.audio_io import AudioError, load_audio, read_audio, to_16k
from rvclora_jax.frontend.preprocess import preprocess_audio, preprocess_file

slicer2 = pytest.importorskip("rvc.lib.slicer2")
librosa = pytest.importorskip("librosa")

from tests.speech import speech_file  # noqa: E402


def rvc_expected(audio, sr, per=3.7):
    """What RVC's preprocess.py writes for one recording, as {idx1: (gt float32, 16k float32)}
    (later writes of an index replace earlier ones, as files do), plus every written piece in order."""
    b, a = signal.butter(N=5, Wn=48, btype="high", fs=sr)
    x = signal.lfilter(b, a, audio)
    files, order = {}, []

    def write(piece, idx1):
        m = np.abs(piece).max()
        if m > 2.5:
            return
        y = piece / m * (0.9 * 0.75) + (1 - 0.75) * piece
        files[idx1] = (y.astype(np.float32), librosa.resample(y, orig_sr=sr, target_sr=16000).astype(np.float32))
        order.append(files[idx1])

    idx1 = 0
    for chunk in slicer2.Slicer(sr, threshold=-42, min_length=1500, min_interval=400, hop_size=15,
                                max_sil_kept=500).slice(x):
        i = 0
        while True:
            start = int(sr * (per - 0.3) * i)
            i += 1
            if len(chunk[start:]) > (per + 0.3) * sr:
                write(chunk[start:start + int(per * sr)], idx1)
                idx1 += 1
            else:
                piece = chunk[start:]
                idx1 += 1
                break
        write(piece, idx1)
    return files, order


@pytest.fixture(scope="module")
def speech():
    return [sf.read(speech_file(f), dtype="float32")[0] for f in ("arctic_a0007.wav", "arctic_a0009.wav")]


def recording(speech, sr, seed=0):
    """~20 s: short and long slices (a 10 s one gives several pieces), a too-loud slice, pauses."""
    from scipy.signal import resample_poly

    rng = np.random.default_rng(seed)
    def core(s):  # the clip without its leading and trailing silence
        loud = np.flatnonzero(np.abs(s) > 0.02)
        return s[max(0, loud[0] - int(0.05 * sr)):loud[-1] + int(0.05 * sr)]

    a, b = (core(resample_poly(s, sr // 1000, 16)) for s in speech)
    pause = lambda s: 3e-4 * rng.standard_normal(int(s * sr))  # noqa: E731
    return np.concatenate([pause(0.6), a[: int(2.2 * sr)], pause(1.0), a, b, a[: int(1.5 * sr)], pause(0.8),
                           6.0 * b, pause(1.2), b, pause(0.5)]).astype(np.float32)


@pytest.mark.parametrize("sr,per", [(40000, 3.7), (32000, 3.0)])
def test_matches_rvc(speech, sr, per):
    x = recording(speech, sr)
    files, order = rvc_expected(x, sr, per)
    got = preprocess_audio(x, sr, per=per, numbering="rvc")
    assert [s.idx1 for s in got.segments] == sorted(files)
    for s in got.segments:
        gt, w16 = files[s.idx1]
        np.testing.assert_array_equal(s.wav, gt)
        np.testing.assert_array_equal(s.wav16k, w16)  # soxr HQ is librosa's default resampler
    assert any("peak" in n and "> 2.5" in n for n in got.notes)  # the 6x slice was dropped, named
    assert any("overwritten" in n for n in got.notes)
    # sequential numbering keeps every piece RVC writes, overwritten ones included, in order
    seq = preprocess_audio(x, sr, per=per)
    assert [s.idx1 for s in seq.segments] == list(range(len(order)))
    assert len(seq.segments) > len(files)
    for s, (gt, w16) in zip(seq.segments, order):
        np.testing.assert_array_equal(s.wav, gt)
        np.testing.assert_array_equal(s.wav16k, w16)
    longest = max(len(s.wav) for s in seq.segments)
    assert longest <= int((per + 0.3) * sr) + 1
    for s in seq.segments:  # RVC's loudness mix: peak 0.675 + 0.25·m
        assert np.abs(s.wav).max() == pytest.approx(0.675 + 0.25 * s.peak, rel=1e-6)
        assert s.wav.dtype == np.float32 and s.wav16k.dtype == np.float32


def test_silence_and_digital_zeros(tmp_path, speech):
    sr = 40000
    p = tmp_path / "silent.wav"
    sf.write(p, np.zeros(sr * 3, np.float32), sr)
    with pytest.raises(AudioError, match="silent.wav: silent"):
        preprocess_file(str(p), sr)
    # a slice of digital zeros between speech: RVC would write NaN (0/0); we skip it, named
    x = recording(speech, sr)
    got = preprocess_audio(np.concatenate([x, np.zeros(sr * 5, np.float32)]), sr)
    assert all(np.isfinite(s.wav).all() for s in got.segments)


# --------------------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def files(tmp_path_factory, speech):
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(3)
    s = np.concatenate(speech)
    st = np.stack([s, 0.7 * s[::-1]], 1) * 0.8 + 1e-3 * rng.standard_normal((len(s), 2))
    out = {}
    for name, data, rate, kw in [("pcm16.wav", st, 44100, dict(subtype="PCM_16")),
                                 ("pcm24.flac", st, 48000, dict(subtype="PCM_24")),
                                 ("pcm32.wav", st[:, 0], 22050, dict(subtype="PCM_32")),
                                 ("float.wav", st, 16000, dict(subtype="FLOAT")),
                                 ("pcm24.wav", st, 40000, dict(subtype="PCM_24")),
                                 ("mono16k.wav", s, 16000, dict(subtype="PCM_16"))]:
        sf.write(d / name, data, rate, **kw)
        out[name] = str(d / name)
    try:
        sf.write(d / "speech.mp3", st, 44100, format="MP3")
        out["speech.mp3"] = str(d / "speech.mp3")
    except Exception:  # noqa: BLE001 - a libsndfile built without mp3
        pass
    return out


def test_formats_and_downmix(files):
    from scipy.signal import resample_poly

    for name, path in files.items():
        ref, rate = sf.read(path, dtype="float32")
        x, r = read_audio(path)
        assert r == rate
        np.testing.assert_array_equal(x, ref)
        y = load_audio(path, 40000)
        assert y.dtype == np.float32 and y.ndim == 1
        # RVC (ffmpeg/PyAV -ac 1): stereo -> (L+R)/sqrt(2); then the rate change
        mono = (ref[:, 0].astype(np.float64) + ref[:, 1]) * np.sqrt(0.5) if ref.ndim == 2 else ref
        from math import gcd

        g = gcd(40000, rate)
        want = mono if rate == 40000 else resample_poly(mono.astype(np.float32), 40000 // g, rate // g)
        np.testing.assert_allclose(y, want, atol=2e-6)
        assert len(y) == -(-len(ref) * 40000 // rate)
    st, _ = sf.read(files["pcm16.wav"], dtype="float32")
    np.testing.assert_allclose(audio_io.to_mono(st, "mean"), st.mean(1), atol=1e-7)
    np.testing.assert_array_equal(read_audio(files["mono16k.wav"])[0],
                                  sf.read(files["mono16k.wav"], dtype="int16")[0] / np.float32(32768))


def test_16k_is_librosas_resample():
    rng = np.random.default_rng(4)
    for sr in (32000, 40000, 48000):
        x = rng.standard_normal(int(3.7 * sr)) * 0.1
        np.testing.assert_array_equal(to_16k(x, sr), librosa.resample(x, orig_sr=sr, target_sr=16000))


def test_wav_without_soundfile(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile -> ImportError
    for name in ("pcm16.wav", "pcm24.wav", "pcm32.wav", "float.wav"):
        x, r = read_audio(files[name])
        ref, rate = sf.read(files[name], dtype="float32")
        assert r == rate
        np.testing.assert_allclose(x, ref, atol=1e-7)
    with pytest.raises(ImportError, match=r"rvclora-jax\[audio\]"):
        read_audio(files["pcm24.flac"])


def test_bad_files(tmp_path):
    sr = 16000
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("not audio\n")
    (tmp_path / "header.wav").write_bytes(open(__file__, "rb").read()[:0] + b"RIFF\x24\x00\x00\x00WAVEfmt ")
    nan = np.zeros(sr, np.float32)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, sr, subtype="FLOAT")
    sf.write(tmp_path / "nosamples.wav", np.zeros(0, np.float32), sr)
    os.mkdir(tmp_path / "folder.wav")
    for name in ("empty.wav", "notes.wav", "header.wav", "nan.wav", "nosamples.wav", "folder.wav"):
        p = str(tmp_path / name)
        with pytest.raises((AudioError, ValueError, OSError)) as e:
            load_audio(p, 40000)
        msg = str(e.value)
        assert msg.startswith(p) and "\n" not in msg, msg
