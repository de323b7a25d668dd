"""Reading RVC ``.pth`` files (pretrained, training checkpoints, inference models).

Layouts (``../shared/rvc-facts.md`` §6):

* ``"base"``: pretrained ``{"model": state_dict}`` (extra scalar keys tolerated);
* ``"train-checkpoint"``: ``G_*.pth`` / ``D_*.pth``
  ``{"model", "iteration", "optimizer", "learning_rate"}`` (Applio adds ``"scaler"``);
* ``"inference"``: small models ``{"weight", "config", "info", "sr", "f0", "version"}``
  (fp16, no ``enc_q``), plus Applio's extra keys and spellings.

:func:`load_rvc_file` reads a file with ``torch.load(weights_only=True)`` (no code in the
file is ever run), detects layout, kind (generator / discriminator), version, f0, sample
rate and synthesizer config from the tensor shapes, and cross-checks them against what
the file claims. Every problem is an :class:`RVCFileError` whose one-line message starts
with the file path and names the offending key. :func:`to_flax` builds the matching
Flax model and maps the weights with :func:`rvclora_convert.state_dict.torch_to_flax`.

This module imports torch; ``rvclora_jax`` itself does not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from typing import Any, Mapping

import numpy as np
import torch
from flax import nnx

from .state_dict import StateDictError, load_params, torch_to_flax, weight_norm_style
from rvclora_jax.models.discriminators import multi_period_discriminator
from rvclora_jax.models.generator import noise_conv_geometry
from rvclora_jax.models.synthesizer import SynthConfig, Synthesizer, parse_sr, preset

LAYOUTS = ("base", "train-checkpoint", "inference")
_NOT_METADATA = ("model", "weight", "optimizer", "config")
_D_VERSIONS = {7: "v1", 9: "v2"}           # number of sub-discriminators -> version
_FEATURE_VERSIONS = {256: "v1", 768: "v2"}  # enc_p.emb_phone.weight dim 1 -> version
_UPS_WEIGHT_SUFFIXES = ("weight_v", "parametrizations.weight.original1", "weight")


class RVCFileError(ValueError):
    """An RVC ``.pth`` file cannot be used; the one-line message starts with the path."""


@dataclasses.dataclass
class RVCFile:
    path: str
    layout: str                      # "base" | "train-checkpoint" | "inference"
    kind: str                        # "generator" | "discriminator"
    version: str                     # "v1" | "v2"
    f0: bool | None                  # generators only
    sr: int | None                   # generators; None if unknown (discriminators)
    config: SynthConfig | None       # generators only
    state_dict: dict[str, np.ndarray]  # as stored (original dtype)
    dtype: str                       # "float16", "float32", or "mixed(float16,float32)"
    weight_norm_style: str           # rvclora_convert.state_dict.weight_norm_style
    has_enc_q: bool
    metadata: dict[str, Any]         # other top-level JSON-able values (info, epoch, sr, ...)
    has_optimizer: bool
    num_params: int
    n_speakers: int | None           # emb_g rows (generators)

    def summary(self) -> str:
        what = (f"{self.kind} {self.version}" + (f" {self.sr // 1000}k" if self.sr else "")
                + ("" if self.kind == "discriminator" else (" f0" if self.f0 else " nof0")))
        return (f"{self.path}: {self.layout} {what}, {self.num_params:,} params ({self.dtype}, "
                f"weight norm {self.weight_norm_style}), enc_q={self.has_enc_q}")


def _fail(path: str, msg: str) -> RVCFileError:
    return RVCFileError(f"{path}: " + " ".join(str(msg).split()))


# --------------------------------------------------------------------------- reading


def _torch_load(path: str) -> Any:
    if not os.path.exists(path):
        raise _fail(path, "file not found")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a .pth file")
    if os.path.getsize(path) == 0:
        raise _fail(path, "file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL\s+([\w.]+)", text)
        if m or "Unsupported global" in text:
            name = m.group(1) if m else "?"
            raise _fail(path, f"the file contains Python objects/code ({name}) that safe loading "
                              f"(torch.load weights_only=True) refuses; nothing from it was executed, "
                              f"and RVC weight files never need this") from None
        m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
        why = m.group(1).strip() if m else text.splitlines()[0]
        raise _fail(path, f"not a readable PyTorch checkpoint (unpickling failed: {why})") from None
    except RuntimeError as e:
        text = str(e)
        if "zip archive" in text or "central directory" in text:
            raise _fail(path, "truncated or corrupted PyTorch checkpoint (its zip archive is "
                              "incomplete: failed finding central directory)") from None
        raise _fail(path, f"could not be read by torch.load: {text.splitlines()[0] if text else e!r}") from None
    except EOFError:
        raise _fail(path, "truncated or empty file (unexpected end of file while unpickling)") from None
    except Exception as e:  # garbage bytes give KeyError / ValueError / ... from the unpickler
        raise _fail(path, f"not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def _to_numpy(path: str, where: str, sd: Any) -> dict[str, np.ndarray]:
    if not isinstance(sd, Mapping):
        raise _fail(path, f"'{where}' should be a state dict (str -> tensor), got {type(sd).__name__}")
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise _fail(path, f"'{where}' has a non-string key {k!r}")
        if not isinstance(v, torch.Tensor):
            raise _fail(path, f"{k}: expected a tensor in '{where}', got {type(v).__name__}")
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        out[k] = t.numpy()
        if out[k].dtype.kind == "f" and not np.all(np.isfinite(out[k])):
            raise _fail(path, f"{k} contains NaN or inf values")
    if not out:
        raise _fail(path, f"'{where}' is an empty state dict")
    return out


def _dtype_name(sd: Mapping[str, np.ndarray]) -> str:
    names = sorted({str(a.dtype) for a in sd.values() if a.dtype.kind == "f"})
    if not names:
        return "none"
    return names[0] if len(names) == 1 else f"mixed({','.join(names)})"


def _layout(path: str, ckpt: dict) -> tuple[str, str]:
    """(layout, key of the state dict)."""
    keys = sorted(map(str, ckpt))
    expected = ("expected 'model' (pretrained base or training checkpoint G_*/D_*.pth) or "
                "'weight' + 'config' (inference model)")
    if "weight" in ckpt and "model" in ckpt:
        raise _fail(path, f"has both 'weight' and 'model' keys; top-level keys found: {keys}")
    if "weight" in ckpt:
        if "config" not in ckpt:
            raise _fail(path, f"key 'config' missing: an inference model needs 'weight' and 'config'; "
                              f"top-level keys found: {keys}")
        return "inference", "weight"
    if "model" in ckpt:
        if "optimizer" in ckpt or "iteration" in ckpt:
            return "train-checkpoint", "model"
        return "base", "model"
    raise _fail(path, f"unrecognised layout: top-level keys found: {keys}; {expected}")


def _claimed_f0(path: str, v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    if isinstance(v, str) and v.strip() in ("0", "1", "True", "False", "true", "false"):
        return v.strip() in ("1", "True", "true")
    raise _fail(path, f"key 'f0' has value {v!r}; expected 0/1 or True/False")


def _claimed_sr(path: str, v: Any, key: str = "sr") -> int:
    try:
        return parse_sr(v)
    except (TypeError, ValueError):
        raise _fail(path, f"key '{key}' has value {v!r}; expected e.g. '40k', 40000 or '40000'") from None


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


def _shape(sd, key) -> list[int] | None:
    return list(sd[key].shape) if key in sd else None


def _check_config_vs_shapes(path: str, cfg: SynthConfig, sd: Mapping[str, np.ndarray], where: str) -> None:
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
            raise _fail(path, f"{where}[{idx[field]}] {field} = {shown} does not match {key} {shp}")
    ups = _ups_kernels(sd)
    if ups != tuple(cfg.upsample_kernel_sizes):
        raise _fail(path, f"{where}[{idx['upsample_kernel_sizes']}] upsample_kernel_sizes = "
                          f"{list(cfg.upsample_kernel_sizes)} does not match the dec.ups.* weights "
                          f"(kernel sizes {list(ups)})")
    if len(cfg.upsample_rates) != len(ups):
        raise _fail(path, f"{where}[{idx['upsample_rates']}] upsample_rates = {list(cfg.upsample_rates)} "
                          f"has {len(cfg.upsample_rates)} stages but the file has {len(ups)} dec.ups.* layers")
    nk = _noise_kernels(sd)
    if nk is not None and nk != _expected_noise_kernels(cfg):
        raise _fail(path, f"{where}[{idx['upsample_rates']}] upsample_rates = {list(cfg.upsample_rates)} "
                          f"does not match the dec.noise_convs.* kernel sizes {list(nk)}")


def _infer_preset(path: str, version: str, sd: Mapping[str, np.ndarray], claimed_sr: int | None) -> SynthConfig:
    ups = _ups_kernels(sd)
    spec = _shape(sd, "enc_q.pre.weight")
    nk = _noise_kernels(sd)
    matches = []
    for sr in (32000, 40000, 48000):
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
        raise _fail(path, f"no RVC {version} preset (32k/40k/48k) matches the weights ({what})")
    if claimed_sr is not None:
        chosen = [c for c in matches if c.sr == claimed_sr]
        if not chosen:
            raise _fail(path, f"key 'sr' says {claimed_sr} but the weights ({what}) fit only "
                              f"{', '.join(f'{version} {c.sr}' for c in matches)}")
        matches = chosen
    if len(matches) > 1:
        raise _fail(path, f"the weights ({what}) fit several RVC presets "
                          f"({', '.join(f'{version} {c.sr}' for c in matches)}); the sample rate is "
                          f"ambiguous without enc_q or an 'sr' key")
    return matches[0]


def load_rvc_file(path: str | os.PathLike) -> RVCFile:
    """Read and identify an RVC ``.pth`` file (see module docstring). Raises :class:`RVCFileError`."""
    path = os.fspath(path)
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict):
        raise _fail(path, f"top level is a {type(ckpt).__name__}, expected a dict with 'model' "
                          f"(pretrained / training checkpoint) or 'weight' + 'config' (inference model)")
    layout, sd_key = _layout(path, ckpt)
    sd = _to_numpy(path, sd_key, ckpt[sd_key])
    metadata = {str(k): v for k, v in ckpt.items() if k not in _NOT_METADATA and _jsonable(v)}
    has_optimizer = "optimizer" in ckpt and ckpt["optimizer"] is not None
    if has_optimizer and not isinstance(ckpt["optimizer"], Mapping):
        raise _fail(path, f"key 'optimizer' should be an optimizer state dict, got {type(ckpt['optimizer']).__name__}")
    common = dict(path=path, layout=layout, state_dict=sd, dtype=_dtype_name(sd),
                  weight_norm_style=weight_norm_style(sd), has_enc_q=any(k.startswith("enc_q.") for k in sd),
                  metadata=metadata, has_optimizer=has_optimizer,
                  num_params=int(sum(int(a.size) for a in sd.values())))
    claimed_version = ckpt.get("version")
    if claimed_version is not None and claimed_version not in ("v1", "v2"):
        raise _fail(path, f"key 'version' has value {claimed_version!r}; expected 'v1' or 'v2'")

    # ---- discriminator
    if any(k.startswith("discriminators.") for k in sd):
        if layout == "inference":
            raise _fail(path, "key 'weight' holds discriminator weights; inference models hold a generator")
        idx = {k.split(".")[1] for k in sd if k.startswith("discriminators.")}
        n = len(idx)
        if n not in _D_VERSIONS:
            raise _fail(path, f"discriminators.*: found {n} sub-discriminators, expected 7 (v1) or 9 (v2)")
        version = _D_VERSIONS[n]
        if claimed_version is not None and claimed_version != version:
            raise _fail(path, f"key 'version' says {claimed_version!r} but the file has {n} "
                              f"sub-discriminators (discriminators.*), which is {version}")
        sr = _claimed_sr(path, ckpt["sr"]) if "sr" in ckpt else None
        return RVCFile(kind="discriminator", version=version, f0=None, sr=sr, config=None,
                       n_speakers=None, **common)

    # ---- generator
    for need in ("enc_p.emb_phone.weight", "emb_g.weight"):
        if need not in sd:
            raise _fail(path, f"key {need} missing from '{sd_key}': not an RVC synthesizer "
                              f"(and no discriminators.* keys either)")
    emb_phone = list(sd["enc_p.emb_phone.weight"].shape)
    if len(emb_phone) != 2 or emb_phone[1] not in _FEATURE_VERSIONS:
        raise _fail(path, f"enc_p.emb_phone.weight has shape {emb_phone}; expected [hidden, 256] (v1) "
                          f"or [hidden, 768] (v2)")
    version = _FEATURE_VERSIONS[emb_phone[1]]
    if claimed_version is not None and claimed_version != version:
        raise _fail(path, f"key 'version' says {claimed_version!r} but enc_p.emb_phone.weight is "
                          f"{emb_phone}, which is {version}")
    f0 = "enc_p.emb_pitch.weight" in sd
    if "f0" in ckpt:
        claimed = _claimed_f0(path, ckpt["f0"])
        if claimed != f0:
            raise _fail(path, f"key 'f0' says {ckpt['f0']!r} but enc_p.emb_pitch.weight is "
                              f"{'present' if f0 else 'absent'} (a {'pitch' if f0 else 'no-pitch'} model)")
    emb_g = list(sd["emb_g.weight"].shape)
    if len(emb_g) != 2:
        raise _fail(path, f"emb_g.weight has shape {emb_g}; expected [n_speakers, gin_channels]")
    n_speakers = emb_g[0]
    claimed_sr = _claimed_sr(path, ckpt["sr"]) if "sr" in ckpt else None

    if layout == "inference":
        raw = ckpt["config"]
        if not isinstance(raw, (list, tuple)):
            raise _fail(path, f"key 'config' should be RVC's 18-element list, got {type(raw).__name__}")
        try:
            cfg = SynthConfig.from_list(list(raw))
        except (TypeError, ValueError) as e:
            raise _fail(path, f"key 'config' is not a valid RVC config list: {e}") from None
        cfg = cfg.replace(spk_embed_dim=n_speakers)  # RVC: config[-3] = emb_g rows
        _check_config_vs_shapes(path, cfg, sd, "config")
        if claimed_sr is not None and claimed_sr != cfg.sr:
            raise _fail(path, f"key 'sr' says {ckpt['sr']!r} but config[17] sr is {raw[17]!r}")
    else:
        cfg = _infer_preset(path, version, sd, claimed_sr).replace(spk_embed_dim=n_speakers)
    return RVCFile(kind="generator", version=version, f0=f0, sr=cfg.sr, config=cfg,
                   n_speakers=n_speakers, **common)


# --------------------------------------------------------------------------- to Flax


def build_model(rvc_file: RVCFile, *, seed: int = 0) -> nnx.Module:
    """The (randomly initialised) Flax model that ``rvc_file``'s weights belong to."""
    rngs = nnx.Rngs(seed)
    if rvc_file.kind == "discriminator":
        return multi_period_discriminator(rvc_file.version, rngs)
    return Synthesizer(rvc_file.config, rvc_file.version, bool(rvc_file.f0), rngs=rngs,
                       with_enc_q=rvc_file.has_enc_q)


def to_flax(rvc_file: RVCFile, *, seed: int = 0) -> tuple[nnx.Module, dict]:
    """Build the matching model, map the weights (strict) and load them.

    Returns ``(model, params)``: the model with the file's weights loaded (fp32) and the
    nested parameter dict. Weight norm is folded; fp16 is upcast."""
    model = build_model(rvc_file, seed=seed)
    try:
        params = torch_to_flax(model, rvc_file.state_dict, source=rvc_file.path)
    except StateDictError as e:
        raise RVCFileError(" ".join(str(e).split())) from None
    load_params(model, params)
    return model, params


__all__ = ["RVCFile", "RVCFileError", "LAYOUTS", "load_rvc_file", "to_flax", "build_model"]
