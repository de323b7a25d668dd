"""LoRA for RVC models: configuration, injection, pure merge, adapter files.

Life cycle
----------
1. **Configure.** A :class:`LoRAConfig` names the layers to adapt by regular
   expressions over module paths (``"dec/ups/\\d+"``), or by a preset
   (:data:`PRESETS`), plus rank, alpha, dropout, rsLoRA and per-path
   ``rank_pattern`` / ``alpha_pattern`` overrides.
2. **Inject.** :func:`inject` walks an NNX model and calls ``add_lora`` on every
   matching :class:`~rvclora_jax.layers.Dense`, ``Conv1d`` or ``ConvTranspose1d``.
   Adapter weights are :class:`LoRAParam` variables living *inside* the adapted
   layer, so base paths (``dec/ups/0/kernel``) are unchanged and converters never
   need to know about LoRA. ``b`` starts at zero: a fresh adapter changes nothing.
3. **Train.** ``nnx.split(model, LoRAParam, nnx.Param, ...)`` (LoRAParam first: it
   subclasses ``nnx.Param``) gives the trainable subtree; everything else is frozen.
4. **Merge.** :func:`merge` is a pure function on parameter trees: base params +
   adapter + config → new plain params whose kernels include the exact delta
   ``ΔW = s·B·A`` in the kernel's own layout (see ``layers.py``); :func:`unmerge` is
   its inverse for the same adapter.
5. **Save / load.** :func:`save_adapter` writes ``adapter.safetensors`` +
   ``adapter_config.json`` (PEFT's file convention) with a fingerprint of the base
   model; :func:`load_adapter` reads them back, and :func:`apply_adapter` injects
   and fills an adapter into a model, checking every key and shape.

Parameter trees here are nested dicts as produced by ``nnx.to_pure_dict(state)``
(list indices are ints). Paths are the keys joined with ``/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .families.rvc import RVC
from .fileio import atomic_write
from .layers import ADAPTABLE_LAYERS, Embed, LoRAParam, delta_kernel, lora_scaling
from .tree import flatten, path_str, unflatten

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "rvclora-adapter"
ADAPTER_FORMAT_VERSION = 1
LORA_KEYS = ("lora_a", "lora_b")
DELTA_KEY = "lora_delta"  # full-size additive delta of an embedding table (modules_to_save)
ADAPTER_LEAVES = LORA_KEYS + (DELTA_KEY,)

# LoRA target presets belong to the model family (RVC's, by default).
PRESETS = RVC.lora_presets
DEFAULT_PRESET = RVC.default_lora_preset


def _freeze_pattern(p: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    if p is None:
        return ()
    items = p.items() if isinstance(p, Mapping) else p
    return tuple((str(k), v) for k, v in items)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    ``targets`` / ``exclude`` and the keys of ``rank_pattern`` / ``alpha_pattern`` are
    regular expressions that must match a whole module path (``re.fullmatch``), e.g.
    ``"dec/ups/\\d+"`` or ``"dec/resblocks/.*"``. For the two patterns the first
    matching key wins. ``alpha`` defaults to ``rank`` (scaling 1), PEFT's habit.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    targets: tuple[str, ...] = PRESETS[DEFAULT_PRESET][0]
    exclude: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    preset: str | None = DEFAULT_PRESET
    # Embedding tables (paths, e.g. ("emb_g",)) that get a trainable full-size delta:
    # PEFT's modules_to_save for RVC's speaker embedding, merged by exact addition.
    train_embeddings: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "train_embeddings", tuple(self.train_embeddings))
        object.__setattr__(self, "rank_pattern", _freeze_pattern(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", _freeze_pattern(self.alpha_pattern))
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        for k, r in self.rank_pattern:
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"rank_pattern[{k!r}] must be a positive integer, got {r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        for pat in (*self.targets, *self.exclude, *(k for k, _ in self.rank_pattern),
                    *(k for k, _ in self.alpha_pattern)):
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"invalid path pattern {pat!r}: {e}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LoRAConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(targets=PRESETS[name][0], preset=name, **overrides)

    def matches(self, path: str) -> bool:
        """Whether the module at ``path`` (``"dec/ups/0"``) should get an adapter."""
        return (any(re.fullmatch(p, path) for p in self.targets)
                and not any(re.fullmatch(p, path) for p in self.exclude))

    def rank_for(self, path: str) -> int:
        for pat, r in self.rank_pattern:
            if re.fullmatch(pat, path):
                return int(r)
        return self.rank

    def alpha_for(self, path: str) -> float:
        for pat, a in self.alpha_pattern:
            if re.fullmatch(pat, path):
                return float(a)
        return float(self.alpha)

    def scaling_for(self, path: str, rank: int | None = None) -> float:
        return lora_scaling(rank or self.rank_for(path), self.alpha_for(path), self.use_rslora)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"], d["exclude"] = list(self.targets), list(self.exclude)
        d["train_embeddings"] = list(self.train_embeddings)
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = dict(self.alpha_pattern)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRA config keys: {', '.join(unknown)}")
        return cls(**dict(d))


# ---------------------------------------------------------------------------------
# Adaptable layers of a model
# ---------------------------------------------------------------------------------
def iter_lora_layers(model: nnx.Module) -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` for every adaptable layer in the model (adapted or not)."""
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, ADAPTABLE_LAYERS):
            yield path_str(path), mod


