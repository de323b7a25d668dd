"""HuBERT / ContentVec content features in JAX: the network and RVC's way of calling it.

Life cycle::

    model = rvclora_convert.hubert.load_hubert("hubert_base.pt")   # or an HF folder
    feats = ContentFeatures(model, output="v2")                     # jitted per bucket
    f = feats(wav16k)                          # (T, 768) float32, T = frames(len(wav16k))
    fs = feats.batch([wav_a, wav_b, ...])      # same results, batched by bucketed length

The network (:class:`Hubert`) is hubert-base as fairseq and ``transformers.HubertModel``
define it: a 7-conv feature encoder with a per-channel GroupNorm on its first layer
("group"/"default" extractor mode), the feature projection (LayerNorm + Linear), the
weight-normed convolutional positional embedding (kernel 128, 16 groups, the last frame
trimmed as SamePad does for an even kernel), an encoder LayerNorm and N post-LN
Transformer layers, and optionally ``final_proj`` (768→256: fairseq's pretraining head,
Applio's ``HubertModelWithFinalProj``). Parameter paths are the Hugging Face state-dict
keys (``encoder.layers.0.attention.k_proj`` ⇒ ``encoder/layers/0/attention/k_proj/kernel``);
the fairseq names are mapped onto them by ``rvclora_convert.hubert``.

Outputs, by name (:data:`OUTPUTS`):

* ``"v2"``: the output of layer 12 (768-d). fairseq's ``extract_features(output_layer=12)``
  returns the last layer's output as is (post-LN: no final LayerNorm), which is HF's
  ``last_hidden_state`` = ``hidden_states[12]``; RVC's ``extract_feature_print.py`` and
  its inference pipeline use it for v2 models.
* ``"v1"``: ``final_proj`` of the output of layer 9 (HF ``hidden_states[9]``), RVC's v1.
* ``"v1-applio"``: ``final_proj`` of the last layer, what Applio feeds v1 models.

fairseq's ``output_layer`` is 1-based and runs layers up to it; a model with fewer
layers runs them all, as fairseq does. Layers past the requested one are not computed.

Frames: a clip of ``N`` samples at 16 kHz gives ``frames(N) = (N - 400) // 320 + 1``
frames at 50 fps (0 below 400 samples), the conv stack's arithmetic. RVC pads nothing
before the extractor (its ``padding_mask`` is all False), and neither do we: batches and
buckets pad the waveform, but every padded sample is masked out — the GroupNorm's
statistics are taken over the real frames only, padded frames are zeroed before the
positional conv and are never attended to — so a clip's features do not depend on the
bucket or on its batch neighbours (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from flax.typing import Dtype

from .. import initializers
from ..layers import Conv1d, Dense

SAMPLE_RATE = 16000
FRAME_RATE = 50

# RVC's extract_feature_print.py / Pipeline.vc: output_layer 9 (+ final_proj) for v1, 12 for v2.
OUTPUTS = {
    "v2": (12, False),          # (fairseq output_layer, through final_proj)
    "v1": (9, True),
    "v1-applio": (None, True),  # None: the last layer
}
HUBERT_BASE_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclasses.dataclass(frozen=True)
class HubertConfig:
    """The architecture (hashable: one traced structure per config).

    Defaults are hubert-base / ContentVec (what RVC's ``hubert_base.pt`` holds)."""

    conv_layers: tuple[tuple[int, int, int], ...] = HUBERT_BASE_CONV  # (channels, kernel, stride)
    conv_bias: bool = False
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    conv_pos: int = 128
    conv_pos_groups: int = 16
    layer_norm_eps: float = 1e-5
    final_proj_dim: int | None = 256   # None: the model has no final_proj
    normalize_waveform: bool = False   # fairseq task.normalize: RVC's training extractor then
                                       # layer-normalises each clip's waveform first

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % self.conv_pos_groups:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by conv_pos_groups "
                             f"{self.conv_pos_groups}")

    @property
    def receptive_field(self) -> int:
        r = 1
        for _, k, s in reversed(self.conv_layers):
            r = (r - 1) * s + k
        return r

    @property
    def hop(self) -> int:
        return math.prod(s for _, _, s in self.conv_layers)


