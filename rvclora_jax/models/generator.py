"""RVC decoders: the NSF-HiFi-GAN ``GeneratorNSF`` (f0 models) and plain ``Generator``.

One class covers both: ``nsf=True`` adds the harmonic source (``m_source``) and the
``noise_convs`` that inject it after every upsampler, exactly as RVC's two classes
differ. Inputs are ``z [B, T, C]`` (frames), ``f0 [B, T]`` in Hz and the speaker
condition ``g [B, 1, gin]``; the output is ``[B, T·upp, 1]`` audio in [-1, 1].

Every layer computes in ``dtype`` (None: inferred from inputs and params, as in flax)
except the harmonic source, which always runs in :data:`SOURCE_DTYPE` (see
:func:`sine_source`) and is cast to the compute dtype where it enters ``l_linear``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype
from jax import lax

from ..layers import Conv1d, ConvTranspose1d, Dense
from .commons import LRELU_SLOPE, leaky_relu
from .modules import ResBlock1, ResBlock2

# The harmonic source is computed in float32 whatever the model's compute dtype. In
# bfloat16 (8 significant bits) f0 itself would be off by up to 0.4 % (~7 cents) and a
# phase in [0, 2) cycles would be quantised to 1/128 cycle, i.e. a buzzing sine; the
# scan in sine_source keeps ~1e-7 cycle over whole utterances only in float32. Its output
# (a bounded excitation) is cast to the compute dtype where it enters l_linear.
SOURCE_DTYPE = jnp.float32


def sine_source(f0: jax.Array, upp: int, sr: int, noise: jax.Array, *, harmonic_num: int = 0,
                sine_amp: float = 0.1, noise_std: float = 0.003, voiced_threshold: float = 0.0,
                ) -> jax.Array:
    """RVC ``SineGen``: frame-level f0 ``[B, T]`` → sample-level ``[B, T·upp, harmonic_num+1]``.

    The phase (in cycles) of sample ``n = t·upp + k`` is
    ``Σ_{t'<t} upp·f[t'] + (k+1)·f[t]`` with ``f = (h·f0/sr) mod 1`` for harmonic ``h``
    — the closed form of RVC's cumsum-with-wrap-correction (which only subtracts
    integers). The frame offsets are accumulated modulo 1 with an associative scan, so
    the phase stays in [0, 2) and float32 keeps ~1e-7 cycle accuracy on long inputs.
    ``noise`` is the standard-normal draw (``randn_like`` in RVC), same shape as the output.
    The initial random phase of RVC (``rand_ini``) is zero for the fundamental, and RVC
    models only have the fundamental (``harmonic_num=0``). Computed and returned in
    :data:`SOURCE_DTYPE` (float32) regardless of the inputs' dtype: phase accuracy.
    """
    f0 = jax.lax.stop_gradient(jnp.asarray(f0, SOURCE_DTYPE))
    noise = jnp.asarray(noise, SOURCE_DTYPE)
    b, t = f0.shape
    harmonics = jnp.arange(1, harmonic_num + 2, dtype=SOURCE_DTYPE)
    rad = (f0[..., None] * harmonics / sr) % 1.0  # [B, T, H] cycles per sample
    inc = (rad * upp) % 1.0  # whole-frame phase advance, mod 1
    offset = lax.associative_scan(lambda a, c: (a + c) % 1.0, inc, axis=1)
    offset = jnp.concatenate([jnp.zeros_like(offset[:, :1]), offset[:, :-1]], axis=1)  # exclusive
    k = jnp.arange(1, upp + 1, dtype=SOURCE_DTYPE)[None, None, :, None]
    phase = offset[:, :, None, :] + k * rad[:, :, None, :]  # [B, T, upp, H]
    sine = sine_amp * jnp.sin(2.0 * jnp.pi * phase).reshape(b, t * upp, -1)
    uv = jnp.repeat((f0 > voiced_threshold).astype(SOURCE_DTYPE), upp, axis=1)[..., None]
    noise_amp = uv * noise_std + (1.0 - uv) * sine_amp / 3.0
    return jax.lax.stop_gradient(sine * uv + noise_amp * noise)


def noise_conv_geometry(upsample_rates: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(kernel, stride, padding)`` of each ``noise_convs`` layer of the NSF generator.

    The harmonic source runs at the output rate; after upsampler ``i`` the signal is
    ``s = prod(rates[i+1:])`` times slower, so the source is brought down by a strided
    conv (kernel ``2s``, stride ``s``, padding ``s // 2``), and by a 1x1 conv after the
    last one. The converters use the kernels to recognise a model's rate."""
    out = []
    for i in range(len(upsample_rates)):
        if i + 1 < len(upsample_rates):
            s = math.prod(upsample_rates[i + 1:])
            out.append((2 * s, s, s // 2))
        else:
            out.append((1, 1, 0))
    return out


class SourceModuleHnNSF(nnx.Module):
    """Harmonic-plus-noise source: ``tanh(l_linear(SineGen(f0)))`` → ``[B, T·upp, 1]``.

    The sines are float32 (:data:`SOURCE_DTYPE`); ``l_linear`` casts them to its compute
    dtype (``dtype``, or with ``dtype=None`` the promotion of float32 and the params)."""

    def __init__(self, sampling_rate: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshold: float = 0.0, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.sampling_rate, self.harmonic_num = int(sampling_rate), harmonic_num
        self.sine_amp, self.noise_std, self.voiced_threshold = sine_amp, add_noise_std, voiced_threshold
        self.l_linear = Dense(harmonic_num + 1, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, f0: jax.Array, upp: int, noise: jax.Array) -> jax.Array:
        sines = sine_source(f0, upp, self.sampling_rate, noise, harmonic_num=self.harmonic_num,
                            sine_amp=self.sine_amp, noise_std=self.noise_std,
                            voiced_threshold=self.voiced_threshold)
        return jnp.tanh(self.l_linear(sines))


class Generator(nnx.Module):
    """HiFi-GAN decoder with RVC's layer names; ``nsf=True`` makes it ``GeneratorNSF``."""

    def __init__(self, initial_channel: int, resblock: str, resblock_kernel_sizes: Sequence[int],
                 resblock_dilation_sizes: Sequence[Sequence[int]], upsample_rates: Sequence[int],
                 upsample_initial_channel: int, upsample_kernel_sizes: Sequence[int],
                 gin_channels: int = 0, *, nsf: bool = False, sr: int | None = None,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upp = math.prod(upsample_rates)
        self.nsf = nsf
        self.dtype, self.param_dtype = dtype, param_dtype
        dt = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c0 = upsample_initial_channel
        self.conv_pre = Conv1d(initial_channel, c0, 7, padding=3, **dt)
        self.ups = nnx.List([
            ConvTranspose1d(c0 // 2 ** i, c0 // 2 ** (i + 1), k, stride=u, padding=(k - u) // 2,
                            weight_norm=True, **dt)
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))])
        block = ResBlock1 if str(resblock) == "1" else ResBlock2
        self.resblocks = nnx.List([
            block(c0 // 2 ** (i + 1), k, tuple(d), **dt)
            for i in range(self.num_upsamples)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes)])
        ch = c0 // 2 ** self.num_upsamples
        self.conv_post = Conv1d(ch, 1, 7, padding=3, use_bias=False, **dt)
        self.cond = Conv1d(gin_channels, c0, 1, **dt) if gin_channels else nnx.data(None)
        if nsf:
            if sr is None:
                raise ValueError("the NSF generator needs the sample rate")
            self.m_source = SourceModuleHnNSF(sr, harmonic_num=0, **dt)
            self.noise_convs = nnx.List([
                Conv1d(1, c0 // 2 ** (i + 1), k, stride=s, padding=p, **dt)
                for i, (k, s, p) in enumerate(noise_conv_geometry(upsample_rates))])
        else:
            self.m_source = nnx.data(None)
            self.noise_convs = nnx.data(None)

    def __call__(self, x: jax.Array, f0: jax.Array | None = None, g: jax.Array | None = None,
                 *, source_noise: jax.Array | None = None, x_mask: jax.Array | None = None) -> jax.Array:
        """``x_mask`` (``[B, T, 1]``, optional; RVC has none): zero every activation past each
        row's length before each convolution, so each row of a padded batch renders
        exactly as it would alone (RVC renders one utterance at a time). Without it a
        padded row's last samples see the padding, as in RVC's own batched ``infer``."""
        def upsampled_mask(y):  # 0/1, so exact in y's dtype (a float32 mask would promote bf16 y)
            return jnp.repeat(x_mask, y.shape[1] // x_mask.shape[1], axis=1).astype(y.dtype)

        def mask_at(y):
            return y if x_mask is None else y * upsampled_mask(y)

        if self.nsf:
            if f0 is None:
                raise ValueError("GeneratorNSF needs f0")
            if source_noise is None:  # deterministic: no noise in the excitation
                source_noise = jnp.zeros((x.shape[0], x.shape[1] * self.upp, 1), SOURCE_DTYPE)
            har = mask_at(self.m_source(f0, self.upp, source_noise))  # [B, T*upp, 1]
        x = self.conv_pre(mask_at(x))
        if g is not None:
            x = x + self.cond(g)
        for i in range(self.num_upsamples):
            x = mask_at(leaky_relu(x, LRELU_SLOPE))
            x = self.ups[i](x)
            if self.nsf:
                x = x + self.noise_convs[i](har)
            m = None if x_mask is None else upsampled_mask(x)
            xs = self.resblocks[i * self.num_kernels](x, m)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x, m)
            x = xs / self.num_kernels
        x = mask_at(leaky_relu(x, 0.01))  # torch's default slope here, not 0.1
        return mask_at(jnp.tanh(self.conv_post(x)))
