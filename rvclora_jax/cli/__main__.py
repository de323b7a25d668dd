"""``python -m rvclora_jax.cli``: the same as the ``rvclora`` console script."""

from . import entry

entry()
