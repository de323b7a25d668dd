"""RVC's spectrograms in JAX (``rvc.lib.train.mel_processing``), channels-last."""

from __future__ import annotations

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