# ---------------------------------------------------------------------------------
# Injection and model-level helpers
# ---------------------------------------------------------------------------------
def inject(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Attach adapters to every layer ``config`` matches. Returns the adapted paths.

    Mutates ``model`` in place (NNX modules are mutable objects); base parameters are
    untouched. Raises if the config matches no adaptable layer; on any error the
    adapters added by this call are removed again (no half-injected model)."""
    done = []
    layers = list(iter_lora_layers(model))
    try:
        for path, layer in layers:
            if not config.matches(path):
                continue
            if layer.has_lora:
                raise ValueError(f"{path} already has an adapter")
            layer.add_lora(config.rank_for(path), config.alpha_for(path), rngs=rngs,
                           dropout=config.dropout, use_rslora=config.use_rslora, init=config.init)
            done.append(path)
        embeds = {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Embed)}
        for path in config.train_embeddings:
            if path not in embeds:
                raise ValueError(f"train_embeddings: the model has no embedding table at {path!r} "
                                 f"(have {sorted(embeds)})")
            embeds[path].add_delta()
            done.append(path)
    except BaseException:
        _remove_adapters(model, done)
        raise
    if not done:
        avail = [p for p, _ in iter_lora_layers(model)]
        raise ValueError(f"LoRA targets {list(config.targets)} match none of the model's "
                         f"{len(avail)} adaptable layers (e.g. {avail[:3]})")
    return done


def _remove_adapters(model: nnx.Module, paths: Iterable[str]) -> None:
    mods = {path_str(p): m for p, m in nnx.iter_modules(model)}
    for p in paths:
        if isinstance(mods[p], Embed):
            mods[p].remove_delta()
        else:
            mods[p].remove_lora()


def adapter_state(model: nnx.Module) -> nnx.State:
    return nnx.state(model, LoRAParam)


def split(model: nnx.Module):
    """``graphdef, adapter, base, rest``: the trainable adapter, frozen base params,
    and everything else (RNG state, ...)."""
    return nnx.split(model, LoRAParam, nnx.Param, ...)


def merge_model(model: nnx.Module, scale: float = 1.0) -> dict:
    """Merged plain parameters of an adapted model (model is not changed)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    adapter, base = partition(params)
    scalings = {p: layer.lora_scaling for p, layer in iter_lora_layers(model) if layer.has_lora}
    return merge(base, adapter, scalings, scale=scale)


# ---------------------------------------------------------------------------------
# Pure functions on parameter trees
# ---------------------------------------------------------------------------------
def partition(params: Mapping) -> tuple[dict, dict]:
    """Split a tree into ``(adapter, base)``; adapter leaves are ``.../lora_a|lora_b``."""
    flat = flatten(params)
    adapter = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] in ADAPTER_LEAVES}
    base = {p: v for p, v in flat.items() if p not in adapter}
    return unflatten(adapter), unflatten(base)