def conv_frames(n_samples, conv_layers: Sequence[tuple[int, int, int]] = HUBERT_BASE_CONV):
    """Frames the conv stack makes of ``n_samples`` (int or integer array), layer by layer
    as torch's ``conv1d`` (no padding) counts them; 0 when the clip is too short."""
    xp = jnp if isinstance(n_samples, jax.Array) else np
    n = n_samples
    for _, k, s in conv_layers:
        n = xp.maximum((n - k) // s + 1, 0)
    return n


def frames(n_samples: int, conv_layers: Sequence[tuple[int, int, int]] = HUBERT_BASE_CONV) -> int:
    """RVC's number of 50 fps feature frames for a clip of ``n_samples`` at 16 kHz:
    ``(N - 400) // 320 + 1`` for hubert-base (0 below 400 samples)."""
    return int(conv_frames(int(n_samples), conv_layers))


# ----------------------------------------------------------------------------- layers

class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm`` over the last axis, with torch's names (``weight``, ``bias``).
    Statistics in at least float32, so a bfloat16 model normalises stably."""

    def __init__(self, features: int, eps: float = 1e-5, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # ones / zeros, as in torch
        self.features, self.eps, self.dtype = features, eps, dtype
        self.weight = nnx.Param(initializers.ones(None, (features,), param_dtype))
        self.bias = nnx.Param(initializers.zeros(None, (features,), param_dtype))

    def __call__(self, x):
        x, w, b = promote_dtype((x, self.weight[...], self.bias[...]), dtype=self.dtype)
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xs, -1, keepdims=True)
        var = jnp.mean(jnp.square(xs - mean), -1, keepdims=True)
        return ((xs - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * w + b


class ChannelGroupNorm(nnx.Module):
    """``torch.nn.GroupNorm(C, C)`` (one group per channel) on ``[B, T, C]``: each channel
    is normalised over time. ``mask [B, T, 1]`` restricts the statistics to the real frames
    (a padded clip then normalises as the unpadded one). Statistics in float32 (fairseq's
    ``Fp32GroupNorm``)."""

    def __init__(self, channels: int, eps: float = 1e-5, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.channels, self.eps, self.dtype = channels, eps, dtype
        self.weight = nnx.Param(initializers.ones(None, (channels,), param_dtype))
        self.bias = nnx.Param(initializers.zeros(None, (channels,), param_dtype))

    def __call__(self, x, mask=None):
        x, w, b = promote_dtype((x, self.weight[...], self.bias[...]), dtype=self.dtype)
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if mask is None:
            mean = jnp.mean(xs, 1, keepdims=True)
            var = jnp.mean(jnp.square(xs - mean), 1, keepdims=True)
        else:
            # jnp.where, not a multiply by a float mask: XLA's CPU reduction over
            # ``xs * m[B, T, 1]`` ran 24x slower (240 vs 10 ms for one 3.7 s clip's
            # 11840 x 512 frames), which was 40% of a batch-1 HuBERT call
            count = jnp.maximum(jnp.sum(mask, 1, keepdims=True), 1).astype(xs.dtype)
            mean = jnp.sum(jnp.where(mask, xs, 0), 1, keepdims=True) / count
            var = jnp.sum(jnp.where(mask, jnp.square(xs - mean), 0), 1, keepdims=True) / count
        return ((xs - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * w + b


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)  # fairseq and HF use the exact erf form


class FeatureConvLayer(nnx.Module):
    """One conv of the feature encoder: conv (no bias in hubert-base) → [GroupNorm] → GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, *, group_norm: bool,
                 use_bias: bool, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv1d(c_in, c_out, kernel, stride=stride, use_bias=use_bias, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = (ChannelGroupNorm(c_out, dtype=dtype, param_dtype=param_dtype)
                           if group_norm else nnx.data(None))

    def __call__(self, x, mask=None):
        # XLA's own strided conv: on this CPU it beat the same conv written as
        # stride-blocked matmuls (0.48 s vs 0.59 s CPU for two 3.7 s clips).
        y = self.conv(x)
        if self.layer_norm is not None:
            y = self.layer_norm(y, mask)
        return _gelu(y)


class FeatureEncoder(nnx.Module):
    def __init__(self, cfg: HubertConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        layers, c_in = [], 1
        for i, (c, k, s) in enumerate(cfg.conv_layers):
            layers.append(FeatureConvLayer(c_in, c, k, s, group_norm=i == 0, use_bias=cfg.conv_bias,
                                           dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            c_in = c
        self.conv_layers = nnx.List(layers)
        self.geometry = tuple((k, s) for _, k, s in cfg.conv_layers)

    def __call__(self, wav, n_samples=None):
        """``wav [B, N]`` → ``[B, T, C]``; ``n_samples [B]`` masks the GroupNorm statistics."""
        x = wav[..., None]
        for i, layer in enumerate(self.conv_layers):
            mask = None
            if i == 0 and n_samples is not None:
                k, s = self.geometry[0]
                valid = jnp.maximum((n_samples - k) // s + 1, 0)
                t0 = (x.shape[1] - k) // s + 1
                mask = (jnp.arange(t0)[None, :] < valid[:, None])[..., None]
            x = layer(x, mask)
        return x


class FeatureProjection(nnx.Module):
    def __init__(self, c_in: int, hidden: int, eps: float, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.layer_norm = LayerNorm(c_in, eps, dtype=dtype, param_dtype=param_dtype)
        self.projection = Dense(c_in, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.projection(self.layer_norm(x))


class PositionalConvEmbedding(nnx.Module):
    """Grouped conv (kernel K, padding K//2), the last frame dropped when K is even
    (fairseq's SamePad), GELU. The torch weight is weight-normed over ``dim=2`` (one g
    per tap); the converters fold it, so the kernel here is the effective weight."""

    def __init__(self, hidden: int, kernel: int, groups: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=groups, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
        self.trim = 1 if kernel % 2 == 0 else 0

    def __call__(self, x):
        y = self.conv(x)
        if self.trim:
            y = y[:, : y.shape[1] - self.trim]
        return _gelu(y)


class Attention(nnx.Module):
    def __init__(self, hidden: int, heads: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads, self.head_dim = heads, hidden // heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(hidden, hidden, **kw)
        self.k_proj = Dense(hidden, hidden, **kw)
        self.v_proj = Dense(hidden, hidden, **kw)
        self.out_proj = Dense(hidden, hidden, **kw)

    def __call__(self, x, key_mask=None):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.head_dim)  # noqa: E731
        if any(p.has_lora for p in (self.q_proj, self.k_proj, self.v_proj)):
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # one GEMM for q, k and v (three reads of x become one)
            ps = (self.q_proj, self.k_proj, self.v_proj)
            x_, kern, bias = promote_dtype((x, jnp.concatenate([p.kernel[...] for p in ps], 1),
                                            jnp.concatenate([p.bias[...] for p in ps])), dtype=self.q_proj.dtype)
            q, k, v = jnp.split(x_ @ kern + bias, 3, axis=-1)
        # heads-major [b, h, t, d] operands: XLA's CPU dot then runs as plain batched GEMMs
        heads = lambda y: split(y).transpose(0, 2, 1, 3)  # noqa: E731
        q = heads(q) * jnp.asarray(self.head_dim ** -0.5, q.dtype)
        k, v = heads(k), heads(v)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3).reshape(b, t, self.heads * self.head_dim)
        return self.out_proj(o)


class FeedForward(nnx.Module):
    def __init__(self, hidden: int, inner: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.intermediate_dense = Dense(hidden, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output_dense = Dense(inner, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.output_dense(_gelu(self.intermediate_dense(x)))


class EncoderLayer(nnx.Module):
    """Post-LN layer (fairseq ``layer_norm_first=False``): x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: HubertConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attention = Attention(cfg.hidden_size, cfg.num_heads, **kw, rngs=rngs)
        self.layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size, **kw, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, x, key_mask=None):
        x = self.layer_norm(x + self.attention(x, key_mask))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: HubertConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.pos_conv_embed = PositionalConvEmbedding(cfg.hidden_size, cfg.conv_pos, cfg.conv_pos_groups,
                                                      **kw, rngs=rngs)
        self.layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.layers = nnx.List([EncoderLayer(cfg, **kw, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, x, key_mask=None, n_layers: int | None = None, stacked=None):
        """``stacked``: ``(graphdef, state)`` of one layer with the first ``n_layers``
        layers' states stacked on a leading axis (:func:`stack_layers`); the layers then
        run as one ``lax.scan`` (compiled once, not once per layer)."""
        if key_mask is not None:  # padded frames read as zeros by the positional conv (as unpadded)
            x = jnp.where(key_mask[..., None], x, 0)
        x = self.layer_norm(x + self.pos_conv_embed(x))
        if stacked is not None:
            layer_def, layer_states = stacked

            def step(h, st):
                return nnx.merge(layer_def, st)(h, key_mask), None

            x, _ = jax.lax.scan(step, x, layer_states)
            return x
        for layer in list(self.layers)[: len(self.layers) if n_layers is None else n_layers]:
            x = layer(x, key_mask)
        return x


def stack_layers(encoder: Encoder, n_layers: int):
    """``(graphdef, state)`` of ``encoder.layers[0]`` with the states of the first
    ``n_layers`` layers stacked (leading axis), for :meth:`Encoder.__call__`'s scan."""
    layers = list(encoder.layers)[:n_layers]
    layer_def, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]
    return layer_def, jax.tree.map(lambda *a: jnp.stack(a), *states)


class Hubert(nnx.Module):
    """HuBERT / ContentVec (see the module docstring). ``dtype``: compute dtype (None:
    that of the params and input); ``param_dtype``: storage. Build it from weights with
    ``rvclora_convert.hubert.load_hubert`` (or the ``hubert`` model family)."""

    def __init__(self, config: HubertConfig = HubertConfig(), *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.feature_extractor = FeatureEncoder(config, **kw)
        self.feature_projection = FeatureProjection(config.conv_layers[-1][0], config.hidden_size,
                                                    config.layer_norm_eps, **kw)
        self.encoder = Encoder(config, **kw)
        self.final_proj = (Dense(config.hidden_size, config.final_proj_dim, **kw)
                           if config.final_proj_dim else nnx.data(None))

    def n_layers(self, output_layer: int | None) -> int:
        """How many Transformer layers fairseq's ``output_layer`` runs."""
        return self.config.num_layers if output_layer is None else max(0, min(int(output_layer),
                                                                               self.config.num_layers))

    def __call__(self, wav, n_samples=None, *, output_layer: int | None = None, final_proj: bool = False,
                 stacked=None):
        """``wav [B, N]`` (16 kHz) → features ``[B, T, C]`` with ``T = frames(N)``.

        ``n_samples [B]`` (int): the real length of each padded row; frames past
        ``frames(n_samples)`` are then garbage and must be cut by the caller, but the
        real ones equal those of the unpadded clip. ``output_layer`` is fairseq's
        (1-based; ``None`` or larger than the model: the last layer; 0: the encoder's
        input after the positional conv and LayerNorm). ``final_proj`` applies it.
        ``stacked``: :func:`stack_layers` of those layers, to run them as a scan."""
        x = self.feature_extractor(wav, n_samples)
        x = self.feature_projection(x)
        key_mask = None
        if n_samples is not None:
            valid = conv_frames(jnp.asarray(n_samples), self.config.conv_layers)
            key_mask = jnp.arange(x.shape[1])[None, :] < valid[:, None]
        x = self.encoder(x, key_mask, self.n_layers(output_layer), stacked)
        if final_proj:
            if self.final_proj is None:
                raise ValueError("this HuBERT model has no final_proj (an HF HubertModel without Applio's "
                                 "extension): only output='v2' is available")
            x = self.final_proj(x)
        return x


# ----------------------------------------------------------------------------- RVC's extractor

def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """``F.layer_norm(wav, wav.shape)``: what RVC's training extractor applies when the
    checkpoint's ``task.normalize`` is set (zero mean, unit variance, eps 1e-5)."""
    w = np.asarray(wav, np.float64)
    return ((w - w.mean()) / np.sqrt(w.var() + 1e-5)).astype(np.float32)


def bucket_frames(t: int) -> int:
    """The bucket a clip of ``t`` frames runs in: ``t`` rounded up to a multiple of
    ``max(8, 2^floor(log2 t) / 8)`` frames, so at most ~12% of a batch is padding and a
    corpus compiles one program per octave-eighth (RVC's 3.7 s segments all share one)."""
    if t <= 8:
        return 8
    step = max(8, 1 << (int(t).bit_length() - 4))
    return -(-t // step) * step


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _extract(graphdef, layer_def, output_layer, final_proj, dtype, state, stacked, wav, n):
    # One jit for every ContentFeatures: models of the same structure (graphdef) share
    # their compiled buckets.
    m = nnx.merge(graphdef, state)  # (its per-layer weights are unused arguments: see `stacked`)
    if dtype is not None:
        wav = wav.astype(dtype)
    return m(wav, n, output_layer=output_layer, final_proj=final_proj,
             stacked=(layer_def, stacked) if layer_def is not None else None).astype(jnp.float32)


class ContentFeatures:
    """RVC's content-feature extractor on a :class:`Hubert`: ``__call__(wav16k)`` for one
    clip, :meth:`batch` for many. ``output``: ``"v2"`` (layer 12, 768-d), ``"v1"`` (RVC:
    final_proj of layer 9, 256-d) or ``"v1-applio"`` (final_proj of the last layer).
    ``dtype``: compute dtype (None: the model's, float32); results are float32 numpy
    ``(T, C)``. ``normalize``: layer-normalise each waveform first (None: the model
    config's ``normalize_waveform``, i.e. the fairseq checkpoint's ``task.normalize``).

    Clips are padded to a bucket length (:func:`bucket_frames`, or ``bucket(frames)``
    when given: any rule ``t -> T >= t``) with their real length passed along, so each
    bucket × batch size compiles once and padding changes nothing."""

    def __init__(self, model: Hubert, output: str = "v2", dtype=None, *, batch_size: int = 8,
                 normalize: bool | None = None, bucket: Callable[[int], int] | None = None):
        if output not in OUTPUTS:
            raise ValueError(f"unknown HuBERT output {output!r}; expected one of {', '.join(OUTPUTS)}")
        layer, proj = OUTPUTS[output]
        if proj and model.final_proj is None:
            raise ValueError(f"output={output!r} needs final_proj, which this HuBERT model lacks "
                             f"(only output='v2' is available)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.output, self.batch_size = output, int(batch_size)
        self.bucket = bucket_frames if bucket is None else bucket
        self.config: HubertConfig = model.config
        self.normalize = self.config.normalize_waveform if normalize is None else bool(normalize)
        self.dim = self.config.final_proj_dim if proj else self.config.hidden_size
        n_layers = model.n_layers(layer)
        # The Transformer layers run as one scan over their stacked weights: XLA then
        # compiles one layer, not twelve (on a CPU ~1 s of compile time per layer and
        # bucket). The model's own per-layer weights are not passed in.
        layer_def, stacked = stack_layers(model.encoder, n_layers) if n_layers else (None, None)
        graphdef, state = nnx.split(model)
        cast = (lambda t: t) if dtype is None else (lambda t: jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t))
        self._state, self._stacked = cast(state), cast(stacked)
        self._static = (graphdef, layer_def, layer, proj, None if dtype is None else jnp.dtype(dtype).name)

    def frames(self, n_samples: int) -> int:
        return frames(n_samples, self.config.conv_layers)

    def bucket_for(self, t: int) -> int:
        """The bucket (padded frame count) a clip of ``t`` frames runs in."""
        tb = int(self.bucket(t))
        if tb < t:
            raise ValueError(f"bucket({t}) = {tb} frames is shorter than the clip")
        return tb

    def _padded_len(self, t_bucket: int) -> int:
        # The longest clip with t_bucket frames: every shorter clip fits, and the padded
        # row itself still gives exactly t_bucket frames.
        n = self.config.receptive_field + (t_bucket - 1) * self.config.hop
        return n + self.config.hop - 1

    def _prepare(self, wav) -> np.ndarray:
        w = np.asarray(wav, np.float32)
        if w.ndim != 1:
            raise ValueError(f"expected a mono waveform of shape (N,), got shape {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("the waveform contains NaN or inf samples")
        return normalize_waveform(w) if self.normalize and w.size else w

    def _run_group(self, wavs: list[np.ndarray], t_bucket: int, rows: int) -> list[np.ndarray]:
        n_pad = self._padded_len(t_bucket)
        x = np.zeros((rows, n_pad), np.float32)
        n = np.zeros((rows,), np.int32)
        for i, w in enumerate(wavs):
            x[i, : w.size] = w
            n[i] = w.size
        n[len(wavs):] = n_pad  # filler rows: full length (their output is dropped)
        y = np.asarray(_extract(*self._static, self._state, self._stacked, jnp.asarray(x), jnp.asarray(n)))
        return [y[i, : self.frames(w.size)] for i, w in enumerate(wavs)]

    def __call__(self, wav16k) -> np.ndarray:
        """Features ``(frames(N), C)`` float32 of one 16 kHz mono clip of ``N`` samples."""
        w = self._prepare(wav16k)
        t = self.frames(w.size)
        if t == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._run_group([w], self.bucket_for(t), 1)[0]

    def batch(self, wavs: Iterable, progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Features of each clip, in order (as :meth:`__call__` would give them). Clips are
        grouped by bucket and run ``batch_size`` at a time (a last, smaller group is padded
        to the next power of two, so few batch shapes compile); ``progress(done, total)``
        is called after each group."""
        wavs = [self._prepare(w) for w in wavs]
        out: list[np.ndarray | None] = [None] * len(wavs)
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(wavs):
            t = self.frames(w.size)
            if t == 0:
                out[i] = np.zeros((0, self.dim), np.float32)
            else:
                groups.setdefault(self.bucket_for(t), []).append(i)
        done, total = sum(o is not None for o in out), len(wavs)
        for t_bucket in sorted(groups):
            idx = groups[t_bucket]
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s: s + self.batch_size]
                rows = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
                for i, y in zip(chunk, self._run_group([wavs[i] for i in chunk], t_bucket, rows)):
                    out[i] = y
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return out  # type: ignore[return-value]


__all__ = ["HubertConfig", "Hubert", "ContentFeatures", "stack_layers", "OUTPUTS", "HUBERT_BASE_CONV", "frames", "conv_frames",
           "bucket_frames", "normalize_waveform", "SAMPLE_RATE", "FRAME_RATE"]
