"""The RMVPE family: RVC's pitch network ``E2E`` (``rmvpe.pt``), ported in
:mod:`rvclora_jax.frontend.rmvpe`.

A state dict is recognised by ``unet.encoder.bn.*`` and ``fc.0.gru.*``; the config is
read off the keys and shapes: the number of ``unet.encoder.layers.<i>`` (en_de_layers),
of ``unet.encoder.layers.0.conv.<j>`` (n_blocks), of ``unet.intermediate.layers.<i>``
(inter_layers) and the width of the first conv (en_out_channels). Unlike the RVC family,
the model holds non-parameter state (batch-norm running statistics) that comes from the
file, so :meth:`RMVPEFamily.materialize` fills every variable, not only the parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from ..frontend.rmvpe import GRU_HIDDEN, N_BINS, N_MELS, RMVPE, RMVPEConfig
from ..tree import check_fits, flatten, unflatten
from .base import DetectionError, Family, ModelSpec, dtype_kwargs, register


def _indices(sd: Mapping[str, Any], prefix: str) -> set[int]:
    out = set()
    for k in sd:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return out


def _count(sd, prefix: str, where: str) -> int:
    idx = _indices(sd, prefix)
    if not idx:
        raise DetectionError(f"'{where}' has no {prefix}<i>.* keys (RVC's rmvpe.pt has them)")
    if idx != set(range(len(idx))):
        missing = min(set(range(max(idx) + 1)) - idx)
        raise DetectionError(f"'{where}' has {prefix}{max(idx)}.* but no {prefix}{missing}.*")
    return len(idx)


def _shape(sd, key: str, where: str) -> tuple[int, ...]:
    if key not in sd:
        raise DetectionError(f"'{where}': key {key} missing")
    return tuple(int(d) for d in sd[key].shape)


class RMVPEFamily(Family):
    name = "rmvpe"
    signature = "RMVPE pitch model (rmvpe.pt: unet.encoder.bn.*, unet.encoder.layers.*, cnn.*, fc.0.gru.*, fc.1.*)"

    @staticmethod
    def spec(config: RMVPEConfig = RMVPEConfig()) -> ModelSpec:
        return ModelSpec(family="rmvpe", kind="rmvpe", version="e2e", config=config, sr=16000)

    def build(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype=None, param_dtype=None) -> nnx.Module:
        return RMVPE(spec.config or RMVPEConfig(), rngs=rngs, **dtype_kwargs(dtype, param_dtype))

    def recognises(self, sd: Mapping[str, Any]) -> bool:
        return any(k.startswith("unet.encoder.") for k in sd) and any(k.startswith("fc.0.gru.") for k in sd)

    def detect(self, sd: Mapping[str, Any], claims: Mapping[str, Any], *, layout: str = "state-dict",
               where: str = "model") -> ModelSpec:
        if any(k.startswith("fc.0.gru.") and k.endswith(("_l1", "_l1_reverse")) for k in sd):
            raise DetectionError(f"'{where}' has a 2-layer GRU (fc.0.gru.*_l1); RVC's RMVPE has one (n_gru=1)")
        en_de = _count(sd, "unet.encoder.layers.", where)
        n_blocks = _count(sd, "unet.encoder.layers.0.conv.", where)
        inter = _count(sd, "unet.intermediate.layers.", where)
        first = _shape(sd, "unet.encoder.layers.0.conv.0.conv.0.weight", where)
        if len(first) != 4 or first[1:] != (1, 3, 3):
            raise DetectionError(f"'{where}': unet.encoder.layers.0.conv.0.conv.0.weight has shape {list(first)}; "
                                 f"expected [channels, 1, 3, 3]")
        dec = _count(sd, "unet.decoder.layers.", where)
        if dec != en_de:
            raise DetectionError(f"'{where}' has {en_de} unet.encoder.layers.* but {dec} unet.decoder.layers.*")
        for key, want in (("fc.0.gru.weight_ih_l0", (3 * GRU_HIDDEN, 3 * N_MELS)),
                          ("fc.1.weight", (N_BINS, 2 * GRU_HIDDEN))):
            got = _shape(sd, key, where)
            if got != want:
                raise DetectionError(f"'{where}': {key} has shape {list(got)}; RMVPE's is {list(want)}")
        try:
            cfg = RMVPEConfig(n_blocks=n_blocks, en_de_layers=en_de, inter_layers=inter, en_out_channels=first[0])
        except ValueError as e:
            raise DetectionError(f"'{where}': {e}") from None
        return self.spec(cfg)

    def materialize(self, spec: ModelSpec, params: Mapping, *, seed: int = 0, dtype=None,
                    param_dtype=None, source: str = "params") -> nnx.Module:
        """As :meth:`Family.materialize`, but ``params`` gives every variable: parameters and
        the batch-norm statistics (``mean``/``var``). Strict."""
        graphdef, state = nnx.split(self.abstract(spec, dtype=dtype, param_dtype=param_dtype))
        target = flatten(nnx.to_pure_dict(state))
        given = flatten(params)
        check_fits(target, given, source=source, allow_missing=False)
        nnx.replace_by_pure_dict(state, unflatten({p: jnp.asarray(given[p], target[p].dtype) for p in target}))
        return nnx.merge(graphdef, state)


RMVPE_FAMILY = register(RMVPEFamily())

__all__ = ["RMVPE_FAMILY", "RMVPEFamily"]
