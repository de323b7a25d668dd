"""Reading RVC's ``rmvpe.pt`` (the RMVPE pitch model) into :class:`rvclora_jax.frontend.rmvpe.RMVPE`.

The file is a bare ``state_dict`` of RVC's ``E2E(4, 1, (2, 2))`` (RVC loads it with a strict
``load_state_dict``): 741 tensors, including the batch-norm running statistics and their
``num_batches_tracked`` counters (dropped here: they only matter for training). It is read
with :func:`rvclora_convert.torchfile.load` (numpy only, a restricted unpickler), so no
code in it runs. The file's SHA-256 is
compared with the official one (:data:`~rvclora_jax.frontend.rmvpe.OFFICIAL_SHA256`); a
different file is loaded anyway, with a warning (a re-saved or fine-tuned copy is legal).
Anything else — an RVC voice model, a HuBERT checkpoint, a state dict missing keys — is
an :class:`~rvclora_convert.pth.RVCFileError` whose one-line message names the file.

Nothing here needs torch.
"""

from __future__ import annotations

import collections
import hashlib
import os
import warnings
from typing import Any, Mapping

import numpy as np
from flax import nnx

from . import torchfile
from .pth import RVCFileError, _fail, _to_numpy, read_checkpoint
from rvclora_jax import families
from rvclora_jax.families import DetectionError
from rvclora_jax.frontend.rmvpe import OFFICIAL_SHA256, RMVPE, torch_layout
from rvclora_jax.tree import TreeMismatch, check_fits, flatten, unflatten


class RMVPEHashWarning(UserWarning):
    """The file is not byte-identical to the official ``rmvpe.pt``."""


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _state_dict(path: str, obj: Any) -> Mapping:
    if not isinstance(obj, Mapping):
        raise _fail(path, f"top level is a {torchfile.type_name(obj)}; RMVPE's rmvpe.pt is a state dict (str -> tensor)")
    keys = [str(k) for k in obj]
    if "weight" in obj and "config" in obj:
        raise _fail(path, "is an RVC voice model ('weight' + 'config'), not RMVPE's rmvpe.pt")
    if "model" in obj and isinstance(obj["model"], Mapping):
        inner = obj["model"]
        if families.get("rmvpe").recognises({str(k): None for k in inner}):
            return inner  # a state dict wrapped as {"model": ...} (as some tools save it)
        if "cfg" in obj or "args" in obj:
            raise _fail(path, "is a fairseq checkpoint (HuBERT/ContentVec?), not RMVPE's rmvpe.pt")
        raise _fail(path, f"is a checkpoint with a 'model' entry that is not RMVPE's (top-level keys: "
                          f"{sorted(keys)[:8]}); RMVPE's rmvpe.pt is a bare E2E state dict")
    return obj


def load_rmvpe_state_dict(path: str | os.PathLike, *, check_hash: bool = True) -> tuple[dict[str, np.ndarray], Any]:
    """``(state_dict as numpy, spec)`` of an ``rmvpe.pt``; see the module docstring."""
    path = os.fspath(path)
    obj = read_checkpoint(path, kind="rmvpe.pt file", never="RMVPE weight files never need this")
    sd = _state_dict(path, obj)
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise _fail(path, f"has a non-string key {bad[0]!r}; RMVPE's rmvpe.pt is a state dict")
    sd = {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
    family = families.get("rmvpe")
    if not family.recognises(sd):
        other = None
        try:
            other = families.detect(_to_numpy(path, "state dict", sd), {}, layout="base")
        except Exception:  # noqa: BLE001  (only used to word the message)
            pass
        what = (f"it looks like a {other.family} {other.kind}" if other is not None
                else f"keys found: {sorted(sd)[:6]}{' …' if len(sd) > 6 else ''}")
        raise _fail(path, f"not RMVPE's rmvpe.pt (no unet.encoder.* / fc.0.gru.* keys; {what})")
    arrays = _to_numpy(path, "state dict", sd)
    try:
        spec = family.detect(arrays, {}, layout="state-dict", where="state dict")
    except DetectionError as e:
        raise _fail(path, str(e)) from None
    if check_hash:
        digest = sha256_of(path)
        if digest != OFFICIAL_SHA256:
            warnings.warn(f"{path}: SHA-256 {digest} is not the official rmvpe.pt's ({OFFICIAL_SHA256}); "
                          f"loading it anyway", RMVPEHashWarning, stacklevel=3)
    return arrays, spec


def load_rmvpe(path: str | os.PathLike, *, dtype=None, param_dtype=None, check_hash: bool = True) -> RMVPE:
    """The :class:`~rvclora_jax.frontend.rmvpe.RMVPE` of RVC's ``rmvpe.pt`` at ``path`` (strict:
    every tensor used, every shape checked). ``dtype`` is the compute dtype (e.g. bfloat16);
    weights are kept in ``param_dtype`` (float32 by default). Raises :class:`RVCFileError`."""
    path = os.fspath(path)
    sd, spec = load_rmvpe_state_dict(path, check_hash=check_hash)
    family = families.get("rmvpe")
    abstract = family.abstract(spec)
    shapes = {p: tuple(v.shape) for p, v in flatten(nnx.to_pure_dict(nnx.state(abstract))).items()}
    plan = torch_layout(abstract)
    # the model's variables in torch layouts (zero-stride views: only the shapes matter)
    target = {tk: to_torch(np.broadcast_to(np.float32(0), shapes[fp])) for fp, (tk, _, to_torch) in plan.items()}
    try:
        check_fits(target, sd, source=path, allow_missing=False, what="state dict does not match RMVPE",
                   noun="keys", error=RVCFileError)
        params = unflatten({fp: np.ascontiguousarray(to_flax(sd[tk]), np.float32)
                            for fp, (tk, to_flax, _) in plan.items()})
        return family.materialize(spec, params, dtype=dtype, param_dtype=param_dtype, source=path)
    except TreeMismatch as e:
        raise RVCFileError(" ".join(str(e).split())) from None


def save_rmvpe(model: RMVPE, path: str | os.PathLike, *, dtype=np.float32) -> str:
    """Write ``model`` as an ``rmvpe.pt`` state dict (RVC's keys and layouts, batch-norm
    statistics included) that :func:`load_rmvpe` and ``rvc.lib.rmvpe`` read: the built-in
    example's random-weight stand-in. Written to a temporary path, then renamed."""
    from rvclora_jax.fileio import atomic_write

    flat = flatten(nnx.to_pure_dict(nnx.state(model)))
    sd = collections.OrderedDict((tk, np.array(to_torch(np.asarray(flat[fp], np.float32)), dtype))
                                 for fp, (tk, _, to_torch) in torch_layout(model).items())
    return atomic_write(os.fspath(path), lambda tmp: torchfile.save(sd, tmp), suffix=".pt")


__all__ = ["save_rmvpe", "load_rmvpe", "load_rmvpe_state_dict", "RMVPEHashWarning", "sha256_of", "RVCFileError"]
