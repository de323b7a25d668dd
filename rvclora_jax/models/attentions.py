"""RVC's relative-position Transformer encoder (``rvc.lib.infer_pack.attentions``).

Channels-last port: activations ``[B, T, C]``, masks ``[B, T, 1]``. Attribute names
are RVC's, so ``encoder/attn_layers/0/conv_q`` loads ``encoder.attn_layers.0.conv_q``.

Relative attention
------------------
RVC's self-attention (Shaw et al. 2018, as in VITS) adds two terms that depend only
on the offset ``r = j - i`` between query position ``i`` and key position ``j``,
clipped to a window ``|r| <= w`` (``w = window_size = 10``) and zero outside it:

* logits:  ``s[i, j] = q_i·k_j / √d  +  (q_i / √d)·E_k[r + w]``
* output:  ``o_i = Σ_j p[i, j] v_j  +  Σ_j p[i, j] E_v[r + w]``

``E_k``/``E_v`` are ``emb_rel_k``/``emb_rel_v`` (``[1 or H, 2w+1, d]``). RVC computes
both terms with a pad/reshape "skew" over ``2T-1`` relative positions. Here they are
computed directly on the ``2w+1`` window:

* ``rel[b,h,i,r] = (q_i/√d)·E_k[r]`` is ``[B,H,T,2w+1]``; it is spread to absolute
  positions with one gather, ``s_rel[i, j] = rel[i, j - i + w]`` for ``|j-i| <= w``.
* ``pw[b,h,i,r] = p[i, i + r - w]`` (zero where that key is off the sequence) is
  gathered from the attention weights, and the value term is ``pw @ E_v``.

Memory stays ``O(B·H·T²)`` (the attention matrix itself); nothing is ``O(T²·d)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rvclora_jax.layers import Conv1d

MASK_VALUE = -1e4  # RVC fills masked logits with -1e4, not -inf


def _xavier_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, fan_out: int, dtype) -> jax.Array:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LayerNorm(nnx.Module):
    """RVC's ``modules.LayerNorm``: layer norm over channels (the last axis here)."""

    def __init__(self, channels: int, eps: float = 1e-5, *, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32):
        del rngs  # deterministic init (ones / zeros), as in torch
        self.channels, self.eps = channels, eps
        self.gamma = nnx.Param(jnp.ones((channels,), param_dtype))
        self.beta = nnx.Param(jnp.zeros((channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)  # biased, like torch
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return y * self.gamma[...] + self.beta[...]


class MultiHeadAttention(nnx.Module):
    """RVC's ``attentions.MultiHeadAttention`` (no dropout: ``p_dropout`` must be 0).

    ``__call__(x [B,Tq,C], c [B,Tk,C], attn_mask [B,Tq,Tk] or None) -> [B,Tq,out]``.
    Relative positions (``window_size`` not None) need self-attention (``Tq == Tk``).
    """

    def __init__(self, channels: int, out_channels: int, n_heads: int, p_dropout: float = 0.0,
                 window_size: int | None = None, heads_share: bool = True,
                 block_length: int | None = None, proximal_bias: bool = False,
                 proximal_init: bool = False, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if channels % n_heads:
            raise ValueError(f"channels={channels} not divisible by n_heads={n_heads}")
        if p_dropout:
            raise NotImplementedError("attention dropout is not ported (RVC uses p_dropout=0)")
        self.channels, self.out_channels, self.n_heads = channels, out_channels, n_heads
        self.p_dropout = float(p_dropout)
        self.window_size, self.heads_share = window_size, heads_share
        self.block_length, self.proximal_bias = block_length, proximal_bias
        self.k_channels = channels // n_heads

        conv = lambda i, o: Conv1d(i, o, 1, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        self.conv_q = conv(channels, channels)
        self.conv_k = conv(channels, channels)
        self.conv_v = conv(channels, channels)
        self.conv_o = conv(channels, out_channels)
        # torch: xavier_uniform_ on the q/k/v weights (biases keep the default init).
        for layer in (self.conv_q, self.conv_k, self.conv_v):
            layer.kernel[...] = _xavier_uniform(rngs.params(), layer.kernel[...].shape,
                                                channels, channels, param_dtype)
        if proximal_init:
            self.conv_k.kernel[...] = self.conv_q.kernel[...]
            self.conv_k.bias[...] = self.conv_q.bias[...]

        if window_size is not None:
            n_rel = 1 if heads_share else n_heads
            shape = (n_rel, 2 * window_size + 1, self.k_channels)
            std = self.k_channels ** -0.5
            self.emb_rel_k = nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype) * std)
            self.emb_rel_v = nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype) * std)
        else:
            self.emb_rel_k = nnx.data(None)
            self.emb_rel_v = nnx.data(None)

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
        q = q / math.sqrt(self.k_channels)
        scores = q @ jnp.swapaxes(k, -1, -2)
        if self.window_size is not None:
            if t_s != t_t:
                raise ValueError("relative attention is only available for self-attention")
            rel = q @ jnp.swapaxes(self.emb_rel_k[...], -1, -2)[None]  # [B,H,T,2w+1]
            idx, valid = self._relative_offsets(t_s)
            spread = jnp.take_along_axis(rel, jnp.broadcast_to(idx, rel.shape[:2] + idx.shape), axis=-1)
            scores = scores + jnp.where(valid, spread, jnp.zeros((), scores.dtype))
        if self.proximal_bias:
            if t_s != t_t:
                raise ValueError("proximal bias is only available for self-attention")
            pos = jnp.arange(t_s, dtype=scores.dtype)
            scores = scores - jnp.log1p(jnp.abs(pos[None, :] - pos[:, None]))
        if mask is not None:
            scores = jnp.where(mask == 0, jnp.asarray(MASK_VALUE, scores.dtype), scores)
            if self.block_length is not None:
                pos = jnp.arange(t_s)
                off = pos[None, :] - jnp.arange(t_t)[:, None]
                band = (off >= -self.block_length) & (off <= self.block_length)
                scores = jnp.where(band, scores, jnp.asarray(MASK_VALUE, scores.dtype))
        p = jax.nn.softmax(scores, axis=-1)
        out = p @ v
        if self.window_size is not None:
            idx, valid = self._window_positions(t_s)
            pw = jnp.take_along_axis(p, jnp.broadcast_to(idx, p.shape[:2] + idx.shape), axis=-1)
            pw = jnp.where(valid, pw, jnp.zeros((), p.dtype))  # [B,H,T,2w+1]
            out = out + pw @ self.emb_rel_v[...][None]
        return out, p

    def __call__(self, x: jax.Array, c: jax.Array, attn_mask: jax.Array | None = None) -> jax.Array:
        q, k, v = self._heads(self.conv_q(x)), self._heads(self.conv_k(c)), self._heads(self.conv_v(c))
        mask = None if attn_mask is None else attn_mask[:, None]  # [B,1,Tq,Tk]
        out, _ = self.attention(q, k, v, mask)
        b, _, t, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, t, self.channels)
        return self.conv_o(out)


