"""One utterance's frame-level inputs, shared by training (:mod:`rvclora_jax.data`) and
rendering (:mod:`rvclora_jax.render`).

RVC's synthesizer runs at 100 frames per second. Its content features (HuBERT/ContentVec,
``<name>.npy``) are stored at 50 fps and repeated ×2 (its loader's ``np.repeat(phone, 2,
axis=0)``, its inference pipeline's nearest ``F.interpolate(scale_factor=2)``: the same
frames); pitch (coarse, ``2a_f0``) and f0 in Hz (``2b-f0nsf``) are stored at 100 fps as
``<name>.wav.npy``. An utterance here is a dict of numpy arrays keyed by the names in
:data:`FIELDS`; :func:`collate` zero-pads several into one batch.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from .fileio import require_regular_file

# Content-feature width per RVC version (v1: HuBERT 256-d, v2: ContentVec 768-d).
FEATURE_DIM = {"v1": 256, "v2": 768}

# The per-utterance arrays and their batch dtypes. All are per 100 fps frame except
# "wave", which has ``hop`` samples per frame.
FIELDS = {"phone": np.float32, "pitch": np.int32, "pitchf": np.float32, "spec": np.float32, "wave": np.float32}
# The fields a batch records lengths of ("<field>_lengths"); pitch/pitchf share phone's.
LENGTH_FIELDS = ("phone", "spec", "wave")


def repeat_features(features) -> np.ndarray:
    """50 fps content features ``[T50, C]`` → 100 fps ``[2·T50, C]`` (RVC's nearest ×2)."""
    return np.repeat(features, 2, axis=0)


def stem(filename: str) -> str:
    """An utterance's name from one of its files: ``x.npy``, ``x.wav.npy``, ``x.wav`` → ``x``."""
    name = os.path.basename(filename)
    if name.endswith(".npy"):
        name = name[:-4]
    if name.endswith(".wav"):
        name = name[:-4]
    return name


def pitch_file(folder: str, name: str) -> str:
    """The pitch/f0 file of utterance ``name`` in ``folder``: ``<name>.wav.npy`` (RVC's and
    Applio's naming) or, if only that exists, ``<name>.npy``. When neither exists the
    ``.wav.npy`` path is returned, for the caller's missing-file message."""
    p = os.path.join(folder, name + ".wav.npy")
    if not os.path.exists(p):
        alt = os.path.join(folder, name + ".npy")
        if os.path.exists(alt):
            return alt
    return p


def load_npy(path: str, what: str = "numpy array file") -> np.ndarray:
    """A ``.npy`` array of real numbers (never a pickle); a bad file (not a regular file,
    empty, truncated, an ``.npz``, a structured, string, object, bool or complex dtype, a
    0-d array) is a ``ValueError`` naming it."""
    require_regular_file(path, what)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - EOFError (0 bytes), ValueError, OSError...: all name the file
        raise ValueError(f"{path}: not a numpy array file ({e or type(e).__name__})") from None
    if not isinstance(arr, np.ndarray):
        if hasattr(arr, "close"):
            arr.close()
        raise ValueError(f"{path}: not a single .npy array (an .npz archive?)")
    if arr.dtype.names is not None or arr.dtype.kind not in "fiu":
        raise ValueError(f"{path}: dtype {arr.dtype} is not a real number array")
    if arr.ndim == 0:
        raise ValueError(f"{path}: a 0-d array, expected one value per frame")
    return arr


def load_features(path: str, dim: int | None = None) -> np.ndarray:
    """Content features ``[T50, C]`` (float, finite, ``C == dim`` when given) from ``path``."""
    feats = load_npy(path, "feature file")
    if feats.dtype.kind != "f":
        raise ValueError(f"{path}: features have dtype {feats.dtype}, expected float")
    if feats.ndim != 2 or (dim is not None and feats.shape[1] != dim):
        want = f"[T, {dim}]" if dim is not None else "[frames, dim]"
        raise ValueError(f"{path}: feature shape {tuple(feats.shape)}, expected {want}")
    if not np.all(np.isfinite(feats)):
        raise ValueError(f"{path}: features contain NaN or inf")
    return feats


def _frames(arr: np.ndarray, path: str, what: str) -> np.ndarray:
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{path}: {what} must be one value per 10 ms frame, got shape {tuple(arr.shape)}")
    return arr


def load_coarse_pitch(path: str) -> np.ndarray:
    """RVC's coarse pitch (``2a_f0``, ``[T100]``): integer values in 1..255, as int32."""
    arr = _frames(load_npy(path, "coarse pitch file"), path, "coarse pitch")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.rint(arr)):
            raise ValueError(f"{path}: coarse pitch must be integers 1..255 (RVC's 2a_f0), "
                             f"found non-integer values")
    if arr.size and (arr.min() < 1 or arr.max() > 255):
        raise ValueError(f"{path}: coarse pitch must be in 1..255 (RVC's 2a_f0), "
                         f"found {arr.min():g}..{arr.max():g}")
    return arr.astype(np.int32)


def load_f0(path: str) -> np.ndarray:
    """f0 in Hz (``2b-f0nsf``, ``[T100]``): float, finite, ≥ 0 (0 = unvoiced)."""
    arr = _frames(load_npy(path, "f0 file"), path, "f0")
    if arr.dtype.kind != "f":
        raise ValueError(f"{path}: f0 has dtype {arr.dtype}, expected float Hz (RVC's 2b-f0nsf; "
                         f"an integer file is the coarse pitch 2a_f0)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: f0 contains NaN or inf")
    if np.any(arr < 0):
        raise ValueError(f"{path}: f0 contains negative values")
    return arr


def cut(utt: Mapping, n: int, hop: int | None = None) -> dict:
    """``utt`` with every per-frame field cut to ``n`` frames (``"wave"`` to ``n·hop`` samples)."""
    out = dict(utt)
    for k in FIELDS:
        if out.get(k) is not None:
            out[k] = out[k][: n * hop] if k == "wave" else out[k][:n]
    return out


def collate(utts: Sequence[Mapping], T: int | None = None, *, hop: int | None = None) -> dict:
    """Zero-pad utterances into one batch, rows in the given order.

    Each field of :data:`FIELDS` the utterances carry (not ``None``) becomes ``[B, T, ...]``
    (``"wave"``: ``[B, T·hop]``) of its dtype, zero past each row's length; the fields of
    :data:`LENGTH_FIELDS` also get ``<field>_lengths`` ``[B]`` int32, and ``"sid"`` (if
    present) ``[B]`` int32. ``T`` defaults to the longest ``phone``."""
    first = utts[0]
    B = len(utts)
    if T is None:
        T = max(len(u["phone"]) for u in utts)
    out = {}
    for k, dtype in FIELDS.items():
        if first.get(k) is None:
            continue
        n = T * hop if k == "wave" else T
        arr = np.zeros((B, n) + tuple(first[k].shape[1:]), dtype)
        for r, u in enumerate(utts):
            arr[r, : len(u[k])] = u[k]
        out[k] = arr
        if k in LENGTH_FIELDS:
            out[f"{k}_lengths"] = np.array([len(u[k]) for u in utts], np.int32)
    if "sid" in first:
        out["sid"] = np.array([u["sid"] for u in utts], np.int32)
    return out


__all__ = ["FEATURE_DIM", "FIELDS", "LENGTH_FIELDS", "repeat_features", "stem", "pitch_file", "load_npy",
           "load_features", "load_coarse_pitch", "load_f0",
           "cut", "collate"]