def combine(base: Mapping, adapter: Mapping) -> dict:
    flat = flatten(base)
    for p, v in flatten(adapter).items():
        if p in flat:
            raise ValueError(f"adapter key {p} collides with a base parameter")
        flat[p] = v
    return unflatten(flat)


def adapter_layers(adapter: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{layer_path: (a, b)}`` for an adapter tree, with both factors checked present."""
    flat = flatten(adapter)
    layers: dict[str, dict] = {}
    for p, v in flat.items():
        layer, leaf = p.rsplit("/", 1)
        if leaf == DELTA_KEY:
            continue  # embedding deltas: see adapter_deltas()
        if leaf not in LORA_KEYS:
            raise ValueError(f"unexpected adapter key {p} (expected .../lora_a, .../lora_b or .../{DELTA_KEY})")
        layers.setdefault(layer, {})[leaf] = v
    for layer, ab in layers.items():
        missing = [k for k in LORA_KEYS if k not in ab]
        if missing:
            raise ValueError(f"adapter for {layer} lacks {missing[0]}")
    return {k: (v["lora_a"], v["lora_b"]) for k, v in layers.items()}


def adapter_deltas(adapter: Mapping) -> dict[str, Any]:
    """``{embedding_path: delta}`` for the full-size embedding deltas of an adapter tree."""
    return {p.rsplit("/", 1)[0]: v for p, v in flatten(adapter).items() if p.rsplit("/", 1)[-1] == DELTA_KEY}


def _scalings(adapter_ls: Mapping[str, tuple], config: LoRAConfig | Mapping[str, float]) -> dict[str, float]:
    if isinstance(config, LoRAConfig):
        out = {}
        for path, (a, b) in adapter_ls.items():
            r = int(a.shape[-1])
            if r != config.rank_for(path):
                raise ValueError(f"adapter {path} has rank {r} but the config says {config.rank_for(path)}")
            out[path] = config.scaling_for(path, r)
        return out
    missing = sorted(set(adapter_ls) - set(config))
    if missing:
        raise ValueError(f"no scaling given for adapter layers {missing}")
    return {p: float(config[p]) for p in adapter_ls}


def _apply_delta(params: Mapping, adapter: Mapping, config, scale: float, sign: float) -> dict:
    flat = dict(flatten(params))
    if any(p.rsplit("/", 1)[-1] in ADAPTER_LEAVES for p in flat):
        raise ValueError("params still contain adapter leaves; pass the base from partition()")
    for path, dv in adapter_deltas(adapter).items():
        ep = f"{path}/embedding"
        if ep not in flat:
            raise KeyError(f"adapter delta {path} has no base table {ep} in the params")
        w = flat[ep]
        if tuple(np.shape(dv)) != tuple(np.shape(w)):
            raise ValueError(f"adapter {path}: delta shape {tuple(np.shape(dv))} != table shape {tuple(np.shape(w))}")
        flat[ep] = (jnp.asarray(w, jnp.float32) + sign * scale * jnp.asarray(dv, jnp.float32)).astype(
            jnp.asarray(w).dtype)
    ls = adapter_layers(adapter)
    scal = _scalings(ls, config)
    for path, (a, b) in ls.items():
        kp = f"{path}/kernel"
        if kp not in flat:
            raise KeyError(f"adapter layer {path} has no base kernel {kp} in the params")
        w = flat[kp]
        d = delta_kernel(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), scal[path] * scale)
        if d.shape != w.shape:
            raise ValueError(f"adapter {path}: delta shape {tuple(d.shape)} != kernel shape {tuple(w.shape)}")
        # Merge in float32 whatever the storage dtype, then cast back.
        flat[kp] = (jnp.asarray(w, jnp.float32) + sign * d).astype(jnp.asarray(w).dtype)
    return unflatten(flat)


def merge(base: Mapping, adapter: Mapping, config: LoRAConfig | Mapping[str, float], *,
          scale: float = 1.0) -> dict:
    """Pure merge: returns new params with ``kernel + scale·ΔW`` for every adapted layer.

    ``config`` is the :class:`LoRAConfig` the adapter was built with (for alpha and
    rank patterns) or an explicit ``{layer_path: scaling}`` map. Inputs are not
    modified; the result contains no adapter leaves."""
    return _apply_delta(base, adapter, config, scale, +1.0)


def unmerge(merged: Mapping, adapter: Mapping, config: LoRAConfig | Mapping[str, float], *,
            scale: float = 1.0) -> dict:
    """Inverse of :func:`merge` for the same adapter (exact up to float rounding)."""
    return _apply_delta(merged, adapter, config, scale, -1.0)


# ---------------------------------------------------------------------------------
# Counting and summaries
# ---------------------------------------------------------------------------------
@dataclasses.dataclass
class LayerRow:
    path: str
    kind: str
    kernel_shape: tuple[int, ...]
    rank: int
    alpha: float
    scaling: float
    base_params: int
    adapter_params: int


@dataclasses.dataclass
class Summary:
    rows: list[LayerRow]
    total_params: int  # base + adapter
    trainable_params: int  # adapter only
    adapted_base_params: int  # params of the layers that carry an adapter

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def format(self, max_rows: int | None = None) -> str:
        head = f"{'module':<44} {'kind':<16} {'kernel':<16} {'r':>3} {'alpha':>6} {'adapter':>9}"
        lines = [head, "-" * len(head)]
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        for r in rows:
            lines.append(f"{r.path:<44} {r.kind:<16} {str(list(r.kernel_shape)):<16} {r.rank:>3} "
                         f"{r.alpha:>6g} {r.adapter_params:>9,}")
        if max_rows is not None and len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more adapted modules")
        lines.append("-" * len(head))
        lines.append(f"adapted modules: {len(self.rows)}   adapter params: {self.trainable_params:,} "
                     f"({self.trainable_params * 4 / 1e6:.2f} MB fp32)")
        lines.append(f"total params: {self.total_params:,}   trainable: {self.trainable_params:,} "
                     f"({self.trainable_percent:.3f}%)")
        return "\n".join(lines)


def _size(x) -> int:
    return int(np.prod(x.shape))


def summarize(model: nnx.Module) -> Summary:
    rows = []
    for path, layer in iter_lora_layers(model):
        if not layer.has_lora:
            continue
        base = _size(layer.kernel) + (_size(layer.bias) if layer.bias is not None else 0)
        rows.append(LayerRow(path, type(layer).__name__, tuple(layer.kernel.shape), layer.lora_rank,
                             layer.lora_alpha, layer.lora_scaling, base,
                             _size(layer.lora_a) + _size(layer.lora_b)))
    for p, m in nnx.iter_modules(model):
        if isinstance(m, Embed) and m.has_delta:
            n = _size(m.embedding)
            rows.append(LayerRow(path_str(p), "Embed (delta)", tuple(m.embedding.shape), 0, 0.0, 1.0, n, n))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    total = sum(_size(x) for x in leaves)
    trainable = sum(_size(x) for x in jax.tree.leaves(adapter_state(model)))
    return Summary(rows, total, trainable, sum(r.base_params for r in rows))


def count_params(tree: Mapping) -> int:
    return sum(_size(x) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------
# Fingerprints and adapter files
# ---------------------------------------------------------------------------------
def fingerprint(base: Mapping, *, with_weights: bool = True) -> dict[str, str]:
    """Identify a base model: ``structure`` hashes every base path, shape and dtype;
    ``weights`` (optional) hashes the values. An adapter may only be applied to a model
    with the same structure; a different ``weights`` hash means another base with the
    same architecture (allowed, with a warning)."""
    # enc_q only serves training and RVC strips it from inference models, so it is left
    # out: an adapter trained on a full G applies to the small model of the same base.
    flat = {p: v for p, v in flatten(base).items()
            if p.rsplit("/", 1)[-1] not in ADAPTER_LEAVES and not p.startswith("enc_q/")}
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


def _dotted(path: str) -> str:
    return path.replace("/", ".")


def save_adapter(directory: str, adapter: Mapping, config: LoRAConfig, *,
                 base_fingerprint: Mapping[str, str] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` into ``directory``.

    Tensor names are RVC-style dotted paths (``dec.ups.0.lora_a``). Both files are
    written to temporary names and renamed into place."""
    from safetensors.numpy import save_file

    adapter_layers(adapter)  # validate pairs
    os.makedirs(directory, exist_ok=True)
    tensors = {_dotted(p): np.ascontiguousarray(np.asarray(v)) for p, v in flatten(adapter).items()}
    cfg = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "lora": config.to_dict(),
        "base_fingerprint": dict(base_fingerprint or {}),
        "metadata": dict(metadata or {}),
    }
    from . import __version__
    cfg["rvclora_version"] = __version__
    wpath = os.path.join(directory, ADAPTER_WEIGHTS)
    cpath = os.path.join(directory, ADAPTER_CONFIG)
    atomic_write(wpath, lambda t: save_file(tensors, t, metadata={"format": ADAPTER_FORMAT}))
    # No sort_keys: rank_pattern / alpha_pattern are first-match-wins, so key order matters.
    atomic_write(cpath, lambda t: open(t, "w").write(json.dumps(cfg, indent=2) + "\n"))
    return directory


