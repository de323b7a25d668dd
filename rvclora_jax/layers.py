"""Linear layers with PyTorch semantics and an optional, exact low-rank adapter.

These are the only parameterised linear maps the RVC port uses, so every one of them
can carry a LoRA adapter. Layout is channels-last (``[batch, time, channels]``), the
JAX convention; kernels are stored in the layouts below, which are what the
converters in ``convert/`` produce from torch weights:

=====================  ==========================  ==============================
layer                  kernel                      torch weight it comes from
=====================  ==========================  ==============================
``Dense``              ``[in, out]``               ``Linear.weight.T``
``Conv1d``             ``[K, in/groups, out]``     ``Conv1d.weight.transpose(2,1,0)``
``ConvTranspose1d``    ``[K, in, out]``            ``ConvTranspose1d.weight.transpose(2,0,1)``
=====================  ==========================  ==============================

Output lengths, padding, stride and dilation follow ``torch.nn.functional`` exactly
(``conv1d`` / ``conv_transpose1d``), because RVC's length bookkeeping depends on them.

Adapters
--------
``add_lora`` attaches two :class:`LoRAParam` variables, ``lora_a`` and ``lora_b``, to
the layer itself, so the base parameter paths (``.../kernel``, ``.../bias``) are the
same with or without an adapter. ``b`` starts at zero, so a fresh adapter leaves the
layer's output bit-identical.

Each adaptable layer kind owns its whole *LoRA basis*, declared once by
:func:`register_layer_kind` as a kind name and an einsum ``a, b -> ΔW`` in the kernel's
own layout (``s`` = alpha/r, or alpha/sqrt(r) with rsLoRA; ``r`` is the rank):

===================  ==================  ==================  ====================
kind                 ``a``               ``b``               ΔW = s·einsum(a, b)
===================  ==================  ==================  ====================
``Dense``            ``[in, r]``         ``[r, out]``        ``ir,ro->io``
``Conv1d``           ``[K, in, r]``      ``[r, out]``        ``kir,ro->kio``
``ConvTranspose1d``  ``[in, r]``         ``[K, r, out]``     ``ir,kro->kio``
===================  ==================  ==================  ====================

For Conv1d ``a`` is a conv with the base stride/padding/dilation and ``b`` is pointwise.
For ConvTranspose1d ``a`` is pointwise (applied first) and ``b`` a transposed conv with
the base stride/padding: exact, since a transposed conv is linear in its input
channels, and ``r·(in + K·out)`` parameters instead of ``r·(K·in + out)`` — about half
for RVC's ``dec.ups.0`` (512→256, K=16).

Everything else about a kind follows from that einsum, as class methods that work on
bare arrays and shapes (merges, adapter files and SVD work call them through the
registry, :func:`layer_kind`): :meth:`Adaptable.factor_shapes` (and the init's fan-in),
:meth:`~Adaptable.delta` (jnp at HIGHEST precision, or float64 numpy),
:meth:`~Adaptable.kernel_shape_of`, :meth:`~Adaptable.rank_axes` (rank concatenation)
and :meth:`~Adaptable.to_matrix` / :meth:`~Adaptable.from_matrix`: the delta as one
matrix ``M = A·B`` (rows: the kernel axes ``a`` carries, columns: those ``b`` carries),
whose truncated SVD is the best rank-k adapter of the layer. Each layer also owns its
torch layout (:meth:`~Adaptable.from_torch` / :meth:`~Adaptable.to_torch`, per instance:
a Conv1d may stand for a Kx1 Conv2d). A new layer kind is one class in one file: an
:class:`Adaptable` subclass with a constructor, ``__call__``, ``_lora_branch``, the torch
hooks, and the decorator.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from flax.nnx.nn.initializers import Initializer
from flax.typing import Dtype
from jax import lax

from . import initializers

# Adapter weights get their own variable type so `nnx.state(model, LoRAParam)` is the
# whole trainable subtree. We reuse flax's class: it subclasses nnx.Param, so filters
# must list LoRAParam *before* nnx.Param (the first matching filter wins).
LoRAParam = nnx.LoRAParam

Padding = int | tuple[int, int] | Literal["same", "valid"]
_DN = ("NWC", "WIO", "NWC")
# Merge arithmetic is done at full precision: on GPU/TPU the default f32 matmul may
# use TF32/bf16 passes, which would make "merged == unmerged" only approximately true.
_EXACT = lax.Precision.HIGHEST


# torch's default init of Linear/Conv1d weights, U(±1/sqrt(fan_in)) (kaiming_uniform(a=√5));
# the bias default (``bias_init=None``) is U(±1/sqrt(fan_in)) of the same fan-in.
default_kernel_init = initializers.fan_in_uniform()
# torch computes a ConvTranspose1d weight's fan-in as out·K (its dim 1 is the output).
default_transpose_kernel_init = initializers.fan_in_uniform(in_axis=-1, out_axis=-2)
default_embed_init = initializers.normal(1.0)  # torch.nn.Embedding: N(0, 1)


# One Rngs draw per layer, split in one compiled call: each rngs.params() costs ~0.5 ms
# eagerly, and under nnx.eval_shape its cost grows with the length of the trace.
_split2 = jax.jit(lambda key: tuple(jax.random.split(key)))


def _params(kernel_init: Initializer, bias_init: Initializer | None, kernel_shape: tuple[int, ...],
            fan_in: int, use_bias: bool, param_dtype, rngs: nnx.Rngs):
    """``(kernel, bias)`` Params; ``bias_init=None`` is torch's U(±1/sqrt(fan_in))."""
    kernel_key, bias_key = _split2(rngs.params())
    kernel = nnx.Param(kernel_init(kernel_key, kernel_shape, param_dtype))
    if not use_bias:
        return kernel, nnx.data(None)
    if bias_init is None:
        bias_init = initializers.uniform(1.0 / math.sqrt(fan_in))
    return kernel, nnx.Param(bias_init(bias_key, (kernel_shape[-1],), param_dtype))


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


