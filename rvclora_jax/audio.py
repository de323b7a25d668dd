"""RVC's spectrograms in JAX (``rvc.lib.train.mel_processing``), channels-last."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np


def hann_window(win_size: int) -> np.ndarray:
    """Periodic Hann window, like ``torch.hann_window(win_size)``."""
    n = np.arange(win_size)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_size)).astype(np.float32)


def spectrogram(y: jax.Array, n_fft: int, hop_size: int, win_size: int) -> jax.Array:
    """Linear magnitude spectrogram ``[B, frames, n_fft//2+1]`` of waveforms ``[B, N]``.

    Like RVC's ``spectrogram_torch(center=False)``: reflect-pad (n_fft-hop)/2 on both
    sides, frames every ``hop_size``, periodic Hann window of ``win_size`` centred in
    ``n_fft``, magnitude ``sqrt(re² + im² + 1e-6)``. ``N // hop`` frames."""
    y = jnp.asarray(y, jnp.float32)
    pad = int((n_fft - hop_size) / 2)
    y = jnp.pad(y, ((0, 0), (pad, pad)), mode="reflect")
    n_frames = 1 + (y.shape[1] - n_fft) // hop_size
    idx = np.arange(n_fft)[None, :] + hop_size * np.arange(n_frames)[:, None]
    win = np.zeros(n_fft, np.float32)
    left = (n_fft - win_size) // 2  # torch.stft centres a shorter window in n_fft
    win[left:left + win_size] = hann_window(win_size)
    frames = y[:, idx] * win  # [B, frames, n_fft]
    spec = jnp.fft.rfft(frames, axis=-1)
    return jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + 1e-6)


# ---------------------------------------------------------------------------
# Mel filterbank (librosa.filters.mel defaults: Slaney mel scale, Slaney norm)
# ---------------------------------------------------------------------------

_F_SP = 200.0 / 3.0  # Hz per mel in the linear part of the Slaney scale
_MIN_LOG_HZ = 1000.0  # where the Slaney scale turns logarithmic
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney (Auditory Toolbox) mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    mel = f / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log_part, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_mel`."""
    m = np.asarray(m, np.float64)
    hz = m * _F_SP
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log_part, hz)


@functools.lru_cache(maxsize=32)
def _mel_filterbank_cached(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    n_freq = n_fft // 2 + 1
    fft_hz = np.arange(n_freq, dtype=np.float64) * (float(sr) / n_fft)
    # n_mels + 2 band edges, equally spaced on the mel scale
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    width = np.diff(edges)  # [n_mels + 1]
    lo, hi = edges[:-2, None], edges[2:, None]
    rising = (fft_hz[None, :] - lo) / width[:-1, None]
    falling = (hi - fft_hz[None, :]) / width[1:, None]
    tri = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    # Slaney normalisation: each triangle has unit area in Hz
    area_norm = 2.0 / (edges[2:] - edges[:-2])
    bank = (tri * area_norm[:, None]).astype(np.float32)
    bank.setflags(write=False)
    return bank


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Mel filterbank ``[n_mels, n_fft//2+1]`` (float32), equal to
    ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)``
    with librosa's defaults (Slaney mel scale, ``htk=False``, Slaney area norm).
    ``fmax=None`` means ``sr / 2``. Returns a fresh (writable) copy of a cached bank."""
    fmax = float(sr) / 2.0 if fmax is None else float(fmax)
    return _mel_filterbank_cached(int(sr), int(n_fft), int(n_mels), float(fmin), fmax).copy()


def spec_to_mel(spec: jax.Array, sampling_rate: int, n_fft: int, n_mels: int,
                fmin: float = 0.0, fmax: float | None = None) -> jax.Array:
    """Log-mel ``[B, frames, n_mels]`` of a linear magnitude spectrogram ``[B, frames, F]``.

    Like RVC's ``spec_to_mel_torch``: ``log(clamp(mel_basis @ spec, min=1e-5))``
    (natural log), channels-last."""
    fmax = float(sampling_rate) / 2.0 if fmax is None else float(fmax)
    bank = _mel_filterbank_cached(int(sampling_rate), int(n_fft), int(n_mels), float(fmin), fmax)
    spec = jnp.asarray(spec, jnp.float32)
    mel = jnp.einsum("btf,mf->btm", spec, jnp.asarray(bank),
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(mel, 1e-5))


def mel_spectrogram(y: jax.Array, n_fft: int, n_mels: int, sampling_rate: int, hop_size: int,
                    win_size: int, fmin: float = 0.0, fmax: float | None = None) -> jax.Array:
    """Log-mel ``[B, frames, n_mels]`` of waveforms ``[B, N]``; RVC's
    ``mel_spectrogram_torch(center=False)`` = :func:`spectrogram` then :func:`spec_to_mel`."""
    spec = spectrogram(y, n_fft, hop_size, win_size)
    return spec_to_mel(spec, sampling_rate, n_fft, n_mels, fmin, fmax)


@dataclass(frozen=True)
class MelConfig:
    """RVC's ``data`` audio settings (``configs/*.json``); see :meth:`for_rate`."""

    sampling_rate: int
    filter_length: int
    hop_length: int
    win_length: int
    n_mel_channels: int
    mel_fmin: float = 0.0
    mel_fmax: float | None = None

    # sr -> (filter_length, hop_length, win_length, n_mel_channels)
    _PRESETS: ClassVar[dict[int, tuple[int, int, int, int]]] = {
        24000: (1024, 240, 1024, 80),  # Applio only
        32000: (1024, 320, 1024, 80),
        40000: (2048, 400, 2048, 125),
        48000: (2048, 480, 2048, 128),
    }

    @classmethod
    def for_rate(cls, sr: int) -> "MelConfig":
        """RVC's per-rate settings (fmin 0, fmax None → sr/2). 24000 is Applio's preset."""
        sr = int(sr)
        if sr not in cls._PRESETS:
            raise ValueError(f"no RVC mel preset for sampling rate {sr}; "
                             f"known: {sorted(cls._PRESETS)}")
        n_fft, hop, win, n_mels = cls._PRESETS[sr]
        return cls(sr, n_fft, hop, win, n_mels, 0.0, None)

    @property
    def n_freq(self) -> int:
        """Linear-spectrogram bins (RVC's ``spec_channels``)."""
        return self.filter_length // 2 + 1

    def filterbank(self) -> np.ndarray:
        return mel_filterbank(self.sampling_rate, self.filter_length, self.n_mel_channels,
                              self.mel_fmin, self.mel_fmax)

    def spectrogram(self, y: jax.Array) -> jax.Array:
        """``[B, N]`` → ``[B, N // hop, n_freq]`` linear magnitude."""
        return spectrogram(y, self.filter_length, self.hop_length, self.win_length)

    def spec_to_mel(self, spec: jax.Array) -> jax.Array:
        """``[B, frames, n_freq]`` → ``[B, frames, n_mel_channels]`` log-mel."""
        return spec_to_mel(spec, self.sampling_rate, self.filter_length, self.n_mel_channels,
                           self.mel_fmin, self.mel_fmax)

    def mel(self, y: jax.Array) -> jax.Array:
        """``[B, N]`` → ``[B, N // hop, n_mel_channels]`` log-mel."""
        return self.spec_to_mel(self.spectrogram(y))
