"""Writing plain parameter trees into NNX models."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from .tree import check_fits, flatten, unflatten


def load_params(model: nnx.Module, params: Mapping) -> None:
    """Write a nested param dict (e.g. from ``merge`` or the converters) into ``model``.

    Every given path must exist in the model with the same shape (else
    :class:`~rvclora_jax.tree.TreeMismatch` listing the unexpected and misshapen paths);
    paths not given keep the model's values."""
    state = nnx.state(model, nnx.Param)
    flat_state = flatten(nnx.to_pure_dict(state))
    flat = flatten(params)
    check_fits(flat_state, flat, source="load_params", what="params do not fit the model")
    merged = unflatten({p: jnp.asarray(flat.get(p, v), jnp.asarray(v).dtype) for p, v in flat_state.items()})
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model, state)
