"""RVC's prior encoder ``enc_p`` (``models.TextEncoder256`` / ``TextEncoder768``).

One class covers both: ``in_channels`` is the content-feature width (256 for v1
HuBERT features, 768 for v2). Channels-last: inputs ``[B, T, C]``, outputs
``m, logs [B, T, out_channels]`` and ``x_mask [B, T, 1]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from rvclora_jax import initializers
from rvclora_jax.layers import Conv1d, Dense
from rvclora_jax.models.attentions import Encoder
from rvclora_jax.models.commons import leaky_relu, sequence_mask

N_PITCH_BINS = 256  # RVC's coarse pitch has 256 bins (1..255 voiced, 0/1 unvoiced)


class TextEncoder(nnx.Module):
    """``emb_phone(phone) [+ emb_pitch(pitch)]`` → ×√hidden → leaky ReLU(0.1) →
    relative-attention :class:`Encoder` → 1×1 ``proj`` → split into ``(m, logs)``.

    ``f0=False`` is the model used by RVC's ``*_nono`` synthesizers (no ``emb_pitch``).
    """

    def __init__(self, in_channels: int, out_channels: int = 192, hidden_channels: int = 192,
                 filter_channels: int = 768, n_heads: int = 2, n_layers: int = 6,
                 kernel_size: int = 3, p_dropout: float = 0.0, f0: bool = True, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden_channels
        self.filter_channels, self.n_heads, self.n_layers = filter_channels, n_heads, n_layers
        self.kernel_size, self.p_dropout, self.f0 = kernel_size, float(p_dropout), bool(f0)
        self.dtype, self.param_dtype = dtype, param_dtype
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.emb_phone = Dense(in_channels, hidden_channels, **dt, rngs=rngs)
        if self.f0:
            # torch.nn.Embedding initialises N(0, 1).
            self.emb_pitch = nnx.Embed(N_PITCH_BINS, hidden_channels, **dt,
                                       embedding_init=initializers.normal(1.0), rngs=rngs)
        else:
            self.emb_pitch = nnx.data(None)
        self.encoder = Encoder(hidden_channels, filter_channels, n_heads, n_layers, kernel_size,
                               p_dropout, **dt, rngs=rngs)
        self.proj = Conv1d(hidden_channels, out_channels * 2, 1, **dt, rngs=rngs)

    def __call__(self, phone: jax.Array, pitch: jax.Array | None, lengths: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``phone [B,T,in]``, ``pitch [B,T]`` int (or None: phone only, as in RVC),
        ``lengths [B]`` → ``(m [B,T,out], logs [B,T,out], x_mask [B,T,1])``."""
        x = self.emb_phone(phone)
        if pitch is not None:
            if self.emb_pitch is None:
                raise ValueError("this TextEncoder was built with f0=False; pass pitch=None")
            x = x + self.emb_pitch(pitch)
        x = leaky_relu(x * math.sqrt(self.hidden_channels), 0.1)
        x_mask = sequence_mask(lengths, x.shape[1])[..., None].astype(x.dtype)
        x = self.encoder(x * x_mask, x_mask)
        stats = self.proj(x) * x_mask
        m, logs = jnp.split(stats, [self.out_channels], axis=-1)
        return m, logs, x_mask
