"""Small shared helpers of the RVC port."""

from __future__ import annotations

import jax
import jax.numpy as jnp

LRELU_SLOPE = 0.1  # RVC's slope everywhere except the final activation before conv_post


def sequence_mask(lengths: jax.Array, max_len: int) -> jax.Array:
    """``[B, T]`` bool: position t < lengths[b]."""
    return jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]


def leaky_relu(x: jax.Array, slope: float = LRELU_SLOPE) -> jax.Array:
    return jnp.where(x >= 0, x, slope * x)
