"""RMVPE pitch estimation in JAX: RVC's ``rmvpe`` f0 method (``rvc.lib.rmvpe``).

Life cycle::

    model = rvclora_convert.rmvpe.load_rmvpe("rmvpe.pt")     # RMVPE (nnx), RVC's weights
    pitch = RMVPEPitch(model)                               # threshold 0.03, as RVC
    f0 = pitch(wav16k)                                      # (1 + N // 160,) Hz, 0 = unvoiced
    f0s = pitch.batch([wav_a, wav_b, ...])                  # bucketed, jit-compiled batches

The stages, each a function or module here:

1. :func:`log_mel`: RVC's ``MelSpectrogram(128 mels, n_fft = win = 1024, hop 160, 30-8000 Hz)``
   — reflect padding of 512 samples (``torch.stft(center=True)``), periodic Hann window,
   magnitude without epsilon, an HTK-scale triangular filter bank with area (Slaney)
   normalisation (:func:`mel_filterbank`), natural log of ``max(mel, 1e-5)``.
2. The frames are padded with log-mel 0 to a multiple of 32 (RVC's ``mel2hidden``), and
   :class:`RMVPE` (RVC's ``E2E``: a deep U-Net of residual conv blocks, a 3-channel conv,
   a BiGRU 384→2×256, a linear layer to 360 pitch bins and a sigmoid) gives the salience.
3. :func:`to_local_average_cents` and :func:`cents_to_hz`: the salience-weighted mean of the
   cents of the 9 bins around the peak; frames whose peak is ≤ the threshold are unvoiced.

Layout: channels-last, ``[batch, time, mel, channels]`` (torch's ``[batch, channels, time,
mel]``). Parameter paths are the torch ``state_dict`` keys (``unet.encoder.layers.0.conv.0
.conv.0.weight`` ⇒ ``unet/encoder/layers/0/conv/0/conv/0/kernel``); :func:`torch_layout`
lists the mapping. Batch norm runs in inference mode, folded into the preceding conv: at
call time in :class:`RMVPE` itself (the stored values stay the file's), once up front in
the copy :func:`fold_batch_norm` makes, which :class:`RMVPEPitch` runs.

Batches and buckets: a clip's result depends on its own padded length (the backward GRU
starts in the padding, and the convs see zeros past the end), so a batch of clips padded
to a common bucket length would change every clip. Instead each clip carries its valid
length: activations past it are zeroed before every conv (exactly the zero padding RVC's
convs see at the end of that clip's tensor) and the backward GRU starts from a zero state
at that clip's own end. So a clip gives the same f0 alone, in a batch, or in any bucket.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jax import lax

from .. import initializers
from ..layers import Dense

# ------------------------------------------------------------------ constants (RVC's)
SAMPLE_RATE = 16000
HOP = 160                 # 100 frames/s
N_FFT = 1024              # = win_length
N_MELS = 128
FMIN, FMAX = 30.0, 8000.0
LOG_CLAMP = 1e-5
N_BINS = 360              # 20-cent pitch bins
CENTS_OFFSET = 1997.3794084376191  # bin 0 = 31.70 Hz
FRAME_MULTIPLE = 32       # mel2hidden pads the frames to a multiple of 32
DEFAULT_THRESHOLD = 0.03  # what RVC and Applio pass everywhere (the function's 0.05 default is never used)
BN_EPS = 1e-5
GRU_HIDDEN = 256

OFFICIAL_SHA256 = "6d62215f4306e3ca278246188607209f09af3dc77ed4232efdd069798c4ec193"


@dataclasses.dataclass(frozen=True)
class RMVPEConfig:
    """RVC's ``E2E(n_blocks, n_gru, kernel_size=(2, 2), en_de_layers, inter_layers, 1,
    en_out_channels)``; the defaults are the shipped ``rmvpe.pt`` (``E2E(4, 1, (2, 2))``)."""

    n_blocks: int = 4          # ConvBlockRes per encoder / intermediate / decoder block
    en_de_layers: int = 5      # encoder (and decoder) levels, each halving time and mel
    inter_layers: int = 4      # intermediate blocks at the bottom of the U-Net
    en_out_channels: int = 16  # channels of the first level (doubled per level)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RMVPEConfig.{f.name} = {v!r}: expected a positive integer")
        # RVC pads to 32 frames and the mel axis (128) is halved per level, so at most 5.
        if self.en_de_layers > 5:
            raise ValueError(f"RMVPEConfig.en_de_layers = {self.en_de_layers}: at most 5 "
                             f"(RVC pads the frames to a multiple of 32 = 2**5)")

    def channels(self, level: int) -> int:
        return self.en_out_channels * 2 ** level


# ------------------------------------------------------------------ mel front end


def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` float32: triangles on the HTK mel scale, each scaled to
    unit area in Hz (``2 / bandwidth``), as librosa's ``filters.mel(htk=True)`` (its default
    ``norm="slaney"``) that RVC's ``MelSpectrogram`` uses. Computed in float64."""
    bins = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(fmin), _hz_to_mel_htk(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lo) / (mid - lo)
    falling = (hi - bins[None, :]) / (hi - mid)
    tri = np.maximum(0.0, np.minimum(rising, falling))
    return (tri * (2.0 / (hi - lo))).astype(np.float32)


