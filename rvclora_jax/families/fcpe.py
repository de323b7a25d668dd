"""The FCPE family: torchfcpe's ``CFNaiveMelPE`` pitch estimator (conv-only checkpoints).

A torchfcpe checkpoint (``fcpe_c_v001.pt``, bundled in the ``torchfcpe`` wheel, and
Applio's ``fcpe.pt``) is ``{"model": state_dict, "config_dict": {"mel": ..., "model":
...}, ...}``. Recognition needs the state dict's keys (``input_stack.0.weight`` and
``net.encoder_layers.*``); the spec's :class:`~rvclora_jax.frontend.fcpe.FCPEConfig`
comes from the tensor shapes, cross-checked against ``config_dict`` when the file has one
(its ``mel`` section is not visible in the shapes and is taken from it, with torchfcpe's
defaults where an entry is absent).

Only the conv-only variant is supported (``config_dict.model.conv_only``, what every
released checkpoint uses): checkpoints with attention (``*.attn.*`` keys) or a harmonic
embedding are refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from ..frontend.fcpe import FCPE, FCPEConfig
from .base import DetectionError, Family, ModelSpec, dtype_kwargs, register

KIND = "fcpe"
MODEL_TYPE = "CFNaiveMelPE"
_MEL_KEYS = {"sr": "sr", "num_mels": "n_mels", "n_fft": "n_fft", "win_size": "win_size",
             "hop_size": "hop_size", "fmin": "fmin", "fmax": "fmax"}
_MODEL_KEYS = {"out_dims": "out_dims", "hidden_dims": "hidden_dims", "n_layers": "n_layers",
               "f0_min": "f0_min", "f0_max": "f0_max"}
_INT_FIELDS = {"sr", "n_mels", "n_fft", "win_size", "hop_size", "out_dims", "hidden_dims", "n_layers"}


def _number(section: str, key: str, v: Any, field: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise DetectionError(f"config_dict.{section}.{key} is {v!r}; expected a finite number")
    if field in _INT_FIELDS:
        if float(v) != int(v) or int(v) < 1:
            raise DetectionError(f"config_dict.{section}.{key} is {v!r}; expected a positive integer")
        return int(v)
    if float(v) < 0:
        raise DetectionError(f"config_dict.{section}.{key} is {v!r}; expected a number >= 0")
    return float(v)


def config_from_dict(config_dict: Any) -> tuple[FCPEConfig, dict[str, Any]]:
    """``(FCPEConfig, model_section)`` from torchfcpe's ``config_dict``; fields a section
    leaves out take torchfcpe's defaults (its mel ``fmax`` defaults to 8000 for the
    bundled model's ``sr`` 16000 in ``spawn_wav2mel``). Raises :class:`DetectionError`."""
    if not isinstance(config_dict, Mapping):
        raise DetectionError(f"key 'config_dict' should be a dict with 'mel' and 'model' sections, "
                             f"got {type(config_dict).__name__}")
    fields: dict[str, Any] = {}
    for section, names in (("mel", _MEL_KEYS), ("model", _MODEL_KEYS)):
        sec = config_dict.get(section)
        if not isinstance(sec, Mapping):
            raise DetectionError(f"config_dict.{section} is missing or not a dict")
        for key, field in names.items():
            if sec.get(key) is not None:
                fields[field] = _number(section, key, sec[key], field)
    model = dict(config_dict["model"])
    mtype = model.get("type", MODEL_TYPE)
    if mtype != MODEL_TYPE:
        raise DetectionError(f"config_dict.model.type is {mtype!r}; only {MODEL_TYPE!r} is supported")
    if config_dict.get("is_onnx"):
        raise DetectionError("config_dict.is_onnx is set: an ONNX model's config, not a PyTorch checkpoint")
    if not model.get("conv_only", False):
        raise DetectionError("config_dict.model.conv_only is not true: FCPE models with attention are not "
                             "supported (every released checkpoint, fcpe_c_v001.pt included, is conv-only)")
    if model.get("use_harmonic_emb"):
        raise DetectionError("config_dict.model.use_harmonic_emb is set: harmonic embeddings are not supported")
    mel = config_dict["mel"]
    if mel.get("type") not in (None, "default", "none", "None"):
        raise DetectionError(f"config_dict.mel.type is {mel.get('type')!r}; only the default mel is supported")
    try:
        cfg = FCPEConfig(**fields)
    except TypeError as e:  # pragma: no cover - fields are a fixed set
        raise DetectionError(f"config_dict: {e}") from None
    if cfg.win_size != cfg.n_fft:
        raise DetectionError(f"config_dict.mel: win_size {cfg.win_size} != n_fft {cfg.n_fft} is not supported")
    if not 0 <= cfg.fmin < cfg.fmax <= cfg.sr / 2:
        raise DetectionError(f"config_dict.mel: need 0 <= fmin < fmax <= sr/2, got fmin {cfg.fmin}, "
                             f"fmax {cfg.fmax}, sr {cfg.sr}")
    if not 0 < cfg.f0_min < cfg.f0_max:
        raise DetectionError(f"config_dict.model: need 0 < f0_min < f0_max, got {cfg.f0_min}, {cfg.f0_max}")
    return cfg, model


