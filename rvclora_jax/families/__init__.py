"""Model families: one object per family of networks, registered in one place.

A family (today: :data:`rvclora_jax.families.rvc.RVC`, RVC's synthesizers v1/v2 ×
f0/nof0 × 32/40/48 kHz and their discriminators) owns everything that is specific to
it: its configurations and presets, how to build a model of a spec, how to recognise
its ``.pth`` state dicts from keys and shapes, its LoRA target presets, the subtree
that only serves training, its training segment and its discriminator. Code outside a
family asks the family instead of hard-coding names. A new family (Applio's
MRF-HiFi-GAN or RefineGAN decoders, a HuBERT encoder) is one new module here plus one
:func:`register` call.
"""

from __future__ import annotations

from typing import Any

FAMILIES: dict[str, Any] = {}


def register(family: Any) -> Any:
    """Add ``family`` (an object with a unique ``name``) to :data:`FAMILIES`."""
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Any:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


from . import rvc  # noqa: E402,F401  (registers the RVC family)

__all__ = ["FAMILIES", "register", "get", "rvc"]
