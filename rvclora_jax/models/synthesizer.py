"""The RVC synthesizer (``SynthesizerTrnMs{256,768}NSFsid[_nono]``) and its configs.

One :class:`Synthesizer` class covers RVC's four: ``version`` picks the content-feature
width of ``enc_p`` (v1: 256, v2: 768) and ``f0`` picks the NSF decoder with a pitch
embedding, or the plain decoder without. Parameter paths equal RVC's state_dict keys.

Randomness is explicit: the training forward takes the posterior noise ``eps_q``, the
slice starts ``ids_slice`` and the NSF ``source_noise``; ``infer`` takes the prior noise
``eps`` (scaled by ``noise_scale``, RVC's literal 0.66666 by default) and
``source_noise``. Missing noise arrays mean zeros, i.e. deterministic rendering.

``dtype`` (compute) and ``param_dtype`` are passed down to every submodule (flax's
convention): ``Synthesizer(..., dtype=jnp.bfloat16)`` computes in bfloat16 and keeps
float32 parameters. Masks follow the activations' dtype, noise inputs are cast to it,
and the NSF source stays float32 (``generator.SOURCE_DTYPE``). Losses, STFT and mel
are not part of the model and stay float32.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from ..layers import Conv1d, Embed
from .commons import sequence_mask
from .generator import Generator
from .modules import WN, Flip, ResidualCouplingLayer
from .text_encoder import TextEncoder

INFER_NOISE_SCALE = 0.66666  # RVC's literal, not 2/3


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """The 18 constructor arguments of RVC's synthesizers, stored as ``config`` in inference models."""

    spec_channels: int = 1025
    segment_size: int = 32
    inter_channels: int = 192
    hidden_channels: int = 192
    filter_channels: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    p_dropout: float = 0.0
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple[int, ...] = (10, 10, 2, 2)
    upsample_initial_channel: int = 512
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    spk_embed_dim: int = 109
    gin_channels: int = 256
    sr: int = 40000

    FIELDS = ("spec_channels", "segment_size", "inter_channels", "hidden_channels", "filter_channels",
              "n_heads", "n_layers", "kernel_size", "p_dropout", "resblock", "resblock_kernel_sizes",
              "resblock_dilation_sizes", "upsample_rates", "upsample_initial_channel",
              "upsample_kernel_sizes", "spk_embed_dim", "gin_channels", "sr")

    @property
    def hop_length(self) -> int:
        n = 1
        for u in self.upsample_rates:
            n *= u
        return n

    @classmethod
    def from_list(cls, config: Sequence[Any]) -> "SynthConfig":
        """From RVC's 18-element list (``sr`` may be an int or ``"40k"``), every entry
        checked: a bad value raises :class:`ValueError` naming ``config[i] field``."""
        if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
            raise ValueError(f"RVC config must be an 18-entry list, got {type(config).__name__}")
        if len(config) != 18:
            raise ValueError(f"RVC config list must have 18 entries, got {len(config)}")
        from ..families.rvc import parse_sr  # RVC's rate names ("40k") belong to the family

        idx = {f: i for i, f in enumerate(cls.FIELDS)}
        raw = dict(zip(cls.FIELDS, config))

        def bad(field, want):
            return ValueError(f"config[{idx[field]}] {field} = {raw[field]!r}: expected {want}")

        def pos_int(field, v=None, *, want="a positive integer"):
            v = raw[field] if v is None else v
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise bad(field, want)
            return int(v)

        def int_list(field, *, n=None):
            v = raw[field]
            want = f"a non-empty list of positive integers{f' ({n} entries)' if n else ''}"
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not v or (n and len(v) != n):
                raise bad(field, want)
            return tuple(pos_int(field, x, want=want) for x in v)

        vals = {f: pos_int(f) for f in ("spec_channels", "segment_size", "inter_channels", "hidden_channels",
                                        "filter_channels", "n_heads", "n_layers", "kernel_size",
                                        "upsample_initial_channel", "spk_embed_dim", "gin_channels")}
        if vals["hidden_channels"] % vals["n_heads"]:
            raise bad("n_heads", f"a divisor of hidden_channels ({vals['hidden_channels']})")
        p = raw["p_dropout"]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= float(p) < 1.0):
            raise bad("p_dropout", "a number in [0, 1)")  # NaN fails the comparison too
        vals["p_dropout"] = float(p)
        rb = raw["resblock"]
        if isinstance(rb, bool) or str(rb) not in ("1", "2"):
            raise bad("resblock", "'1' or '2'")
        vals["resblock"] = str(rb)
        vals["resblock_kernel_sizes"] = int_list("resblock_kernel_sizes")
        d = raw["resblock_dilation_sizes"]
        n_dil = 3 if vals["resblock"] == "1" else 2  # ResBlock1 has 3 dilated convs, ResBlock2 2
        want = (f"{len(vals['resblock_kernel_sizes'])} lists (one per resblock kernel size) of "
                f"{n_dil}+ positive integers")
        if (isinstance(d, (str, bytes)) or not isinstance(d, Sequence)
                or len(d) != len(vals["resblock_kernel_sizes"])):
            raise bad("resblock_dilation_sizes", want)
        for x in d:
            if isinstance(x, (str, bytes)) or not isinstance(x, Sequence) or len(x) < n_dil:
                raise bad("resblock_dilation_sizes", want)
        vals["resblock_dilation_sizes"] = tuple(tuple(pos_int("resblock_dilation_sizes", y, want=want) for y in x)
                                                for x in d)
        vals["upsample_rates"] = int_list("upsample_rates")
        vals["upsample_kernel_sizes"] = int_list("upsample_kernel_sizes", n=len(vals["upsample_rates"]))
        if vals["upsample_initial_channel"] >> len(vals["upsample_rates"]) < 1:
            raise bad("upsample_initial_channel", f"at least 2**{len(vals['upsample_rates'])} (the channels "
                                                  f"halve at each of the {len(vals['upsample_rates'])} upsamplers)")
        try:
            sr = parse_sr(raw["sr"]) if not isinstance(raw["sr"], bool) else None
        except (TypeError, ValueError):
            sr = None
        if sr is None or sr <= 0:
            raise bad("sr", "a sample rate such as 40000 or '40k'")
        vals["sr"] = sr
        return cls(**vals)

    def to_list(self) -> list:
        out = []
        for f in self.FIELDS:
            v = getattr(self, f)
            if f == "resblock_dilation_sizes":
                v = [list(d) for d in v]
            elif isinstance(v, tuple):
                v = list(v)
            out.append(v)
        return out

    def replace(self, **kw) -> "SynthConfig":
        return dataclasses.replace(self, **kw)


