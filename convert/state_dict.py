"""RVC PyTorch ``state_dict`` ⇄ Flax NNX parameters (numpy in, numpy out).

The key map is declarative: a Flax module path ``enc_p/encoder/attn_layers/0/conv_q``
is the torch prefix ``enc_p.encoder.attn_layers.0.conv_q`` — the port keeps RVC's
names. The only per-layer logic is a value hook that each layer class owns
(``torch_param``, ``from_torch`` / ``to_torch`` on the instances of
:mod:`rvclora_jax.layers`; a new layer kind brings its own):

=====================  ==========================  ===============================
Flax layer             torch key(s)                hook
=====================  ==========================  ===============================
``Dense``              ``.weight [out,in]``        transpose → ``kernel [in,out]``
``Conv1d``             ``.weight [out,in,K]``      → ``kernel [K,in,out]``
                       (``[out,in,K,1]`` for the   (squeeze the trailing 1)
                       Kx1 Conv2d of DiscriminatorP)
``ConvTranspose1d``    ``.weight [in,out,K]``      → ``kernel [K,in,out]``
``Embed``              ``.weight [n,d]``           → ``embedding``
``nnx.Embed`` (flax)   ``.weight [n,d]``           → ``embedding``
anything else          same name                   copied (LayerNorm gamma/beta, emb_rel_k/v)
=====================  ==========================  ===============================

Weight norm (``weight_g``/``weight_v``, or torch's newer
``parametrizations.weight.original0/1``) is folded to the effective weight
``g·v/‖v‖`` (norm over every axis but 0 — for ConvTranspose1d that is per *input*
channel) before the hooks run. The reverse direction re-factors it for layers
marked ``weight_norm=True``: ``v = w``, ``g = ‖w‖``.

Loading is strict (:func:`rvclora_jax.tree.check_fits`, in torch layouts): missing
keys, unexpected keys, wrong shapes and non-finite values are errors that name the key. This module does not import torch; loading a
``.pth`` file lives in ``convert/pth.py``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from rvclora_jax.layers import Adaptable, Embed
from rvclora_jax.lora import ADAPTER_LEAVES
from rvclora_jax.params import load_params  # noqa: F401  (re-exported for callers)
from rvclora_jax.tree import TreeMismatch, check_fits, flatten, leaf_name, parent, path_str, unflatten

LEGACY_G, LEGACY_V = "weight_g", "weight_v"
NEW_G, NEW_V = "parametrizations.weight.original0", "parametrizations.weight.original1"


class StateDictError(TreeMismatch):
    """A state dict does not fit the model; the message names the key(s)."""


def weight_norm_style(sd: Mapping[str, Any]) -> str:
    """``"legacy"`` (weight_g/v), ``"parametrizations"``, ``"mixed"`` or ``"none"``."""
    legacy = any(k.endswith("." + LEGACY_G) for k in sd)
    new = any(k.endswith("." + NEW_G) for k in sd)
    return {(True, False): "legacy", (False, True): "parametrizations",
            (True, True): "mixed", (False, False): "none"}[(legacy, new)]


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``g · v / ‖v‖`` with the norm over all axes except 0 (torch ``dim=0``), in fp64."""
    v64 = np.asarray(v, np.float64)
    norm = np.sqrt(np.sum(v64 * v64, axis=tuple(range(1, v64.ndim)), keepdims=True))
    return (np.asarray(g, np.float64).reshape(norm.shape) * v64 / norm).astype(np.float32)