class FFN(nnx.Module):
    """RVC's ``attentions.FFN``: conv → relu (or gelu approx.) → conv, masked inputs.

    ``__call__(x [B,T,C], x_mask [B,T,1]) -> [B,T,out]``."""

    def __init__(self, in_channels: int, out_channels: int, filter_channels: int, kernel_size: int,
                 p_dropout: float = 0.0, activation: str | None = None, causal: bool = False,
                 *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if p_dropout:
            raise NotImplementedError("FFN dropout is not ported (RVC uses p_dropout=0)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.filter_channels, self.kernel_size = filter_channels, kernel_size
        self.p_dropout, self.activation, self.causal = float(p_dropout), activation, causal
        # RVC pads (x * mask) explicitly before each conv; zero padding inside the conv
        # is the same thing, and keeps the LoRA branch on the same padding.
        pad = (kernel_size - 1, 0) if causal else ((kernel_size - 1) // 2, kernel_size // 2)
        self.conv_1 = Conv1d(in_channels, filter_channels, kernel_size, padding=pad,
                             rngs=rngs, param_dtype=param_dtype)
        self.conv_2 = Conv1d(filter_channels, out_channels, kernel_size, padding=pad,
                             rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, x_mask: jax.Array) -> jax.Array:
        x = self.conv_1(x * x_mask)
        if self.activation == "gelu":
            x = x * jax.nn.sigmoid(1.702 * x)
        else:
            x = jax.nn.relu(x)
        x = self.conv_2(x * x_mask)
        return x * x_mask


class Encoder(nnx.Module):
    """RVC's ``attentions.Encoder``: post-LN Transformer with relative attention.

    ``__call__(x [B,T,C], x_mask [B,T,1]) -> [B,T,C]`` (zero at masked positions)."""

    def __init__(self, hidden_channels: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int = 1, p_dropout: float = 0.0, window_size: int | None = 10,
                 *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.hidden_channels, self.filter_channels = hidden_channels, filter_channels
        self.n_heads, self.n_layers = n_heads, int(n_layers)
        self.kernel_size, self.p_dropout, self.window_size = kernel_size, float(p_dropout), window_size
        h = hidden_channels
        self.attn_layers = nnx.List([
            MultiHeadAttention(h, h, n_heads, p_dropout=p_dropout, window_size=window_size,
                               rngs=rngs, param_dtype=param_dtype) for _ in range(self.n_layers)])
        self.norm_layers_1 = nnx.List([LayerNorm(h, param_dtype=param_dtype) for _ in range(self.n_layers)])
        self.ffn_layers = nnx.List([
            FFN(h, h, filter_channels, kernel_size, p_dropout=p_dropout, rngs=rngs,
                param_dtype=param_dtype) for _ in range(self.n_layers)])
        self.norm_layers_2 = nnx.List([LayerNorm(h, param_dtype=param_dtype) for _ in range(self.n_layers)])

    def __call__(self, x: jax.Array, x_mask: jax.Array) -> jax.Array:
        attn_mask = x_mask * jnp.swapaxes(x_mask, 1, 2)  # [B,T,1]*[B,1,T] -> [B,T,T]
        x = x * x_mask
        for attn, norm_1, ffn, norm_2 in zip(self.attn_layers, self.norm_layers_1,
                                             self.ffn_layers, self.norm_layers_2):
            x = norm_1(x + attn(x, x, attn_mask))
            x = norm_2(x + ffn(x, x_mask))
        return x * x_mask