def hann_window(n: int = N_FFT) -> np.ndarray:
    """Periodic Hann window (``torch.hann_window(n)``), float32."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def n_frames(n_samples: int) -> int:
    """RVC's frame count for ``n_samples`` at 16 kHz: ``1 + N // 160`` (centred STFT)."""
    return 1 + int(n_samples) // HOP


def padded_frames(frames: int) -> int:
    """``frames`` rounded up to a multiple of 32 (what ``mel2hidden`` feeds the network)."""
    return FRAME_MULTIPLE * (-(-int(frames) // FRAME_MULTIPLE))


def center_pad(wav: np.ndarray) -> np.ndarray:
    """The clip as ``torch.stft(center=True)`` sees it: reflected by ``n_fft // 2`` on each
    side (numpy repeats the reflection for clips shorter than that, where torch would refuse)."""
    wav = np.asarray(wav, np.float32)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"expected a non-empty mono waveform (N,), got shape {wav.shape}")
    if wav.size == 1:
        return np.full(wav.size + N_FFT, wav[0], np.float32)
    return np.pad(wav, N_FFT // 2, mode="reflect")


def log_mel(padded: jax.Array, frames: int, basis: jax.Array, window: jax.Array) -> jax.Array:
    """``[B, frames, 128]`` log-mel of ``padded`` ``[B, ≥ (frames-1)·160 + 1024]`` (already
    :func:`center_pad`-ed), in float32. ``basis`` is :func:`mel_filterbank`, ``window``
    :func:`hann_window`."""
    padded = jnp.asarray(padded, jnp.float32)
    idx = jnp.arange(frames)[:, None] * HOP + jnp.arange(N_FFT)[None, :]
    spec = jnp.fft.rfft(padded[:, idx] * window, axis=-1)
    mag = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2)
    mel = jnp.einsum("btf,mf->btm", mag, basis, precision=lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(mel, LOG_CLAMP))


# ------------------------------------------------------------------ layers

_DN = ("NHWC", "HWIO", "NHWC")


def _time_mask(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """``x`` ``[B, T, F, C]`` with frames ``t >= valid[b]`` set to 0 (see the module docstring)."""
    if valid is None:
        return x
    keep = jnp.arange(x.shape[1])[None, :] < valid[:, None]
    return jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))


class ReLU(nnx.Module):
    """Parameter-free placeholder, so list indices (paths) are torch's ``Sequential`` ones."""

    def __call__(self, x):
        return jax.nn.relu(x)


