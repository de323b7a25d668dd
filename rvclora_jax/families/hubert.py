"""The HuBERT / ContentVec content-encoder family (:class:`rvclora_jax.frontend.hubert.Hubert`).

One spec kind, ``"hubert"``, version ``"base"``: a group-norm feature encoder and a
post-LN Transformer (hubert-base, ContentVec, the language-specific hubert-base models
Applio offers). Sizes are read from the state dict (Hugging Face names: the converters
rename fairseq's first) and cross-checked against what the file's config claims; what
shapes cannot tell (the conv strides, the waveform normalisation flag) comes from the
claims, hubert-base's values otherwise.

Claims (all optional): ``conv_layers`` ((channels, kernel, stride) per conv),
``num_heads``, ``layer_norm_eps``, ``normalize_waveform``, ``extractor`` ("group" is
the only one supported), ``layer_norm_first`` (False is the only one supported).
Layouts: ``"hf"`` and ``"fairseq"`` (how the file stored it); any other layout (an RVC
``.pth`` loader asking) is refused with a message saying what the file is.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from ..frontend.hubert import HUBERT_BASE_CONV, Hubert, HubertConfig
from .base import DetectionError, Family, ModelSpec, dtype_kwargs, register

LAYOUTS = ("hf", "fairseq")
_FAIRSEQ_MARKERS = ("encoder.pos_conv.0.", "post_extract_proj.weight")
_HF_MARKERS = ("encoder.pos_conv_embed.", "feature_projection.projection.weight")
# The positional conv's weight, in each key style (weight norm legacy / parametrizations / folded).
_POS_V = ("encoder.pos_conv_embed.conv.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
          "encoder.pos_conv_embed.conv.weight")

LORA_PRESETS: dict[str, tuple[tuple[str, ...], str]] = {
    "attention": ((r"encoder/layers/\d+/attention/(q|k|v|out)_proj",),
                  "self-attention projections q/k/v/out of every Transformer layer"),
    "encoder": ((r"encoder/layers/\d+/(attention/(q|k|v|out)_proj|feed_forward/(intermediate|output)_dense)",),
                "attention and feed-forward Dense layers of every Transformer layer"),
}


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    return tuple(int(d) for d in np.shape(sd[key])) if key in sd else None


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
    if idx and idx != set(range(len(idx))):
        raise DetectionError(f"layer indices {sorted(idx)} of '{pattern}' are not 0..{len(idx) - 1}")
    return len(idx)


class HubertFamily(Family):
    name = "hubert"
    signature = ("feature_extractor.conv_layers.<i>.conv.weight, feature_projection.*, "
                 "encoder.pos_conv_embed.*, encoder.layers.<i>.attention.* (HuBERT/ContentVec)")
    lora_presets = LORA_PRESETS
    default_lora_preset = "attention"

    def build(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype=None, param_dtype=None) -> nnx.Module:
        if spec.kind != "hubert":
            raise ValueError(f"the hubert family builds kind 'hubert', not {spec.kind!r}")
        return Hubert(spec.config, rngs=rngs, **dtype_kwargs(dtype, param_dtype))

    def recognises(self, sd: Mapping[str, Any]) -> bool:
        # Both layouts, so an RVC loader handed a HuBERT file says what it is.
        return any(k.startswith(m) for k in sd for m in _HF_MARKERS + _FAIRSEQ_MARKERS)

    def spec(self, config: HubertConfig = HubertConfig()) -> ModelSpec:
        return ModelSpec(family=self.name, kind="hubert", version="base", config=config)

    def detect(self, sd: Mapping[str, Any], claims: Mapping[str, Any], *, layout: str,
               where: str = "model") -> ModelSpec:
        if layout not in LAYOUTS:
            raise DetectionError(f"'{where}' holds a HuBERT/ContentVec content encoder, not an RVC voice model "
                                 f"(pass it as the HuBERT model, e.g. rvclora prepare --hubert)")
        if any(k.startswith(m) for k in sd for m in _FAIRSEQ_MARKERS):
            raise DetectionError(f"'{where}' has fairseq key names; rename them to Hugging Face's first "
                                 f"(rvclora_convert.hubert does)")
        if claims.get("extractor", "group") != "group":
            raise DetectionError(f"feature extractor mode {claims['extractor']!r} is not supported "
                                 f"(only hubert-base's group-norm mode)")
        if claims.get("layer_norm_first", False):
            raise DetectionError("pre-LN Transformer (layer_norm_first / do_stable_layer_norm, hubert-large) "
                                 "is not supported; RVC uses hubert-base (post-LN)")
        n_conv = _count(sd, r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight$")
        if n_conv == 0:
            raise DetectionError(f"'{where}' has no feature_extractor.conv_layers.<i>.conv.weight")
        conv_shapes = [_shape(sd, f"feature_extractor.conv_layers.{i}.conv.weight") for i in range(n_conv)]
        if "feature_extractor.conv_layers.1.layer_norm.weight" in sd:
            raise DetectionError("feature extractor has a norm on every conv (layer-norm mode); "
                                 "only hubert-base's group-norm mode is supported")
        if "feature_extractor.conv_layers.0.layer_norm.weight" not in sd:
            raise DetectionError(f"'{where}' lacks feature_extractor.conv_layers.0.layer_norm.weight "
                                 f"(the GroupNorm of hubert-base's first conv)")
        claimed_conv = claims.get("conv_layers")
        strides = ([int(s) for _, _, s in claimed_conv] if claimed_conv is not None
                   else [s for _, _, s in HUBERT_BASE_CONV])
        if len(strides) != n_conv:
            raise DetectionError(f"the config describes {len(strides)} conv layers but '{where}' has {n_conv}")
        conv_layers = []
        c_in = 1
        for i, (shape, s) in enumerate(zip(conv_shapes, strides)):
            if len(shape) != 3 or shape[1] != c_in:
                raise DetectionError(f"feature_extractor.conv_layers.{i}.conv.weight has shape {list(shape)}; "
                                     f"expected [out, {c_in}, kernel]")
            conv_layers.append((shape[0], shape[2], s))
            c_in = shape[0]
        if claimed_conv is not None and [tuple(map(int, c)) for c in claimed_conv] != conv_layers:
            raise DetectionError(f"the config's conv layers {list(map(tuple, claimed_conv))} do not match the "
                                 f"weights' {conv_layers}")
        proj = _shape(sd, "feature_projection.projection.weight")
        if proj is None or len(proj) != 2 or proj[1] != c_in:
            raise DetectionError(f"feature_projection.projection.weight has shape {proj}; expected [hidden, {c_in}]")
        hidden = proj[0]
        pos = next((_shape(sd, k) for k in _POS_V if k in sd), None)
        if pos is None or len(pos) != 3 or pos[0] != hidden or hidden % pos[1]:
            raise DetectionError(f"encoder.pos_conv_embed.conv weight has shape {pos}; expected "
                                 f"[{hidden}, {hidden}/groups, kernel]")
        n_layers = _count(sd, r"encoder\.layers\.(\d+)\.attention\.q_proj\.weight$")
        ffn = _shape(sd, "encoder.layers.0.feed_forward.intermediate_dense.weight")
        if n_layers == 0 or ffn is None:
            raise DetectionError(f"'{where}' has no encoder.layers.<i>.attention / feed_forward weights")
        heads = int(claims.get("num_heads") or max(1, hidden // 64))
        fp = _shape(sd, "final_proj.weight")
        if fp is not None and (len(fp) != 2 or fp[1] != hidden):
            raise DetectionError(f"final_proj.weight has shape {list(fp)}; expected [dim, {hidden}]")
        try:
            cfg = HubertConfig(conv_layers=tuple(conv_layers), conv_bias="feature_extractor.conv_layers.0.conv.bias" in sd,
                               hidden_size=hidden, num_layers=n_layers, num_heads=heads, intermediate_size=ffn[0],
                               conv_pos=pos[2], conv_pos_groups=hidden // pos[1],
                               layer_norm_eps=float(claims.get("layer_norm_eps", 1e-5)),
                               final_proj_dim=fp[0] if fp is not None else None,
                               normalize_waveform=bool(claims.get("normalize_waveform", False)))
        except ValueError as e:
            raise DetectionError(f"'{where}': {e}") from None
        return self.spec(cfg)


HUBERT = register(HubertFamily())

__all__ = ["HubertFamily", "HUBERT", "LAYOUTS", "LORA_PRESETS"]
