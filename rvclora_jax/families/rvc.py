"""The RVC synthesizer family: v1/v2 × with/without f0 × 32/40/48 kHz, and its discriminators.

Skeleton: LoRA target presets, the training-only subtree and the discriminator choice
live here; presets, segment sizes and ``.pth`` detection move here next.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from . import register

# LoRA target presets. Paths follow RVC's state_dict names with "." replaced by "/".
_DEC_UPS = r"dec/ups/\d+"
_DEC_ALL = r"dec/(conv_pre|cond|ups/\d+|noise_convs/\d+|resblocks/\d+/convs[12]?/\d+|conv_post)"
_FLOW = r"flow/flows/\d+/(pre|post|enc/(in_layers/\d+|res_skip_layers/\d+|cond_layer))"
_ENC_P = r"enc_p/(emb_phone|encoder/(attn_layers/\d+/conv_[qkvo]|ffn_layers/\d+/conv_[12])|proj)"

LORA_PRESETS: dict[str, tuple[tuple[str, ...], str]] = {
    "ups": ((_DEC_UPS,),
            "generator upsamplers only: dec.ups.* (ConvTranspose1d)"),
    "generator": ((_DEC_ALL,),
                  "whole generator: dec.conv_pre, dec.cond, dec.ups.*, dec.noise_convs.*, "
                  "dec.resblocks.*.convs1/convs2/convs.*, dec.conv_post "
                  "(not the 1x1 harmonic mixer dec.m_source.l_linear)"),
    "generator+flow": ((_DEC_ALL, _FLOW),
                       "generator plus the flow's coupling layers (pre, WaveNet in/res_skip/cond, post)"),
    "generator+prior": ((_DEC_ALL, _FLOW, _ENC_P),
                        "generator + flow + prior (text) encoder: enc_p.emb_phone, attention "
                        "conv_q/k/v/o, FFN conv_1/conv_2, enc_p.proj; everything used at inference"),
}


@dataclasses.dataclass(frozen=True)
class RVCFamily:
    name: str = "rvc"
    lora_presets: dict = dataclasses.field(default_factory=lambda: dict(LORA_PRESETS), repr=False)
    default_lora_preset: str = "generator"
    # enc_q (the posterior encoder) only serves training; RVC strips it from inference
    # models, so fingerprints, extraction and inference exports leave it out.
    training_only: tuple[str, ...] = ("enc_q",)

    def is_training_only(self, path: str) -> bool:
        """Whether a parameter/module path (``"enc_q/pre/kernel"``) is in the training-only subtree."""
        head = path.split("/", 1)[0]
        return head in self.training_only

    def discriminator(self, version: str, rngs: nnx.Rngs):
        from ..models.discriminators import multi_period_discriminator

        return multi_period_discriminator(version, rngs)


RVC = register(RVCFamily())

__all__ = ["RVC", "RVCFamily", "LORA_PRESETS"]
