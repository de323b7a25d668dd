"""``rvclora adapters mix|extract|info`` (placeholder: the parser still lives in
:mod:`rvclora_jax.adapters`; helper H1's version of this module replaces it)."""

from __future__ import annotations


def register(subparsers) -> None:
    from ..adapters import add_adapters_parser

    add_adapters_parser(subparsers)