# ---------------------------------------------------------------------------------
# Layer kinds: name -> class, each class owning its LoRA basis
# ---------------------------------------------------------------------------------
LAYER_KINDS: dict[str, type["Adaptable"]] = {}


@functools.lru_cache(maxsize=None)
def _parse_basis(spec: str) -> tuple[str, str, str]:
    """``"kir,ro->kio"`` → ``("kir", "ro", "kio")``, checked to be a LoRA basis: ``r``
    (the rank) once in each factor and not in ΔW, and every kernel axis in exactly one
    factor (so ΔW is one matrix product ``A·B``)."""
    try:
        lhs, out = spec.replace(" ", "").split("->")
        a, b = lhs.split(",")
    except ValueError:
        raise ValueError(f"LoRA basis {spec!r}: expected an einsum 'a,b->kernel'") from None
    ka, kb = a.replace("r", ""), b.replace("r", "")
    if (a.count("r"), b.count("r")) != (1, 1) or "r" in out:
        raise ValueError(f"LoRA basis {spec!r}: the rank axis 'r' must appear once in a and once in b, not in ΔW")
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out) or set(ka) & set(kb) \
            or sorted(ka + kb) != sorted(out):
        raise ValueError(f"LoRA basis {spec!r}: every kernel axis must be carried by exactly one factor")
    return a, b, out


def register_layer_kind(kind: str, basis: str):
    """Class decorator: register an :class:`Adaptable` subclass as layer kind ``kind`` with
    the LoRA basis ``basis`` (an einsum ``"a,b->kernel"``, rank axis ``r``), stored as the
    class attributes ``kind`` and ``lora_einsum``. Adapter files record the kind of each
    adapted layer by this name."""
    _parse_basis(basis)

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Adaptable)):
            raise TypeError(f"register_layer_kind({kind!r}): {cls!r} is not an Adaptable layer class")
        if LAYER_KINDS.get(kind, cls) is not cls:
            raise ValueError(f"layer kind {kind!r} is already registered to {LAYER_KINDS[kind].__qualname__}")
        cls.kind, cls.lora_einsum = kind, basis
        LAYER_KINDS[kind] = cls
        return cls

    return deco