@dataclasses.dataclass
class Adapter:
    params: dict  # nested {layer path...: {"lora_a", "lora_b"}}
    config: LoRAConfig
    base_fingerprint: dict
    metadata: dict
    directory: str


def resolve_adapter_path(path: str) -> str:
    """Accept an adapter directory or the ``adapter.safetensors`` inside it."""
    if os.path.isdir(path):
        return path
    if os.path.basename(path) == ADAPTER_WEIGHTS:
        return os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such adapter directory or file")
    raise ValueError(f"{path}: expected an adapter directory or its {ADAPTER_WEIGHTS}")


def load_adapter(path: str) -> Adapter:
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
    adapter_layers(params)
    return Adapter(params, config, dict(cfg.get("base_fingerprint", {})), dict(cfg.get("metadata", {})), d)


def check_fingerprint(adapter: Adapter, base: Mapping, *, source: str = "model") -> None:
    want = adapter.base_fingerprint
    if not want:
        return
    have = fingerprint(base, with_weights="weights" in want)
    if want.get("structure") != have["structure"]:
        raise ValueError(f"{adapter.directory}: adapter was made for a different model architecture "
                         f"(structure {want.get('structure')} != {have['structure']} of {source})")
    if "weights" in want and want["weights"] != have["weights"]:
        warnings.warn(f"{adapter.directory}: adapter was trained on a different base "
                      f"(weights {want['weights']} != {have['weights']} of {source}); applying anyway",
                      stacklevel=2)


