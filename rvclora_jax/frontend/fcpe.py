"""FCPE (torchfcpe's ``CFNaiveMelPE``) in JAX: log-mel front end, network, cents decoder.

FCPE ("fast context-based pitch estimation") is the pitch tracker behind RVC's and
Applio's ``fcpe`` f0 method. This is a port of what ``torchfcpe==0.0.4`` runs for its
bundled ``fcpe_c_v001.pt`` checkpoint (``spawn_bundled_infer_model().infer(...)``):

1. **Mel** (torchfcpe's ``Wav2MelModule``): the 16 kHz signal is padded by
   ``(win − hop)//2`` on the left and at least as much on the right (reflect, or zeros
   when the clip is too short to reflect), framed without centring, Hann-windowed,
   magnitude ``√(re² + im² + 1e-9)``, a Slaney mel bank (fmin 0, fmax 8 kHz) and
   ``log(max(·, 1e-5))``. A clip of N samples gives ``N//hop + 1`` frames: the STFT
   yields one fewer, so the last frame is repeated.
2. **Network** (``CFNaiveMelPE`` with ``conv_only``): input stack Conv1d(k3) →
   GroupNorm(4) → LeakyReLU → Conv1d(k3); six residual conformer convolution modules
   (LayerNorm → 1×1 conv to 4·hidden → GLU → depthwise conv k31 → SiLU → 1×1 conv);
   LayerNorm; weight-normed Linear to 360 bins; sigmoid. The result is the *salience*
   (``latent``) over 360 bins of a cent table from 32.7 to 1975.5 Hz.
3. **Decoder**: ``local_argmax`` (torchfcpe's default and what RVC/Applio call) takes the
   salience-weighted mean cents over the 9 bins around the peak (indices clamped at the
   table's ends); ``argmax`` the weighted mean over all bins. Frames whose peak salience
   is ``<= threshold`` are unvoiced (f0 = 0). ``f0 = 10·2^(cents/1200)``.

Layout is channels-last (``[B, T, C]``); parameter paths are torchfcpe's state-dict keys
(``net.encoder_layers.0.conformer.net.4.conv`` ⇒ ``net/encoder_layers/0/conformer/net/4/conv``);
the parameter-free slots of torch's ``nn.Sequential`` (activations, transposes) are kept
as empty modules so the list indices match.

Life cycle::

    model = rvclora_convert.fcpe.load_fcpe("fcpe_c_v001.pt")   # read in numpy (no torch)
    pitch = FCPEPitch(model)                                     # RVC's settings: local_argmax, 0.006
    f0 = pitch(wav16k)                                           # (N//160 + 1,) Hz, 0 = unvoiced
    f0s = pitch.batch([wav_a, wav_b, ...])                      # bucketed, jit-compiled per bucket

Batches are exact: each clip is padded and framed on its own, frames beyond a clip's end
are zeroed before every convolution and left out of the GroupNorm statistics, so a clip's
result does not depend on what it is batched with (the input GroupNorm normalises over
the whole clip, so plain zero padding would change it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from flax.typing import Dtype

from rvclora_jax import initializers
from rvclora_jax.layers import Conv1d, Dense

DECODERS = ("local_argmax", "argmax")
RVC_THRESHOLD = 0.006  # RVC (rtrvc.py) and Applio (predictors/f0.py) both pass 0.006
LOCAL_WINDOW = 9       # bins averaged around the peak by the local_argmax decoder


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class FCPEConfig:
    """torchfcpe's ``config_dict`` (``mel`` and ``model`` sections) as one hashable record.
    The defaults are those of the bundled ``fcpe_c_v001.pt``."""

    sr: int = 16000
    n_mels: int = 128
    n_fft: int = 1024
    win_size: int = 1024
    hop_size: int = 160
    fmin: float = 0.0
    fmax: float = 8000.0
    out_dims: int = 360
    hidden_dims: int = 512
    n_layers: int = 6
    f0_min: float = 32.7
    f0_max: float = 1975.5
    kernel_size: int = 31          # ConformerConvModule's depthwise kernel (fixed in torchfcpe)
    expansion_factor: int = 2      # ConformerConvModule's inner width = 2·hidden (fixed)
    groups: int = 4                # the input stack's GroupNorm (fixed)
    clip_val: float = 1e-5         # log floor of the mel (fixed)

    @property
    def inner_dims(self) -> int:
        return self.hidden_dims * self.expansion_factor

    def n_frames(self, n_samples: int) -> int:
        """Frames torchfcpe returns for a clip of ``n_samples``: ``N//hop + 1``."""
        return int(n_samples) // self.hop_size + 1


