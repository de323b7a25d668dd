"""Parameter trees: nested dicts as ``nnx.to_pure_dict`` gives them, and their flat form.

A path is the keys joined with ``/`` (``"dec/ups/0/kernel"``); list indices are ints in
the nested form and digits in the flat form. Everything that walks or fills a
parameter tree (loading params into a model, torch state dicts, adapter merges,
adapter checks) goes through these few functions, so there is one strict loader and
one way to spell a path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np


def path_str(path: Iterable[Any]) -> str:
    """``("dec", "ups", 0)`` → ``"dec/ups/0"``."""
    return "/".join(str(p) for p in path)


def _key(k: str) -> Any:
    return int(k) if k.isdigit() else k


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict → ``{"a/b/0/kernel": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, p))
        else:
            out[p] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten` (digit keys become ints, as in ``nnx.to_pure_dict``)."""
    out: dict = {}
    for p, v in flat.items():
        node = out
        *parents, last = [_key(k) for k in p.split("/")]
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def leaf_name(path: str) -> str:
    """``"dec/ups/0/kernel"`` → ``"kernel"``."""
    return path.rsplit("/", 1)[-1]


def parent(path: str) -> str:
    """``"dec/ups/0/kernel"`` → ``"dec/ups/0"`` (``""`` for a top-level leaf)."""
    return path.rsplit("/", 1)[0] if "/" in path else ""


class TreeMismatch(ValueError):
    """A tree does not fit its target; the message lists the offending paths."""


def _fmt(paths: Iterable[str], limit: int = 6) -> str:
    paths = sorted(paths)
    s = ", ".join(paths[:limit])
    return s + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


@dataclasses.dataclass
class Mismatch:
    """How a flat tree ``given`` differs from a flat ``target`` (see :func:`mismatches`)."""

    missing: list[str]      # in target, not given
    unexpected: list[str]   # given, not in target
    misshapen: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (path, given shape, target shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshapen)

    def message(self, source: str, *, describe: Callable[[str], str] = lambda p: p,
                what: str = "does not fit", noun: str = "") -> str:
        """One line: ``"{source}: {what}; missing {noun}: ...; unexpected {noun}: ...; wrong shape: ..."``."""
        n = f" {noun}" if noun else ""
        parts = [f"{source}: {what}"]
        if self.missing:
            parts.append(f"missing{n}: {_fmt(describe(p) for p in self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected{n}: {_fmt(describe(p) for p in self.unexpected)}")
        if self.misshapen:
            parts.append("wrong shape: " + _fmt((f"{describe(p)} {g} != {t}" for p, g, t in self.misshapen), 3))
        return "; ".join(parts)


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of an array, a ``jax.ShapeDtypeStruct`` or a plain shape tuple."""
    if isinstance(x, tuple) and all(isinstance(d, int) for d in x):
        return x
    return tuple(int(d) for d in np.shape(x))


def mismatches(target: Mapping[str, Any], given: Mapping[str, Any], *, allow_missing: bool = True) -> Mismatch:
    """Compare two *flat* trees by paths and shapes (leaves: arrays, shape structs or shape
    tuples). With ``allow_missing`` a path of ``target`` that is not given is fine."""
    unexpected = [p for p in given if p not in target]
    missing = [] if allow_missing else [p for p in target if p not in given]
    misshapen = [(p, shape_of(given[p]), shape_of(target[p])) for p in given
                 if p in target and shape_of(given[p]) != shape_of(target[p])]
    return Mismatch(missing, unexpected, misshapen)


def check_fits(target: Mapping[str, Any], given: Mapping[str, Any], *, source: str = "params",
               allow_missing: bool = True, describe: Callable[[str], str] = lambda p: p,
               what: str = "does not fit", noun: str = "", error: type[Exception] = TreeMismatch) -> None:
    """Strictly compare two *flat* trees: every path of ``given`` must exist in ``target``
    with the same shape; with ``allow_missing=False`` every path of ``target`` must be
    given too. Raises ``error`` (:class:`TreeMismatch` by default) listing the missing,
    unexpected and misshapen paths (``describe`` renders a path, e.g. as a torch key)."""
    m = mismatches(target, given, allow_missing=allow_missing)
    if m:
        raise error(m.message(source, describe=describe, what=what, noun=noun))


__all__ = ["path_str", "flatten", "unflatten", "leaf_name", "parent", "shape_of", "mismatches", "Mismatch",
           "check_fits", "TreeMismatch"]