def apply_adapter(model: nnx.Module, adapter: Adapter, *, rngs: nnx.Rngs | None = None,
                  check_base: bool = True) -> list[str]:
    """Inject ``adapter.config`` into ``model`` and fill in the saved weights.

    Every adapter tensor must land on a layer the config adapts, with the shape that
    layer expects; anything else is an error naming the key."""
    check_adapter_fits(model, adapter)  # precise, per-key errors before the coarse fingerprint
    if check_base:
        check_fingerprint(adapter, partition(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[1])
    paths = inject(model, adapter.config, rngs=rngs or nnx.Rngs(0))
    try:
        _fill_adapter(model, adapter, paths)
    except BaseException:
        _remove_adapters(model, paths)  # leave the model as it was, not half-filled
        raise
    return paths


def _implied_kernel_shape(a, b) -> tuple[int, ...]:
    if len(a.shape) == 2 and len(b.shape) == 2:
        return (a.shape[0], b.shape[1])
    if len(a.shape) == 3 and len(b.shape) == 2:
        return (a.shape[0], a.shape[1], b.shape[1])
    if len(a.shape) == 2 and len(b.shape) == 3:
        return (b.shape[0], a.shape[0], b.shape[2])
    raise ValueError(f"not a LoRA factor pair: a{tuple(a.shape)}, b{tuple(b.shape)}")


def check_adapter_fits(model: nnx.Module, adapter: Adapter, *, source: str = "the model") -> None:
    """Every adapter layer must exist in ``model`` with the kernel its factors imply, and
    every embedding delta must match its table; errors name the key (``source`` names the model)."""
    layers = dict(iter_lora_layers(model))
    for path, (a, b) in adapter_layers(adapter.params).items():
        if path not in layers:
            raise ValueError(f"{adapter.directory}: adapter has weights for {_dotted(path)}, which is not an "
                             f"adaptable layer of {source} (adapter made for another model?)")
        want = _implied_kernel_shape(a, b)
        have = tuple(layers[path].kernel.shape)
        if want != have:
            raise ValueError(f"{adapter.directory}: {_dotted(path)} was made for a kernel of shape {want}, "
                             f"{source} has {have} (adapter made for another model?)")
    embeds = {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Embed)}
    for path, dv in adapter_deltas(adapter.params).items():
        if path not in embeds:
            raise ValueError(f"{adapter.directory}: adapter has a delta for {_dotted(path)}, which is not an "
                             f"embedding table of {source}")
        if tuple(np.shape(dv)) != tuple(embeds[path].embedding.shape):
            raise ValueError(f"{adapter.directory}: {_dotted(path)}.{DELTA_KEY} has shape {tuple(np.shape(dv))}, "
                             f"the table of {source} is {tuple(embeds[path].embedding.shape)}")


