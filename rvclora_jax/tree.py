"""Parameter trees: nested dicts as ``nnx.to_pure_dict`` gives them, and their flat form.

A path is the keys joined with ``/`` (``"dec/ups/0/kernel"``); list indices are ints in
the nested form and digits in the flat form. Everything that walks or fills a
parameter tree (loading params into a model, torch state dicts, adapter merges,
adapter checks) goes through these few functions, so there is one strict loader and
one way to spell a path.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

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


def check_fits(target: Mapping[str, Any], given: Mapping[str, Any], *, source: str = "params",
               allow_missing: bool = True, describe=lambda p: p) -> None:
    """Strictly compare two *flat* trees: every path of ``given`` must exist in ``target``
    with the same shape; with ``allow_missing=False`` every path of ``target`` must be
    given too. Raises :class:`TreeMismatch` listing the missing, unexpected and
    misshapen paths (``describe`` renders a path, e.g. as a torch key)."""
    unexpected = [p for p in given if p not in target]
    missing = [] if allow_missing else [p for p in target if p not in given]
    misshapen = [f"{describe(p)} {tuple(np.shape(given[p]))} != {tuple(np.shape(target[p]))}"
                 for p in given if p in target and tuple(np.shape(given[p])) != tuple(np.shape(target[p]))]
    if missing or unexpected or misshapen:
        parts = [f"{source}: does not fit"]
        if missing:
            parts.append(f"missing: {_fmt(describe(p) for p in missing)}")
        if unexpected:
            parts.append(f"unexpected: {_fmt(describe(p) for p in unexpected)}")
        if misshapen:
            parts.append(f"wrong shape: {_fmt(misshapen, 3)}")
        raise TreeMismatch("; ".join(parts))


__all__ = ["path_str", "flatten", "unflatten", "leaf_name", "parent", "check_fits", "TreeMismatch"]
