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
    if cfg.get("format_version", 1) >= 2:
        kinds = cfg.get("layer_kinds")
        if not isinstance(kinds, Mapping):
            raise ValueError(f"{cpath}: layer_kinds: format_version {cfg['format_version']} needs a table")
        if set(kinds) != set(layers):
            odd = sorted(set(kinds) ^ set(layers))
            raise ValueError(f"{cpath}: layer_kinds and the weights disagree on {_dotted(odd[0])} "
                             f"({len(odd)} layers)")
        for p, k in kinds.items():
            try:
                layer_kind(k)
            except ValueError as e:
                raise ValueError(f"{cpath}: layer_kinds: {_dotted(p)}: {e}") from None
        return dict(kinds)
    if model is None:
        return None
    # Version 1 with a model: the model's kinds where it has the layer; a layer the model
    # lacks keeps its ndim kind, so check_adapter_fits can name it.
    have = lora.layer_kinds(model)
    try:
        legacy = lora.legacy_kinds({p: {"lora_a": a, "lora_b": b} for p, (a, b) in layers.items() if p not in have})
    except ValueError as e:
        raise ValueError(f"{cpath}: {e}") from None
    return {p: have[p] if p in have else legacy[p] for p in layers}


# adapter_config.json is small; anything bigger is not one (and a FIFO is refused).
MAX_CONFIG_BYTES = 16 << 20
_TOP_KEYS = {"format", "format_version", "lora", "layer_kinds", "base_fingerprint", "metadata",
             "rvclora_version"}


def _read_config(cpath: str) -> dict:
    """``adapter_config.json``, its top-level schema checked; errors ``<file>: <key>: ...``."""
    from ..fileio import require_regular_file

    require_regular_file(cpath, "adapter config", max_bytes=MAX_CONFIG_BYTES)
    try:
        with open(cpath, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{cpath}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cpath}: must be a JSON object, got {type(cfg).__name__}")
    if cfg.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{cpath}: format: not an rvclora adapter config (format={cfg.get('format')!r})")
    version = cfg.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{cpath}: format_version: must be a positive integer, got {version!r}")
    if version > ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{cpath}: format_version {version} is newer than this rvclora "
                         f"supports ({ADAPTER_FORMAT_VERSION}); upgrade rvclora-jax")
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{cpath}: {unknown[0]}: unknown key ({len(unknown)} unknown keys)")
    if "lora" not in cfg:
        raise ValueError(f"{cpath}: lora: missing (the LoRA settings)")
    if version >= 2 and "layer_kinds" not in cfg:
        raise ValueError(f"{cpath}: layer_kinds: format_version {version} needs a 'layer_kinds' table")
    if "layer_kinds" in cfg:
        kinds = cfg["layer_kinds"]
        if not isinstance(kinds, dict) or not all(isinstance(v, str) for v in kinds.values()):
            raise ValueError(f"{cpath}: layer_kinds: must be an object of layer path -> kind name")
    for key in ("base_fingerprint", "metadata"):
        if not isinstance(cfg.get(key, {}), dict):
            raise ValueError(f"{cpath}: {key}: must be an object, got {type(cfg[key]).__name__}")
    if not all(isinstance(v, str) for v in cfg.get("base_fingerprint", {}).values()):
        raise ValueError(f"{cpath}: base_fingerprint: values must be strings")
    if not isinstance(cfg.get("rvclora_version", ""), str):
        raise ValueError(f"{cpath}: rvclora_version: must be a string")
    try:
        cfg["lora"] = LoRAConfig.from_dict(cfg["lora"])
    except ValueError as e:
        raise ValueError(f"{cpath}: lora: {e}") from None
    return cfg


def _read_tensors(wpath: str) -> dict[str, np.ndarray]:
    """The tensors of ``adapter.safetensors`` by layer path: real floating point, at
    least 1-d, finite, and no two names for one layer; errors name the tensor."""
    from safetensors import safe_open

    from ..fileio import require_regular_file

    require_regular_file(wpath, "adapter weights")
    # safetensors checks the header's offsets against the file size before reading;
    # the dtype is checked on the header, before a value is converted.
    try:
        with safe_open(wpath, framework="numpy") as f:
            names = list(f.keys())
            for k in names:
                dt = f.get_slice(k).get_dtype()
                if dt not in ("F16", "BF16", "F32", "F64"):
                    raise ValueError(f"{wpath}: tensor {k}: dtype {dt} is not floating point "
                                     f"(adapter factors are float; refusing to cast)")
            tensors = {k: f.get_tensor(k) for k in names}
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{wpath}: cannot read safetensors file ({e})") from None
    if not tensors:
        raise ValueError(f"{wpath}: the adapter holds no tensors")
    flat, spelled = {}, {}
    for k, v in tensors.items():
        parts = k.split(".")
        if len(k) > lora.MAX_PATH_CHARS or not all(parts) or len(parts) < 2:
            raise ValueError(f"{wpath}: tensor name {k[:60]!r} is not a dotted layer path")
        # a layer path has one spelling: dec.ups.00 and dec.ups.0 would land on one layer
        canon = "/".join(str(int(x)) if x.isdigit() else x for x in parts)
        if canon in spelled:
            raise ValueError(f"{wpath}: tensors {spelled[canon]} and {k} name the same layer "
                             f"(index spelled two ways)")
        if canon != "/".join(parts):
            raise ValueError(f"{wpath}: tensor {k}: layer index with leading zeros (write "
                             f"{canon.replace('/', '.')})")
        spelled[canon] = k
        v = np.asarray(v)
        if v.ndim < 1 or v.size == 0:
            raise ValueError(f"{wpath}: tensor {k}: shape {tuple(v.shape)} is not a factor or delta")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{wpath}: tensor {k} contains NaN or inf")
        flat[canon] = v
    for canon, k in spelled.items():  # a tensor cannot also be a layer holding tensors
        parts = canon.split("/")
        for j in range(1, len(parts)):
            if "/".join(parts[:j]) in spelled:
                raise ValueError(f"{wpath}: tensor {k} is nested inside tensor {spelled['/'.join(parts[:j])]}")
    return flat


