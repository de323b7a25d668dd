"""What every model family provides, the spec of one model, and the registry.

A :class:`Family` subclass implements four things — :meth:`Family.build` (a model of a
:class:`ModelSpec`), :meth:`Family.recognises` and :meth:`Family.detect` (a spec from a
state dict's keys and shapes plus what the file claims about itself) and a one-line
:attr:`Family.signature` for error messages — and inherits the rest: the structure of
a model without initialising it (:meth:`Family.abstract`) and a concrete model holding
given weights (:meth:`Family.materialize`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ..tree import check_fits, flatten, unflatten


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model: enough to build it, and hashable (one cached structure per spec)."""

    family: str                      # a registered family's name ("rvc")
    kind: str                        # "generator" | "discriminator"
    version: str                     # the family's own versions ("v1" | "v2" for RVC)
    f0: bool | None = None           # generators: pitch-conditioned or not
    config: Any = None               # the family's config type (RVC: SynthConfig); None for discriminators
    sr: int | None = None            # sample rate (generators: the config's; discriminators: if the file says)
    with_training_only: bool = False  # whether the family's training-only subtree (RVC: enc_q) is present


class DetectionError(ValueError):
    """A state dict does not fit a family; the one-line message names the key."""


def dtype_kwargs(dtype, param_dtype) -> dict:
    # Only pass what was asked for, so families whose models have no dtype arguments
    # (or not yet) still build.
    return {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}


_ABSTRACT_CACHE_SIZE = 16


def _dtype_key(d) -> str | None:
    return None if d is None else jnp.dtype(d).name


class Family:
    """Base class of model families (see the module docstring for what a subclass adds)."""

    name: str = ""
    signature: str = ""              # what the family's state dicts look like (for "no family fits")
    training_only: tuple[str, ...] = ()
    lora_presets: Mapping[str, tuple[tuple[str, ...], str]] = {}
    default_lora_preset: str | None = None

    # ---------------------------------------------------------------- to implement
    def build(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype=None, param_dtype=None) -> nnx.Module:
        raise NotImplementedError

    def recognises(self, sd: Mapping[str, Any]) -> bool:
        """Whether ``sd``'s keys are this family's (cheap; :meth:`detect` checks the rest)."""
        raise NotImplementedError

    def detect(self, sd: Mapping[str, Any], claims: Mapping[str, Any], *, layout: str,
               where: str = "model") -> ModelSpec:
        """The spec of state dict ``sd`` (numpy arrays, torch key names), cross-checked
        against ``claims`` (the file's other top-level entries: version, sr, f0, config,
        ...). ``where`` names the state dict in messages. Raises :class:`DetectionError`."""
        raise NotImplementedError

    # ---------------------------------------------------------------- provided
    def is_training_only(self, path: str) -> bool:
        """Whether a module/parameter path (``"enc_q/pre/kernel"``) or torch key
        (``"enc_q.pre.weight"``) lies in the training-only subtree."""
        return re.split(r"[./]", path, maxsplit=1)[0] in self.training_only

    def abstract(self, spec: ModelSpec, *, dtype=None, param_dtype=None) -> nnx.Module:
        """The model of ``spec`` with :class:`jax.ShapeDtypeStruct` in place of every
        array: its structure, paths and shapes, traced with :func:`nnx.eval_shape`, so no
        initialiser runs and nothing is allocated. Cached per spec; each call returns a
        fresh module."""
        cache = self.__dict__.setdefault("_abstract_cache", {})
        key = (spec, _dtype_key(dtype), _dtype_key(param_dtype))
        if key not in cache:
            if len(cache) >= _ABSTRACT_CACHE_SIZE:
                del cache[next(iter(cache))]  # oldest first; structures hold no arrays, only shapes
            cache[key] = nnx.split(self._trace(spec, dtype, param_dtype))
        graphdef, state = cache[key]
        return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # fresh Variables

    def _trace(self, spec, dtype, param_dtype) -> nnx.Module:
        return nnx.eval_shape(lambda: self.build(spec, rngs=nnx.Rngs(0), **dtype_kwargs(dtype, param_dtype)))

    def materialize(self, spec: ModelSpec, params: Mapping, *, seed: int = 0, dtype=None,
                    param_dtype=None, source: str = "params") -> nnx.Module:
        """A concrete model of ``spec`` holding ``params`` (nested dict, e.g. from
        ``rvclora_convert.state_dict.torch_to_flax``), without running the parameter
        initialisers. Strict: every parameter must be given, with its shape (arrays are
        cast to the model's parameter dtype). State that is not a parameter (RNG streams)
        is what a model built with ``nnx.Rngs(seed)`` would hold."""
        graphdef, pstate, rest = nnx.split(self.abstract(spec, dtype=dtype, param_dtype=param_dtype),
                                           nnx.Param, ...)
        target = flatten(nnx.to_pure_dict(pstate))
        given = flatten(params)
        check_fits(target, given, source=source, allow_missing=False)
        nnx.replace_by_pure_dict(pstate, unflatten({p: jnp.asarray(given[p], target[p].dtype) for p in target}))
        if jax.tree.leaves(rest):
            rest = self._non_param_state(spec, seed, dtype, param_dtype)
        return nnx.merge(graphdef, pstate, rest)

    def _non_param_state(self, spec, seed, dtype, param_dtype) -> nnx.State:
        # Under jit only the returned (non-parameter) state is computed: XLA drops the
        # parameter initialisers as dead code.
        def make():
            model = self.build(spec, rngs=nnx.Rngs(seed), **dtype_kwargs(dtype, param_dtype))
            return nnx.state(model, nnx.Not(nnx.Param))
        return jax.jit(make)()


# --------------------------------------------------------------------------- registry

FAMILIES: dict[str, Family] = {}


def register(family: Family, *, before: str | None = None) -> Family:
    """Add ``family`` (unique ``name``) to :data:`FAMILIES`. Detection tries families in
    this order; ``before`` puts a family whose state dicts refine another's (same keys
    plus its own) ahead of it."""
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    if before is None or family.name in FAMILIES:
        FAMILIES[family.name] = family
        return family
    if before not in FAMILIES:
        raise ValueError(f"register(before={before!r}): no such family; known: {', '.join(FAMILIES)}")
    items = list(FAMILIES.items())
    at = [n for n, _ in items].index(before)
    FAMILIES.clear()
    FAMILIES.update(items[:at] + [(family.name, family)] + items[at:])
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def detect(sd: Mapping[str, Any], claims: Mapping[str, Any] | None = None, *, layout: str = "base",
           where: str = "model") -> ModelSpec:
    """The spec of state dict ``sd``: the first registered family that recognises its
    keys decides (see :meth:`Family.detect`). Raises :class:`DetectionError`."""
    tried = []
    for family in FAMILIES.values():
        if family.recognises(sd):
            return family.detect(sd, claims or {}, layout=layout, where=where)
        tried.append(f"{family.name}: {family.signature}")
    raise DetectionError(f"no registered model family recognises the keys of '{where}' "
                         f"(tried {'; '.join(tried) or 'none'})")


__all__ = ["ModelSpec", "DetectionError", "Family", "dtype_kwargs", "FAMILIES", "register", "unregister", "get", "detect"]
