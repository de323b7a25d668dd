"""Reading RVC ``.pth`` files (pretrained, training checkpoints, inference models).

Layouts (what RVC writes: ``rvc/lib/train/utils.py`` ``save_checkpoint``, and
``rvc/lib/train/process_ckpt.py`` ``savee`` for small models; Applio's variants too):

* ``"base"``: pretrained ``{"model": state_dict}`` (extra scalar keys tolerated);
* ``"train-checkpoint"``: ``G_*.pth`` / ``D_*.pth``
  ``{"model", "iteration", "optimizer", "learning_rate"}`` (Applio adds ``"scaler"``);
* ``"inference"``: small models ``{"weight", "config", "info", "sr", "f0", "version"}``
  (fp16, no ``enc_q``), plus Applio's extra keys and spellings.

:func:`load_rvc_file` reads a file with :func:`rvclora_convert.torchfile.load` (numpy only;
like ``torch.load(weights_only=True)``, no code in the file is ever run) and detects its
layout here; which model the state dict holds (kind,
version, f0, sample rate, config: a :class:`rvclora_jax.families.ModelSpec`) is
recognised from the tensor shapes by the model family (:func:`rvclora_jax.families.detect`),
which also cross-checks what the file claims. Every problem is an :class:`RVCFileError`
whose one-line message starts with the file path and names the offending key.
:func:`to_flax` traces the model's structure (no random initialisation), maps the
weights onto it with :func:`rvclora_convert.state_dict.torch_to_flax` and materialises
the model with them.

Nothing here needs torch.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

from . import torchfile
from .state_dict import StateDictError, torch_to_flax, weight_norm_groups, weight_norm_style
from rvclora_jax import families
from rvclora_jax.families import DetectionError, ModelSpec
from rvclora_jax.fileio import require_regular_file
from rvclora_jax.models.synthesizer import SynthConfig
from rvclora_jax.tree import TreeMismatch

LAYOUTS = ("base", "train-checkpoint", "inference")
_NOT_METADATA = ("model", "weight", "optimizer", "config")


class RVCFileError(ValueError):
    """An RVC ``.pth`` file cannot be used; the one-line message starts with the path."""


@dataclasses.dataclass
class RVCFile:
    path: str
    layout: str                      # "base" | "train-checkpoint" | "inference"
    spec: ModelSpec                  # which model the weights belong to (the family decides)
    state_dict: dict[str, np.ndarray]  # as stored (original dtype)
    dtype: str                       # "float16", "float32", or "mixed(float16,float32)"
    weight_norm_style: str           # rvclora_convert.state_dict.weight_norm_style
    has_enc_q: bool                  # the family's training-only subtree is present
    metadata: dict[str, Any]         # other top-level JSON-able values (info, epoch, sr, ...)
    has_optimizer: bool
    num_params: int

    @property
    def kind(self) -> str:           # "generator" | "discriminator"
        return self.spec.kind

    @property
    def version(self) -> str:        # "v1" | "v2"
        return self.spec.version

    @property
    def f0(self) -> bool | None:     # generators only
        return self.spec.f0

    @property
    def sr(self) -> int | None:      # generators; discriminators only if the file says
        return self.spec.sr

    @property
    def config(self) -> SynthConfig | None:  # generators only
        return self.spec.config

    @property
    def n_speakers(self) -> int | None:  # emb_g rows (generators)
        return getattr(self.spec.config, "spk_embed_dim", None)

    def describe(self) -> dict[str, Any]:
        """What ``rvclora inspect`` shows, as strict JSON-able values (metadata is made
        JSON-safe on load: a NaN is the string ``"nan"``)."""
        return {
            "path": self.path, "layout": self.layout, "kind": self.kind, "version": self.version,
            "f0": self.f0, "sr": self.sr, "params": self.num_params, "tensors": len(self.state_dict),
            "dtype": self.dtype, "weight_norm": self.weight_norm_style, "enc_q": self.has_enc_q,
            "optimizer": self.has_optimizer, "speakers": self.n_speakers,
            "config": self.config.to_list() if self.config else None, "metadata": dict(self.metadata),
        }

    def summary(self) -> str:
        what = (f"{self.kind} {self.version}" + (f" {self.sr // 1000}k" if self.sr else "")
                + ("" if self.kind == "discriminator" else (" f0" if self.f0 else " nof0")))
        return (f"{self.path}: {self.layout} {what}, {self.num_params:,} params ({self.dtype}, "
                f"weight norm {self.weight_norm_style}), enc_q={self.has_enc_q}")


def _fail(path: str, msg: str) -> RVCFileError:
    return RVCFileError(f"{path}: " + " ".join(str(msg).split()))


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str, *, fail: Callable[[str, str], Exception] = _fail,
                    inert: Callable[[str], type | None] | None = None,
                    kind: str = ".pth file", never: str = "RVC weight files never need this") -> Any:
    """The object in the PyTorch file at ``path``, tensors as numpy arrays
    (:func:`rvclora_convert.torchfile.load`: no torch, no code from the file run). Every
    problem is one line made by ``fail(path, reason)``; a refused global is named, and
    ``never`` says why such a file is not what was expected. ``inert`` lets harmless
    foreign classes through as records (see :func:`torchfile.load`)."""
    if not os.path.exists(path):
        raise fail(path, "file not found")
    if os.path.isdir(path):
        raise fail(path, f"is a directory, not a {kind}")
    try:  # a FIFO or /dev/zero would be read without end
        require_regular_file(path, kind)
    except (OSError, ValueError) as e:
        raise fail(path, " ".join(str(e).split()).removeprefix(f"{path}: ")) from None
    if os.path.getsize(path) == 0:
        raise fail(path, "file is empty")
    try:
        return torchfile.load(path, inert=inert)
    except torchfile.UnsafeGlobal as e:
        raise fail(path, f"the file contains Python objects/code ({e.name}) that safe loading refuses; nothing "
                         f"from it was executed, and {never}") from None
    except torchfile.TorchFileError as e:
        raise fail(path, str(e)) from None
    except OSError as e:
        raise fail(path, f"could not be read ({e.strerror or e})") from None


def _json_safe(v: Any) -> Any:
    """``v`` with non-finite floats spelled as strings (``"nan"``, ``"inf"``): metadata is
    written to ``model.json`` and printed by ``inspect --json``, and JSON has no NaN."""
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


# What an RVC state dict holds: float tensors of at least one dimension (weights, biases,
# LayerNorm gammas, relative-attention embeddings). bfloat16 is upcast to float32.
_FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")


def _to_numpy(path: str, where: str, sd: Any) -> dict[str, np.ndarray]:
    if not isinstance(sd, Mapping):
        raise _fail(path, f"'{where}' should be a state dict (str -> tensor), got {torchfile.type_name(sd)}")
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise _fail(path, f"'{where}' has a non-string key {k!r}")
        if isinstance(v, torchfile.BadTensor):  # reaches past its stored bytes: nothing was allocated
            raise _fail(path, f"{k} {v.reason}")
        if not isinstance(v, np.ndarray):
            raise _fail(path, f"{k}: expected a tensor in '{where}', got {torchfile.type_name(v)}")
        if v.dtype.name not in _FLOAT_DTYPES:
            raise _fail(path, f"{k} is a {v.dtype.name} tensor; a float tensor was "
                              f"expected (RVC state dicts hold only float weights)")
        if v.ndim == 0:
            raise _fail(path, f"{k} is a 0-d (scalar) tensor; RVC weights have at least one dimension")
        out[k] = v.astype(np.float32) if v.dtype.name == "bfloat16" else v  # numpy has no bfloat16 maths
        if not np.all(np.isfinite(out[k])):
            raise _fail(path, f"{k} contains NaN or inf values")
    if not out:
        raise _fail(path, f"'{where}' is an empty state dict")
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_metadata(path: str, md: Mapping[str, Any]) -> None:
    """The top-level values RVC's ``load_checkpoint`` reads back (and ``export`` writes
    again): ``learning_rate`` a finite number > 0, ``iteration`` an integer >= 0."""
    if "learning_rate" in md:
        lr = md["learning_rate"]
        if not _is_number(lr) or not np.isfinite(float(lr)) or float(lr) <= 0:
            raise _fail(path, f"key 'learning_rate' has value {lr!r}; expected a finite number > 0")
    if "iteration" in md:
        it = md["iteration"]
        if isinstance(it, bool) or not isinstance(it, numbers.Integral) or it < 0:
            raise _fail(path, f"key 'iteration' has value {it!r}; expected an integer >= 0")


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


def load_rvc_file(path: str | os.PathLike) -> RVCFile:
    """Read and identify an RVC ``.pth`` file (see module docstring). Raises :class:`RVCFileError`."""
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise _fail(path, f"top level is a {torchfile.type_name(ckpt)}, expected a dict with 'model' "
                          f"(pretrained / training checkpoint) or 'weight' + 'config' (inference model)")
    layout, sd_key = _layout(path, ckpt)
    sd = _to_numpy(path, sd_key, ckpt[sd_key])
    try:  # every layer's weight given once (no two weight-norm key styles for one layer)
        weight_norm_groups(sd, source=path)
    except StateDictError as e:
        raise RVCFileError(" ".join(str(e).split())) from None
    check_metadata(path, {str(k): v for k, v in ckpt.items()})
    metadata = {str(k): _json_safe(v) for k, v in ckpt.items() if k not in _NOT_METADATA}
    metadata = {k: v for k, v in metadata.items() if _jsonable(v)}
    has_optimizer = "optimizer" in ckpt and ckpt["optimizer"] is not None
    if has_optimizer and not isinstance(ckpt["optimizer"], Mapping):
        raise _fail(path, f"key 'optimizer' should be an optimizer state dict, got {torchfile.type_name(ckpt['optimizer'])}")
    claims = {str(k): v for k, v in ckpt.items() if k != sd_key}
    try:
        spec = families.detect(sd, claims, layout=layout, where=sd_key)
    except DetectionError as e:
        raise _fail(path, str(e)) from None
    family = families.get(spec.family)
    return RVCFile(path=path, layout=layout, spec=spec, state_dict=sd, dtype=_dtype_name(sd),
                   weight_norm_style=weight_norm_style(sd),
                   has_enc_q=any(family.is_training_only(k) for k in sd), metadata=metadata,
                   has_optimizer=has_optimizer, num_params=int(sum(int(a.size) for a in sd.values())))


# --------------------------------------------------------------------------- to Flax


def to_flax(rvc_file: RVCFile, *, seed: int = 0) -> tuple[nnx.Module, dict]:
    """The model the file's weights belong to, holding them (strict), and its params.

    The model's structure comes from the family's :meth:`~rvclora_jax.families.Family.abstract`
    (traced, nothing initialised), the weights are mapped onto it and the model is
    materialised with them, so no random parameter is ever drawn; ``seed`` only seeds
    state that is not a parameter (RNG streams), if the model has any. Returns
    ``(model, params)``: params is the nested fp32 dict. Weight norm is folded; fp16 is
    upcast."""
    family = families.get(rvc_file.spec.family)
    try:
        params = torch_to_flax(family.abstract(rvc_file.spec), rvc_file.state_dict, source=rvc_file.path)
        model = family.materialize(rvc_file.spec, params, seed=seed, source=rvc_file.path)
    except (StateDictError, TreeMismatch) as e:
        raise RVCFileError(" ".join(str(e).split())) from None
    return model, params


__all__ = ["RVCFile", "RVCFileError", "LAYOUTS", "load_rvc_file", "read_checkpoint", "to_flax", "check_metadata"]
