"""PyTorch's default initialisers as jax initialisers, fast to run eagerly.

Every function here returns a flax-style initialiser ``init(key, shape, dtype) -> Array``
(what layers take as ``kernel_init`` / ``bias_init`` / ``embedding_init``), drawn with
``jax.random`` from the key, so a model's shapes trace under ``nnx.eval_shape`` and it
can be built inside ``nnx.jit``. Any other jax initialiser (``nnx.initializers.*``) can
be injected instead; these exist for two reasons:

* Values follow torch's defaults (``nn.Linear``/``nn.Conv1d``: kaiming_uniform(a=√5),
  i.e. U(±1/√fan_in) for weight and bias; ``nn.Embedding``: N(0, 1); the attention's
  ``xavier_uniform_``), so a randomly initialised port behaves like a fresh RVC model.
* Eager speed. XLA compiles one program per distinct shape, and a threefry draw takes
  ~0.1–0.4 s to compile on a CPU, so drawing each of a v2 synthesizer's ~50 parameter
  shapes directly costs ~20 s (and compiling the whole build as one program takes
  minutes). Here the standard draws come in fixed-size blocks (``jax.random.fold_in``
  of the key with the block index), so only three programs are ever compiled per
  dtype. With a concrete key the blocks are cut to the parameter's shape on the host,
  which compiles nothing; under a trace the same blocks are cut with jnp ops, so values
  are identical either way. ``zeros``/``ones`` likewise fill on the host when eager.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.nnx.nn.initializers import Initializer

Distribution = Literal["uniform", "normal"]
# Two block sizes: uniform draws of biases use the small one (drawing 2**16 numbers for a
# 192-vector, hundreds of times per model, would cost more than the compile it saves).
# Normal draws are few (embedding and relative-position tables), so they always use the
# large block and need one compiled program, not two.
_SMALL_BLOCK, _BLOCK = 1 << 12, 1 << 16


@functools.partial(jax.jit, static_argnames=("dist", "size", "dtype"))
def _block(key: jax.Array, index: int, scale: jax.Array, *, dist: Distribution, size: int, dtype):
    k = jax.random.fold_in(key, index)
    if dist == "uniform":  # U[-1, 1)·scale: |x| <= scale exactly (rounding is monotonic)
        z = jax.random.uniform(k, (size,), dtype, -1.0, 1.0)
    else:
        z = jax.random.normal(k, (size,), dtype)
    return z * scale


def _count(n: int, size: int) -> int:
    return max(1, -(-n // size))  # at least one block, so empty shapes cut cleanly too


@functools.partial(jax.jit, static_argnames=("shape", "dist", "size", "dtype"))
def _traced_draw(key: jax.Array, scale: jax.Array, *, shape: tuple[int, ...], dist: Distribution,
                 size: int, dtype) -> jax.Array:
    # A jit, so this is one equation in the caller's trace however many blocks it draws
    # (flax's Rngs bookkeeping under nnx.eval_shape slows down with the trace's length),
    # and lax.map rather than a Python loop, so a model built under nnx.jit compiles one
    # threefry program per parameter, not one per block.
    n = math.prod(shape)
    blocks = jax.lax.map(lambda i: _block(key, i, scale, dist=dist, size=size, dtype=dtype),
                         jnp.arange(_count(n, size)))
    return blocks.reshape(-1)[:n].reshape(shape)


def _draw(key: jax.Array, shape: Sequence[int], dtype, dist: Distribution, scale: float) -> jax.Array:
    """``scale·U[-1,1)`` or ``scale·N(0,1)`` of ``shape``, assembled from fixed-size blocks."""
    shape = tuple(int(d) for d in shape)
    dtype = jnp.dtype(dtype)
    n = math.prod(shape)
    size = _SMALL_BLOCK if dist == "uniform" and n <= _SMALL_BLOCK else _BLOCK
    scale = jnp.asarray(scale, dtype)  # a tracer whenever a trace is active, even for a concrete key
    if isinstance(key, jax.core.Tracer) or isinstance(scale, jax.core.Tracer):
        # nnx.eval_shape / nnx.jit: the same blocks, traced
        return _traced_draw(key, scale, shape=shape, dist=dist, size=size, dtype=dtype)
    # Eagerly: one dispatch of the compiled block program per block, cut on the host
    # (which compiles nothing per shape).
    blocks = [np.asarray(_block(key, i, scale, dist=dist, size=size, dtype=dtype)) for i in range(_count(n, size))]
    flat = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    return jnp.asarray(flat[:n].reshape(shape), dtype)


def _fans(shape: Sequence[int], in_axis: int, out_axis: int) -> tuple[int, int]:
    """torch's ``_calculate_fan_in_and_fan_out`` for a kernel with the given axes."""
    if len(shape) < 2:
        raise ValueError(f"fan-in needs a kernel of rank >= 2, got shape {tuple(shape)}")
    channel_axes = {in_axis % len(shape), out_axis % len(shape)}
    receptive = math.prod(d for i, d in enumerate(shape) if i not in channel_axes)
    return shape[in_axis] * receptive, shape[out_axis] * receptive


def uniform(bound: float) -> Initializer:
    """U(-bound, bound), e.g. torch's default bias init with ``bound = 1/√fan_in``."""
    def init(key, shape, dtype=jnp.float32):
        return _draw(key, shape, dtype, "uniform", bound)
    return init


def normal(stddev: float = 1.0) -> Initializer:
    """N(0, stddev²); ``normal()`` is ``torch.nn.Embedding``'s init."""
    def init(key, shape, dtype=jnp.float32):
        return _draw(key, shape, dtype, "normal", stddev)
    return init


def fan_in_uniform(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """U(±1/√fan_in): torch's default weight init, ``kaiming_uniform_(a=√5)``.

    ``in_axis``/``out_axis`` locate the channels in the kernel (the rest is the receptive
    field). A ``ConvTranspose1d`` kernel ``[K, in, out]`` takes ``in_axis=-1``: torch
    computes its fan-in from weight ``[in, out, K]`` as ``out·K``."""
    def init(key, shape, dtype=jnp.float32):
        fan_in, _ = _fans(shape, in_axis, out_axis)
        return _draw(key, shape, dtype, "uniform", 1.0 / math.sqrt(max(fan_in, 1)))  # 0: an empty kernel
    return init


def xavier_uniform(in_axis: int = -2, out_axis: int = -1) -> Initializer:
    """U(±√(6/(fan_in+fan_out))): torch's ``xavier_uniform_`` (RVC's attention q/k/v)."""
    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = _fans(shape, in_axis, out_axis)
        return _draw(key, shape, dtype, "uniform", math.sqrt(6.0 / max(fan_in + fan_out, 1)))
    return init


def _constant(key, shape, dtype, value: float) -> jax.Array:
    if isinstance(key, jax.core.Tracer):
        return jnp.full(shape, value, dtype)
    return jnp.asarray(np.full(tuple(shape), value, jnp.dtype(dtype)))  # host fill: no per-shape compile


def zeros(key, shape, dtype=jnp.float32) -> jax.Array:
    """All zeros (RVC's flow ``post`` layers start at zero, so a fresh flow is the identity).
    ``key`` may be None (a deterministic init)."""
    return _constant(key, shape, dtype, 0.0)


def ones(key, shape, dtype=jnp.float32) -> jax.Array:
    """All ones (LayerNorm's gain); ``key`` may be None."""
    return _constant(key, shape, dtype, 1.0)