def _fill_adapter(model: nnx.Module, adapter: Adapter, paths: list[str]) -> None:
    embeds = {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Embed)}
    deltas = adapter_deltas(adapter.params)
    if set(deltas) != set(adapter.config.train_embeddings):
        raise ValueError(f"{adapter.directory}: embedding deltas {sorted(deltas)} do not match the config's "
                         f"train_embeddings {list(adapter.config.train_embeddings)}")
    for path, dv in deltas.items():
        embeds[path].lora_delta[...] = jnp.asarray(dv, embeds[path].lora_delta.dtype)
    paths = [p for p in paths if p not in deltas]
    saved = adapter_layers(adapter.params)
    layers = dict(iter_lora_layers(model))
    unexpected = sorted(set(saved) - set(paths))
    missing = sorted(set(paths) - set(saved))
    if unexpected:
        raise ValueError(f"{adapter.directory}: adapter has weights for {_dotted(unexpected[0])} "
                         f"which the model has no adapted layer for ({len(unexpected)} such keys)")
    if missing:
        raise ValueError(f"{adapter.directory}: adapter lacks weights for {_dotted(missing[0])} "
                         f"({len(missing)} adapted layers missing)")
    for path in paths:
        layer = layers[path]
        for name, val in zip(LORA_KEYS, saved[path]):
            var = getattr(layer, name)
            if tuple(val.shape) != tuple(var.shape):
                raise ValueError(f"{adapter.directory}: {_dotted(path)}.{name} has shape {tuple(val.shape)}, "
                                 f"the model expects {tuple(var.shape)}")
            var[...] = jnp.asarray(val, var.dtype)
