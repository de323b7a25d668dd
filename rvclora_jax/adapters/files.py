"""Adapter files: ``adapter.safetensors`` + ``adapter_config.json`` (PEFT's convention),
base-model fingerprints, and applying a saved adapter to a model.

``adapter_config.json`` (format ``rvclora-adapter``, version 2)::

    {"format": "rvclora-adapter", "format_version": 2,
     "lora": {...LoRAConfig.to_dict()...},
     "layer_kinds": {"dec/ups/0": "ConvTranspose1d", "dec/conv_pre": "Conv1d", ...},
     "base_fingerprint": {"structure": "...", "weights": "..."},
     "metadata": {...}, "rvclora_version": "..."}

``layer_kinds`` records the registered kind (:func:`rvclora_jax.layers.layer_kind`) of
every low-rank layer, so reading a file never guesses a layer's factor layout.
Version-1 files have no ``layer_kinds``: :func:`load_adapter` takes them from the
model when one is given, else from the factor ndims (:func:`rvclora_jax.lora.legacy_kinds`).
Tensor names are RVC-style dotted paths (``dec.ups.0.lora_a``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import lora
from ..families.rvc import RVC
from ..fileio import atomic_write
from ..layers import layer_kind
from ..lora import DELTA_KEY, LORA_KEYS, LoRAConfig
from ..tree import flatten, leaf_name, mismatches, parent, unflatten

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "rvclora-adapter"
ADAPTER_FORMAT_VERSION = 2  # 2: layer_kinds recorded; 1: kinds implied by the factor ndims


def _dotted(path: str) -> str:
    return path.replace("/", ".")


@dataclasses.dataclass
class Adapter:
    """An adapter in memory: factor (and embedding-delta) tree, its config, the kind of
    every low-rank layer, and where it came from. ``kinds`` defaults to the built-in
    kinds implied by the factor ndims (:func:`rvclora_jax.lora.legacy_kinds`)."""

    params: dict  # nested {layer path...: {"lora_a", "lora_b"} | {"lora_delta"}}
    config: LoRAConfig
    base_fingerprint: dict = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)
    directory: str = ""  # "" for an adapter that was never saved
    kinds: dict | None = None  # {layer path: kind}

    def __post_init__(self):
        self.kinds = lora.resolve_kinds(self.params, self.kinds or None)


# ---------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------
def fingerprint(base: Mapping, *, with_weights: bool = True, family=RVC) -> dict[str, str]:
    """Identify a base model: ``structure`` hashes every base path, shape and dtype;
    ``weights`` (optional) hashes the values. An adapter may only be applied to a model
    with the same structure; a different ``weights`` hash means another base with the
    same architecture (allowed, with a warning)."""
    # The family's training-only subtree (RVC: enc_q) is stripped from inference models,
    # so it is left out: an adapter trained on a full G applies to the small model of the same base.
    flat = {p: v for p, v in flatten(base).items()
            if leaf_name(p) not in lora.ADAPTER_LEAVES and not family.is_training_only(p)}
    hs = hashlib.sha256()
    hw = hashlib.sha256()
    for p in sorted(flat):
        v = np.asarray(flat[p])
        hs.update(f"{p}:{v.shape}:{v.dtype};".encode())
        if with_weights:
            hw.update(p.encode())
            hw.update(np.ascontiguousarray(v.astype(np.float32)).tobytes())
    out = {"structure": hs.hexdigest()[:16]}
    if with_weights:
        out["weights"] = hw.hexdigest()[:16]
    return out


def check_fingerprint(adapter: Adapter, base: Mapping, *, source: str = "model", family=RVC) -> None:
    want = adapter.base_fingerprint
    if not want:
        return
    have = fingerprint(base, with_weights="weights" in want, family=family)
    if want.get("structure") != have["structure"]:
        raise ValueError(f"{adapter.directory}: adapter was made for a different model architecture "
                         f"(structure {want.get('structure')} != {have['structure']} of {source})")
    if "weights" in want and want["weights"] != have["weights"]:
        warnings.warn(f"{adapter.directory}: adapter was trained on a different base "
                      f"(weights {want['weights']} != {have['weights']} of {source}); applying anyway",
                      stacklevel=2)


# ---------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------
def save_adapter(directory: str, adapter: Mapping, config: LoRAConfig, *,
                 kinds: Mapping[str, str] | None = None,
                 base_fingerprint: Mapping[str, str] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` into ``directory``.

    ``kinds`` (``{layer path: kind}``: ``Adapter.kinds`` or
    :func:`rvclora_jax.lora.layer_kinds` of the model) is recorded in the config; without
    it the built-in kinds are read off the factor ndims. Both files are written to
    temporary names and renamed into place."""
    from safetensors.numpy import save_file

    kinds = lora.resolve_kinds(adapter, kinds)  # also validates the factor pairs
    os.makedirs(directory, exist_ok=True)
    tensors = {_dotted(p): np.ascontiguousarray(np.asarray(v)) for p, v in flatten(adapter).items()}
    from .. import __version__

    cfg = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "lora": config.to_dict(),
        "layer_kinds": {p: kinds[p] for p in sorted(kinds)},
        "base_fingerprint": dict(base_fingerprint or {}),
        "metadata": dict(metadata or {}),
        "rvclora_version": __version__,
    }
    wpath = os.path.join(directory, ADAPTER_WEIGHTS)
    cpath = os.path.join(directory, ADAPTER_CONFIG)
    atomic_write(wpath, lambda t: save_file(tensors, t, metadata={"format": ADAPTER_FORMAT}))
    # No sort_keys: rank_pattern / alpha_pattern are first-match-wins, so key order matters.
    atomic_write(cpath, lambda t: open(t, "w").write(json.dumps(cfg, indent=2) + "\n"))
    return directory