def _shape(sd, key, where) -> tuple[int, ...]:
    if key not in sd:
        raise DetectionError(f"key {key} missing from '{where}': not a complete FCPE (CFNaiveMelPE) state dict")
    return tuple(int(d) for d in np.shape(sd[key]))


def config_from_shapes(sd: Mapping[str, Any], where: str = "model") -> FCPEConfig:
    """The network's sizes from the tensor shapes (mel settings at their defaults)."""
    w0 = _shape(sd, "input_stack.0.weight", where)
    if len(w0) != 3 or w0[2] != 3:
        raise DetectionError(f"input_stack.0.weight has shape {list(w0)}; expected [hidden, n_mels, 3]")
    hidden, n_mels = w0[0], w0[1]
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"net\.encoder_layers\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise DetectionError(f"net.encoder_layers.*: found layers {layers}; expected 0..n-1")
    pw = _shape(sd, "net.encoder_layers.0.conformer.net.2.weight", where)
    dw = _shape(sd, "net.encoder_layers.0.conformer.net.4.conv.weight", where)
    if len(pw) != 3 or pw[0] % (2 * hidden) or pw[1:] != (hidden, 1):
        raise DetectionError(f"net.encoder_layers.0.conformer.net.2.weight has shape {list(pw)}; expected "
                             f"[2·inner, {hidden}, 1] with inner a multiple of {hidden}")
    expansion = pw[0] // (2 * hidden)
    if len(dw) != 3 or dw[:2] != (hidden * expansion, 1):
        raise DetectionError(f"net.encoder_layers.0.conformer.net.4.conv.weight has shape {list(dw)}; "
                             f"expected [{hidden * expansion}, 1, kernel]")
    if "output_proj.weight_v" in sd:
        out = _shape(sd, "output_proj.weight_v", where)
    elif "output_proj.parametrizations.weight.original1" in sd:
        out = _shape(sd, "output_proj.parametrizations.weight.original1", where)
    else:
        out = _shape(sd, "output_proj.weight", where)
    if len(out) != 2 or out[1] != hidden:
        raise DetectionError(f"output_proj weight has shape {list(out)}; expected [out_dims, {hidden}]")
    return FCPEConfig(n_mels=n_mels, hidden_dims=hidden, n_layers=len(layers), out_dims=out[0],
                      kernel_size=dw[2], expansion_factor=expansion)


@dataclasses.dataclass(frozen=True)
class FCPEFamily(Family):
    name: str = "fcpe"
    signature: str = "an FCPE pitch estimator has input_stack.0.weight and net.encoder_layers.* keys"
    buffers: tuple[str, ...] = ("cent_table", "gaussian_blurred_cent_mask")  # constants, not parameters

    def spec(self, config: FCPEConfig | None = None) -> ModelSpec:
        """The spec of an FCPE model (default: the bundled ``fcpe_c_v001`` layout)."""
        return ModelSpec(self.name, KIND, MODEL_TYPE, None, config or FCPEConfig(), (config or FCPEConfig()).sr)

    def build(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype=None, param_dtype=None) -> nnx.Module:
        if spec.family != self.name or spec.kind != KIND:
            raise ValueError(f"spec {spec.family}/{spec.kind} given to the {self.name!r} family")
        return FCPE(spec.config, rngs=rngs, **dtype_kwargs(dtype, param_dtype))

    def recognises(self, sd: Mapping[str, Any]) -> bool:
        return "input_stack.0.weight" in sd and any(k.startswith("net.encoder_layers.") for k in sd)

    def detect(self, sd: Mapping[str, Any], claims: Mapping[str, Any], *, layout: str = "base",
               where: str = "model") -> ModelSpec:
        attn = sorted(k for k in sd if ".attn." in k)
        if attn:
            raise DetectionError(f"{attn[0]}: FCPE models with attention are not supported (conv-only only)")
        if "harmonic_emb.weight" in sd:
            raise DetectionError("harmonic_emb.weight: FCPE models with a harmonic embedding are not supported")
        shapes = config_from_shapes(sd, where)
        if "config_dict" not in claims:
            return self.spec(shapes)
        cfg, _ = config_from_dict(claims["config_dict"])
        for field, key in (("n_mels", "mel.num_mels"), ("hidden_dims", "model.hidden_dims"),
                           ("n_layers", "model.n_layers"), ("out_dims", "model.out_dims")):
            if getattr(cfg, field) != getattr(shapes, field):
                raise DetectionError(f"config_dict.{key} is {getattr(cfg, field)} but the weights have "
                                     f"{getattr(shapes, field)} ({'input_stack.0.weight' if field in ('n_mels', 'hidden_dims') else 'net.encoder_layers.*' if field == 'n_layers' else 'output_proj'})")
        return self.spec(dataclasses.replace(cfg, kernel_size=shapes.kernel_size,
                                             expansion_factor=shapes.expansion_factor))


FCPE_FAMILY = register(FCPEFamily())

__all__ = ["FCPE_FAMILY", "FCPEFamily", "KIND", "MODEL_TYPE", "config_from_dict", "config_from_shapes"]
