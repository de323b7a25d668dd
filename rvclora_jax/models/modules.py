"""WaveNet block, residual coupling layer and HiFi-GAN residual blocks (RVC ``modules.py``).

All activations are ``[B, T, C]``; masks ``[B, T, 1]``; the speaker condition ``g`` is
``[B, 1, gin]`` and broadcasts over time. ``dtype``/``param_dtype`` are passed to every
layer (flax's convention; ``dtype=None`` infers the compute dtype from inputs and params).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from .. import initializers
from ..layers import Conv1d
from .commons import LRELU_SLOPE, leaky_relu


def _same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size * dilation - dilation) // 2


class WN(nnx.Module):
    """Non-causal WaveNet: gated dilated convs with residual/skip 1x1 convs."""

    def __init__(self, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 gin_channels: int = 0, p_dropout: float = 0.0, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if kernel_size % 2 != 1:
            raise ValueError("WN kernel_size must be odd")
        if p_dropout:
            raise NotImplementedError("WN dropout is not ported (RVC uses p_dropout=0)")
        self.hidden_channels, self.n_layers = hidden_channels, n_layers
        h, dt = hidden_channels, dict(dtype=dtype, param_dtype=param_dtype, weight_norm=True, rngs=rngs)
        self.cond_layer = Conv1d(gin_channels, 2 * h * n_layers, 1, **dt) if gin_channels else nnx.data(None)
        self.in_layers = nnx.List([
            Conv1d(h, 2 * h, kernel_size, dilation=dilation_rate ** i,
                   padding=_same_padding(kernel_size, dilation_rate ** i), **dt)
            for i in range(n_layers)])
        # The last layer only feeds the skip output, so it has half the channels.
        self.res_skip_layers = nnx.List([
            Conv1d(h, 2 * h if i < n_layers - 1 else h, 1, **dt) for i in range(n_layers)])

    def __call__(self, x: jax.Array, x_mask: jax.Array, g: jax.Array | None = None) -> jax.Array:
        h = self.hidden_channels
        output = jnp.zeros_like(x)  # x's dtype: the skip sum accumulates in the compute dtype
        if g is not None:
            g = self.cond_layer(g)  # [B, 1, 2*h*n_layers]
        for i, (in_layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            x_in = in_layer(x)
            if g is not None:
                x_in = x_in + g[..., 2 * h * i: 2 * h * (i + 1)]
            acts = jnp.tanh(x_in[..., :h]) * jax.nn.sigmoid(x_in[..., h:])
            rs = res_skip(acts)
            if i < self.n_layers - 1:
                x = (x + rs[..., :h]) * x_mask
                output = output + rs[..., h:]
            else:
                output = output + rs
        return output * x_mask


class ResidualCouplingLayer(nnx.Module):
    """Affine coupling with ``mean_only`` (RVC always uses it): x1 ± m(x0)."""

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, dilation_rate: int,
                 n_layers: int, p_dropout: float = 0.0, gin_channels: int = 0, mean_only: bool = True,
                 *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if channels % 2:
            raise ValueError("channels must be even")
        if not mean_only:
            raise NotImplementedError("RVC only uses mean_only coupling layers")
        self.half_channels = channels // 2
        dt = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre = Conv1d(self.half_channels, hidden_channels, 1, **dt)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels, p_dropout, **dt)
        # Zero-initialised like RVC, so a fresh flow is the identity.
        self.post = Conv1d(hidden_channels, self.half_channels, 1, kernel_init=initializers.zeros,
                           bias_init=initializers.zeros, **dt)

    def __call__(self, x, x_mask, g=None, reverse: bool = False):
        x0, x1 = x[..., :self.half_channels], x[..., self.half_channels:]
        h = self.pre(x0) * x_mask
        h = self.enc(h, x_mask, g)
        m = self.post(h) * x_mask
        x1 = (m + x1 * x_mask) if not reverse else (x1 - m) * x_mask
        return jnp.concatenate([x0, x1], axis=-1)  # x0 is deliberately not re-masked (as RVC)


class Flip(nnx.Module):
    """Reverses the channel order (RVC ``modules.Flip``); no parameters."""

    def __call__(self, x, x_mask=None, g=None, reverse: bool = False):
        return jnp.flip(x, axis=-1)


class ResBlock1(nnx.Module):
    """HiFi-GAN ResBlock1: three (dilated conv, conv) pairs with residuals."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3, 5), *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dt = dict(dtype=dtype, param_dtype=param_dtype, weight_norm=True, rngs=rngs)
        self.convs1 = nnx.List([
            Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d), **dt)
            for d in dilation])
        self.convs2 = nnx.List([
            Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size, 1), **dt)
            for _ in dilation])

    def __call__(self, x, x_mask=None):
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = leaky_relu(x, LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            xt = c1(xt)
            xt = leaky_relu(xt, LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            x = c2(xt) + x
        return x * x_mask if x_mask is not None else x


class ResBlock2(nnx.Module):
    """HiFi-GAN ResBlock2: dilated convs with residuals (RVC keeps it but never uses it)."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3), *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.convs = nnx.List([
            Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d),
                   dtype=dtype, param_dtype=param_dtype, weight_norm=True, rngs=rngs)
            for d in dilation[:2]])  # RVC uses the first two

    def __call__(self, x, x_mask=None):
        for c in self.convs:
            xt = leaky_relu(x, LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            x = c(xt) + x
        return x * x_mask if x_mask is not None else x