def split_weight_norm(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`fold_weight_norm` with ``v = w``: returns ``(g, v)``."""
    w = np.asarray(w, np.float32)
    w64 = w.astype(np.float64)
    g = np.sqrt(np.sum(w64 * w64, axis=tuple(range(1, w.ndim)), keepdims=True)).astype(np.float32)
    return g, w


def weight_norm_groups(sd: Mapping[str, Any], *, source: str = "state dict"
                       ) -> tuple[dict[str, Any], dict[str, tuple[tuple[str, Any], tuple[str, Any]]]]:
    """Split ``sd`` into plain keys and weight-norm pairs ``prefix -> ((gk, g), (vk, v))``.

    Each layer's weight must be given exactly once: a ``(g, v)`` pair in one key style,
    or a plain ``.weight``. A layer given twice (both key styles, or a pair and a plain
    weight) is ambiguous — which one RVC would load depends on its code path — so it is
    refused naming both keys, never collapsed to one silently. Only shapes are read."""
    plain: dict[str, Any] = {}
    pending: dict[str, dict[str, tuple[str, Any]]] = {}
    for k, v in sd.items():
        for gname, vname in ((LEGACY_G, LEGACY_V), (NEW_G, NEW_V)):
            if k.endswith("." + gname) or k.endswith("." + vname):
                prefix, leaf = (k[: -len(gname) - 1], "g") if k.endswith("." + gname) else (k[: -len(vname) - 1], "v")
                pair = pending.setdefault(prefix, {})
                if leaf in pair:
                    raise StateDictError(f"{source}: {pair[leaf][0]} and {k} both give the weight norm of "
                                         f"{prefix} (two key styles); keep one of them")
                pair[leaf] = (k, v)
                break
        else:
            plain[k] = v
    pairs = {}
    for prefix, gv in pending.items():
        if set(gv) != {"g", "v"}:
            have = next(iter(gv.values()))[0]
            raise StateDictError(f"{source}: weight-norm key {have} has no partner "
                                 f"({'weight_v' if 'g' in gv else 'weight_g'} missing)")
        (gk, g), (vk, v) = gv["g"], gv["v"]
        if gk.endswith("." + LEGACY_G) != vk.endswith("." + LEGACY_V):
            raise StateDictError(f"{source}: {gk} and {vk} mix the two weight-norm key styles for {prefix}")
        if np.ndim(v) < 2 or np.size(g) != np.shape(v)[0]:
            raise StateDictError(f"{source}: {gk} has shape {tuple(np.shape(g))} and {vk} {tuple(np.shape(v))}; "
                                 f"expected v of at least 2 dimensions and one g per row of v")
        if prefix + ".weight" in plain:
            raise StateDictError(f"{source}: {prefix}.weight and {gk}/{vk} both give the weight of {prefix}; "
                                 f"keep one of them")
        pairs[prefix] = ((gk, g), (vk, v))
    return plain, pairs


def fold_state_dict(sd: Mapping[str, Any], *, source: str = "state dict") -> dict[str, np.ndarray]:
    """Upcast to fp32 and fold both weight-norm key styles into plain ``.weight`` keys
    (each layer given once: see :func:`weight_norm_groups`)."""
    def f32(a):
        a = np.asarray(a)
        return a.astype(np.float32) if a.dtype.kind == "f" else a

    plain, pairs = weight_norm_groups(sd, source=source)
    out = {k: f32(v) for k, v in plain.items()}
    for prefix, ((_, g), (_, v)) in pairs.items():
        out[prefix + ".weight"] = fold_weight_norm(f32(g), f32(v))
    return out


def _torch_prefix(path: str) -> str:
    return path.replace("/", ".")


def _identity(w):
    return w


def _layer_hooks(model: nnx.Module):
    """Yield (flax_param_path, torch_key, to_flax, to_torch, layer) for every hooked param:
    the hook comes from the layer itself (flax's own ``nnx.Embed`` is a plain rename)."""
    for path, mod in nnx.iter_modules(model):
        p = path_str(path)
        t = _torch_prefix(p)
        if isinstance(mod, (Adaptable, Embed)):
            yield f"{p}/{mod.torch_param}", t + ".weight", mod.from_torch, mod.to_torch, mod
        elif isinstance(mod, nnx.Embed):
            yield p + "/embedding", t + ".weight", _identity, _identity, mod


def _base_params(model: nnx.Module) -> dict[str, Any]:
    flat = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {p: v for p, v in flat.items() if leaf_name(p) not in ADAPTER_LEAVES}


def torch_to_flax(model: nnx.Module, sd: Mapping[str, Any], *, source: str = "state dict",
                  allow_missing: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> dict:
    """Map an RVC state dict onto ``model``'s parameter tree (nested dict, fp32 numpy).

    ``allow_missing``/``ignore`` are torch-key prefixes that may be absent from /
    extra in ``sd`` (e.g. ``enc_q.`` for inference models). Anything else that does
    not fit raises :class:`StateDictError` naming the key(s)."""
    folded = fold_state_dict(sd, source=source)
    expected = _base_params(model)
    # flax path -> (torch key, torch -> flax hook); params without a hook keep their name.
    hooks = {fp: (tk, to_flax, to_torch) for fp, tk, to_flax, to_torch, _ in _layer_hooks(model) if fp in expected}
    plan = {fp: hooks.get(fp, (_torch_prefix(fp), _identity, _identity)) for fp in expected}
    # The model's parameters in torch layouts (zero-stride views: only the shapes matter).
    target = {tk: to_torch(np.broadcast_to(np.float32(0), np.shape(expected[fp])))
              for fp, (tk, _, to_torch) in plan.items()}
    target = {tk: v for tk, v in target.items() if tk in folded or not tk.startswith(allow_missing)}
    given = {k: v for k, v in folded.items() if k in target or not k.startswith(ignore)}
    check_fits(target, given, source=source, allow_missing=False, what="state dict does not match the model",
               noun="keys", error=StateDictError)
    out: dict[str, np.ndarray] = {}
    for fp, (tk, to_flax, _) in plan.items():
        if tk not in folded:
            continue  # allowed to be missing: keeps the model's own value below
        val = np.ascontiguousarray(to_flax(folded[tk]))
        if not np.all(np.isfinite(val)):
            raise StateDictError(f"{source}: {tk} contains NaN or inf")
        out[fp] = val
    for fp, v in expected.items():
        out.setdefault(fp, np.asarray(v))
    return unflatten(out)


def flax_to_torch(model: nnx.Module, params: Mapping | None = None, *,
                  style: str = "legacy") -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: torch layouts, weight norm re-factored.

    ``params`` defaults to the model's own (base) parameters; adapter leaves must have
    been merged away first. ``style`` picks ``weight_g/weight_v`` ("legacy", what RVC
    writes) or ``parametrizations.weight.original0/1``."""
    flat = flatten(params) if params is not None else _base_params(model)
    if any(leaf_name(p) in ADAPTER_LEAVES for p in flat):
        raise ValueError("params contain adapter leaves; merge them first (rvclora_jax.lora.merge)")
    gname, vname = {"legacy": (LEGACY_G, LEGACY_V), "parametrizations": (NEW_G, NEW_V)}[style]
    out: dict[str, np.ndarray] = {}
    done: set[str] = set()
    for fp, tk, _, to_torch, mod in _layer_hooks(model):
        if fp not in flat:
            continue
        w = np.asarray(to_torch(np.asarray(flat[fp], np.float32)))
        prefix = tk[: -len(".weight")]
        bias_fp = parent(fp) + "/bias"
        if bias_fp in flat:
            out[prefix + ".bias"] = np.asarray(flat[bias_fp], np.float32)
            done.add(bias_fp)
        if getattr(mod, "weight_norm", False):
            g, v = split_weight_norm(w)
            out[f"{prefix}.{gname}"], out[f"{prefix}.{vname}"] = g, v
        else:
            out[tk] = w
        done.add(fp)
    for fp, v in flat.items():
        if fp not in done:
            out[_torch_prefix(fp)] = np.asarray(v, np.float32)
    return out
