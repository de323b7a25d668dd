"""The RVC synthesizer family: v1/v2 × with/without f0 × 32/40/48 kHz, and its discriminators.

Everything RVC-specific that is not the network itself lives here: the per-rate configs
(RVC's ``configs/v{1,2}/*.json``), the training segment, the sample-rate names, the LoRA
target presets, the training-only subtree (``enc_q``), the discriminator of each
version, and how a ``.pth`` state dict is recognised from its keys and shapes.

Recognition (:meth:`RVCFamily.detect`) needs only numpy shapes:

* a discriminator has ``discriminators.<i>.*`` keys; 7 sub-discriminators are v1's
  ``MultiPeriodDiscriminator``, 9 are v2's ``MultiPeriodDiscriminatorV2``;
* a synthesizer has ``enc_p.emb_phone.weight [hidden, 256 | 768]`` (v1 | v2 content
  features) and ``emb_g.weight [n_speakers, gin]``; ``enc_p.emb_pitch.weight`` exists
  only with f0;
* its rate is the preset whose ``dec.ups.*`` kernel sizes, ``enc_q.pre.weight`` input
  width (``spec_channels``) and NSF ``dec.noise_convs.*`` kernel sizes fit; an inference
  model's own config list is checked against the same shapes instead.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Sequence

import numpy as np
from flax import nnx

from ..models.generator import noise_conv_geometry
from ..models.synthesizer import SynthConfig, Synthesizer
from .base import DetectionError, Family, ModelSpec, dtype_kwargs, register

# ------------------------------------------------------------------ configs

SAMPLE_RATES = {"32k": 32000, "40k": 40000, "48k": 48000}  # RVC's names for its rates


def parse_sr(sr: Any) -> int:
    """``"40k"``, ``40000`` and ``"40000"`` all mean 40 kHz (RVC and Applio spellings)."""
    if isinstance(sr, str):
        if sr in SAMPLE_RATES:
            return SAMPLE_RATES[sr]
        if sr.isdigit():
            return int(sr)
        raise ValueError(f"unknown sample rate {sr!r}")
    # Strict: 40000.5, True, NaN or inf are not rates (int() would truncate or overflow).
    if isinstance(sr, bool) or not isinstance(sr, numbers.Integral):
        raise ValueError(f"unknown sample rate {sr!r}")
    return int(sr)


def sample_rate_name(sr: int) -> str:
    """``40000`` → ``"40k"`` (what RVC writes in a model's ``sr``); other rates as digits."""
    return {hz: name for name, hz in SAMPLE_RATES.items()}.get(int(sr), str(sr))


# Per-rate presets from RVC's configs/v{1,2}/*.json. There is no v2/40k.json: RVC uses
# the v1 40k generator for v2 too. Training segment sizes are in samples.
_PRESETS = {
    ("v1", 32000): dict(spec_channels=513, upsample_rates=(10, 4, 2, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4, 4)),
    ("v1", 40000): dict(spec_channels=1025, upsample_rates=(10, 10, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4)),
    ("v1", 48000): dict(spec_channels=1025, upsample_rates=(10, 6, 2, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4, 4)),
    ("v2", 32000): dict(spec_channels=513, upsample_rates=(10, 8, 2, 2), upsample_kernel_sizes=(20, 16, 4, 4)),
    ("v2", 40000): dict(spec_channels=1025, upsample_rates=(10, 10, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4)),
    ("v2", 48000): dict(spec_channels=1025, upsample_rates=(12, 10, 2, 2), upsample_kernel_sizes=(24, 20, 4, 4)),
}
TRAIN_SEGMENT_SAMPLES = {("v1", 32000): 12800, ("v1", 40000): 12800, ("v1", 48000): 11520,
                         ("v2", 32000): 12800, ("v2", 40000): 12800, ("v2", 48000): 17280}
DEFAULT_SEGMENT_SAMPLES = 12800  # RVC's train.segment_size for rates without a config


def preset(version: str, sr: Any) -> SynthConfig:
    """The synthesizer config RVC uses for ``version`` ("v1"/"v2") at rate ``sr``."""
    key = (version, parse_sr(sr))
    if key not in _PRESETS:
        raise ValueError(f"no RVC preset for version={version!r} sr={sr!r}; "
                         f"have {sorted({f'{v} {s}' for v, s in _PRESETS})}")
    return SynthConfig(sr=key[1], **_PRESETS[key])


# ------------------------------------------------------------------ LoRA target presets
# Paths follow RVC's state_dict names with "." replaced by "/".
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

# ------------------------------------------------------------------ .pth recognition

_D_VERSIONS = {7: "v1", 9: "v2"}           # number of sub-discriminators -> version
_FEATURE_VERSIONS = {256: "v1", 768: "v2"}  # enc_p.emb_phone.weight dim 1 -> version
# The ConvTranspose1d weight of dec.ups.<i> in each key style (weight norm legacy / new / folded).
_UPS_WEIGHT_SUFFIXES = ("weight_v", "parametrizations.weight.original1", "weight")


def _ups_kernels(sd: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    ks = []
    i = 0
    while True:
        for suf in _UPS_WEIGHT_SUFFIXES:
            k = f"dec.ups.{i}.{suf}"
            if k in sd:
                ks.append(int(sd[k].shape[-1]))
                break
        else:
            return tuple(ks)
        i += 1


def _noise_kernels(sd: Mapping[str, np.ndarray]) -> tuple[int, ...] | None:
    ks, i = [], 0
    while f"dec.noise_convs.{i}.weight" in sd:
        ks.append(int(sd[f"dec.noise_convs.{i}.weight"].shape[-1]))
        i += 1
    return tuple(ks) if ks else None


def _expected_noise_kernels(cfg: SynthConfig) -> tuple[int, ...]:
    return tuple(k for k, _, _ in noise_conv_geometry(cfg.upsample_rates))


def _indices(sd: Mapping[str, Any], prefix: str) -> set[str]:
    """The distinct ``<i>`` of keys ``prefix<i>.…``."""
    return {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}


def _first_shape(sd, prefix) -> list[int] | None:
    """The shape of a conv's weight in whichever key style it is stored."""
    for suf in _UPS_WEIGHT_SUFFIXES:
        if f"{prefix}.{suf}" in sd:
            return list(sd[f"{prefix}.{suf}"].shape)
    return None


def _shape(sd, key) -> list[int] | None:
    return list(sd[key].shape) if key in sd else None


def _claimed_sr(v: Any, key: str = "sr") -> int:
    try:
        sr = parse_sr(v)
    except (TypeError, ValueError):
        sr = None
    if sr not in SAMPLE_RATES.values():
        raise DetectionError(f"key '{key}' has value {v!r}; expected one of RVC's rates "
                             f"({', '.join(f'{n!r}/{hz}' for n, hz in SAMPLE_RATES.items())})")
    return sr


def check_config_rate(cfg: SynthConfig, version: str, where: str) -> None:
    """An explicit config's ``sr`` must be one of RVC's rates and fit the upsampling the
    weights were built with: the decoder turns one feature frame into ``hop_length``
    samples, and every RVC preset runs at 100 frames/s (40k: 10·10·2·2 = 400 = 40000/100).
    Otherwise audio rendered from the model would be written at the wrong rate."""
    i = SynthConfig.FIELDS.index("sr")
    if cfg.sr not in SAMPLE_RATES.values():
        raise DetectionError(f"{where}[{i}] sr = {cfg.sr} is not one of RVC's rates "
                             f"({', '.join(str(hz) for hz in SAMPLE_RATES.values())})")
    want = preset(version, cfg.sr).hop_length
    if cfg.hop_length != want:
        fits = [f"{hz}" for hz in SAMPLE_RATES.values() if preset(version, hz).hop_length == cfg.hop_length]
        raise DetectionError(f"{where}[{i}] sr = {cfg.sr} does not fit the model: its upsample_rates "
                             f"{list(cfg.upsample_rates)} give {cfg.hop_length} samples per frame, "
                             f"{version} at {cfg.sr} Hz needs {want}"
                             + (f" (the weights are a {'/'.join(fits)} Hz model)" if fits else ""))


def _claimed_f0(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    if isinstance(v, str) and v.strip() in ("0", "1", "True", "False", "true", "false"):
        return v.strip() in ("1", "True", "true")
    raise DetectionError(f"key 'f0' has value {v!r}; expected 0/1 or True/False")


def _check_config_vs_shapes(cfg: SynthConfig, sd: Mapping[str, np.ndarray], where: str) -> None:
    """Fields of an explicit config list against the tensor shapes (names the config entry)."""
    idx = {f: i for i, f in enumerate(SynthConfig.FIELDS)}
    checks = [
        ("hidden_channels", cfg.hidden_channels, "enc_p.emb_phone.weight", 0),
        ("inter_channels", 2 * cfg.inter_channels, "enc_p.proj.weight", 0),
        ("filter_channels", cfg.filter_channels, "enc_p.encoder.ffn_layers.0.conv_1.weight", 0),
        ("upsample_initial_channel", cfg.upsample_initial_channel, "dec.conv_pre.weight", 0),
        ("gin_channels", cfg.gin_channels, "emb_g.weight", 1),
        ("spec_channels", cfg.spec_channels, "enc_q.pre.weight", 1),
    ]
    for field, want, key, dim in checks:
        shp = _shape(sd, key)
        if shp is not None and len(shp) > dim and shp[dim] != want:
            shown = want // 2 if field == "inter_channels" else want
            raise DetectionError(f"{where}[{idx[field]}] {field} = {shown} does not match {key} {shp}")
    # The entries no tensor width shows are counted from the keys, so a config can never
    # make the build trace a model the file does not hold (n_layers = 10**9 would hang).
    n_attn = len(_indices(sd, "enc_p.encoder.attn_layers."))
    if n_attn and n_attn != cfg.n_layers:
        raise DetectionError(f"{where}[{idx['n_layers']}] n_layers = {cfg.n_layers} does not match the file's "
                             f"{n_attn} enc_p.encoder.attn_layers.*")
    rel = _shape(sd, "enc_p.encoder.attn_layers.0.emb_rel_k")
    if rel is not None and len(rel) == 3 and rel[-1] * cfg.n_heads != cfg.hidden_channels:
        raise DetectionError(f"{where}[{idx['n_heads']}] n_heads = {cfg.n_heads} does not match "
                             f"enc_p.encoder.attn_layers.0.emb_rel_k {rel} (hidden_channels / n_heads per head)")
    ffn = _shape(sd, "enc_p.encoder.ffn_layers.0.conv_1.weight")
    if ffn is not None and len(ffn) == 3 and ffn[-1] != cfg.kernel_size:
        raise DetectionError(f"{where}[{idx['kernel_size']}] kernel_size = {cfg.kernel_size} does not match "
                             f"enc_p.encoder.ffn_layers.0.conv_1.weight {ffn}")
    n_rb = len(_indices(sd, "dec.resblocks."))
    nk = len(cfg.resblock_kernel_sizes)
    if n_rb != nk * len(cfg.upsample_rates):
        raise DetectionError(f"{where}[{idx['resblock_kernel_sizes']}] resblock_kernel_sizes = "
                             f"{list(cfg.resblock_kernel_sizes)} gives {nk} resblocks per upsampler "
                             f"({nk * len(cfg.upsample_rates)} in all) but the file has {n_rb} dec.resblocks.*")
    convs = "convs1" if cfg.resblock == "1" else "convs"
    for j in range(n_rb):
        n_convs = len(_indices(sd, f"dec.resblocks.{j}.{convs}."))
        want = len(cfg.resblock_dilation_sizes[j % nk]) if cfg.resblock == "1" else 2
        if n_convs != want:
            field = "resblock_dilation_sizes" if n_convs else "resblock"
            raise DetectionError(f"{where}[{idx[field]}] {field} = {getattr(cfg, field)!r} does not match "
                                 f"dec.resblocks.{j} ({n_convs} {convs}.* layers, expected {want})")
        k = _first_shape(sd, f"dec.resblocks.{j}.{convs}.0")
        if k is not None and k[-1] != cfg.resblock_kernel_sizes[j % nk]:
            raise DetectionError(f"{where}[{idx['resblock_kernel_sizes']}] resblock_kernel_sizes = "
                                 f"{list(cfg.resblock_kernel_sizes)} does not match dec.resblocks.{j}.{convs}.0 "
                                 f"(kernel size {k[-1]})")
    ups = _ups_kernels(sd)
    if ups != tuple(cfg.upsample_kernel_sizes):
        raise DetectionError(f"{where}[{idx['upsample_kernel_sizes']}] upsample_kernel_sizes = "
                             f"{list(cfg.upsample_kernel_sizes)} does not match the dec.ups.* weights "
                             f"(kernel sizes {list(ups)})")
    if len(cfg.upsample_rates) != len(ups):
        raise DetectionError(f"{where}[{idx['upsample_rates']}] upsample_rates = {list(cfg.upsample_rates)} "
                             f"has {len(cfg.upsample_rates)} stages but the file has {len(ups)} dec.ups.* layers")
    nk = _noise_kernels(sd)
    if nk is not None and nk != _expected_noise_kernels(cfg):
        raise DetectionError(f"{where}[{idx['upsample_rates']}] upsample_rates = {list(cfg.upsample_rates)} "
                             f"does not match the dec.noise_convs.* kernel sizes {list(nk)}")


def _infer_preset(version: str, sd: Mapping[str, np.ndarray], claimed_sr: int | None) -> SynthConfig:
    ups = _ups_kernels(sd)
    spec = _shape(sd, "enc_q.pre.weight")
    nk = _noise_kernels(sd)
    matches = []
    for sr in sorted({s for v, s in _PRESETS if v == version}):
        cfg = preset(version, sr)
        if tuple(cfg.upsample_kernel_sizes) != ups:
            continue
        if spec is not None and len(spec) > 1 and spec[1] != cfg.spec_channels:
            continue
        if nk is not None and nk != _expected_noise_kernels(cfg):
            continue
        matches.append(cfg)
    what = (f"dec.ups.* kernel sizes {list(ups)}"
            + (f", enc_q.pre.weight {spec}" if spec is not None else "")
            + (f", dec.noise_convs.* kernel sizes {list(nk)}" if nk is not None else ""))
    if not matches:
        raise DetectionError(f"no RVC {version} preset (32k/40k/48k) matches the weights ({what})")
    if claimed_sr is not None:
        chosen = [c for c in matches if c.sr == claimed_sr]
        if not chosen:
            raise DetectionError(f"key 'sr' says {claimed_sr} but the weights ({what}) fit only "
                                 f"{', '.join(f'{version} {c.sr}' for c in matches)}")
        matches = chosen
    if len(matches) > 1:
        raise DetectionError(f"the weights ({what}) fit several RVC presets "
                             f"({', '.join(f'{version} {c.sr}' for c in matches)}); the sample rate is "
                             f"ambiguous without enc_q or an 'sr' key")
    return matches[0]


# ------------------------------------------------------------------ the family


@dataclasses.dataclass(frozen=True)
class RVCFamily(Family):
    name: str = "rvc"
    signature: str = ("an RVC synthesizer has enc_p.emb_phone.weight and emb_g.weight, "
                      "an RVC discriminator has discriminators.* keys")
    lora_presets: dict = dataclasses.field(default_factory=lambda: dict(LORA_PRESETS), repr=False)
    default_lora_preset: str = "generator"
    # enc_q (the posterior encoder) only serves training; RVC strips it from inference
    # models, so fingerprints, extraction and inference exports leave it out.
    training_only: tuple[str, ...] = ("enc_q",)
    versions: tuple[str, ...] = ("v1", "v2")
    sample_rates: dict = dataclasses.field(default_factory=lambda: dict(SAMPLE_RATES), repr=False)

    # ---- configs
    parse_sr = staticmethod(parse_sr)
    sample_rate_name = staticmethod(sample_rate_name)
    preset = staticmethod(preset)

    def presets(self) -> list[tuple[str, int]]:
        """Every ``(version, sr)`` RVC has a config for."""
        return sorted(_PRESETS)

    def train_segment_samples(self, version: str, sr: Any) -> int:
        """RVC's training segment in samples (``train.segment_size`` of the rate's config)."""
        return TRAIN_SEGMENT_SAMPLES.get((version, parse_sr(sr)), DEFAULT_SEGMENT_SAMPLES)

    def segment_frames(self, version: str, sr: Any, hop_length: int | None = None) -> int:
        """The training segment in frames: :meth:`train_segment_samples` over the hop
        (``hop_length`` defaults to the preset's, e.g. 12800 // 400 = 32 at 40k)."""
        hop = hop_length if hop_length is not None else preset(version, sr).hop_length
        return self.train_segment_samples(version, sr) // hop

    # ---- specs and models
    def generator_spec(self, config: SynthConfig | Sequence[Any] | int | str, version: str = "v2",
                       f0: bool = True, *, with_training_only: bool = True) -> ModelSpec:
        """A synthesizer spec; ``config`` is a :class:`SynthConfig`, RVC's 18-entry list,
        or a sample rate (the preset of ``version`` at that rate)."""
        if isinstance(config, (int, str)):
            config = preset(version, config)
        elif not isinstance(config, SynthConfig):
            config = SynthConfig.from_list(config)
        return ModelSpec(self.name, "generator", version, bool(f0), config, config.sr, bool(with_training_only))

    def discriminator_spec(self, version: str, sr: int | None = None) -> ModelSpec:
        return ModelSpec(self.name, "discriminator", version, None, None, sr, False)

    def build(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype=None, param_dtype=None) -> nnx.Module:
        if spec.family != self.name:
            raise ValueError(f"spec of family {spec.family!r} given to the {self.name!r} family")
        if spec.kind == "discriminator":
            return self.discriminator(spec.version, rngs, dtype=dtype, param_dtype=param_dtype)
        if spec.kind != "generator":
            raise ValueError(f"unknown RVC model kind {spec.kind!r} (expected 'generator' or 'discriminator')")
        return Synthesizer(spec.config, spec.version, bool(spec.f0), rngs=rngs,
                           with_enc_q=spec.with_training_only, **dtype_kwargs(dtype, param_dtype))

    def discriminator(self, version: str, rngs: nnx.Rngs, *, dtype=None, param_dtype=None):
        """The multi-period discriminator RVC trains ``version`` with (v1: 7, v2: 9 periods)."""
        from ..models.discriminators import multi_period_discriminator

        return multi_period_discriminator(version, rngs, **dtype_kwargs(dtype, param_dtype))

    # ---- .pth recognition
    def recognises(self, sd: Mapping[str, Any]) -> bool:
        return ("enc_p.emb_phone.weight" in sd or "emb_g.weight" in sd
                or any(k.startswith("discriminators.") for k in sd))

    def detect(self, sd: Mapping[str, Any], claims: Mapping[str, Any], *, layout: str,
               where: str = "model") -> ModelSpec:
        claimed_version = claims.get("version")
        if claimed_version is not None and claimed_version not in self.versions:
            raise DetectionError(f"key 'version' has value {claimed_version!r}; expected 'v1' or 'v2'")
        if any(k.startswith("discriminators.") for k in sd):
            return self._detect_discriminator(sd, claims, layout, claimed_version)
        return self._detect_generator(sd, claims, layout, where, claimed_version)

    def _detect_discriminator(self, sd, claims, layout, claimed_version) -> ModelSpec:
        if layout == "inference":
            raise DetectionError("key 'weight' holds discriminator weights; inference models hold a generator")
        n = len({k.split(".")[1] for k in sd if k.startswith("discriminators.")})
        if n not in _D_VERSIONS:
            raise DetectionError(f"discriminators.*: found {n} sub-discriminators, expected 7 (v1) or 9 (v2)")
        version = _D_VERSIONS[n]
        if claimed_version is not None and claimed_version != version:
            raise DetectionError(f"key 'version' says {claimed_version!r} but the file has {n} "
                                 f"sub-discriminators (discriminators.*), which is {version}")
        sr = _claimed_sr(claims["sr"]) if "sr" in claims else None
        return self.discriminator_spec(version, sr)

    def _detect_generator(self, sd, claims, layout, where, claimed_version) -> ModelSpec:
        for need in ("enc_p.emb_phone.weight", "emb_g.weight"):
            if need not in sd:
                raise DetectionError(f"key {need} missing from '{where}': not an RVC synthesizer "
                                     f"(and no discriminators.* keys either)")
        emb_phone = list(sd["enc_p.emb_phone.weight"].shape)
        if len(emb_phone) != 2 or emb_phone[1] not in _FEATURE_VERSIONS:
            raise DetectionError(f"enc_p.emb_phone.weight has shape {emb_phone}; expected [hidden, 256] (v1) "
                                 f"or [hidden, 768] (v2)")
        version = _FEATURE_VERSIONS[emb_phone[1]]
        if claimed_version is not None and claimed_version != version:
            raise DetectionError(f"key 'version' says {claimed_version!r} but enc_p.emb_phone.weight is "
                                 f"{emb_phone}, which is {version}")
        f0 = "enc_p.emb_pitch.weight" in sd
        if "f0" in claims and _claimed_f0(claims["f0"]) != f0:
            raise DetectionError(f"key 'f0' says {claims['f0']!r} but enc_p.emb_pitch.weight is "
                                 f"{'present' if f0 else 'absent'} (a {'pitch' if f0 else 'no-pitch'} model)")
        emb_g = list(sd["emb_g.weight"].shape)
        if len(emb_g) != 2:
            raise DetectionError(f"emb_g.weight has shape {emb_g}; expected [n_speakers, gin_channels]")
        n_speakers = emb_g[0]
        if n_speakers < 1 or emb_g[1] < 1:
            raise DetectionError(f"emb_g.weight has shape {emb_g}: a model needs at least one speaker "
                                 f"(n_speakers = {emb_g[0]}) and gin_channels > 0")
        claimed_sr = _claimed_sr(claims["sr"]) if "sr" in claims else None

        if layout == "inference":
            raw = claims.get("config")
            if not isinstance(raw, (list, tuple)):
                raise DetectionError(f"key 'config' should be RVC's 18-element list, got {type(raw).__name__}")
            try:
                cfg = SynthConfig.from_list(list(raw))
            except (TypeError, ValueError) as e:
                raise DetectionError(f"key 'config' is not a valid RVC config list: {e}") from None
            cfg = cfg.replace(spk_embed_dim=n_speakers)  # RVC: config[-3] = emb_g rows
            _check_config_vs_shapes(cfg, sd, "config")
            check_config_rate(cfg, version, "config")
            if claimed_sr is not None and claimed_sr != cfg.sr:
                raise DetectionError(f"key 'sr' says {claims['sr']!r} but config[17] sr is {raw[17]!r}")
        else:
            cfg = _infer_preset(version, sd, claimed_sr).replace(spk_embed_dim=n_speakers)
        has_training_only = any(self.is_training_only(k) for k in sd)
        return self.generator_spec(cfg, version, f0, with_training_only=has_training_only)


RVC = register(RVCFamily())

__all__ = ["RVC", "RVCFamily", "LORA_PRESETS", "SAMPLE_RATES", "TRAIN_SEGMENT_SAMPLES", "parse_sr",
           "sample_rate_name", "preset"]
