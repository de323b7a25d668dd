"""A stand-in for the one piece of ``torchaudio`` that ``torchfcpe`` imports.

``torchfcpe`` 0.0.4 runs ``from torchaudio.transforms import Resample`` when it is
imported, but torchaudio has no build for torch 2.13 (the torch the tests use), so it
cannot be installed. torchfcpe only *calls* Resample when the input rate differs from
the model's 16 kHz; the tests always feed 16 kHz audio, resampled beforehand with a
field library (soxr) identically for both sides. So the stand-in's ``Resample`` refuses
to run rather than guessing at torchaudio's filter: if it is ever reached, a test is
feeding the wrong rate, and it fails loudly instead of comparing against a made-up
reference.

Usage, before the first ``import torchfcpe``::

    from tests.torchaudio_stub import install, remove
    install()
    import torchfcpe
    remove()

:func:`install` does nothing when a real torchaudio is importable.
"""

from __future__ import annotations

import importlib.util
import sys
import types


class Resample:
    """``torchaudio.transforms.Resample`` for the identity only (orig_freq == new_freq)."""

    def __init__(self, orig_freq=16000, new_freq=16000, *args, **kwargs):
        if orig_freq != new_freq:
            raise NotImplementedError(
                f"tests/torchaudio_stub.py: Resample({orig_freq} -> {new_freq}) is not available "
                f"(torchaudio cannot be installed with torch 2.13); resample to 16 kHz with soxr first")
        self.orig_freq, self.new_freq = orig_freq, new_freq

    def to(self, *args, **kwargs):
        return self

    def __call__(self, waveform):
        return waveform


def install() -> bool:
    """Put a minimal ``torchaudio`` / ``torchaudio.transforms`` in :data:`sys.modules`.

    Returns True if the stand-in was installed, False if a real torchaudio (or an
    already installed stand-in) is there."""
    if "torchaudio" in sys.modules:
        return False
    if importlib.util.find_spec("torchaudio") is not None:
        return False
    pkg = types.ModuleType("torchaudio")
    pkg.__doc__ = "stand-in installed by tests/torchaudio_stub.py (only transforms.Resample, identity only)"
    pkg.__path__ = []  # a package, so `import torchaudio.transforms` resolves through sys.modules
    transforms = types.ModuleType("torchaudio.transforms")
    transforms.Resample = Resample
    pkg.transforms = transforms
    sys.modules["torchaudio"] = pkg
    sys.modules["torchaudio.transforms"] = transforms
    return True


def remove() -> None:
    """Take the stand-in out of :data:`sys.modules` again (modules that imported from it
    keep their reference). Other libraries probe for torchaudio (transformers checks
    ``importlib.util.find_spec("torchaudio")``, which fails on a module without a spec), so
    it must only be there while torchfcpe is imported."""
    mod = sys.modules.get("torchaudio")
    if mod is not None and getattr(mod, "__doc__", "").startswith("stand-in installed by tests/"):
        del sys.modules["torchaudio"]
        sys.modules.pop("torchaudio.transforms", None)


__all__ = ["Resample", "install", "remove"]
