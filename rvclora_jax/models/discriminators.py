"""RVC's multi-period discriminator (HiFi-GAN style) in Flax NNX.

Computes what ``rvc.lib.infer_pack.models.MultiPeriodDiscriminator`` (v1, periods
2, 3, 5, 7, 11, 17) and ``MultiPeriodDiscriminatorV2`` (v2, adds 23 and 37) compute
with ``use_spectral_norm=False``: a scale discriminator ``DiscriminatorS`` on the raw
waveform followed by one ``DiscriminatorP(p)`` per period.

Attribute names are RVC's ``state_dict`` names (``discriminators.3.convs.2``,
``discriminators.0.conv_post``), so ``rvclora_convert.state_dict.torch_to_flax`` maps a
torch checkpoint (``weight_g``/``weight_v`` are folded) without a key table.

Layouts (channels-last; ``B`` batch, ``N`` samples)
--------------------------------------------------
* Input waveform: ``[B, N, 1]`` (torch ``[B, 1, N]``).
* ``DiscriminatorS`` feature maps: ``[B, T, C]`` — torch's ``[B, C, T]`` is
  ``fmap.transpose(0, 2, 1)``.
* ``DiscriminatorP`` feature maps: ``[B, H, p, C]`` — torch's ``[B, C, H, p]`` is
  ``fmap.transpose(0, 3, 1, 2)``.
* Scores: ``[B, -1]``, flattened in torch's order (``torch.flatten(x, 1, -1)`` of the
  ``[B, 1, T]`` / ``[B, 1, H, p]`` conv_post output), so they are equal elementwise.

DiscriminatorP's Conv2d layers all have kernels ``(K, 1)``: each of the ``p`` columns
of the ``[H, p]`` image is convolved independently along ``H``. We therefore fold the
period axis into the batch (``[B, H, p, C] -> [B*p, H, C]``) and use
:class:`~rvclora_jax.layers.Conv1d` with ``torch_kx1=True`` (the converter squeezes
the torch weight ``[out, in, K, 1]``).
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from rvclora_jax.layers import Conv1d
from rvclora_jax.models.commons import leaky_relu

V1_PERIODS: tuple[int, ...] = (2, 3, 5, 7, 11, 17)
V2_PERIODS: tuple[int, ...] = (2, 3, 5, 7, 11, 17, 23, 37)

# DiscriminatorS: (in, out, kernel, stride, groups, padding)
_S_CONVS = (
    (1, 16, 15, 1, 1, 7),
    (16, 64, 41, 4, 4, 20),
    (64, 256, 41, 4, 16, 20),
    (256, 1024, 41, 4, 64, 20),
    (1024, 1024, 41, 4, 256, 20),
    (1024, 1024, 5, 1, 1, 2),
)
# DiscriminatorP channel progression; the last conv has stride 1.
_P_CHANNELS = (1, 32, 128, 512, 1024, 1024)


def _narrow(divisor: int):
    """Channel widths divided by ``divisor`` (1 is RVC's). Only for tests and toy runs:
    the discriminator's state (weights plus two Adam moments, 264 MB for two periods at
    RVC's widths) dominates a narrow test trainer's memory, and every data-parallel
    device holds a replica of it."""
    if divisor < 1 or 1024 % divisor or 16 % divisor:
        raise ValueError(f"channel_divisor must divide 16 (got {divisor})")
    return lambda c: c // divisor


class DiscriminatorS(nnx.Module):
    """RVC ``DiscriminatorS`` on ``[B, N, 1]``. Returns ``(score [B, T'], fmaps)``,
    each fmap ``[B, T, C]`` (6 activations after leaky ReLU, then conv_post)."""

    def __init__(self, *, channel_divisor: int = 1, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dt = dict(dtype=dtype, param_dtype=param_dtype, weight_norm=True, rngs=rngs)
        n = _narrow(channel_divisor)
        self.convs = nnx.List([
            Conv1d(cin if cin == 1 else n(cin), n(cout), k, stride=s, groups=max(1, g // channel_divisor),
                   padding=p, **dt)
            for cin, cout, k, s, g, p in _S_CONVS
        ])
        self.conv_post = Conv1d(n(1024), 1, 3, stride=1, padding=1, **dt)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        fmap = []
        for conv in self.convs:
            x = leaky_relu(conv(x))  # RVC's slope 0.1
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return x.reshape(x.shape[0], -1), fmap


class DiscriminatorP(nnx.Module):
    """RVC ``DiscriminatorP(period)`` (kernel 5, stride 3) on ``[B, N, 1]``.

    Returns ``(score [B, H'*p], fmaps)``, each fmap ``[B, H, p, C]``."""

    def __init__(self, period: int, kernel_size: int = 5, stride: int = 3, *, channel_divisor: int = 1,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.period = int(period)
        pad = (kernel_size - 1) // 2  # RVC's get_padding(kernel_size, 1)
        n = len(_P_CHANNELS) - 1
        ch = (1,) + tuple(map(_narrow(channel_divisor), _P_CHANNELS[1:]))
        dt = dict(dtype=dtype, param_dtype=param_dtype, weight_norm=True, torch_kx1=True, rngs=rngs)
        self.convs = nnx.List([
            Conv1d(ch[i], ch[i + 1], kernel_size, stride=stride if i < n - 1 else 1, padding=pad, **dt)
            for i in range(n)
        ])
        self.conv_post = Conv1d(ch[-1], 1, 3, stride=1, padding=1, **dt)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        b, t, c = x.shape
        p = self.period
        if t % p:
            # torch F.pad(..., "reflect") on the right: no edge repeat, like numpy "reflect".
            x = jnp.pad(x, ((0, 0), (0, p - t % p), (0, 0)), mode="reflect")
            t = x.shape[1]
        # torch view [B, C, T/p, p]: sample h*p + j lands at (h, j). Channels-last that is
        # [B, T/p, p, C]; fold the period axis into the batch -> [B*p, T/p, C].
        x = x.reshape(b, t // p, p, c).transpose(0, 2, 1, 3).reshape(b * p, t // p, c)

        def unfold(y):  # [B*p, H, C] -> [B, H, p, C]
            return y.reshape(b, p, y.shape[1], y.shape[2]).transpose(0, 2, 1, 3)

        fmap = []
        for conv in self.convs:
            x = leaky_relu(conv(x))  # RVC's slope 0.1
            fmap.append(unfold(x))
        x = unfold(self.conv_post(x))
        fmap.append(x)
        return x.reshape(b, -1), fmap


class MultiPeriodDiscriminator(nnx.Module):
    """``[DiscriminatorS] + [DiscriminatorP(p) for p in periods]`` as ``discriminators``.

    ``periods=V1_PERIODS`` is RVC's ``MultiPeriodDiscriminator``; ``V2_PERIODS`` is
    ``MultiPeriodDiscriminatorV2``."""

    def __init__(self, periods: Sequence[int] = V1_PERIODS, *, channel_divisor: int = 1,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.periods = tuple(int(p) for p in periods)
        self.dtype, self.param_dtype = dtype, param_dtype
        dt = dict(channel_divisor=channel_divisor, dtype=dtype, param_dtype=param_dtype)
        # One fork of rngs per sub-discriminator (keeps nnx.eval_shape linear; see Synthesizer).
        self.discriminators = nnx.List(
            [DiscriminatorS(**dt, rngs=rngs.fork())] + [DiscriminatorP(p, **dt, rngs=rngs.fork())
                                                        for p in self.periods])

    def apply_one(self, y: jax.Array) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        """Run every sub-discriminator on one batch ``y [B, N, 1]``.

        Returns ``(scores, fmaps)``: ``scores[i]`` is ``[B, -1]``, ``fmaps[i]`` the list of
        feature maps of sub-discriminator ``i`` (layouts in the module docstring)."""
        scores, fmaps = [], []
        for d in self.discriminators:
            s, f = d(y)
            scores.append(s)
            fmaps.append(f)
        return scores, fmaps

    def __call__(self, y: jax.Array, y_hat: jax.Array):
        """RVC's ``forward(y, y_hat)``: ``(y_d_rs, y_d_gs, fmap_rs, fmap_gs)``."""
        y_d_rs, fmap_rs = self.apply_one(y)
        y_d_gs, fmap_gs = self.apply_one(y_hat)
        return y_d_rs, y_d_gs, fmap_rs, fmap_gs


def multi_period_discriminator(version: Literal["v1", "v2"], rngs: nnx.Rngs, *, dtype: Dtype | None = None,
                               param_dtype: Dtype = jnp.float32) -> MultiPeriodDiscriminator:
    """The discriminator RVC trains with for model ``version`` ("v1" or "v2")."""
    periods = {"v1": V1_PERIODS, "v2": V2_PERIODS}.get(version)
    if periods is None:
        raise ValueError(f"unknown RVC version {version!r} (expected 'v1' or 'v2')")
    return MultiPeriodDiscriminator(periods, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
