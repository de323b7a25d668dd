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


def load_npy(path: str) -> np.ndarray:
    """A ``.npy`` array (never a pickle); a bad file is a ``ValueError`` naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a numpy array file ({e})") from None


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
           "cut", "collate"]