def layer_kind(kind: str) -> type["Adaptable"]:
    """The layer class registered as ``kind`` (``"Dense"``, ``"Conv1d"``, ...)."""
    try:
        return LAYER_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown layer kind {kind!r} (registered: {', '.join(sorted(LAYER_KINDS))})") from None


class Adaptable(nnx.Module):
    """An adaptable layer: adapter slots and life cycle, plus its kind's LoRA basis.

    Subclasses define the layer (constructor, ``__call__``), the adapter branch
    ``_lora_branch`` (exactly ``x ↦ x·ΔW`` under the layer's own map), the torch layout
    hooks, and are registered with :func:`register_layer_kind`; the basis methods below
    are derived from the registered einsum."""

    kind: ClassVar[str] = ""
    lora_einsum: ClassVar[str] = ""
    torch_param: ClassVar[str] = "kernel"  # the param the torch ``.weight`` maps to

    lora_a: nnx.LoRAParam | None
    lora_b: nnx.LoRAParam | None

    def _init_adapter_slots(self) -> None:
        # nnx.data: these slots hold Variables/Modules once an adapter is attached.
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_dropout = nnx.data(None)
        self.lora_scaling = 0.0  # static python float, part of the graph definition
        self.lora_rank = 0
        self.lora_alpha = 0.0

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    # -- the LoRA basis of the kind (class methods: they work on bare arrays and shapes) --
    @classmethod
    def _basis(cls) -> tuple[str, str, str]:
        if not cls.lora_einsum:
            raise TypeError(f"{cls.__qualname__} is not a registered layer kind (use @register_layer_kind)")
        return _parse_basis(cls.lora_einsum)

    @classmethod
    def factor_shapes(cls, kernel_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """``(a_shape, b_shape, fan_in)`` of a rank-``rank`` adapter of a kernel of this shape
        (``fan_in``: the inputs one entry of ``a`` sees, for kaiming init)."""
        a, b, out = cls._basis()
        if len(kernel_shape) != len(out):
            raise ValueError(f"{cls.kind}: kernel shape {tuple(kernel_shape)} is not {len(out)}-D")
        size = {**dict(zip(out, (int(d) for d in kernel_shape))), "r": int(rank)}
        return (tuple(size[c] for c in a), tuple(size[c] for c in b),
                math.prod(size[c] for c in a if c != "r"))

    @classmethod
    def rank_axes(cls) -> tuple[int, int]:
        """The axes of ``a`` and ``b`` that hold the rank (to concatenate adapters)."""
        a, b, _ = cls._basis()
        return a.index("r"), b.index("r")

    @classmethod
    def rank_of(cls, a_shape: Sequence[int]) -> int:
        return int(a_shape[cls.rank_axes()[0]])

    @classmethod
    def kernel_shape_of(cls, a_shape: Sequence[int], b_shape: Sequence[int]) -> tuple[int, ...]:
        """The kernel shape a factor pair of this kind implies (raises if it is not one)."""
        a, b, out = cls._basis()
        a_shape, b_shape = tuple(int(d) for d in a_shape), tuple(int(d) for d in b_shape)
        if len(a_shape) != len(a) or len(b_shape) != len(b) or \
                a_shape[a.index("r")] != b_shape[b.index("r")]:
            raise ValueError(f"not a LoRA factor pair of a {cls.kind}: a{a_shape}, b{b_shape} "
                             f"(expected a[{','.join(a)}], b[{','.join(b)}])")
        size = {**dict(zip(a, a_shape)), **dict(zip(b, b_shape))}
        return tuple(size[c] for c in out)

    @classmethod
    def delta(cls, a, b, scaling: float, *, xp=jnp):
        """ΔW = s·einsum(a, b) in the kernel's layout. ``xp=jnp``: at HIGHEST precision
        (merges must be exact on TPU/GPU too); ``xp=np``: in float64, for SVD work."""
        cls.kernel_shape_of(np.shape(a), np.shape(b))
        if xp is np:
            d = np.einsum(cls.lora_einsum, np.asarray(a, np.float64), np.asarray(b, np.float64))
            return d * float(scaling)
        if xp is not jnp:
            raise ValueError(f"delta: xp must be jax.numpy or numpy, got {xp!r}")
        d = jnp.einsum(cls.lora_einsum, a, b, precision=_EXACT)
        return d * jnp.asarray(scaling, d.dtype)

    @classmethod
    def _matrix_axes(cls) -> tuple[list[str], list[str], str]:
        a, b, out = cls._basis()
        return [c for c in a if c != "r"], [c for c in b if c != "r"], out

    @classmethod
    def to_matrix(cls, delta) -> np.ndarray:
        """ΔW (kernel layout) → ``M`` [rows, cols] with ``M = A·B`` for the factors as
        :meth:`from_matrix` reads them (rows: the kernel axes of ``a``, cols: those of ``b``)."""
        rows, cols, out = cls._matrix_axes()
        delta = np.asarray(delta)
        n_rows = math.prod(delta.shape[out.index(c)] for c in rows)
        return delta.transpose([out.index(c) for c in rows + cols]).reshape(n_rows, -1)

    @classmethod
    def from_matrix(cls, A, B, kernel_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Factors of ``M = A·B`` (``A [rows, r]``, ``B [r, cols]``) → ``(a, b)`` in this kind's layout."""
        rows, cols, out = cls._matrix_axes()
        a, b, _ = cls._basis()
        size = dict(zip(out, (int(d) for d in kernel_shape)))
        r = int(np.shape(A)[1])
        fa = np.reshape(A, [size[c] for c in rows] + [r]).transpose([(rows + ["r"]).index(c) for c in a])
        fb = np.reshape(B, [r] + [size[c] for c in cols]).transpose([(["r"] + cols).index(c) for c in b])
        return fa, fb

    # -- the adapter of this layer --
    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """``(a_shape, b_shape, fan_in)`` for a rank-``rank`` adapter of this layer."""
        return self.factor_shapes(tuple(self.kernel.shape), rank)

    def _lora_branch(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    # -- torch layout (per instance: a Conv1d may stand for a Kx1 Conv2d) --
    def from_torch(self, w: np.ndarray) -> np.ndarray:
        """torch ``.weight`` → this layer's ``kernel`` layout."""
        raise NotImplementedError

    def to_torch(self, kernel: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`from_torch`."""
        raise NotImplementedError

    def add_lora(
        self,
        rank: int,
        alpha: float,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
    ) -> None:
        """Attach a fresh adapter. ``b`` is zero, so the output does not change."""
        if self.has_lora:
            raise ValueError(f"{type(self).__name__} already has an adapter")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        a_shape, b_shape, fan_in = self.lora_shapes(rank)
        key = rngs.params()
        pdt = self.kernel[...].dtype
        if init == "kaiming":
            # PEFT's default: kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in)).
            a = initializers.uniform(1.0 / math.sqrt(fan_in))(key, a_shape, pdt)
        elif init == "gaussian":
            a = jax.random.normal(key, a_shape, pdt) / rank
        else:
            raise ValueError(f"unknown LoRA init {init!r} (expected 'kaiming' or 'gaussian')")
        self.lora_a = LoRAParam(a)
        self.lora_b = LoRAParam(jnp.zeros(b_shape, pdt))
        self.lora_rank = rank
        self.lora_alpha = float(alpha)
        self.lora_scaling = lora_scaling(rank, alpha, use_rslora)
        if dropout > 0.0:
            # Starts in eval mode; `model.train()` switches it on.
            self.lora_dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    def remove_lora(self) -> None:
        self._init_adapter_slots()

    def delta_kernel(self) -> jax.Array:
        """This layer's ΔW (zeros without an adapter)."""
        if not self.has_lora:
            return jnp.zeros_like(self.kernel[...])
        return self.delta(self.lora_a[...], self.lora_b[...], self.lora_scaling)

    def _adapter_input(self, x: jax.Array) -> jax.Array:
        return self.lora_dropout(x) if self.lora_dropout is not None else x


@register_layer_kind("Dense", "ir,ro->io")
class Dense(Adaptable):
    """``torch.nn.Linear``: ``y = x @ kernel + bias`` on the last axis.

    ``dtype`` is the compute dtype (``None``: promote the input and the params, as flax
    does); parameters are stored in ``param_dtype``. ``kernel_init``/``bias_init`` are jax
    initialisers ``(key, shape, dtype)``; the defaults are torch's, and ``bias_init=None``
    means torch's U(±1/sqrt(fan_in)), which depends on the kernel's fan-in."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = default_kernel_init, bias_init: Initializer | None = None,
                 rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.param_dtype = dtype, param_dtype
        self.weight_norm = False
        self.kernel, self.bias = _params(kernel_init, bias_init, (in_features, out_features), in_features,
                                         use_bias, param_dtype, rngs)
        self._init_adapter_slots()

    def from_torch(self, w):
        return w.T  # Linear.weight [out, in]

    def to_torch(self, kernel):
        return kernel.T

    def _lora_branch(self, x):
        x, a, b = promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        h = self._adapter_input(x) @ a
        return (h @ b) * self.lora_scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        y = x @ kernel
        if bias is not None:
            y = y + bias
        if self.has_lora:
            y = y + self._lora_branch(x)
        return y


def _conv_padding(padding: Padding, kernel_size: int, stride: int, dilation: int) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if stride != 1:
                raise ValueError("padding='same' needs stride 1 (as in torch)")
            total = dilation * (kernel_size - 1)
            return (total // 2, total - total // 2)  # torch puts the odd sample on the right
        raise ValueError(f"unknown padding {padding!r}")
    if isinstance(padding, int):
        return (padding, padding)
    left, right = padding
    return (int(left), int(right))


def _grouped_conv_im2col(x, w, stride: int, padding: tuple[int, int], groups: int):
    """Grouped conv as strided slices + one einsum (the same sums as the grouped conv)."""
    b, t, c = x.shape
    k, cg, o = w.shape
    xp = jnp.pad(x, ((0, 0), padding, (0, 0)))
    t_out = (t + padding[0] + padding[1] - k) // stride + 1
    cols = jnp.stack([lax.slice_in_dim(xp, j, j + stride * (t_out - 1) + 1, stride, axis=1) for j in range(k)],
                     axis=2).reshape(b, t_out, k, groups, c // groups)
    wg = jnp.transpose(w.reshape(k, cg, groups, o // groups), (0, 2, 1, 3))  # [K, G, C/G, O/G]
    return jnp.einsum("btkgc,kgco->btgo", cols, wg).reshape(b, t_out, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def grouped_conv1d(x, w, stride: int, padding: tuple[int, int], groups: int):
    """Grouped 1-D convolution whose backward pass avoids XLA's grouped-conv gradient.

    On CPU the weight gradient of ``conv_general_dilated(feature_group_count=G)`` is
    very slow (2.4 s for RVC's 1024→1024, G=256 layer vs 0.07 s here). The forward pass
    is the ordinary grouped conv; the backward pass differentiates the equivalent
    slices-plus-einsum form, so the gradients are the exact gradients of the same map."""
    return lax.conv_general_dilated(x, w, (stride,), [padding], dimension_numbers=_DN,
                                    feature_group_count=groups)


def _grouped_fwd(x, w, stride, padding, groups):
    return grouped_conv1d(x, w, stride, padding, groups), (x, w)


def _grouped_bwd(stride, padding, groups, res, g):
    # dx: the transposed grouped conv by overlap-add (every output-gradient frame times its
    # group's kernel once); dw: one batched matmul per tap over the strided input slice.
    # ~4x less memory traffic than differentiating the slices-plus-einsum form (K full-size
    # zero-interleaved pads summed).
    x, w = res
    b, t, c = x.shape
    k, cg, o = w.shape
    t_out = g.shape[1]
    og = o // groups
    gg = g.reshape(b, t_out, groups, og)
    wg = w.reshape(k, cg, groups, og)
    taps = jnp.einsum("btgo,kcgo->btkgc", gg, wg).reshape(b, t_out, k, c)
    dx = _overlap_add(taps, stride, padding[0], t)
    xp = jnp.pad(x, ((0, 0), padding, (0, 0)))
    span = stride * (t_out - 1) + 1
    dw = jnp.stack([jnp.einsum("btgc,btgo->cgo", lax.slice_in_dim(xp, j, j + span, stride, axis=1)
                               .reshape(b, t_out, groups, cg), gg) for j in range(k)])
    return dx.astype(x.dtype), dw.reshape(k, cg, o).astype(w.dtype)


grouped_conv1d.defvjp(_grouped_fwd, _grouped_bwd)


def _overlap_add(taps, stride: int, crop_left: int, out_len: int):
    """``y[u] = Σ_{t,k: t·stride + k = u + crop_left} taps[:, t, k]`` for ``u < out_len``
    (``taps [B, T, K, C]``). Padding K up to ``n·stride`` splits each frame's taps into
    ``n`` blocks of ``stride`` samples; block ``j`` of frame ``t`` lands in output block
    ``t+j``. Samples past the last tap are zeros."""
    b, t, k, c = taps.shape
    s = stride
    n = -(-k // s)
    taps = jnp.pad(taps, ((0, 0), (0, 0), (0, n * s - k), (0, 0))).reshape(b, t, n, s, c)
    full = sum(jnp.pad(taps[:, :, j], ((0, 0), (j, n - 1 - j), (0, 0), (0, 0))) for j in range(n))
    full = full.reshape(b, (t + n - 1) * s, c)
    end = crop_left + out_len
    if end > full.shape[1]:
        full = jnp.pad(full, ((0, 0), (0, end - full.shape[1]), (0, 0)))
    return full[:, crop_left:end]


def overlap_add_transpose(x, kernel, stride: int, crop_left: int, out_len: int):
    """``y[u] = Σ_{t,k: t·stride + k = u + crop_left} x[t] · kernel[k]`` for ``u < out_len``
    (``kernel [K, in, out]``): a transposed convolution without zero-stuffing.

    The dilated-input form of a transposed conv multiplies ``stride - 1`` zeros for every
    real sample. Here every input frame is multiplied by the whole kernel once (one
    matmul), giving its ``K`` output samples, which :func:`_overlap_add` sums into place.
    The same sums as the dilated form, in another order."""
    return _overlap_add(jnp.einsum("bti,kio->btko", x, kernel), stride, crop_left, out_len)


def _plain_conv(x, w, stride: int, padding: tuple[int, int], dilation: int = 1):
    return lax.conv_general_dilated(x, w, window_strides=(stride,), padding=[padding],
                                    rhs_dilation=(dilation,), dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def matmul_grad_conv1d(x, w, stride: int, padding: tuple[int, int], dilation: int = 1):
    """1-D convolution (XLA's own forward) whose gradients are plain matmuls.

    XLA's CPU gradients of a conv cost more than their arithmetic where the kernel is
    large next to the activations (RVC's discriminator: 5x1024x1024 kernels over a few
    hundred positions): the input gradient reverses and transposes the whole kernel
    every step (a strided conv's input gradient also runs on the zero-stuffed output
    gradient), the weight gradient transposes the activations. Here, with no copy of the
    kernel: ``taps = dy · Wᵀ`` (one matmul contracting the kernel's minor axis), summed
    into place by :func:`_overlap_add` (stride > 1) or ``K`` shifted adds (stride 1,
    any dilation); ``dW[k]`` is one matmul of the input slice under tap ``k`` with ``dy``.
    The same sums as the conv's gradients, in another order."""
    return _plain_conv(x, w, stride, padding, dilation)


def _mm_fwd(x, w, stride, padding, dilation):
    return matmul_grad_conv1d(x, w, stride, padding, dilation), (x, w)


def _mm_bwd(stride, padding, dilation, res, g):
    x, w = res
    b, t, _ = x.shape
    k = w.shape[0]
    t_out = g.shape[1]
    taps = jnp.einsum("bto,kio->btki", g, w)
    if stride == 1:
        lp = t_out + dilation * (k - 1)
        dxp = sum(jnp.pad(taps[:, :, j], ((0, 0), (dilation * j, lp - t_out - dilation * j), (0, 0)))
                  for j in range(k))
        end = padding[0] + t
        if end > lp:
            dxp = jnp.pad(dxp, ((0, 0), (0, end - lp), (0, 0)))
        dx = dxp[:, padding[0]:end]
    else:
        dx = _overlap_add(taps, stride, padding[0], t)
    xp = jnp.pad(x, ((0, 0), padding, (0, 0)))
    span = stride * (t_out - 1) + 1
    dw = jnp.stack([jnp.einsum("bti,bto->io", lax.slice_in_dim(xp, dilation * j, dilation * j + span, stride, axis=1), g)
                    for j in range(k)])
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul_grad_conv1d.defvjp(_mm_fwd, _mm_bwd)


def _use_matmul_grads(x_shape, k: int, cin: int, cout: int, stride: int, dilation: int) -> bool:
    """Strided convs (dilation 1), and stride-1 convs whose kernel outweighs their input:
    there the kernel copies of XLA's gradients dominate."""
    if stride > 1:
        return dilation == 1
    return k > 1 and k * cin * cout >= math.prod(x_shape)


@register_layer_kind("Conv1d", "kir,ro->kio")
class Conv1d(Adaptable):
    """``torch.nn.Conv1d`` (zero padding) on ``[B, T, C]`` inputs.

    ``dtype``, ``param_dtype``, ``kernel_init`` and ``bias_init`` as in :class:`Dense`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, padding: Padding = 0, dilation: int = 1, groups: int = 1,
                 use_bias: bool = True, weight_norm: bool = False, torch_kx1: bool = False,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = default_kernel_init, bias_init: Initializer | None = None,
                 rngs: nnx.Rngs):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dtype, self.param_dtype = dtype, param_dtype
        self.kernel_size, self.stride, self.dilation, self.groups = kernel_size, stride, dilation, groups
        # Metadata for the converters only: the torch layer is weight-normed, and/or is a
        # Conv2d with a (K, 1) kernel (RVC's DiscriminatorP) that we run as a Conv1d.
        self.weight_norm, self.torch_kx1 = weight_norm, torch_kx1
        self.padding = _conv_padding(padding, kernel_size, stride, dilation)
        self.kernel, self.bias = _params(kernel_init, bias_init, (kernel_size, in_channels // groups, out_channels),
                                         in_channels // groups * kernel_size, use_bias, param_dtype, rngs)
        self._init_adapter_slots()

    def _conv(self, x, kernel, groups=1):
        if groups > 1 and self.dilation == 1:
            return grouped_conv1d(x, kernel, self.stride, tuple(self.padding), groups)
        if groups == 1 and _use_matmul_grads(x.shape, *kernel.shape, self.stride, self.dilation):
            return matmul_grad_conv1d(x, kernel, self.stride, tuple(self.padding), self.dilation)
        return lax.conv_general_dilated(
            x, kernel, window_strides=(self.stride,), padding=[self.padding],
            rhs_dilation=(self.dilation,), dimension_numbers=_DN, feature_group_count=groups)

    def lora_shapes(self, rank):
        if self.groups != 1:
            raise ValueError("LoRA on grouped convolutions (groups > 1) is not supported")
        return super().lora_shapes(rank)

    def from_torch(self, w):
        # Conv1d.weight [out, in/groups, K], or [out, in, K, 1] for a Kx1 Conv2d
        return (w[..., 0] if self.torch_kx1 else w).transpose(2, 1, 0)

    def to_torch(self, kernel):
        w = kernel.transpose(2, 1, 0)
        return w[..., None] if self.torch_kx1 else w

    def _lora_branch(self, x):
        x, a, b = promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        h = self._conv(self._adapter_input(x), a)
        return (h @ b) * self.lora_scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        y = self._conv(x, kernel, self.groups)
        if bias is not None:
            y = y + bias
        if self.has_lora:
            y = y + self._lora_branch(x)
        return y


@register_layer_kind("ConvTranspose1d", "ir,kro->kio")
class ConvTranspose1d(Adaptable):
    """``torch.nn.ConvTranspose1d`` on ``[B, T, C]`` inputs.

    Output length ``(L-1)·stride - 2·padding + dilation·(K-1) + output_padding + 1``.
    Implemented as a stride-1 convolution of the stride-dilated input with the
    spatially flipped kernel, which is exactly torch's definition. ``dtype``,
    ``param_dtype``, ``kernel_init`` and ``bias_init`` as in :class:`Dense` (torch's default
    fan-in of a transposed conv is ``out·K``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, padding: int = 0, output_padding: int = 0, dilation: int = 1,
                 use_bias: bool = True, weight_norm: bool = False,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = default_transpose_kernel_init,
                 bias_init: Initializer | None = None, rngs: nnx.Rngs):
        span = dilation * (kernel_size - 1)
        if padding > span:
            raise ValueError(f"padding {padding} > dilation*(kernel_size-1) = {span} is not supported")
        if output_padding >= max(stride, dilation):
            raise ValueError("output_padding must be smaller than stride or dilation (as in torch)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dtype, self.param_dtype = dtype, param_dtype
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.output_padding, self.dilation = output_padding, dilation
        self.weight_norm = weight_norm  # converter metadata (torch weight_g is per *input* channel)
        # torch computes fan_in of a ConvTranspose weight [in, out, K] as out*K (bias too).
        self.kernel, self.bias = _params(kernel_init, bias_init, (kernel_size, in_channels, out_channels),
                                         out_channels * kernel_size, use_bias, param_dtype, rngs)
        self._init_adapter_slots()

    def _conv_t(self, x, kernel):
        if self.dilation == 1:
            return self._conv_t_polyphase(x, kernel)
        span = self.dilation * (self.kernel_size - 1)
        pad = (span - self.padding, span - self.padding + self.output_padding)
        return lax.conv_general_dilated(
            x, jnp.flip(kernel, 0), window_strides=(1,), padding=[pad],
            lhs_dilation=(self.stride,), rhs_dilation=(self.dilation,), dimension_numbers=_DN)

    def _conv_t_polyphase(self, x, kernel):
        """Same result as the dilated-input convolution, without the zero-stuffing (10x
        the work for RVC's ``ups.0``): :func:`overlap_add_transpose`, cropping ``padding``
        on the left and taking torch's length."""
        out_len = (x.shape[1] - 1) * self.stride - 2 * self.padding + self.kernel_size + self.output_padding
        return overlap_add_transpose(x, kernel, self.stride, self.padding, out_len)

    def from_torch(self, w):
        return w.transpose(2, 0, 1)  # ConvTranspose1d.weight [in, out, K]

    def to_torch(self, kernel):
        return kernel.transpose(1, 2, 0)

    def _lora_branch(self, x):
        x, a, b = promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        h = self._adapter_input(x) @ a
        return self._conv_t(h, b) * self.lora_scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        y = self._conv_t(x, kernel)
        if bias is not None:
            y = y + bias
        if self.has_lora:
            y = y + self._lora_branch(x)
        return y


class Embed(nnx.Module):
    """``torch.nn.Embedding`` (``embedding [num, dim]``) with an optional trainable delta.

    ``add_delta()`` attaches ``lora_delta``, a zero-initialised full-size
    :class:`LoRAParam` added to the table. It is PEFT's ``modules_to_save`` for RVC's
    speaker embedding ``emb_g``: the table is tiny (109×256), only the rows of the
    speakers seen in training get gradients, and merging is an exact addition."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, embedding_init: Initializer = default_embed_init,
                 rngs: nnx.Rngs):
        self.num_embeddings, self.features = num_embeddings, features
        self.dtype, self.param_dtype = dtype, param_dtype
        self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features), param_dtype))
        self.lora_delta = nnx.data(None)

    @property
    def has_delta(self) -> bool:
        return self.lora_delta is not None

    def add_delta(self) -> None:
        if self.has_delta:
            raise ValueError("Embed already has a delta")
        self.lora_delta = LoRAParam(jnp.zeros_like(self.embedding[...]))

    def remove_delta(self) -> None:
        self.lora_delta = nnx.data(None)

    torch_param = "embedding"  # Embedding.weight [num, dim], same layout

    def from_torch(self, w):
        return w

    def to_torch(self, table):
        return table

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...]
        if self.has_delta:
            table = table + self.lora_delta[...]
        (table,) = promote_dtype((table,), dtype=self.dtype, inexact=False)  # delta added in param dtype
        return jnp.take(table, jnp.asarray(ids, jnp.int32), axis=0)
