"""Pitch for training data: f0 trackers by name, and RVC's coarse (mel-bin) pitch.

Life cycle: a method name (``--f0-method``) is looked up in :data:`PITCH_METHODS`, whose
factory takes the model file (or ``None``) and returns a tracker ``wav16k -> f0_hz``
(float ``[frames]`` at 100 fps, hop 160 at 16 kHz, 0 = unvoiced); the experiment folder
stores that curve as ``2b-f0nsf/`` and :func:`coarse` of it as ``2a_f0/``.

Only :func:`harvest` (pyworld) is registered here. The neural trackers (``rmvpe``,
``fcpe``) need weight loaders from ``rvclora_convert`` (torch files), which this package
never imports: the command line (:mod:`rvclora_jax.cli.prepare`) registers their factories
with :func:`register_pitch_method`; until then their entries say so in a one-line error.
Library users may as well pass any callable as ``pitch_fn`` to
:func:`rvclora_jax.frontend.prepare.prepare`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from typing import Callable

import numpy as np

SR = 16000
HOP = 160          # 100 fps
F0_MIN = 50.0      # RVC's training extractor (extract_f0_print.py) and inference pipeline
F0_MAX = 1100.0
F0_BINS = 256      # coarse values 1..255
MEL_MIN = 1127.0 * np.log(1.0 + F0_MIN / 700.0)
MEL_MAX = 1127.0 * np.log(1.0 + F0_MAX / 700.0)

PitchFn = Callable[[np.ndarray], np.ndarray]


def coarse(f0_hz: np.ndarray) -> np.ndarray:
    """RVC's coarse pitch of an f0 curve: mel(f) = 1127·ln(1 + f/700) mapped linearly from
    [mel(50), mel(1100)] onto [1, 255], clipped, rounded half-to-even; unvoiced (0) → 1.
    Returns int64 (RVC's ``astype(int)`` on Linux)."""
    f0 = np.asarray(f0_hz, np.float64)
    mel = 1127.0 * np.log(1.0 + f0 / 700.0)
    q = np.where(mel > 0, (mel - MEL_MIN) * (F0_BINS - 2) / (MEL_MAX - MEL_MIN) + 1, mel)
    q = np.clip(q, 1, F0_BINS - 1)  # RVC: <= 1 -> 1, > 255 -> 255
    return np.rint(q).astype(np.int64)


def _pyworld():
    """pyworld, even where its ``__init__`` fails on ``import pkg_resources`` (removed from
    recent setuptools; pyworld 0.3.5 still asks it for its version string): the compiled
    extension is then loaded directly, without putting a stand-in ``pkg_resources`` into
    ``sys.modules`` for everyone else."""
    try:
        import pyworld

        return pyworld
    except ModuleNotFoundError as e:
        if e.name != "pkg_resources":
            raise ImportError("the harvest f0 method needs the 'pyworld' package: "
                              "pip install 'rvclora-jax[prepare]'") from None
    import glob
    import os

    spec = importlib.util.find_spec("pyworld")
    for folder in spec.submodule_search_locations or []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            for path in glob.glob(os.path.join(folder, "pyworld" + suffix)):
                loader = importlib.machinery.ExtensionFileLoader("pyworld.pyworld", path)
                mod = importlib.util.module_from_spec(
                    importlib.util.spec_from_file_location("pyworld.pyworld", path, loader=loader))
                loader.exec_module(mod)
                return sys.modules.setdefault("pyworld.pyworld", mod)
    raise ImportError("pyworld is installed but its extension module was not found: reinstall pyworld")


def harvest(wav16k: np.ndarray, *, filter_radius: int = 0) -> np.ndarray:
    """WORLD's harvest then stonemask, as RVC's training extractor calls them (16 kHz,
    f0 50..1100 Hz, 10 ms frames): float64 Hz ``[frames]``, 0 = unvoiced.

    ``filter_radius`` > 2 adds the 3-tap median filter RVC's *inference* pipeline applies
    (its training extractor does not, so the default is 0)."""
    pw = _pyworld()
    x = np.ascontiguousarray(wav16k, np.float64)
    f0, t = pw.harvest(x, fs=SR, f0_ceil=F0_MAX, f0_floor=F0_MIN, frame_period=1000 * HOP / SR)
    f0 = pw.stonemask(x, f0, t, SR)
    if filter_radius > 2:
        from scipy.signal import medfilt

        f0 = medfilt(f0, 3)
    return f0


def _harvest_factory(model_path: str | None = None) -> PitchFn:
    if model_path:
        raise ValueError("the harvest f0 method takes no model file (--f0-model)")
    _pyworld()  # fail now, not after the first file
    return harvest


def _needs_loader(name: str):
    def factory(model_path: str | None = None) -> PitchFn:
        raise ValueError(f"the {name} f0 method needs its weight loader from rvclora_convert: use "
                         f"`rvclora prepare --f0-method {name}`, or import rvclora_jax.cli.prepare "
                         "(which registers it), or pass pitch_fn=")
    return factory


# name -> factory(model_path | None) -> tracker(wav16k) -> f0_hz
PITCH_METHODS: dict[str, Callable[[str | None], PitchFn]] = {
    "rmvpe": _needs_loader("rmvpe"),
    "fcpe": _needs_loader("fcpe"),
    "harvest": _harvest_factory,
}


def register_pitch_method(name: str, factory: Callable[[str | None], PitchFn]) -> None:
    """Add or replace the factory of pitch method ``name``."""
    PITCH_METHODS[name] = factory


def pitch_method(name: str, model_path: str | None = None) -> PitchFn:
    """The tracker for ``name`` (see :data:`PITCH_METHODS`)."""
    if name not in PITCH_METHODS:
        raise ValueError(f"unknown f0 method {name!r} (one of: {', '.join(PITCH_METHODS)})")
    return PITCH_METHODS[name](model_path)


__all__ = ["coarse", "harvest", "PITCH_METHODS", "register_pitch_method", "pitch_method", "PitchFn",
           "F0_MIN", "F0_MAX", "HOP", "SR"]