def cent_table(config: FCPEConfig) -> np.ndarray:
    """The bins' cents, ``linspace(cent(f0_min), cent(f0_max), out_dims)``, cent(f) =
    1200·log2(f/10). A checkpoint stores its own (``cent_table``); the loader uses that."""
    lo, hi = (1200.0 * math.log2(f / 10.0) for f in (config.f0_min, config.f0_max))
    return np.linspace(lo, hi, config.out_dims).astype(np.float32)


# --------------------------------------------------------------------------- mel front end


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale: linear below 1 kHz, logarithmic above.
    f = np.asarray(f, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters ``[n_mels, n_fft//2 + 1]`` float32:
    the bank ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`` gives (htk=False,
    norm="slaney"), which torchfcpe uses. Rounded to float32 in the same two steps as
    librosa (the triangle, then the normalisation), so the values agree bit for bit."""
    freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights = (weights.astype(np.float64) * enorm[:, None]).astype(np.float32)
    weights.setflags(write=False)
    return weights


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (``torch.hann_window`` default), float32."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def pad_for_mel(wav: np.ndarray, config: FCPEConfig) -> np.ndarray:
    """The clip as torchfcpe frames it: ``(win − hop)//2`` samples on the left and
    ``max((win − hop + 1)//2, win − N − left)`` on the right, mirrored (reflect, edge not
    repeated) when the right pad is shorter than the clip, zeros otherwise."""
    wav = np.asarray(wav, np.float32).reshape(-1)
    left = (config.win_size - config.hop_size) // 2
    right = max((config.win_size - config.hop_size + 1) // 2, config.win_size - wav.size - left)
    mode = "reflect" if right < wav.size else "constant"
    return np.pad(wav, (left, right), mode=mode)


def stft_frames(n_padded: int, config: FCPEConfig) -> int:
    """Frames of the uncentred STFT of a padded clip of ``n_padded`` samples."""
    return (n_padded - config.n_fft) // config.hop_size + 1


def log_mel(signal: jax.Array, n_frames: int, config: FCPEConfig, *, basis: jax.Array | None = None,
            window: jax.Array | None = None) -> jax.Array:
    """``[B, L]`` padded signals → ``[B, n_frames, n_mels]`` log-mel frames; frame ``t``
    covers samples ``[t·hop, t·hop + n_fft)`` (the signal must hold them all)."""
    if config.win_size != config.n_fft:
        raise ValueError(f"FCPE mel: win_size {config.win_size} != n_fft {config.n_fft} is not supported")
    if basis is None:
        basis = jnp.asarray(mel_filterbank(config.sr, config.n_fft, config.n_mels, config.fmin, config.fmax))
    if window is None:
        window = jnp.asarray(hann_window(config.win_size))
    idx = np.arange(n_frames)[:, None] * config.hop_size + np.arange(config.n_fft)[None, :]
    frames = signal.astype(jnp.float32)[:, idx] * window                     # [B, T, n_fft]
    spec = jnp.fft.rfft(frames, axis=-1)
    mag = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + 1e-9)        # [B, T, n_fft/2+1]
    mel = jnp.einsum("btf,mf->btm", mag, basis, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(mel, config.clip_val))


# --------------------------------------------------------------------------- layers


class Buffer(nnx.Variable):
    """A constant the checkpoint stores next to the weights (the cent table): state of the
    model, never a trainable parameter."""


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm`` over the last axis (params ``weight``/``bias`` as in torch);
    statistics in at least float32."""

    def __init__(self, features: int, eps: float = 1e-5, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init (ones / zeros), as in torch
        self.features, self.eps, self.dtype = features, eps, dtype
        self.weight = nnx.Param(initializers.ones(None, (features,), param_dtype))
        self.bias = nnx.Param(initializers.zeros(None, (features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w, b = promote_dtype((x, self.weight[...], self.bias[...]), dtype=self.dtype)
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xs, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)
        return ((xs - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * w + b


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm`` on ``[B, T, C]``: each group of channels is normalised over
    the group's channels *and all frames*. ``mask [B, T]`` (True = frame of the clip)
    leaves padding frames out of the statistics, so a padded clip normalises as if alone."""

    def __init__(self, num_groups: int, channels: int, eps: float = 1e-5, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels not divisible into {num_groups} groups")
        self.num_groups, self.channels, self.eps, self.dtype = num_groups, channels, eps, dtype
        self.weight = nnx.Param(initializers.ones(None, (channels,), param_dtype))
        self.bias = nnx.Param(initializers.zeros(None, (channels,), param_dtype))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x, w, b = promote_dtype((x, self.weight[...], self.bias[...]), dtype=self.dtype)
        bsz, t, c = x.shape
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(bsz, t, self.num_groups, c // self.num_groups)
        m = jnp.ones((bsz, t), bool) if mask is None else mask.astype(bool)
        m = m[:, :, None, None]
        count = jnp.maximum(jnp.sum(m, axis=(1, 3), keepdims=True) * (c // self.num_groups), 1).astype(xs.dtype)
        # jnp.where, not a multiply by a float mask: XLA's CPU reductions over ``xs * m``
        # with a broadcast mask are many times slower (see hubert.ChannelGroupNorm)
        mean = jnp.sum(jnp.where(m, xs, 0), axis=(1, 3), keepdims=True) / count
        var = jnp.sum(jnp.where(m, jnp.square(xs - mean), 0), axis=(1, 3), keepdims=True) / count  # biased
        y = ((xs - mean) * jax.lax.rsqrt(var + self.eps)).reshape(bsz, t, c).astype(x.dtype)
        return y * w + b


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,                                          # torch's Transpose (channels-last here)
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),              # nn.LeakyReLU() default slope
    "glu": lambda x: jax.nn.glu(x, axis=-1),                          # first half · sigmoid(second half)
    "silu": jax.nn.silu,
}


class Activation(nnx.Module):
    """A parameter-free slot of a torch ``nn.Sequential`` (so list indices stay torch's)."""

    def __init__(self, kind: str):
        if kind not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {kind!r}")
        self.kind = kind

    def __call__(self, x: jax.Array) -> jax.Array:
        return _ACTIVATIONS[self.kind](x)


def _masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    # Zero the frames beyond each clip's end: the next convolution then sees the zeros
    # torch's own padding gives at the clip's end.
    return x if mask is None else x * mask[:, :, None].astype(x.dtype)


class DepthWiseConv1d(nnx.Module):
    """torchfcpe's ``DepthWiseConv1d`` wrapper (its one child is ``conv``, a Conv1d with
    groups = channels, so its kernel is ``[K, 1, C]``).

    The weights live in a :class:`~rvclora_jax.layers.Conv1d` (its torch layout and
    loading), but the forward pass is a sum of K shifted, per-channel-scaled copies of
    the input instead of XLA's grouped convolution: the same sums, and on CPU 9× faster
    (1024 channels, K 31, 512 frames: 9 ms against 82 ms), which is most of the
    network's time otherwise."""

    def __init__(self, channels: int, kernel_size: int, padding: tuple[int, int], *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv1d(channels, channels, kernel_size, padding=padding, groups=channels, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.conv
        bias = conv.bias[...] if conv.bias is not None else None
        x, kernel, bias = promote_dtype((x, conv.kernel[...], bias), dtype=conv.dtype)
        t = x.shape[1]
        xp = jnp.pad(x, ((0, 0), tuple(conv.padding), (0, 0)))
        y = xp[:, 0:t, :] * kernel[0, 0]
        for k in range(1, conv.kernel_size):
            y = y + xp[:, k:k + t, :] * kernel[k, 0]
        return y if bias is None else y + bias


class ConformerConvModule(nnx.Module):
    """LayerNorm → 1×1 conv (hidden → 2·inner) → GLU → depthwise conv → SiLU → 1×1 conv
    (inner → hidden); ``net`` indices 0/2/4/6 carry the weights, as in torchfcpe."""

    def __init__(self, dim: int, expansion_factor: int, kernel_size: int, *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * expansion_factor
        pad = kernel_size // 2
        same = (pad, pad - (kernel_size + 1) % 2)  # torchfcpe's calc_same_padding
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List([
            LayerNorm(dim, **dt),
            Activation("identity"),
            Conv1d(dim, inner * 2, 1, **dt, rngs=rngs),
            Activation("glu"),
            DepthWiseConv1d(inner, kernel_size, same, **dt, rngs=rngs),
            Activation("silu"),
            Conv1d(inner, dim, 1, **dt, rngs=rngs),
        ])

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = self.net[3](self.net[2](self.net[0](x)))
        h = self.net[5](self.net[4](_masked(h, mask)))
        return self.net[6](h)


class CFNEncoderLayer(nnx.Module):
    """One residual conformer layer, conv-only: ``x + conformer(x)``. ``norm`` belongs to
    the attention branch, which conv-only checkpoints do not have; it is kept (the
    checkpoint stores it) but unused, as in torchfcpe."""

    def __init__(self, config: FCPEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.conformer = ConformerConvModule(config.hidden_dims, config.expansion_factor, config.kernel_size,
                                             **dt, rngs=rngs)
        self.norm = LayerNorm(config.hidden_dims, **dt)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return x + self.conformer(x, mask)


class ConformerNaiveEncoder(nnx.Module):
    def __init__(self, config: FCPEConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.encoder_layers = nnx.List([CFNEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                        for _ in range(config.n_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return x


class FCPE(nnx.Module):
    """torchfcpe's ``CFNaiveMelPE`` (conv-only): ``__call__(mel [B,T,n_mels], mask [B,T]
    or None) -> salience [B,T,out_dims]`` in (0, 1). ``config`` is the model's
    :class:`FCPEConfig` (mel settings included); ``cent_table`` the bins' cents."""

    def __init__(self, config: FCPEConfig, *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype, self.param_dtype = dtype, param_dtype
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        h = config.hidden_dims
        self.input_stack = nnx.List([
            Conv1d(config.n_mels, h, 3, padding=1, **dt, rngs=rngs),
            GroupNorm(config.groups, h, **dt),
            Activation("leaky_relu"),
            Conv1d(h, h, 3, padding=1, **dt, rngs=rngs),
        ])
        self.net = ConformerNaiveEncoder(config, **dt, rngs=rngs)
        self.norm = LayerNorm(h, **dt)
        self.output_proj = Dense(h, config.out_dims, **dt, rngs=rngs)
        self.output_proj.weight_norm = True  # torch: weight_norm(nn.Linear), one g per output row
        self.cent_table = Buffer(jnp.asarray(cent_table(config)))

    def __call__(self, mel: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = self.input_stack[0](_masked(mel, mask))
        x = self.input_stack[2](self.input_stack[1](x, mask))
        x = self.input_stack[3](_masked(x, mask))
        x = self.net(x, mask)
        x = self.output_proj(self.norm(x))
        return jax.nn.sigmoid(x)


# --------------------------------------------------------------------------- decoding


def decode(salience: jax.Array, cents: jax.Array, *, threshold: float, decoder: str = "local_argmax") -> jax.Array:
    """``[..., out_dims]`` salience → f0 in Hz ``[...]``; 0 where the peak salience is
    ``<= threshold``. ``cents`` is the model's cent table."""
    y = salience.astype(jnp.float32)
    cents = cents.astype(jnp.float32)
    peak = jnp.max(y, axis=-1)
    if decoder == "local_argmax":
        n = y.shape[-1]
        half = LOCAL_WINDOW // 2
        idx = jnp.argmax(y, axis=-1)[..., None] + jnp.arange(-half, half + 1)
        idx = jnp.clip(idx, 0, n - 1)  # edge bins repeat (torchfcpe clamps the window)
        y_l = jnp.take_along_axis(y, idx, axis=-1)
        c = jnp.sum(cents[idx] * y_l, axis=-1) / jnp.sum(y_l, axis=-1)
    elif decoder == "argmax":
        c = jnp.sum(cents * y, axis=-1) / jnp.sum(y, axis=-1)
    else:
        raise ValueError(f"unknown FCPE decoder {decoder!r}; known: {', '.join(DECODERS)}")
    f0 = 10.0 * jnp.exp2(c / 1200.0)
    return jnp.where(peak > threshold, f0, 0.0)


def nearest_resize(x: np.ndarray, length: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(mode="nearest")`` along the first axis: source
    index ``floor(i · in/out)`` with the scale in float32, as torch computes it."""
    n = x.shape[0]
    scale = np.float32(n) / np.float32(length)
    src = np.floor(np.arange(length, dtype=np.float32) * scale).astype(np.int64)
    return x[np.minimum(src, n - 1)]


def interpolate_unvoiced(f0: np.ndarray, f0_min: float) -> np.ndarray:
    """torchfcpe's ``interp_uv``: frames below ``f0_min`` linearly interpolated from the
    voiced ones (held constant beyond the first/last voiced frame)."""
    uv = f0 < f0_min
    if uv.all() or not uv.any():
        return f0
    out = f0.copy()
    out[uv] = np.interp(np.flatnonzero(uv), np.flatnonzero(~uv), f0[~uv])
    return out


# --------------------------------------------------------------------------- the pitch tracker


@functools.partial(jax.jit, static_argnames=("graphdef", "n_frames", "decoder"))
def _track(graphdef, state, signal, raw, n_out, threshold, *, n_frames: int, decoder: str):
    """One bucket: padded signals ``[B, L]`` → f0 ``[B, n_frames]`` (and mel, salience).
    ``raw`` is each clip's STFT frame count, ``n_out`` its torchfcpe frame count."""
    model = nnx.merge(graphdef, state)
    cfg = model.config
    mel = log_mel(signal, n_frames, cfg)
    t = jnp.arange(n_frames)
    # torchfcpe repeats the last STFT frame to reach N//hop + 1 frames.
    src = jnp.minimum(t[None, :], raw[:, None] - 1)
    mel = jnp.take_along_axis(mel, src[:, :, None], axis=1)
    mask = t[None, :] < n_out[:, None]
    mel = jnp.where(mask[:, :, None], mel, 0.0)
    sal = model(mel.astype(model.dtype or jnp.float32), mask)
    f0 = decode(sal, model.cent_table[...], threshold=threshold, decoder=decoder)
    return f0, mel, sal


class FCPEPitch:
    """f0 of 16 kHz clips with FCPE, as RVC's and Applio's ``fcpe`` method computes it:
    torchfcpe's ``infer(x, sr=16000, decoder_mode="local_argmax", threshold=0.006)``, with
    no f0_min/f0_max post-processing and no interpolation of unvoiced frames.

    ``__call__(wav16k (N,)) -> f0 (N//160 + 1,)`` float32 Hz at 100 fps, 0 = unvoiced;
    :meth:`batch` does many clips, bucketed by length (multiples of ``bucket`` frames,
    at most ``max_batch`` clips, batch sizes rounded up to powers of two) and compiled
    once per (batch, bucket) shape. The network's cost is in its matmuls, so padding
    frames cost as much as real ones: 64-frame buckets waste ≤ 15 % on RVC's 3.7 s
    slices and compile one program per 0.64 s of clip length. The optional ``f0_min``/``f0_max``/``interp_uv`` and
    ``target_length`` reproduce torchfcpe's other ``infer`` options (not used by RVC):
    ``interp_uv`` fills frames below ``f0_min`` (default the model's 32.7 Hz) by linear
    interpolation, ``f0_max`` clips, ``target_length`` resizes (nearest)."""

    def __init__(self, model: FCPE, threshold: float = RVC_THRESHOLD, *, decoder: str = "local_argmax",
                 f0_min: float | None = None, f0_max: float | None = None, interp_uv: bool = False,
                 bucket: int = 64, max_batch: int = 8):
        if decoder not in DECODERS:
            raise ValueError(f"unknown FCPE decoder {decoder!r}; known: {', '.join(DECODERS)}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"FCPE threshold must be a finite number, got {threshold!r}")
        if int(bucket) < 1 or int(max_batch) < 1:
            raise ValueError(f"bucket ({bucket}) and max_batch ({max_batch}) must be >= 1")
        self.model, self.config = model, model.config
        self.threshold, self.decoder = float(threshold), decoder
        self.f0_min = model.config.f0_min if f0_min is None else float(f0_min)
        self.f0_max, self.interp_uv = f0_max, interp_uv
        self.bucket, self.max_batch = int(bucket), int(max_batch)
        self._graphdef, self._state = nnx.split(model)

    def __call__(self, wav16k: np.ndarray, *, target_length: int | None = None) -> np.ndarray:
        return self.batch([wav16k], target_length=[target_length])[0]

    def batch(self, wavs: Sequence[np.ndarray], *, target_length: Sequence[int | None] | None = None,
              progress: Callable[[int], object] | None = None) -> list[np.ndarray]:
        """f0 of every clip, in input order. ``target_length`` (one entry per clip, None:
        keep N//160 + 1); ``progress(n)`` is called after each compiled batch with its
        number of clips."""
        if target_length is not None and len(target_length) != len(wavs):
            raise ValueError(f"target_length has {len(target_length)} entries for {len(wavs)} clips")
        out: list = [None] * len(wavs)
        for j, (f0, _, _) in self._run(wavs, progress=progress):
            out[j] = self._post(f0, None if target_length is None else target_length[j])
        return out

    def analyse(self, wav16k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(f0 [T], mel [T, n_mels], salience [T, out_dims])`` of one clip, T = N//160 + 1:
        the f0 before any post-processing, the network's input and its raw output
        (torchfcpe's ``wav2mel(...)`` and ``model(mel)``)."""
        return self.analyse_batch([wav16k])[0]

    def analyse_batch(self, wavs: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`analyse` of many clips, batched as :meth:`batch` does."""
        out: list = [None] * len(wavs)
        for j, triple in self._run(wavs):
            out[j] = triple
        return out

    # ------------------------------------------------------------------ internals
    def _prepare(self, wav) -> tuple[np.ndarray, int, int]:
        """(padded clip, its STFT frames, its output frames)."""
        wav = np.asarray(wav)
        if wav.ndim != 1:
            raise ValueError(f"FCPE expects a mono clip of shape (N,), got shape {wav.shape}")
        if not np.all(np.isfinite(wav)):
            raise ValueError("FCPE input contains NaN or inf samples")
        padded = pad_for_mel(wav, self.config)
        raw = stft_frames(padded.size, self.config)
        return padded, raw, min(self.config.n_frames(wav.size), raw + 1)

    def _run(self, wavs, *, progress=None):
        cfg = self.config
        prepared = [self._prepare(w) for w in wavs]
        order = sorted(range(len(prepared)), key=lambda i: prepared[i][2])
        i = 0
        while i < len(order):
            frames = -(-prepared[order[i]][2] // self.bucket) * self.bucket
            group = [j for j in order[i:i + self.max_batch] if prepared[j][2] <= frames]  # a prefix: sorted
            i += len(group)
            bsz = 1 << (len(group) - 1).bit_length()
            length = (frames - 1) * cfg.hop_size + cfg.n_fft
            signal = np.zeros((bsz, length), np.float32)
            raw = np.ones((bsz,), np.int32)
            n_out = np.zeros((bsz,), np.int32)
            for row, j in enumerate(group):
                padded, raw[row], n_out[row] = prepared[j]
                take = min(padded.size, length)
                signal[row, :take] = padded[:take]
            f0, mel, sal = _track(self._graphdef, self._state, jnp.asarray(signal), jnp.asarray(raw),
                                  jnp.asarray(n_out), jnp.float32(self.threshold), n_frames=frames,
                                  decoder=self.decoder)
            # One program per shape returns all three (the mel and salience cost little
            # next to the network), so inspecting them compiles nothing new.
            f0, mel, sal = np.asarray(f0), np.asarray(mel), np.asarray(sal, np.float32)
            for row, j in enumerate(group):
                n = int(n_out[row])
                yield j, (f0[row, :n].astype(np.float32), mel[row, :n], sal[row, :n])
            if progress is not None:
                progress(len(group))

    def _post(self, f0: np.ndarray, target_length: int | None) -> np.ndarray:
        if self.interp_uv:
            f0 = interpolate_unvoiced(f0, self.f0_min)
        if self.f0_max is not None:
            f0 = np.minimum(f0, np.float32(self.f0_max))
        if target_length is not None:
            f0 = nearest_resize(f0, int(target_length))
        return np.ascontiguousarray(f0, np.float32)


__all__ = ["FCPEConfig", "FCPE", "FCPEPitch", "DECODERS", "RVC_THRESHOLD", "cent_table", "decode",
           "log_mel", "mel_filterbank", "hann_window", "pad_for_mel", "stft_frames", "nearest_resize",
           "interpolate_unvoiced", "Buffer", "LayerNorm", "GroupNorm"]
