"""RVC's relative-position Transformer encoder (``rvc.lib.infer_pack.attentions``).

Channels-last port: activations ``[B, T, C]``, masks ``[B, T, 1]``. Attribute names
are RVC's, so ``encoder/attn_layers/0/conv_q`` loads ``encoder.attn_layers.0.conv_q``.

Relative attention
------------------
RVC's self-attention (Shaw et al. 2018, as in VITS) adds two terms that depend only
on the offset ``r = j - i`` between query position ``i`` and key position ``j``,
clipped to a window ``|r| <= w`` (``w = WINDOW_SIZE = 10``) and zero outside it:

* logits:  ``s[i, j] = q_i·k_j / √d  +  (q_i / √d)·E_k[r + w]``
* output:  ``o_i = Σ_j p[i, j] v_j  +  Σ_j p[i, j] E_v[r + w]``

``E_k``/``E_v`` are ``emb_rel_k``/``emb_rel_v`` (``[1, 2w+1, d]``, shared by the heads). RVC computes
both terms with a pad/reshape "skew" over ``2T-1`` relative positions. Here they are
computed directly on the ``2w+1`` window:

* ``rel[b,h,i,r] = (q_i/√d)·E_k[r]`` is ``[B,H,T,2w+1]``; it is spread to absolute
  positions with one gather, ``s_rel[i, j] = rel[i, j - i + w]`` for ``|j-i| <= w``.
* ``pw[b,h,i,r] = p[i, i + r - w]`` (zero where that key is off the sequence) is
  gathered from the attention weights, and the value term is ``pw @ E_v``.

Memory stays ``O(B·H·T²)`` (the attention matrix itself); nothing is ``O(T²·d)``.

Only what RVC's models use is ported: relative positions always (window 10, one table
shared by the heads), no dropout, no proximal bias, no block mask, a ReLU non-causal
FFN. Compute runs in the ``dtype`` the layers are given (softmax included, as flax's
attention does by default); LayerNorm statistics are taken in at least float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from flax.typing import Dtype

from rvclora_jax import initializers
from rvclora_jax.layers import Conv1d

MASK_VALUE = -1e4  # RVC fills masked logits with -1e4, not -inf
WINDOW_SIZE = 10  # RVC's attentions.Encoder default, the only value its models use


class LayerNorm(nnx.Module):
    """RVC's ``modules.LayerNorm``: layer norm over channels (the last axis here).

    Mean and variance are computed in at least float32 (as flax's LayerNorm does), so a
    bfloat16 model normalises stably; the result is cast back to the compute dtype."""

    def __init__(self, channels: int, eps: float = 1e-5, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init (ones / zeros), as in torch
        self.channels, self.eps = channels, eps
        self.dtype, self.param_dtype = dtype, param_dtype
        self.gamma = nnx.Param(initializers.ones(None, (channels,), param_dtype))
        self.beta = nnx.Param(initializers.zeros(None, (channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, gamma, beta = promote_dtype((x, self.gamma[...], self.beta[...]), dtype=self.dtype)
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xs, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)  # biased, like torch
        y = ((xs - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return y * gamma + beta


class MultiHeadAttention(nnx.Module):
    """RVC's ``attentions.MultiHeadAttention`` as its Encoder builds it: relative
    positions (window :data:`WINDOW_SIZE`, heads share the tables), no dropout.

    ``__call__(x [B,T,C], c [B,T,C], attn_mask [B,T,T] or None) -> [B,T,out]``; relative
    positions need self-attention (``x`` and ``c`` of the same length).
    """

    def __init__(self, channels: int, out_channels: int, n_heads: int, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if channels % n_heads:
            raise ValueError(f"channels={channels} not divisible by n_heads={n_heads}")
        self.channels, self.out_channels, self.n_heads = channels, out_channels, n_heads
        self.dtype, self.param_dtype = dtype, param_dtype
        self.window_size = WINDOW_SIZE
        self.k_channels = channels // n_heads

        def conv(i, o, kernel_init):
            return Conv1d(i, o, 1, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        # torch: xavier_uniform_ on the q/k/v weights (biases and conv_o keep the default init).
        xavier = initializers.xavier_uniform()
        self.conv_q = conv(channels, channels, xavier)
        self.conv_k = conv(channels, channels, xavier)
        self.conv_v = conv(channels, channels, xavier)
        self.conv_o = conv(channels, out_channels, initializers.fan_in_uniform())

        shape = (1, 2 * self.window_size + 1, self.k_channels)
        rel_init = initializers.normal(self.k_channels ** -0.5)  # torch: randn * k_channels**-0.5
        self.emb_rel_k = nnx.Param(rel_init(rngs.params(), shape, param_dtype))
        self.emb_rel_v = nnx.Param(rel_init(rngs.params(), shape, param_dtype))

    def _heads(self, x: jax.Array) -> jax.Array:
        """``[B, T, C] -> [B, H, T, d]`` (channel c = h·d + k, as torch's view)."""
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_heads, self.k_channels).transpose(0, 2, 1, 3)

    def _relative_offsets(self, length: int):
        """``(idx, valid)`` for the key term: ``[T,T]`` window index ``j - i + w``."""
        w = self.window_size
        pos = jnp.arange(length)
        rel = pos[None, :] - pos[:, None]  # r = j - i
        return jnp.clip(rel + w, 0, 2 * w), jnp.abs(rel) <= w

    def _window_positions(self, length: int):
        """``(idx, valid)`` for the value term: ``[T, 2w+1]`` key index ``i + r - w``."""
        w = self.window_size
        j = jnp.arange(length)[:, None] + jnp.arange(-w, w + 1)[None, :]
        return jnp.clip(j, 0, length - 1), (j >= 0) & (j < length)

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``q,k,v [B,H,T,d]``, ``mask`` broadcastable to ``[B,H,Tq,Tk]`` →
        (``[B,H,Tq,d]`` output, ``[B,H,Tq,Tk]`` attention weights)."""
        t_t, t_s = q.shape[2], k.shape[2]
        if t_s != t_t:
            raise ValueError("relative attention is only available for self-attention")
        q, k, v, emb_k, emb_v = promote_dtype((q, k, v, self.emb_rel_k[...], self.emb_rel_v[...]),
                                              dtype=self.dtype)
        q = q / math.sqrt(self.k_channels)
        scores = q @ jnp.swapaxes(k, -1, -2)
        rel = q @ jnp.swapaxes(emb_k, -1, -2)[None]  # [B,H,T,2w+1]
        idx, valid = self._relative_offsets(t_s)
        spread = jnp.take_along_axis(rel, jnp.broadcast_to(idx, rel.shape[:2] + idx.shape), axis=-1)
        scores = scores + jnp.where(valid, spread, jnp.zeros((), scores.dtype))
        if mask is not None:
            scores = jnp.where(mask == 0, jnp.asarray(MASK_VALUE, scores.dtype), scores)
        p = jax.nn.softmax(scores, axis=-1)
        out = p @ v
        idx, valid = self._window_positions(t_s)
        pw = jnp.take_along_axis(p, jnp.broadcast_to(idx, p.shape[:2] + idx.shape), axis=-1)
        pw = jnp.where(valid, pw, jnp.zeros((), p.dtype))  # [B,H,T,2w+1]
        out = out + pw @ emb_v[None]
        return out, p

    def __call__(self, x: jax.Array, c: jax.Array, attn_mask: jax.Array | None = None) -> jax.Array:
        q, k, v = self._heads(self.conv_q(x)), self._heads(self.conv_k(c)), self._heads(self.conv_v(c))
        mask = None if attn_mask is None else attn_mask[:, None]  # [B,1,Tq,Tk]
        out, _ = self.attention(q, k, v, mask)
        b, _, t, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, t, self.channels)
        return self.conv_o(out)


class FFN(nnx.Module):
    """RVC's ``attentions.FFN`` as its Encoder builds it: conv → ReLU → conv on masked
    inputs, non-causal ("same") padding.

    ``__call__(x [B,T,C], x_mask [B,T,1]) -> [B,T,out]``."""

    def __init__(self, in_channels: int, out_channels: int, filter_channels: int, kernel_size: int,
                 *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.filter_channels, self.kernel_size = filter_channels, kernel_size
        # RVC pads (x * mask) explicitly before each conv; zero padding inside the conv
        # is the same thing, and keeps the LoRA branch on the same padding.
        pad = ((kernel_size - 1) // 2, kernel_size // 2)
        self.conv_1 = Conv1d(in_channels, filter_channels, kernel_size, padding=pad,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_2 = Conv1d(filter_channels, out_channels, kernel_size, padding=pad,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, x_mask: jax.Array) -> jax.Array:
        x = self.conv_1(x * x_mask)
        x = jax.nn.relu(x)
        x = self.conv_2(x * x_mask)
        return x * x_mask


class Encoder(nnx.Module):
    """RVC's ``attentions.Encoder``: post-LN Transformer with relative attention.

    ``__call__(x [B,T,C], x_mask [B,T,1]) -> [B,T,C]`` (zero at masked positions)."""

    def __init__(self, hidden_channels: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int = 1, p_dropout: float = 0.0, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if p_dropout:
            raise NotImplementedError("attention/FFN dropout is not ported (RVC uses p_dropout=0)")
        self.hidden_channels, self.filter_channels = hidden_channels, filter_channels
        self.n_heads, self.n_layers, self.kernel_size = n_heads, int(n_layers), kernel_size
        self.dtype, self.param_dtype = dtype, param_dtype
        h, dt = hidden_channels, dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_layers = nnx.List([MultiHeadAttention(h, h, n_heads, **dt, rngs=rngs)
                                     for _ in range(self.n_layers)])
        self.norm_layers_1 = nnx.List([LayerNorm(h, **dt) for _ in range(self.n_layers)])
        self.ffn_layers = nnx.List([FFN(h, h, filter_channels, kernel_size, **dt, rngs=rngs)
                                    for _ in range(self.n_layers)])
        self.norm_layers_2 = nnx.List([LayerNorm(h, **dt) for _ in range(self.n_layers)])

    def __call__(self, x: jax.Array, x_mask: jax.Array) -> jax.Array:
        x, x_mask = promote_dtype((x, x_mask), dtype=self.dtype)  # the mask is 0/1: exact in any dtype
        attn_mask = x_mask * jnp.swapaxes(x_mask, 1, 2)  # [B,T,1]*[B,1,T] -> [B,T,T]
        x = x * x_mask
        for attn, norm_1, ffn, norm_2 in zip(self.attn_layers, self.norm_layers_1,
                                             self.ffn_layers, self.norm_layers_2):
            x = norm_1(x + attn(x, x, attn_mask))
            x = norm_2(x + ffn(x, x_mask))
        return x * x_mask