class Conv2d(nnx.Module):
    """``torch.nn.Conv2d`` with stride 1 and 'same' padding; kernel ``[kh, kw, in, out]``
    (torch ``weight [out, in, kh, kw]``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, use_bias: bool = True,
                 dtype=None, param_dtype=jnp.float32, kernel_init=None, bias_init=None, rngs: nnx.Rngs):
        self.kernel_size, self.dtype = kernel_size, dtype
        kernel_init = kernel_init or initializers.fan_in_uniform()
        bias_init = bias_init or initializers.uniform(1.0 / math.sqrt(in_channels * kernel_size ** 2))
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,), param_dtype)) if use_bias else nnx.data(None)

    def apply(self, x, kernel, bias):
        k, pad = self.kernel_size, self.kernel_size // 2
        b, h, w, c = x.shape
        if k > 1 and b * h * w <= k * k * kernel.shape[-1]:
            # The kernel outweighs the input (the U-Net's bottom, a few frames x 4 mel bins x
            # 512 channels): XLA's CPU convolution is pathological there (a 2x4 grid took
            # 11x longer than a 3x4 one: ~0.96 s per clip of <= 64 frames). The same sums as
            # one matmul over the k*k shifted copies of the (tiny) input.
            xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            patches = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=-1)
            y = patches @ kernel.reshape(k * k * c, kernel.shape[-1])
        else:
            y = lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DN)
        return y if bias is None else y + bias

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        return self.apply(x, kernel, bias)


class ConvTranspose2d(nnx.Module):
    """``torch.nn.ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1, bias=False)``:
    doubles both spatial axes. Kernel ``[3, 3, in, out]`` (torch ``weight [in, out, 3, 3]``).

    Computed polyphase: output row ``2m`` takes tap 1 at input row ``m``; row ``2m+1`` takes
    tap 2 at ``m`` and tap 0 at ``m+1`` (likewise along the columns). So one 2×2 conv of
    the input (zero row/column appended) with ``4·out`` channels, one block per phase,
    then an interleave — no multiplications by the zeros of a dilated input."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype=None, param_dtype=jnp.float32,
                 kernel_init=None, rngs: nnx.Rngs):
        self.dtype = dtype
        # torch's fan-in of a transposed conv is weight.size(1)·k·k = out·9
        kernel_init = kernel_init or initializers.fan_in_uniform(in_axis=-1, out_axis=-2)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (3, 3, in_channels, out_channels), param_dtype))

    @staticmethod
    def polyphase_kernel(kernel: jax.Array) -> jax.Array:
        """``[3, 3, in, out]`` → ``[2, 2, in, 4·out]``: tap (d_h, d_w) of phase (a, b)."""
        taps = {(0, 0): 1, (1, 0): 2, (1, 1): 0}  # (phase, offset) -> kernel index; (0, 1) unused
        zero = jnp.zeros_like(kernel[0, 0])
        rows = []
        for dh in (0, 1):
            cols = []
            for dw in (0, 1):
                blocks = []
                for a in (0, 1):
                    for b in (0, 1):
                        kh, kw = taps.get((a, dh)), taps.get((b, dw))
                        blocks.append(zero if kh is None or kw is None else kernel[kh, kw])
                cols.append(jnp.concatenate(blocks, axis=-1))
            rows.append(jnp.stack(cols))
        return jnp.stack(rows)

    def apply(self, x, kernel):
        return self.apply_polyphase(x, self.polyphase_kernel(kernel))

    @staticmethod
    def apply_polyphase(x, pkernel):
        b, h, w, _ = x.shape
        y = lax.conv_general_dilated(x, pkernel, (1, 1), ((0, 1), (0, 1)), dimension_numbers=_DN)
        out = pkernel.shape[-1] // 4
        y = y.reshape(b, h, w, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(b, 2 * h, 2 * w, out)

    def __call__(self, x):
        x, kernel = promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        return self.apply(x, kernel)


def BatchNorm(channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """``torch.nn.BatchNorm2d(channels)`` in inference mode (running statistics, eps 1e-5)."""
    return nnx.BatchNorm(channels, use_running_average=True, epsilon=BN_EPS, momentum=0.99,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)


_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _bn_affine(bn: nnx.BatchNorm):
    """(scale, shift) of an inference-mode batch norm: ``y = x·scale + shift``."""
    s = bn.scale[...] * lax.rsqrt(bn.var[...] + bn.epsilon)
    return s, bn.bias[...] - bn.mean[...] * s


def _conv_bn(conv: Conv2d | ConvTranspose2d, bn: nnx.BatchNorm, x, dtype):
    """conv then batch norm, with the norm folded into the kernel (the conv has no bias).
    In a model made by :func:`fold_batch_norm` the folding is already done."""
    if getattr(bn, "prefolded", False):
        x, kernel, t = promote_dtype((x, conv.kernel[...], bn.bias[...]), dtype=dtype)
        if isinstance(conv, ConvTranspose2d):
            return conv.apply_polyphase(x, kernel) + t
        return conv.apply(x, kernel, t)
    s, t = _bn_affine(bn)
    x, kernel, t = promote_dtype((x, conv.kernel[...] * s, t), dtype=dtype)
    if isinstance(conv, ConvTranspose2d):
        return conv.apply(x, kernel) + t
    return conv.apply(x, kernel, t)


class ConvBlockRes(nnx.Module):
    """(conv3×3 → BN → ReLU) ×2 plus a residual (a 1×1 conv with bias when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.conv = nnx.List([
            Conv2d(in_channels, out_channels, 3, use_bias=False, **kw), BatchNorm(out_channels, **kw), ReLU(),
            Conv2d(out_channels, out_channels, 3, use_bias=False, **kw), BatchNorm(out_channels, **kw), ReLU(),
        ])
        self.shortcut = Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else nnx.data(None)

    def __call__(self, x, valid=None):
        c = self.conv
        h = jax.nn.relu(_conv_bn(c[0], c[1], _time_mask(x, valid), self.dtype))
        h = jax.nn.relu(_conv_bn(c[3], c[4], _time_mask(h, valid), self.dtype))
        return h + (x if self.shortcut is None else self.shortcut(x))


class ResBlocks(nnx.Module):
    """``n_blocks`` :class:`ConvBlockRes`, then (encoder levels) a 2×2 average pool."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, pool: bool, *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pool = pool
        self.conv = nnx.List([ConvBlockRes(in_channels if i == 0 else out_channels, out_channels, **kw)
                              for i in range(n_blocks)])

    def __call__(self, x, valid=None):
        for block in self.conv:
            x = block(x, valid)
        if not self.pool:
            return x
        b, t, f, c = x.shape
        return x, x.reshape(b, t // 2, 2, f // 2, 2, c).mean(axis=(2, 4))


class Encoder(nnx.Module):
    def __init__(self, cfg: RMVPEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(1, **kw)
        self.layers = nnx.List([ResBlocks(1 if i == 0 else cfg.channels(i - 1), cfg.channels(i), cfg.n_blocks,
                                          True, **kw) for i in range(cfg.en_de_layers)])

    def __call__(self, x, valid=None):
        s, t = _bn_affine(self.bn)
        x = x * s + t
        skips = []
        for i, layer in enumerate(self.layers):
            skip, x = layer(x, _halve(valid, i))
            skips.append(skip)
        return x, skips


class Intermediate(nnx.Module):
    def __init__(self, cfg: RMVPEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c_in, c = cfg.channels(cfg.en_de_layers - 1), cfg.channels(cfg.en_de_layers)
        self.layers = nnx.List([ResBlocks(c_in if i == 0 else c, c, cfg.n_blocks, False, **kw)
                                for i in range(cfg.inter_layers)])

    def __call__(self, x, valid=None):
        for layer in self.layers:
            x = layer(x, valid)
        return x


class ResDecoderBlock(nnx.Module):
    """Transposed conv (×2 up) → BN → ReLU, concatenation with the skip, ConvBlockRes × n."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.conv1 = nnx.List([ConvTranspose2d(in_channels, out_channels, **kw), BatchNorm(out_channels, **kw),
                               ReLU()])
        self.conv2 = nnx.List([ConvBlockRes(2 * out_channels if i == 0 else out_channels, out_channels, **kw)
                               for i in range(n_blocks)])

    def __call__(self, x, skip, valid_in=None, valid_out=None):
        x = jax.nn.relu(_conv_bn(self.conv1[0], self.conv1[1], _time_mask(x, valid_in), self.dtype))
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        for block in self.conv2:
            x = block(x, valid_out)
        return x


class Decoder(nnx.Module):
    def __init__(self, cfg: RMVPEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n = cfg.en_de_layers
        self.layers = nnx.List([ResDecoderBlock(cfg.channels(n - i), cfg.channels(n - i - 1), cfg.n_blocks, **kw)
                                for i in range(n)])

    def __call__(self, x, skips, valid=None):
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x, skips[-1 - i], _halve(valid, n - i), _halve(valid, n - i - 1))
        return x


class DeepUnet(nnx.Module):
    def __init__(self, cfg: RMVPEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(cfg, **kw)
        self.intermediate = Intermediate(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)

    def __call__(self, x, valid=None):
        x, skips = self.encoder(x, valid)
        x = self.intermediate(x, _halve(valid, len(skips)))
        return self.decoder(x, skips, valid)


def _halve(valid, times: int):
    return None if valid is None else valid // (2 ** times)


class GRU(nnx.Module):
    """One bidirectional ``torch.nn.GRU`` layer (batch-first), parameters in torch's names and
    layouts (``weight_ih_l0 [3H, in]``, gate rows r, z, n; ``*_reverse`` backward).

    ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + b_iz + W_hz h + b_hz)``,
    ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``, ``h' = (1 − z) ⊙ n + z ⊙ h``.
    Both directions run in one :func:`jax.lax.scan` over time (input projections for all
    frames up front, one batched recurrent matmul per step)."""

    _NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")

    def __init__(self, input_size: int, hidden_size: int, *, dtype=None, param_dtype=jnp.float32,
                 init=None, rngs: nnx.Rngs):
        self.hidden_size, self.dtype = hidden_size, dtype
        init = init or initializers.uniform(1.0 / math.sqrt(hidden_size))  # torch's GRU init
        h3 = 3 * hidden_size
        shapes = {"weight_ih_l0": (h3, input_size), "weight_hh_l0": (h3, hidden_size),
                  "bias_ih_l0": (h3,), "bias_hh_l0": (h3,)}
        for suffix in ("", "_reverse"):
            for name, shape in shapes.items():
                setattr(self, name + suffix, nnx.Param(init(rngs.params(), shape, param_dtype)))

    def _stacked(self, name):
        return jnp.stack([getattr(self, name)[...], getattr(self, name + "_reverse")[...]])

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """``x [B, T, in]`` → ``[B, T, 2·H]`` (forward, backward). With ``valid`` the backward
        direction of clip b starts (zero state) at its frame ``valid[b] - 1``."""
        w_ih, w_hh, b_ih, b_hh = (self._stacked(n) for n in self._NAMES)
        x, w_ih, w_hh, b_ih, b_hh = promote_dtype((x, w_ih, w_hh, b_ih, b_hh), dtype=self.dtype)
        hd = self.hidden_size
        t_len = x.shape[1]
        gi = jnp.einsum("bti,dgi->dtbg", x, w_ih) + b_ih[:, None, None, :]   # [2, T, B, 3H]
        gi = jnp.stack([gi[0], gi[1, ::-1]])                                  # backward runs reversed
        steps = jnp.arange(t_len)
        if valid is None:
            keep = jnp.ones((t_len, 2, x.shape[0], 1), bool)
        else:
            # step s of the backward pass is frame T-1-s: hold the zero state past the clip
            back = (t_len - 1 - steps)[:, None] < valid[None, :]
            keep = jnp.stack([jnp.ones_like(back), back], axis=1)[..., None]  # [T, 2, B, 1]

        def step(h, inputs):
            g, k = inputs
            gh = jnp.einsum("dbh,dgh->dbg", h, w_hh) + b_hh[:, None, :]
            r = jax.nn.sigmoid(g[..., :hd] + gh[..., :hd])
            z = jax.nn.sigmoid(g[..., hd:2 * hd] + gh[..., hd:2 * hd])
            n = jnp.tanh(g[..., 2 * hd:] + r * gh[..., 2 * hd:])
            h = jnp.where(k, (1 - z) * n + z * h, jnp.zeros((), h.dtype))
            return h, h

        h0 = jnp.zeros((2, x.shape[0], hd), x.dtype)
        _, hs = lax.scan(step, h0, (gi.transpose(1, 0, 2, 3), keep), unroll=4)  # [T, 2, B, H]
        fwd, bwd = hs[:, 0], hs[::-1, 1]
        return jnp.concatenate([fwd, bwd], axis=-1).transpose(1, 0, 2)


class BiGRU(nnx.Module):
    def __init__(self, input_size: int, hidden_size: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.gru = GRU(input_size, hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, valid=None):
        return self.gru(x, valid)


class RMVPE(nnx.Module):
    """RVC's ``E2E``: log-mel ``[B, T, 128]`` (T a multiple of ``2**en_de_layers``) →
    salience ``[B, T, 360]`` in (0, 1). ``valid [B]`` (optional): each clip's own padded
    length in frames (see the module docstring)."""

    def __init__(self, config: RMVPEConfig = RMVPEConfig(), *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config, self.dtype = config, dtype
        self.unet = DeepUnet(config, **kw)
        self.cnn = Conv2d(config.en_out_channels, 3, 3, **kw)
        self.fc = nnx.List([BiGRU(3 * N_MELS, GRU_HIDDEN, **kw), Dense(2 * GRU_HIDDEN, N_BINS, **kw)])

    def __call__(self, mel: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        b, t, f = mel.shape
        if f != N_MELS or t % (2 ** self.config.en_de_layers):
            raise ValueError(f"RMVPE expects log-mel [B, T, {N_MELS}] with T a multiple of "
                             f"{2 ** self.config.en_de_layers}, got {mel.shape}")
        x = self.unet(mel[..., None], valid)
        x = self.cnn(_time_mask(x, valid))                        # [B, T, 128, 3]
        x = x.transpose(0, 1, 3, 2).reshape(b, t, 3 * N_MELS)     # feature = channel·128 + mel
        x = self.fc[0](x, valid)
        return jax.nn.sigmoid(self.fc[1](x)).astype(jnp.float32)  # dropout: identity at inference


def _conv_bn_pairs(model: nnx.Module):
    for _, mod in nnx.iter_modules(model):
        if isinstance(mod, ConvBlockRes):
            yield mod.conv[0], mod.conv[1]
            yield mod.conv[3], mod.conv[4]
        elif isinstance(mod, ResDecoderBlock):
            yield mod.conv1[0], mod.conv1[1]


@jax.jit
def _fold_arrays(kernel, scale, bias, mean, var):
    s = scale * lax.rsqrt(var + BN_EPS)
    return kernel * s, bias - mean * s


def fold_batch_norm(model: RMVPE) -> RMVPE:
    """A copy of ``model`` for inference with every conv → batch norm pair folded once:
    the conv kernel holds ``kernel·scale`` (a transposed conv its polyphase kernel), the
    norm's ``bias`` the shift, and the norm is marked ``prefolded`` (its other statistics
    are then unused). ``model`` is not changed; unfolded arrays are shared, not copied.
    :class:`RMVPEPitch` runs on such a copy: folding at every call costs a pass over each
    kernel, which on a CPU is a fifth of the U-Net's time at 512 channels."""
    graphdef, state = nnx.split(model)
    folded = nnx.merge(graphdef, state)  # new Variables over the same arrays
    for conv, bn in _conv_bn_pairs(folded):
        kernel, shift = _fold_arrays(conv.kernel[...], bn.scale[...], bn.bias[...], bn.mean[...], bn.var[...])
        if isinstance(conv, ConvTranspose2d):
            kernel = jax.jit(ConvTranspose2d.polyphase_kernel)(kernel)
        conv.kernel = nnx.Param(kernel)
        bn.bias = nnx.Param(shift)
        bn.prefolded = True
    return folded


# ------------------------------------------------------------------ torch key map


def _same(w):
    return w


# (flax leaf, torch -> flax, flax -> torch) per torch parameter name of each layer kind
_CONV_NAMES = {"weight": ("kernel", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
               "bias": ("bias", _same, _same)}
# ConvTranspose2d weight [in, out, kh, kw] <-> kernel [kh, kw, in, out] (the same permutation both ways)
_CONVT_NAMES = {"weight": ("kernel", lambda w: w.transpose(2, 3, 0, 1), lambda k: k.transpose(2, 3, 0, 1))}
_BN_LAYOUT = {tn: (fn, _same, _same) for tn, fn in _BN_NAMES.items()}
_DENSE_NAMES = {"weight": ("kernel", lambda w: w.T, lambda k: k.T), "bias": ("bias", _same, _same)}
_GRU_NAMES = {n + sfx: (n + sfx, _same, _same) for n in GRU._NAMES for sfx in ("", "_reverse")}


def torch_layout(model: RMVPE) -> dict[str, tuple[str, Callable, Callable]]:
    """``flax path -> (torch state_dict key, torch value -> flax value, flax -> torch)`` for
    every variable of ``model`` (parameters and batch-norm statistics). The torch
    ``num_batches_tracked`` counters have no counterpart (they only matter for training)."""
    out = {}
    for path, mod in nnx.iter_modules(model):
        names = (_CONVT_NAMES if isinstance(mod, ConvTranspose2d) else
                 {k: v for k, v in _CONV_NAMES.items() if k != "bias" or mod.bias is not None}
                 if isinstance(mod, Conv2d) else
                 _BN_LAYOUT if isinstance(mod, nnx.BatchNorm) else
                 _GRU_NAMES if isinstance(mod, GRU) else
                 _DENSE_NAMES if isinstance(mod, Dense) else {})
        for tname, (leaf, to_flax, to_torch) in names.items():
            fpath = "/".join([*(str(p) for p in path), leaf])
            out[fpath] = (".".join([*(str(p) for p in path), tname]), to_flax, to_torch)
    return out


# ------------------------------------------------------------------ decoding

_CENTS = np.pad(20.0 * np.arange(N_BINS) + CENTS_OFFSET, (4, 4))  # zero cents outside, as RVC


def to_local_average_cents(salience: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``[T, 360]`` salience → ``[T]`` cents (float64): the salience-weighted mean of the cents
    of bins ``c-4 … c+4`` around the peak ``c``, bins outside 0…359 having weight 0; frames
    whose peak salience is ≤ ``threshold`` get 0."""
    s = np.asarray(salience)
    if s.ndim != 2 or s.shape[1] != N_BINS:
        raise ValueError(f"salience must be [frames, {N_BINS}], got {s.shape}")
    center = np.argmax(s, axis=1)
    padded = np.pad(s, ((0, 0), (4, 4)))
    window = center[:, None] + np.arange(9)[None, :]        # padded indices c-4+4 … c+4+4
    w = np.take_along_axis(padded, window, axis=1)
    # as RVC: products in float64 (the cents table's dtype), the weight sum in the salience's
    # own dtype (float32 from the network), so the result is RVC's to the last bit
    cents = np.sum(w * _CENTS[window], axis=1) / np.sum(w, axis=1)
    cents[np.max(s, axis=1) <= threshold] = 0.0
    return cents


def cents_to_hz(cents: np.ndarray) -> np.ndarray:
    """``10·2^(cents/1200)``, with 0 cents (unvoiced) → 0 Hz, as RVC's ``decode``."""
    f0 = 10.0 * 2.0 ** (np.asarray(cents, np.float64) / 1200.0)
    f0[f0 == 10.0] = 0.0
    return f0


# ------------------------------------------------------------------ pitch tracker


def bucket_frames(frames: int) -> int:
    """The compiled length (frames) for a clip of ``frames``: its multiple of 32, rounded up
    to ``32·m·2^e`` with m ∈ {4,…,7} (≤ 25 % extra work), exact below 8·32 frames."""
    k = padded_frames(frames) // FRAME_MULTIPLE
    if k <= 8:
        return FRAME_MULTIPLE * k
    e = k.bit_length() - 3
    m = -(-k // 2 ** e)
    return FRAME_MULTIPLE * m * 2 ** e


class RMVPEPitch:
    """RVC's ``RMVPE.infer_from_audio(wav16k, thred=threshold)`` on an :class:`RMVPE`.

    ``__call__(wav16k)`` → f0 in Hz, float32 ``(1 + N // 160,)`` at 100 frames/s, 0 where
    unvoiced; :meth:`batch` does many clips in bucketed batches; :meth:`salience` returns
    the network's output before decoding. One program is compiled per (batch, bucket)
    shape (:func:`bucket_frames`)."""

    def __init__(self, model: RMVPE, threshold: float = DEFAULT_THRESHOLD, *, batch_size: int = 8):
        self.model, self.threshold, self.batch_size = model, float(threshold), int(batch_size)
        self._basis = jnp.asarray(mel_filterbank())
        self._window = jnp.asarray(hann_window())
        graphdef, state = nnx.split(fold_batch_norm(model))

        def run(state, padded, frames_valid, net_valid, *, frames):
            m = nnx.merge(graphdef, state)
            mel = log_mel(padded, frames, self._basis, self._window)
            # mel2hidden's constant padding: log-mel 0 past each clip's last frame
            keep = jnp.arange(frames)[None, :, None] < frames_valid[:, None, None]
            return m(jnp.where(keep, mel, 0.0), net_valid)

        self._state = state
        self._run = jax.jit(run, static_argnames=("frames",))

    def _salience_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        frames = [n_frames(len(w)) for w in wavs]
        tb = max(bucket_frames(f) for f in frames)
        # room for every padded clip (N + 1024 < tb·160 + 1024); framing reads the first
        # (tb - 1)·160 + 1024 samples
        length = tb * HOP + N_FFT
        # the batch axis is bucketed too (powers of two): a short last batch reuses a program;
        # the filler rows have valid length 0, so they are all masked
        rows = 1 << (len(wavs) - 1).bit_length()
        padded = np.zeros((rows, length), np.float32)
        for i, w in enumerate(wavs):
            p = center_pad(w)
            padded[i, :p.size] = p
        fv = np.zeros(rows, np.int32)
        fv[:len(wavs)] = frames
        nv = np.zeros(rows, np.int32)
        nv[:len(wavs)] = [padded_frames(f) for f in frames]
        sal = np.asarray(self._run(self._state, padded, fv, nv, frames=tb))
        return [sal[i, :f] for i, f in enumerate(frames)]

    def salience(self, wav16k: np.ndarray) -> np.ndarray:
        """``[1 + N // 160, 360]`` float32: the network's output for one clip."""
        return self._salience_batch([np.asarray(wav16k, np.float32)])[0]

    def decode(self, salience: np.ndarray) -> np.ndarray:
        return cents_to_hz(to_local_average_cents(salience, self.threshold)).astype(np.float32)

    def __call__(self, wav16k: np.ndarray) -> np.ndarray:
        return self.decode(self.salience(wav16k))

    def batch_salience(self, wavs: Sequence[np.ndarray], *, batch_size: int | None = None,
                       progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """The salience of every clip, in input order. Clips of similar length share a batch
        (sorted by length, ``batch_size`` at a time); ``progress(n)`` is called after each
        batch with the number of clips it held."""
        bs = int(batch_size or self.batch_size)
        wavs = [np.asarray(w, np.float32) for w in wavs]
        order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
        out: list[np.ndarray | None] = [None] * len(wavs)
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            for i, s in zip(idx, self._salience_batch([wavs[i] for i in idx])):
                out[i] = s
            if progress is not None:
                progress(len(idx))
        return out

    def batch(self, wavs: Sequence[np.ndarray], *, batch_size: int | None = None,
              progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """f0 of every clip (as :meth:`__call__`), in input order; batched as :meth:`batch_salience`."""
        return [self.decode(s) for s in self.batch_salience(wavs, batch_size=batch_size, progress=progress)]


__all__ = ["RMVPE", "RMVPEConfig", "RMVPEPitch", "OFFICIAL_SHA256", "mel_filterbank", "hann_window", "log_mel",
           "n_frames", "padded_frames", "bucket_frames", "center_pad", "to_local_average_cents", "cents_to_hz",
           "torch_layout", "fold_batch_norm", "DEFAULT_THRESHOLD"]
