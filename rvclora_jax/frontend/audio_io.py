"""Reading recordings the way RVC's preprocessing does, and writing its float32 wavs.

Life cycle: :func:`load_audio` reads any file libsndfile reads (wav, flac, mp3, ogg, aiff,
...; any rate, channels, 16/24/32-bit PCM or float), downmixes to mono and resamples to
the model rate; :func:`to_16k` makes the 16 kHz copy the pitch and content extractors
read; :func:`write_wav` writes either as RVC does (IEEE-float32 WAV, atomically). A file
that cannot be used raises :class:`AudioError`, a one-line message starting with its path.

Why these choices (measured; the figures are in the README's prepare section):

* RVC loads with ffmpeg/PyAV (``-ac 1 -ar SR``), i.e. libswresample. Its stereo→mono
  matrix for float output is (L+R)/√2, not the mean, and is not renormalised; that gain
  matters because the slicer's −42 dB threshold and the 0.25·x term of the loudness mix
  see absolute levels. ``downmix="mean"`` gives Applio's ``librosa.to_mono`` instead.
* Rate change on load: ``scipy.signal.resample_poly`` is the closest field resampler to
  libswresample's default filter (54-64 dB SNR against RVC's own loader on speech,
  soxr 48-53 dB, librosa's kaiser_best 44-49 dB).
* Model rate → 16 kHz: RVC calls ``librosa.resample`` with its default, which in librosa
  ≥ 0.10 (rvc==0.3.5's range) *is* ``soxr`` at "HQ" quality: :func:`to_16k` uses soxr HQ
  directly and is bit-identical to it.

soundfile and soxr are optional dependencies (the ``prepare`` extra), imported on first use.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

from ..fileio import atomic_write, require_regular_file

# What `rvclora prepare` picks up from a folder; anything else in the folder is reported.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".aifc", ".au", ".caf",
                    ".w64", ".rf64", ".wv")
DOWNMIX = ("rvc", "mean")
MAX_AUDIO_BYTES = 4 << 30  # a raw recording larger than 4 GiB is almost surely not one


class AudioError(ValueError):
    """A recording cannot be used; the one-line message starts with the path."""


def _extra(module: str, what: str):
    """Import an optional dependency, or a one-line error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the '{module}' package: pip install 'rvclora-jax[audio]' "
                          f"(or [prepare])") from None


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: float32 ``[N]`` (mono) or ``[N, C]``, integer PCM scaled by
    2^(bits−1) (libsndfile's and ffmpeg's convention: int16 ÷ 32768).

    Needs soundfile, except for plain ``.wav`` files, which scipy reads as a fallback."""
    require_regular_file(path, "audio file", max_bytes=MAX_AUDIO_BYTES)
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        import soundfile as sf
    except ImportError:
        sf = None
    if sf is None:
        if not path.lower().endswith(".wav"):
            _extra("soundfile", f"reading {os.path.splitext(path)[1] or 'this'} files")
        return _read_wav_scipy(path)
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=False)
    except Exception as e:  # noqa: BLE001 - libsndfile's errors (format, truncation) all name the file
        why = " ".join(str(e).split()) or type(e).__name__
        raise AudioError(f"{path}: not a readable audio file ({why})") from None
    return _checked(path, np.asarray(data, np.float32), int(rate))


def _read_wav_scipy(path: str) -> tuple[np.ndarray, int]:
    import warnings

    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():  # extra chunks (PEAK, LIST) are harmless
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            rate, data = wavfile.read(path)
    except Exception as e:  # noqa: BLE001
        raise AudioError(f"{path}: not a readable wav file ({' '.join(str(e).split()) or type(e).__name__})") from None
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        # scipy returns 24-bit PCM left-aligned in int32, so one scale fits 24 and 32 bits
        x = (data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))).astype(np.float32)
    elif data.dtype.kind == "f":
        x = data.astype(np.float32)
    else:
        raise AudioError(f"{path}: {data.dtype} samples are not a supported PCM format")
    return _checked(path, x, int(rate))


def _checked(path: str, x: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.size == 0 or x.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples")
    if rate <= 0:
        raise AudioError(f"{path}: invalid sample rate {rate}")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{path}: samples contain NaN or inf")
    return x, rate


def to_mono(x: np.ndarray, downmix: str = "rvc") -> np.ndarray:
    """``[N]`` or ``[N, C]`` → ``[N]`` float32. ``"rvc"``: what ffmpeg/PyAV's ``-ac 1`` gives
    RVC (stereo (L+R)/√2; other channel counts the mean); ``"mean"``: the channel mean."""
    if downmix not in DOWNMIX:
        raise ValueError(f"downmix must be one of {DOWNMIX}, got {downmix!r}")
    if x.ndim == 1:
        return x
    if downmix == "rvc" and x.shape[1] == 2:
        return ((x[:, 0].astype(np.float64) + x[:, 1]) * math.sqrt(0.5)).astype(np.float32)
    return x.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling (scipy, Kaiser window); output length ⌈N·target/orig⌉."""
    if orig_sr == target_sr:
        return x
    from scipy.signal import resample_poly

    r = Fraction(int(target_sr), int(orig_sr))
    return resample_poly(x, r.numerator, r.denominator).astype(x.dtype, copy=False)


def to_16k(x: np.ndarray, sr: int) -> np.ndarray:
    """RVC's ``librosa.resample(x, orig_sr=sr, target_sr=16000)`` (librosa ≥ 0.10): soxr HQ.
    Keeps the input's float dtype (RVC resamples the float64 segment, then casts)."""
    if sr == 16000:
        return x
    soxr = _extra("soxr", "resampling to 16 kHz")
    return soxr.resample(x, sr, 16000, quality="HQ")


def load_audio(path: str, sr: int, *, downmix: str = "rvc") -> np.ndarray:
    """RVC's ``load_audio(path, sr)``: the file as float32 mono at ``sr`` Hz."""
    x, rate = read_audio(path)
    y = resample(to_mono(x, downmix), rate, sr)
    if y.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples at {sr} Hz")
    return np.ascontiguousarray(y, np.float32)


def write_wav(path: str, x: np.ndarray, sr: int) -> str:
    """An IEEE-float32 mono WAV (RVC's ``scipy.io.wavfile.write`` of a float32 array), written
    to a temporary file then renamed, so an interrupted run never leaves half a wav."""
    from scipy.io import wavfile

    data = np.ascontiguousarray(x, np.float32)
    return atomic_write(path, lambda tmp: wavfile.write(tmp, int(sr), data), suffix=".wav")


__all__ = ["AudioError", "AUDIO_EXTENSIONS", "DOWNMIX", "read_audio", "to_mono", "resample", "to_16k",
           "load_audio", "write_wav"]