def load_adapter(path: str, *, model: nnx.Module | None = None) -> Adapter:
    """Read an adapter directory (or its ``adapter.safetensors``). ``model`` is consulted
    only for version-1 files, which did not record the layer kinds.

    Both files are untrusted input and are checked in full here (the one strict reader):
    the config's schema (:meth:`LoRAConfig.from_dict` for ``lora``), and every tensor
    (floating point, finite, at least 1-d, one spelling per layer, factor pairs whose
    scalings); every error names the file and key. Whether the factor shapes fit a
    layer is checked against the model it is applied to (:func:`check_adapter_fits`)."""
    d = resolve_adapter_path(path)
    cpath, wpath = os.path.join(d, ADAPTER_CONFIG), os.path.join(d, ADAPTER_WEIGHTS)
    for p in (cpath, wpath):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: missing (an adapter directory holds {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    cfg = _read_config(cpath)
    config = cfg["lora"]
    flat = _read_tensors(wpath)
    try:
        params = unflatten(flat)
        layers = lora.adapter_layers(params)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # names that do not form a tree
        raise ValueError(f"{wpath}: tensor names do not form layer paths ({e})") from None
    kinds = _file_kinds(cfg, params, model, cpath)
    if kinds is None:
        try:
            kinds = lora.legacy_kinds(params)
        except ValueError as e:
            raise ValueError(f"{wpath}: {e}") from None
    for p, (a, b) in layers.items():
        # The kernel shape the pair implies is checked against a model when the adapter is
        # applied (check_adapter_fits, with the better message); here the rank it needs.
        cls = layer_kind(kinds[p])
        try:
            r = cls.rank_of(np.shape(a))
        except (ValueError, IndexError) as e:
            raise ValueError(f"{wpath}: {_dotted(p)}: {e}") from None
        try:
            s = config.scaling_for(p, r)
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(f"{cpath}: lora: {_dotted(p)}: {e}") from None
        if not np.isfinite(s):
            raise ValueError(f"{cpath}: lora: {_dotted(p)}: scaling {s} is not finite")
    for p, dv in lora.adapter_deltas(params).items():
        if np.ndim(dv) != 2:
            raise ValueError(f"{wpath}: {_dotted(p)}.{DELTA_KEY}: shape {tuple(np.shape(dv))} is not a table delta")
    if set(lora.adapter_deltas(params)) != set(config.train_embeddings):
        raise ValueError(f"{cpath}: lora.train_embeddings {list(config.train_embeddings)} do not match the "
                         f"embedding deltas of {wpath} {sorted(_dotted(p) for p in lora.adapter_deltas(params))}")
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
    # a duck-typed adapter (any object with .params/.config/...) may carry no kinds
    kinds = lora.resolve_kinds(adapter.params, getattr(adapter, "kinds", None))
    for path, (a, b) in lora.adapter_layers(adapter.params).items():
        kind = kinds[path]
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
    # The other direction: the config is what apply_adapter injects, so every layer of
    # the model it targets must have weights (a merge would silently leave it unchanged),
    # and every stored layer must be one it targets.
    config, have = adapter.config, lora.adapter_layers(adapter.params)
    lacking = [p for p in layers if config.matches(p) and p not in have]
    if lacking:
        raise ValueError(f"{where}: adapter lacks weights for {_dotted(lacking[0])}, which its config targets "
                         f"in {source} ({len(lacking)} such layers)")
    untargeted = sorted(p for p in have if not config.matches(p))
    if untargeted:
        raise ValueError(f"{where}: adapter has weights for {_dotted(untargeted[0])}, which its config does "
                         f"not target ({len(untargeted)} such layers)")
    deltas = lora.adapter_deltas(adapter.params)
    if set(deltas) != set(config.train_embeddings):
        raise ValueError(f"{where}: embedding deltas {sorted(map(_dotted, deltas))} do not match the config's "
                         f"train_embeddings {list(config.train_embeddings)}")


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
