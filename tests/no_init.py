"""Checking that the converters never initialise a model at random.

The RVC family builds inside ``nnx.eval_shape`` (or ``jax.jit``) when converting, so any
build outside a trace is a random initialisation."""

import jax
import jax.numpy as jnp
from rvclora_jax.families.rvc import RVCFamily


def is_tracing() -> bool:
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def spy_rvc_builds(monkeypatch) -> list[bool]:
    """Record, for each RVC model build from now on, whether it ran inside a trace."""
    traced: list[bool] = []
    build = RVCFamily.build

    def spy(self, spec, **kw):
        traced.append(is_tracing())
        return build(self, spec, **kw)

    monkeypatch.setattr(RVCFamily, "build", spy)
    return traced
