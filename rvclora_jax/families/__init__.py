"""Model families: one object per family of networks, registered in one place.

A family (today: :data:`rvclora_jax.families.rvc.RVC`, RVC's synthesizers v1/v2 ×
f0/nof0 × 32/40/48 kHz and their discriminators) owns everything that is specific to
it: its configurations and presets, how to build a model of a :class:`ModelSpec`, how
to recognise its ``.pth`` state dicts from keys and shapes, its LoRA target presets,
the subtree that only serves training, its training segment and its discriminator.
Code outside a family asks the family instead of hard-coding names.

The life of a model in the converters::

    spec  = detect(state_dict, claims, layout=...)    # first family that recognises the keys
    fam   = get(spec.family)
    shape = fam.abstract(spec)                         # nnx.eval_shape: structure, no init
    model = fam.materialize(spec, params)              # the file's weights, nothing random

Adding a family (Applio's MRF-HiFi-GAN or RefineGAN decoders, a HuBERT encoder) is one
new module here — a :class:`Family` subclass implementing ``build``, ``recognises``,
``detect`` and ``signature`` — plus one line importing it at the bottom of this file
(its module calls :func:`register`). Nothing else changes: the converters, ``inspect``
and ``export`` find it through :func:`detect` and :func:`get`. A family whose state
dicts are another's plus some keys registers with ``register(family, before="rvc")``.
"""

from __future__ import annotations

from .base import (FAMILIES, DetectionError, Family, ModelSpec, detect, dtype_kwargs, get, register,
                   unregister)

# The registered families, in detection order: RVC's voice models, then the front end's
# networks (issue 13), whose state dicts share no keys with RVC's.
from . import rvc  # noqa: E402,F401
from . import hubert  # noqa: E402,F401  (HuBERT/ContentVec content encoder)
from . import rmvpe  # noqa: E402,F401  (RVC's RMVPE pitch network)
from . import fcpe  # noqa: E402,F401  (torchfcpe's CFNaiveMelPE pitch estimator)

__all__ = ["FAMILIES", "DetectionError", "Family", "ModelSpec", "detect", "dtype_kwargs", "get",
           "register", "unregister", "rvc", "hubert", "rmvpe", "fcpe"]