def resolve_adapter_path(path: str) -> str:
    """Accept an adapter directory or the ``adapter.safetensors`` inside it."""
    if os.path.isdir(path):
        return path
    if os.path.basename(path) == ADAPTER_WEIGHTS:
        return os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such adapter directory or file")
    raise ValueError(f"{path}: expected an adapter directory or its {ADAPTER_WEIGHTS}")


def _file_kinds(cfg: Mapping, params: Mapping, model, cpath: str) -> dict[str, str] | None:
    """The layer kinds of a file: recorded (version 2), else the model's, else None (ndims)."""
    layers = lora.adapter_layers(params)
    if int(cfg.get("format_version", 1)) >= 2:
        kinds = cfg.get("layer_kinds")
        if not isinstance(kinds, Mapping):
            raise ValueError(f"{cpath}: format_version {cfg['format_version']} needs a 'layer_kinds' table")
        if set(kinds) != set(layers):
            odd = sorted(set(kinds) ^ set(layers))
            raise ValueError(f"{cpath}: layer_kinds and the weights disagree on {_dotted(odd[0])} "
                             f"({len(odd)} layers)")
        for p, k in kinds.items():
            try:
                layer_kind(k)
            except ValueError as e:
                raise ValueError(f"{cpath}: {_dotted(p)}: {e}") from None
        return dict(kinds)
    if model is None:
        return None
    # Version 1 with a model: the model's kinds where it has the layer; a layer the model
    # lacks keeps its ndim kind, so check_adapter_fits can name it.
    have = lora.layer_kinds(model)
    legacy = lora.legacy_kinds(params)
    return {p: have.get(p, legacy[p]) for p in layers}