class PosteriorEncoder(nnx.Module):
    """``enc_q``: linear spectrogram → posterior z (training only)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int,
                 dilation_rate: int, n_layers: int, gin_channels: int = 0, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.out_channels = out_channels
        dt = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre = Conv1d(in_channels, hidden_channels, 1, **dt)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels, **dt)
        self.proj = Conv1d(hidden_channels, 2 * out_channels, 1, **dt)

    def __call__(self, spec, lengths, g=None, *, eps=None):
        x = self.pre(spec)
        x_mask = sequence_mask(lengths, spec.shape[1])[..., None].astype(x.dtype)  # the compute dtype
        x = self.enc(x * x_mask, x_mask, g)
        stats = self.proj(x) * x_mask
        m, logs = stats[..., :self.out_channels], stats[..., self.out_channels:]
        z = m if eps is None else m + jnp.asarray(eps, m.dtype) * jnp.exp(logs)
        return z * x_mask, m, logs, x_mask


class ResidualCouplingBlock(nnx.Module):
    """``flow``: [coupling, Flip] × n_flows; params live at even indices (0, 2, 4, 6)."""

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, dilation_rate: int,
                 n_layers: int, n_flows: int = 4, gin_channels: int = 0, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        flows = []
        for _ in range(n_flows):
            flows.append(ResidualCouplingLayer(channels, hidden_channels, kernel_size, dilation_rate,
                                               n_layers, gin_channels=gin_channels, mean_only=True,
                                               dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            flows.append(Flip())
        self.flows = nnx.List(flows)

    def __call__(self, x, x_mask, g=None, reverse: bool = False):
        for flow in (list(self.flows)[::-1] if reverse else self.flows):
            x = flow(x, x_mask, g, reverse=reverse)
        return x


def slice_segments(x: jax.Array, starts: jax.Array, size: int) -> jax.Array:
    """Per-row time slices ``x[b, starts[b]:starts[b]+size]`` of ``[B, T, ...]``."""
    def one(row, s):
        return jax.lax.dynamic_slice_in_dim(row, s, size, axis=0)
    return jax.vmap(one)(x, jnp.asarray(starts, jnp.int32))


class Synthesizer(nnx.Module):
    """RVC's synthesizer. ``version`` "v1" (256-d features) or "v2" (768-d); ``f0`` on/off.

    ============  =====================================
    RVC class     here
    ============  =====================================
    ``SynthesizerTrnMs256NSFsid``        ``Synthesizer(cfg, "v1", f0=True)``
    ``SynthesizerTrnMs768NSFsid``        ``Synthesizer(cfg, "v2", f0=True)``
    ``SynthesizerTrnMs256NSFsid_nono``   ``Synthesizer(cfg, "v1", f0=False)``
    ``SynthesizerTrnMs768NSFsid_nono``   ``Synthesizer(cfg, "v2", f0=False)``
    ============  =====================================
    """

    def __init__(self, config: SynthConfig, version: str = "v2", f0: bool = True, *,
                 rngs: nnx.Rngs, with_enc_q: bool = True,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        c = config
        self.config, self.version, self.f0 = c, version, bool(f0)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.feature_dim = 256 if version == "v1" else 768
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        # Each submodule draws from its own fork of rngs. Under nnx.eval_shape every
        # rngs.params() costs time proportional to the draws already taken from that Rngs
        # (flax probes the traced counter's .sharding, and jax's error message prints the
        # counter's whole history), so one stream for ~200 layers is quadratic: 6-7 s
        # for the v2 synthesizer instead of ~1.5 s.
        self.enc_p = TextEncoder(self.feature_dim, c.inter_channels, c.hidden_channels, c.filter_channels,
                                 c.n_heads, c.n_layers, c.kernel_size, c.p_dropout, f0=self.f0, **dt,
                                 rngs=rngs.fork())
        self.dec = Generator(c.inter_channels, c.resblock, c.resblock_kernel_sizes, c.resblock_dilation_sizes,
                             c.upsample_rates, c.upsample_initial_channel, c.upsample_kernel_sizes,
                             gin_channels=c.gin_channels, nsf=self.f0, sr=c.sr, **dt, rngs=rngs.fork())
        # enc_q only serves training; RVC deletes it from inference models. Its fork is
        # taken either way, so the other submodules get the same weights with or without it.
        enc_q_rngs = rngs.fork()
        self.enc_q = (PosteriorEncoder(c.spec_channels, c.inter_channels, c.hidden_channels, 5, 1, 16,
                                       gin_channels=c.gin_channels, **dt, rngs=enc_q_rngs)
                      if with_enc_q else nnx.data(None))
        self.flow = ResidualCouplingBlock(c.inter_channels, c.hidden_channels, 5, 1, 3,
                                          gin_channels=c.gin_channels, **dt, rngs=rngs.fork())
        self.emb_g = Embed(c.spk_embed_dim, c.gin_channels, **dt, rngs=rngs)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def speaker(self, sid: jax.Array) -> jax.Array:
        return self.emb_g(jnp.asarray(sid, jnp.int32))[:, None, :]  # [B, 1, gin]

    def __call__(self, phone, phone_lengths, pitch, pitchf, spec, spec_lengths, sid, *,
                 ids_slice, segment_size: int | None = None, eps_q=None, source_noise=None):
        """Training forward (RVC ``forward``). Returns
        ``(o, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q))`` with
        ``o [B, seg·hop, 1]``; ``segment_size`` is in frames (defaults to the config's)."""
        if self.enc_q is None:
            raise ValueError("this synthesizer was built without enc_q (inference only)")
        seg = segment_size or self.config.segment_size
        g = self.speaker(sid)
        m_p, logs_p, x_mask = self.enc_p(phone, pitch if self.f0 else None, phone_lengths)
        z, m_q, logs_q, y_mask = self.enc_q(spec, spec_lengths, g, eps=eps_q)
        z_p = self.flow(z, y_mask, g)
        z_slice = slice_segments(z, ids_slice, seg)
        f0_slice = slice_segments(pitchf, ids_slice, seg) if self.f0 else None
        o = self.dec(z_slice, f0_slice, g, source_noise=source_noise)
        return o, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q)

    def infer(self, phone, phone_lengths, pitch=None, nsff0=None, sid=None, *, eps=None,
              noise_scale: float = INFER_NOISE_SCALE, source_noise=None, mask_decoder: bool = False):
        """RVC ``infer``: returns ``(o [B, T·hop, 1], x_mask, (z, z_p, m_p, logs_p))``.

        ``mask_decoder=True`` makes every row of a padded batch equal to rendering it alone
        (see :class:`Generator`); the default reproduces RVC's batched ``infer``."""
        if sid is None:
            sid = jnp.zeros((phone.shape[0],), jnp.int32)
        g = self.speaker(sid)
        m_p, logs_p, x_mask = self.enc_p(phone, pitch if self.f0 else None, phone_lengths)
        z_p = m_p if eps is None else m_p + jnp.exp(logs_p) * jnp.asarray(eps, m_p.dtype) * noise_scale
        z_p = z_p * x_mask
        z = self.flow(z_p, x_mask, g, reverse=True)
        o = self.dec(z * x_mask, nsff0 if self.f0 else None, g, source_noise=source_noise,
                     x_mask=x_mask if mask_decoder else None)
        return o, x_mask, (z, z_p, m_p, logs_p)

