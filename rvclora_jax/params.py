"""Writing plain parameter trees into NNX models."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .tree import flatten, unflatten


def load_params(model: nnx.Module, params: Mapping) -> None:
    """Write a nested param dict (e.g. from ``merge`` or the converters) into ``model``.

    Every given path must exist in the model with the same shape; paths not given keep
    the model's values."""
    state = nnx.state(model, nnx.Param)
    flat_state = flatten(nnx.to_pure_dict(state))
    flat = flatten(params)
    unknown = sorted(set(flat) - set(flat_state))
    if unknown:
        raise KeyError(f"model has no parameter {unknown[0]} ({len(unknown)} unknown paths)")
    for p, v in flat.items():
        if tuple(np.shape(v)) != tuple(np.shape(flat_state[p])):
            raise ValueError(f"{p}: shape {tuple(np.shape(v))} != model {tuple(np.shape(flat_state[p]))}")
    merged = unflatten({p: jnp.asarray(flat.get(p, v), jnp.asarray(v).dtype) for p, v in flat_state.items()})
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model, state)