def load_adapter(path: str, *, model: nnx.Module | None = None) -> Adapter:
    """Read an adapter directory (or its ``adapter.safetensors``). ``model`` is consulted
    only for version-1 files, which did not record the layer kinds."""
    from safetensors.numpy import load_file

    d = resolve_adapter_path(path)
    cpath, wpath = os.path.join(d, ADAPTER_CONFIG), os.path.join(d, ADAPTER_WEIGHTS)
    for p in (cpath, wpath):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: missing (an adapter directory holds {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cpath}: not valid JSON ({e})") from None
    if cfg.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{cpath}: not an rvclora adapter config (format={cfg.get('format')!r})")
    if int(cfg.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{cpath}: format_version {cfg['format_version']} is newer than this rvclora "
                         f"supports ({ADAPTER_FORMAT_VERSION}); upgrade rvclora-jax")
    config = LoRAConfig.from_dict(cfg["lora"])
    try:
        tensors = load_file(wpath)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{wpath}: cannot read safetensors file ({e})") from None
    flat = {k.replace(".", "/"): v for k, v in tensors.items()}
    for k, v in flat.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{wpath}: tensor {_dotted(k)} contains NaN or inf")
    params = unflatten(flat)
    kinds = _file_kinds(cfg, params, model, cpath)
    return Adapter(params, config, dict(cfg.get("base_fingerprint", {})), dict(cfg.get("metadata", {})), d,
                   kinds)


# ---------------------------------------------------------------------------------
# Applying an adapter to a model
# ---------------------------------------------------------------------------------
def check_adapter_fits(model: nnx.Module, adapter: Adapter, *, source: str = "the model") -> None:
    """Every adapter layer must exist in ``model`` as a layer of the recorded kind with the
    kernel its factors imply, and every embedding delta must match its table; errors name
    the key (``source`` names the model)."""
    layers = dict(lora.iter_lora_layers(model))
    implied = {}
    for path, (a, b) in lora.adapter_layers(adapter.params).items():
        kind = adapter.kinds[path]
        if path in layers and layers[path].kind != kind:
            raise ValueError(f"{adapter.directory}: {_dotted(path)} is a {kind} in the adapter but a "
                             f"{layers[path].kind} in {source} (adapter made for another model?)")
        try:
            implied[path] = layer_kind(kind).kernel_shape_of(np.shape(a), np.shape(b))
        except ValueError as e:
            raise ValueError(f"{adapter.directory}: {_dotted(path)}: {e}") from None
    # one strict comparison: kernels the factors imply, and embedding deltas, against the model
    target = {f"{p}/kernel": tuple(layer.kernel.shape) for p, layer in layers.items()}
    target.update({f"{p}/embedding": tuple(m.embedding.shape) for p, m in lora.iter_embeddings(model)})
    given = {f"{p}/kernel": shape for p, shape in implied.items()}
    given.update({f"{p}/embedding": dv for p, dv in lora.adapter_deltas(adapter.params).items()})
    bad, where = mismatches(target, given), adapter.directory
    for key in bad.unexpected:
        if leaf_name(key) == "kernel":
            raise ValueError(f"{where}: adapter has weights for {_dotted(parent(key))}, which is not an "
                             f"adaptable layer of {source} (adapter made for another model?)")
        raise ValueError(f"{where}: adapter has a delta for {_dotted(parent(key))}, which is not an "
                         f"embedding table of {source}")
    for key, got, want in bad.misshapen:
        if leaf_name(key) == "kernel":
            raise ValueError(f"{where}: {_dotted(parent(key))} was made for a kernel of shape {got}, "
                             f"{source} has {want} (adapter made for another model?)")
        raise ValueError(f"{where}: {_dotted(parent(key))}.{DELTA_KEY} has shape {got}, "
                         f"the table of {source} is {want}")


def apply_adapter(model: nnx.Module, adapter: Adapter, *, rngs: nnx.Rngs | None = None,
                  check_base: bool = True) -> list[str]:
    """Inject ``adapter.config`` into ``model`` and fill in the saved weights.

    Every adapter tensor must land on a layer the config adapts, with the shape that
    layer expects; anything else is an error naming the key, and the model is left as
    it was."""
    check_adapter_fits(model, adapter)  # precise, per-key errors before the coarse fingerprint
    if check_base:
        check_fingerprint(adapter, lora.partition(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[1])
    paths = lora.inject(model, adapter.config, rngs=rngs or nnx.Rngs(0))
    try:
        _fill_adapter(model, adapter, paths)
    except BaseException:
        lora.remove_adapters(model, paths)  # leave the model as it was, not half-filled
        raise
    return paths


def _fill_adapter(model: nnx.Module, adapter: Adapter, paths: list[str]) -> None:
    embeds = dict(lora.iter_embeddings(model))
    deltas = lora.adapter_deltas(adapter.params)
    if set(deltas) != set(adapter.config.train_embeddings):
        raise ValueError(f"{adapter.directory}: embedding deltas {sorted(deltas)} do not match the config's "
                         f"train_embeddings {list(adapter.config.train_embeddings)}")
    for path, dv in deltas.items():
        embeds[path].lora_delta[...] = jnp.asarray(dv, embeds[path].lora_delta.dtype)
    layers = dict(lora.iter_lora_layers(model))
    slots = {f"{p}/{k}": getattr(layers[p], k) for p in paths if p not in deltas for k in LORA_KEYS}
    saved = {f"{p}/{k}": v for p, ab in lora.adapter_layers(adapter.params).items() for k, v in zip(LORA_KEYS, ab)}
    bad = mismatches(slots, saved, allow_missing=False)
    unexpected = sorted({parent(k) for k in bad.unexpected})
    missing = sorted({parent(k) for k in bad.missing})
    if unexpected:
        raise ValueError(f"{adapter.directory}: adapter has weights for {_dotted(unexpected[0])} "
                         f"which the model has no adapted layer for ({len(unexpected)} such keys)")
    if missing:
        raise ValueError(f"{adapter.directory}: adapter lacks weights for {_dotted(missing[0])} "
                         f"({len(missing)} adapted layers missing)")
    for key, got, want in bad.misshapen:
        raise ValueError(f"{adapter.directory}: {_dotted(key)} has shape {got}, the model expects {want}")
    for key, var in slots.items():
        var[...] = jnp.asarray(saved[key], var.dtype)


__all__ = ["Adapter", "save_adapter", "load_adapter", "resolve_adapter_path", "apply_adapter", "check_adapter_fits",
           "check_fingerprint", "fingerprint", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "ADAPTER_FORMAT",
           "ADAPTER_FORMAT_VERSION"]
