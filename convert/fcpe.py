"""Loading torchfcpe checkpoints (``fcpe_c_v001.pt``) into the JAX FCPE port.

The bundled checkpoint ships inside the ``torchfcpe`` wheel (``torchfcpe/assets/
fcpe_c_v001.pt``, MIT licence); Applio ships the same network as ``fcpe.pt``. It is
``{"global_step": int, "model": state_dict, "config_dict": {...}}`` and is read with
:func:`rvclora_convert.torchfile.load` (numpy only; no code in the file runs). The model's configuration
comes from the file's own ``config_dict`` and is cross-checked against the tensor shapes
(:mod:`rvclora_jax.families.fcpe`); the weight-normed ``output_proj`` is folded; the
stored ``cent_table`` is used as stored (after checking it is the table the config
implies), so decoding matches torchfcpe to the bit of the table.

Every problem is an :class:`~rvclora_convert.pth.RVCFileError` subclass whose one-line
message starts with the file path: a missing or unreadable file, a file of the wrong
kind (an RVC synthesizer, a HuBERT or RMVPE checkpoint), an unsupported FCPE variant, or
weights that do not fit.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from . import torchfile
from .pth import RVCFileError, _fail, _to_numpy, read_checkpoint
from .state_dict import StateDictError, torch_to_flax
from rvclora_jax import families
from rvclora_jax.families import DetectionError, ModelSpec
from rvclora_jax.families.fcpe import FCPE_FAMILY
from rvclora_jax.frontend.fcpe import FCPE, cent_table
from rvclora_jax.tree import TreeMismatch

# torchfcpe 0.0.4's bundled checkpoint (torchfcpe/assets/fcpe_c_v001.pt, 43,363,260 bytes).
BUNDLED_SHA256 = "b9aeaeb673436eeda50ceafd632aa681aa63417e52eae4207503d180c9b10015"
BUNDLED_NAME = "fcpe_c_v001.pt"

# A table that differs from the config's by more than this (in cents) means the file's
# config is not the one its weights were trained with.
_CENT_TABLE_TOLERANCE = 0.05


class FCPEFileError(RVCFileError):
    """An FCPE checkpoint cannot be used; the one-line message starts with the path."""


def _error(path: str, msg: str) -> FCPEFileError:
    return FCPEFileError(str(_fail(path, msg)))


def bundled_checkpoint() -> str | None:
    """The path of ``fcpe_c_v001.pt`` inside an installed ``torchfcpe`` wheel, or None.

    Found without importing torchfcpe (whose import needs torchaudio)."""
    try:
        spec = importlib.util.find_spec("torchfcpe")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(root, "assets", BUNDLED_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def _what_else(sd: Mapping[str, Any]) -> str:
    """What a state dict that is not FCPE's looks like, for the error message."""
    for fam in families.FAMILIES.values():
        if fam.name != FCPE_FAMILY.name and fam.recognises(sd):
            return f"its keys are those of the {fam.name} family: {fam.signature}"
    keys = sorted(map(str, sd))
    if any(k.startswith("feature_extractor.") for k in keys):
        return "it looks like a HuBERT/ContentVec checkpoint (feature_extractor.* keys)"
    if any(k.startswith(("unet.", "cnn.", "fc.")) for k in keys):
        return "it looks like an RMVPE checkpoint (unet.*/fc.* keys)"
    return f"first keys: {keys[:4]}"


def read_fcpe(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(spec, state_dict, buffers)`` of a torchfcpe checkpoint (numpy, torch key names).
    ``buffers`` holds ``cent_table`` (and the scalar ``gaussian_blurred_cent_mask``)."""
    path = os.fspath(path)
    ckpt = read_checkpoint(path, fail=_error, kind="FCPE checkpoint", never="FCPE weight files never need this")
    if not isinstance(ckpt, dict):
        raise _error(path, f"top level is a {torchfile.type_name(ckpt)}; an FCPE checkpoint is a dict with "
                           f"'model' and 'config_dict' (as torchfcpe's fcpe_c_v001.pt)")
    keys = sorted(map(str, ckpt))
    if "weight" in ckpt and "config" in ckpt:
        raise _error(path, f"this is an RVC inference model ('weight' + 'config'), not an FCPE checkpoint "
                           f"(expected 'model' and 'config_dict' as in torchfcpe's fcpe_c_v001.pt)")
    sd_raw = ckpt.get("model")
    if not isinstance(sd_raw, Mapping):
        raise _error(path, f"not an FCPE checkpoint: key 'model' (the state dict) missing; top-level keys "
                           f"found: {keys} (expected 'model' and 'config_dict' as in torchfcpe's fcpe_c_v001.pt)")
    if not FCPE_FAMILY.recognises(sd_raw):
        raise _error(path, f"not an FCPE checkpoint: 'model' has no input_stack.0.weight / "
                           f"net.encoder_layers.* keys ({_what_else(sd_raw)})")
    if "config_dict" not in ckpt:
        raise _error(path, f"key 'config_dict' missing: an FCPE checkpoint carries its mel and model "
                           f"configuration there; top-level keys found: {keys}")
    sd_raw = dict(sd_raw)
    buffers: dict[str, np.ndarray] = {}
    mask = sd_raw.pop("gaussian_blurred_cent_mask", None)  # a 0-d tensor (training only)
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.size != 1 or mask.dtype.kind != "f":
            raise _error(path, "gaussian_blurred_cent_mask should be a scalar float tensor")
        buffers["gaussian_blurred_cent_mask"] = np.asarray(mask, np.float32).reshape(())
    sd = _to_numpy(path, "model", sd_raw)
    try:
        spec = FCPE_FAMILY.detect(sd, {"config_dict": ckpt["config_dict"]}, where="model")
    except DetectionError as e:
        raise _error(path, str(e)) from None
    table = sd.pop("cent_table", None)
    if table is None:
        table = cent_table(spec.config)
    expected = cent_table(spec.config)
    if table.shape != expected.shape:
        raise _error(path, f"cent_table has shape {list(table.shape)}; expected [{spec.config.out_dims}] (out_dims)")
    diff = float(np.max(np.abs(table.astype(np.float64) - expected)))
    if diff > _CENT_TABLE_TOLERANCE:
        raise _error(path, f"cent_table differs from the table of config_dict.model f0_min {spec.config.f0_min} / "
                           f"f0_max {spec.config.f0_max} by up to {diff:.3g} cents; the config does not fit the weights")
    buffers["cent_table"] = table.astype(np.float32)
    if "gaussian_blurred_cent_mask" in buffers:
        want = 1200.0 * math.log2(spec.config.f0_max / 10.0)
        got = float(buffers["gaussian_blurred_cent_mask"])
        if abs(got - want) > _CENT_TABLE_TOLERANCE:
            raise _error(path, f"gaussian_blurred_cent_mask is {got:.4f}; config_dict.model.f0_max "
                               f"{spec.config.f0_max} implies {want:.4f}")
    return spec, sd, buffers


def load_fcpe(path: str | os.PathLike, *, dtype=None, param_dtype=None) -> FCPE:
    """The JAX :class:`~rvclora_jax.frontend.fcpe.FCPE` holding the checkpoint's weights
    (strict: every parameter given, with its shape; nothing random). ``dtype`` is the
    compute dtype (None: float32), ``param_dtype`` the stored one."""
    path = os.fspath(path)
    spec, sd, buffers = read_fcpe(path)
    try:
        params = torch_to_flax(FCPE_FAMILY.abstract(spec), sd, source=path)
        model = FCPE_FAMILY.materialize(spec, params, source=path, dtype=dtype, param_dtype=param_dtype)
    except (StateDictError, TreeMismatch) as e:
        raise FCPEFileError(" ".join(str(e).split())) from None
    model.cent_table.value = jnp.asarray(buffers["cent_table"], jnp.float32)
    return model


__all__ = ["FCPEFileError", "load_fcpe", "read_fcpe", "bundled_checkpoint", "BUNDLED_SHA256"]
