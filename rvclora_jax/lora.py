"""LoRA for RVC models: configuration, injection, the training split, pure merge.

Life cycle
----------
1. **Configure.** A :class:`LoRAConfig` names the layers to adapt by regular
   expressions over module paths (``"dec/ups/\\d+"``), or by a preset of the model
   family (:data:`PRESETS`, RVC's), plus rank, alpha, dropout, rsLoRA and per-path
   ``rank_pattern`` / ``alpha_pattern`` overrides.
2. **Inject.** :func:`inject` walks an NNX model and calls ``add_lora`` on every
   matching adaptable layer (:class:`~rvclora_jax.layers.Adaptable`: ``Dense``,
   ``Conv1d``, ``ConvTranspose1d``, or any kind registered with
   :func:`~rvclora_jax.layers.register_layer_kind`). Adapter weights are
   :class:`LoRAParam` variables living *inside* the adapted layer, so base paths
   (``dec/ups/0/kernel``) are unchanged and converters never need to know about LoRA.
   ``b`` starts at zero: a fresh adapter changes nothing.
3. **Train.** :func:`split` (``nnx.split(model, LoRAParam, nnx.Param, ...)``; LoRAParam
   first: it subclasses ``nnx.Param``) gives the trainable subtree; everything else is
   frozen.
4. **Merge.** :func:`merge` is a pure function on parameter trees: base params +
   adapter + config → new plain params whose kernels include the exact delta
   ``ΔW = s·A·B`` in the kernel's own layout, computed by the layer kind's
   :meth:`~rvclora_jax.layers.Adaptable.delta` (``layer_kinds`` names each layer's
   kind); :func:`unmerge` is its inverse for the same adapter. :func:`merge_model`
   does the same for an adapted model.
5. **Save / load / mix.** Adapter files (``adapter.safetensors`` +
   ``adapter_config.json``, with the kind of every adapted layer and a fingerprint of
   the base) and adapter arithmetic live in :mod:`rvclora_jax.adapters`.

Parameter trees here are nested dicts as produced by ``nnx.to_pure_dict(state)``
(list indices are ints). Paths are the keys joined with ``/`` (:mod:`rvclora_jax.tree`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .families.rvc import RVC
from .layers import Adaptable, Embed, LoRAParam, layer_kind, lora_scaling
from .tree import flatten, leaf_name, mismatches, parent, path_str, unflatten

LORA_KEYS = ("lora_a", "lora_b")
DELTA_KEY = "lora_delta"  # full-size additive delta of an embedding table (modules_to_save)
ADAPTER_LEAVES = LORA_KEYS + (DELTA_KEY,)

# LoRA target presets belong to the model family; these are the default family's (RVC).
PRESETS = RVC.lora_presets
DEFAULT_PRESET = RVC.default_lora_preset


def _freeze_pattern(p: Mapping[str, Any] | Iterable[tuple[str, Any]] | None, key: str) -> tuple[tuple[str, Any], ...]:
    if p is None:
        return ()
    if isinstance(p, (str, bytes)):
        raise ValueError(f"{key}: must be an object of pattern -> value, got {type(p).__name__}")
    try:
        items = list(p.items() if isinstance(p, Mapping) else p)
        pairs = tuple((k, v) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: must be an object of pattern -> value, got {type(p).__name__}") from None
    for k, _ in pairs:
        if not isinstance(k, str):
            raise ValueError(f"{key}: pattern {k!r} is not a string")
    return pairs


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _str_tuple(x, key: str) -> tuple[str, ...]:
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)):
        raise ValueError(f"{key}: must be a list of strings, got {type(x).__name__}")
    for v in x:
        if not isinstance(v, str):
            raise ValueError(f"{key}: entry {v!r} is not a string")
    return tuple(x)


# Path patterns come from config files, i.e. untrusted input, and Python's ``re``
# backtracks: ``(a+)+$`` takes exponential time. A pattern is accepted only if it cannot
# backtrack badly (see LoRAConfig): at most MAX_PATTERN_CHARS characters, no
# backreferences, no repeated group that itself holds a quantifier or an alternation,
# and at most MAX_PATTERN_REPEATS repeating quantifiers along any one alternative; it
# is only ever matched against module paths of at most MAX_PATH_CHARS characters.
MAX_PATTERN_CHARS = 256
MAX_PATTERN_REPEATS = 3
MAX_PATH_CHARS = 128
_QUANT = re.compile(r"(\*|\+|\?|\{(\d*)(,(\d*))?\})[?+]?")


def check_path_pattern(pat: str) -> None:
    """Raise ``ValueError`` unless ``pat`` is a path pattern that matches in bounded time
    (the rule is in :class:`LoRAConfig`'s docstring)."""
    if len(pat) > MAX_PATTERN_CHARS:
        raise ValueError(f"pattern of {len(pat)} characters is longer than {MAX_PATTERN_CHARS}")
    try:
        re.compile(pat)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"invalid path pattern {pat!r}: {e}") from None
    # frames: [repeats along the current alternative, max over finished alternatives,
    #          holds a quantifier, holds an alternation]
    stack = [[0, 0, False, False]]
    i, n = 0, len(pat)

    def quantifier(j: int):
        m = _QUANT.match(pat, j)
        if not m or (m.group(1).startswith("{") and not (m.group(2) or m.group(4))):
            return None, j  # "{" without digits is a literal in re
        q = m.group(1)
        if q == "?":
            repeating = False
        elif q.startswith("{"):
            hi = m.group(4) if m.group(3) else m.group(2)
            repeating = hi == "" or int(hi) > 1
        else:
            repeating = True
        return repeating, m.end()

    while i < n:
        c = pat[i]
        atom_group = None
        if c == "\\":
            if i + 1 < n and pat[i + 1] in "123456789":
                raise ValueError(f"pattern {pat!r}: backreferences are not allowed")
            i += 2
        elif c == "[":
            j = i + 1
            if j < n and pat[j] == "^":
                j += 1
            if j < n and pat[j] == "]":
                j += 1
            while j < n and pat[j] != "]":
                j += 2 if pat[j] == "\\" else 1
            i = j + 1
        elif c == "(":
            if pat.startswith("(?P=", i) or pat.startswith("(?(", i):
                raise ValueError(f"pattern {pat!r}: backreferences are not allowed")
            if pat.startswith("(?#", i):
                i = pat.index(")", i) + 1
                continue
            stack.append([0, 0, False, False])
            i += 1
            continue
        elif c == ")":
            atom_group = stack.pop()
            i += 1
        elif c == "|":
            top = stack[-1]
            top[1], top[0], top[3] = max(top[1], top[0]), 0, True
            i += 1
            continue
        else:
            i += 1
        repeating, i = quantifier(i)
        top = stack[-1]
        if atom_group is not None:
            inner = max(atom_group[0], atom_group[1])
            if repeating and (atom_group[2] or atom_group[3]):
                raise ValueError(f"pattern {pat!r}: a repeated group may not contain a quantifier or "
                                 f"an alternation (nested quantifiers backtrack exponentially)")
            top[0] += inner
            top[2] = top[2] or atom_group[2] or repeating is not None
            top[3] = top[3] or atom_group[3]
        elif repeating is not None:
            top[2] = True
        if repeating:
            top[0] += 1
        if top[0] > MAX_PATTERN_REPEATS:
            raise ValueError(f"pattern {pat!r}: more than {MAX_PATTERN_REPEATS} repeating quantifiers "
                             f"in a row (polynomial backtracking)")


def _fullmatch(pat: str, path: str):
    if len(path) > MAX_PATH_CHARS:
        raise ValueError(f"module path of {len(path)} characters is longer than {MAX_PATH_CHARS}: {path[:40]}...")
    return re.fullmatch(pat, path)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    ``targets`` / ``exclude`` and the keys of ``rank_pattern`` / ``alpha_pattern`` are
    regular expressions that must match a whole module path (``re.fullmatch``), e.g.
    ``"dec/ups/\\d+"`` or ``"dec/resblocks/.*"``. For the two patterns the first
    matching key wins. ``alpha`` defaults to ``rank`` (scaling 1), PEFT's habit.
    Without ``targets`` the config adapts what ``preset`` (default: the RVC family's
    default preset) targets.

    Every field is checked on construction (a config file is untrusted input), errors
    start with the field name: ``rank`` / ``rank_pattern`` values are ints ≥ 1 (not
    bools), ``alpha`` / ``alpha_pattern`` values finite numbers, ``dropout`` in [0, 1),
    ``use_rslora`` a bool, ``init`` ``"kaiming"`` or ``"gaussian"``, the pattern and
    path lists lists of strings. Patterns must match in bounded time (Python's ``re``
    backtracks): at most 256 characters, no backreferences, no repeated group holding a
    quantifier or ``|`` (``(a+)+``, ``(a|aa)*``), at most 3 repeating quantifiers
    (``*``, ``+``, ``{m,n}``) along any one alternative; and they are only matched
    against module paths of at most 128 characters.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    # None: the targets of ``preset``, or of the default family's default preset.
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    # The preset the targets came from; None for custom targets. (Files written before
    # this was fixed may name a preset next to custom targets; they load as written.)
    preset: str | None = None
    # Embedding tables (paths, e.g. ("emb_g",)) that get a trainable full-size delta:
    # PEFT's modules_to_save for RVC's speaker embedding, merged by exact addition.
    train_embeddings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.preset is not None and not isinstance(self.preset, str):
            raise ValueError(f"preset: must be a string or null, got {self.preset!r}")
        if self.targets is None:
            name = self.preset or DEFAULT_PRESET
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
            object.__setattr__(self, "preset", name)
            object.__setattr__(self, "targets", PRESETS[name][0])
        object.__setattr__(self, "targets", _str_tuple(self.targets, "targets"))
        object.__setattr__(self, "exclude", _str_tuple(self.exclude, "exclude"))
        object.__setattr__(self, "train_embeddings", _str_tuple(self.train_embeddings, "train_embeddings"))
        object.__setattr__(self, "rank_pattern", _freeze_pattern(self.rank_pattern, "rank_pattern"))
        object.__setattr__(self, "alpha_pattern", _freeze_pattern(self.alpha_pattern, "alpha_pattern"))
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"rank: must be a positive integer, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        if not _is_number(self.alpha) or not np.isfinite(self.alpha):
            raise ValueError(f"alpha: must be a finite number, got {self.alpha!r}")
        for k, r in self.rank_pattern:
            if not _is_int(r) or r < 1:
                raise ValueError(f"rank_pattern: {k!r}: must be a positive integer, got {r!r}")
        for k, a in self.alpha_pattern:
            if not _is_number(a) or not np.isfinite(a):
                raise ValueError(f"alpha_pattern: {k!r}: must be a finite number, got {a!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, (bool, np.bool_)):
            raise ValueError(f"use_rslora: must be true or false, got {self.use_rslora!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init: must be 'kaiming' or 'gaussian', got {self.init!r}")
        for key, pats in (("targets", self.targets), ("exclude", self.exclude),
                          ("rank_pattern", [k for k, _ in self.rank_pattern]),
                          ("alpha_pattern", [k for k, _ in self.alpha_pattern])):
            for pat in pats:
                try:
                    check_path_pattern(pat)
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None

    @classmethod
    def from_preset(cls, name: str, *, family=RVC, **overrides) -> "LoRAConfig":
        """The targets of ``family``'s LoRA preset ``name`` (``family.lora_presets``)."""
        presets = family.lora_presets
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
        return cls(targets=presets[name][0], preset=name, **overrides)

    def matches(self, path: str) -> bool:
        """Whether the module at ``path`` (``"dec/ups/0"``) should get an adapter."""
        return (any(_fullmatch(p, path) for p in self.targets)
                and not any(_fullmatch(p, path) for p in self.exclude))

    def rank_for(self, path: str) -> int:
        for pat, r in self.rank_pattern:
            if _fullmatch(pat, path):
                return int(r)
        return self.rank

    def alpha_for(self, path: str) -> float:
        for pat, a in self.alpha_pattern:
            if _fullmatch(pat, path):
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
        """The config of a ``to_dict`` mapping (as read from JSON), strictly: unknown keys
        and values of the wrong type are errors starting with the key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"must be an object of LoRA settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown LoRA config keys: {', '.join(map(str, unknown))}")
        for key in ("rank_pattern", "alpha_pattern"):
            if key in d and not isinstance(d[key], Mapping):
                raise ValueError(f"{key}: must be an object of pattern -> value, got {type(d[key]).__name__}")
        return cls(**dict(d))


# ---------------------------------------------------------------------------------
# Adaptable layers of a model
# ---------------------------------------------------------------------------------
def iter_lora_layers(model: nnx.Module) -> Iterator[tuple[str, Adaptable]]:
    """``(path, layer)`` for every adaptable layer in the model (adapted or not)."""
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, Adaptable):
            yield path_str(path), mod


def iter_embeddings(model: nnx.Module) -> Iterator[tuple[str, Embed]]:
    """``(path, table)`` for every :class:`~rvclora_jax.layers.Embed` (which can carry a delta)."""
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, Embed):
            yield path_str(path), mod


def layer_kinds(model: nnx.Module) -> dict[str, str]:
    """``{path: kind}`` for every adaptable layer of ``model`` (kind names as registered)."""
    return {path: layer.kind for path, layer in iter_lora_layers(model)}


# Built-in kinds by the ndims of (a, b): they differ, so version-1 adapter files (which
# did not record kinds) and callers that pass none can still be read.
_LEGACY_KINDS = {(2, 2): "Dense", (3, 2): "Conv1d", (2, 3): "ConvTranspose1d"}


def legacy_kinds(adapter: Mapping) -> dict[str, str]:
    """``{path: kind}`` of an adapter tree from its factor ndims: the documented fallback
    for version-1 adapter files and kind-less callers, the one place a kind is inferred
    rather than recorded. Knows only the built-in kinds (Dense 2/2, Conv1d 3/2,
    ConvTranspose1d 2/3)."""
    out = {}
    for path, (a, b) in adapter_layers(adapter).items():
        kind = _LEGACY_KINDS.get((np.ndim(a), np.ndim(b)))
        if kind is None:
            raise ValueError(f"not a LoRA factor pair of a built-in layer kind: {path} "
                             f"a{tuple(np.shape(a))}, b{tuple(np.shape(b))} (give the layer kinds)")
        out[path] = kind
    return out


def resolve_kinds(adapter: Mapping, kinds: Mapping[str, str] | None) -> dict[str, str]:
    """The kind of every low-rank layer of ``adapter``: from ``kinds`` (recorded in the
    file or read off the model), else :func:`legacy_kinds`."""
    if kinds is None:
        return legacy_kinds(adapter)
    layers = adapter_layers(adapter)
    missing = sorted(set(layers) - set(kinds))
    if missing:
        raise ValueError(f"no layer kind given for adapter layer {missing[0]} ({len(missing)} in all)")
    for p in layers:
        layer_kind(kinds[p])  # a clear error for an unregistered kind
    return {p: kinds[p] for p in layers}


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
        embeds = dict(iter_embeddings(model))
        for path in config.train_embeddings:
            if path not in embeds:
                raise ValueError(f"train_embeddings: the model has no embedding table at {path!r} "
                                 f"(have {sorted(embeds)})")
            embeds[path].add_delta()
            done.append(path)
    except BaseException:
        remove_adapters(model, done)
        raise
    if not done:
        avail = [p for p, _ in iter_lora_layers(model)]
        raise ValueError(f"LoRA targets {list(config.targets)} match none of the model's "
                         f"{len(avail)} adaptable layers (e.g. {avail[:3]})")
    return done


def remove_adapters(model: nnx.Module, paths: Iterable[str]) -> None:
    """Remove the adapters (or embedding deltas) at ``paths``: the inverse of :func:`inject`."""
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
    """The merged base parameters of an adapted model, as a nested dict like :func:`merge`'s
    (no adapter leaves; write them into an adapter-free model with
    :func:`rvclora_jax.params.load_params`). ``model`` itself is not changed."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    adapter, base = partition(params)
    adapted = [(p, layer) for p, layer in iter_lora_layers(model) if layer.has_lora]
    return merge(base, adapter, {p: layer.lora_scaling for p, layer in adapted}, scale=scale,
                 kinds={p: layer.kind for p, layer in adapted})


# ---------------------------------------------------------------------------------
# Pure functions on parameter trees
# ---------------------------------------------------------------------------------
def partition(params: Mapping) -> tuple[dict, dict]:
    """Split a tree into ``(adapter, base)``; adapter leaves are ``.../lora_a|lora_b``."""
    flat = flatten(params)
    adapter = {p: v for p, v in flat.items() if leaf_name(p) in ADAPTER_LEAVES}
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
        layer, leaf = parent(p), leaf_name(p)
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
    return {parent(p): v for p, v in flatten(adapter).items() if leaf_name(p) == DELTA_KEY}


def _scalings(adapter_ls: Mapping[str, tuple], config: LoRAConfig | Mapping[str, float],
              kinds: Mapping[str, str]) -> dict[str, float]:
    if isinstance(config, LoRAConfig):
        out = {}
        for path, (a, b) in adapter_ls.items():
            r = layer_kind(kinds[path]).rank_of(np.shape(a))
            if r != config.rank_for(path):
                raise ValueError(f"adapter {path} has rank {r} but the config says {config.rank_for(path)}")
            out[path] = config.scaling_for(path, r)
        return out
    missing = sorted(set(adapter_ls) - set(config))
    if missing:
        raise ValueError(f"no scaling given for adapter layers {missing}")
    return {p: float(config[p]) for p in adapter_ls}


def _apply_delta(params: Mapping, adapter: Mapping, config, scale: float, sign: float,
                 kinds: Mapping[str, str] | None) -> dict:
    flat = flatten(params)
    if any(leaf_name(p) in ADAPTER_LEAVES for p in flat):
        raise ValueError("params still contain adapter leaves; pass the base from partition()")
    ls = adapter_layers(adapter)
    kinds = resolve_kinds(adapter, kinds)
    scal = _scalings(ls, config, kinds)
    # The additive update of every touched leaf, in float32 whatever the storage dtype.
    upd = {f"{path}/embedding": sign * scale * jnp.asarray(dv, jnp.float32)
           for path, dv in adapter_deltas(adapter).items()}
    for path, (a, b) in ls.items():
        d = layer_kind(kinds[path]).delta(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                          scal[path] * scale)
        upd[f"{path}/kernel"] = sign * d
    bad = mismatches(flat, upd)
    for p in bad.unexpected:
        what = "delta" if leaf_name(p) == "embedding" else "layer"
        base = "table" if leaf_name(p) == "embedding" else "kernel"
        raise KeyError(f"adapter {what} {parent(p)} has no base {base} {p} in the params")
    for p, got, want in bad.misshapen:
        base = "table" if leaf_name(p) == "embedding" else "kernel"
        raise ValueError(f"adapter {parent(p)}: delta shape {got} != {base} shape {want}")
    out = dict(flat)
    for p, d in upd.items():
        w = flat[p]
        out[p] = (jnp.asarray(w, jnp.float32) + d).astype(jnp.asarray(w).dtype)
    return unflatten(out)


def merge(base: Mapping, adapter: Mapping, config: LoRAConfig | Mapping[str, float], *,
          scale: float = 1.0, kinds: Mapping[str, str] | None = None) -> dict:
    """Pure merge: returns new params with ``kernel + scale·ΔW`` for every adapted layer
    (and ``table + scale·delta`` for every embedding delta).

    ``config`` is the :class:`LoRAConfig` the adapter was built with (for alpha and
    rank patterns) or an explicit ``{layer_path: scaling}`` map. ``kinds``
    (``{layer_path: kind}``, e.g. ``Adapter.kinds`` or :func:`layer_kinds`) says how each
    factor pair multiplies out; without it the built-in kinds are read off the factor
    ndims (:func:`legacy_kinds`). Inputs are not modified; the result contains no
    adapter leaves."""
    return _apply_delta(base, adapter, config, scale, +1.0, kinds)


def unmerge(merged: Mapping, adapter: Mapping, config: LoRAConfig | Mapping[str, float], *,
            scale: float = 1.0, kinds: Mapping[str, str] | None = None) -> dict:
    """Inverse of :func:`merge` for the same adapter (exact up to float rounding)."""
    return _apply_delta(merged, adapter, config, scale, -1.0, kinds)


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
        rows.append(LayerRow(path, layer.kind, tuple(layer.kernel.shape), layer.lora_rank,
                             layer.lora_alpha, layer.lora_scaling, base,
                             _size(layer.lora_a) + _size(layer.lora_b)))
    for p, m in iter_embeddings(model):
        if m.has_delta:
            n = _size(m.embedding)
            rows.append(LayerRow(p, "Embed (delta)", tuple(m.embedding.shape), 0, 0.0, 1.0, n, n))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    total = sum(_size(x) for x in leaves)
    trainable = sum(_size(x) for x in jax.tree.leaves(adapter_state(model)))
    return Summary(rows, total, trainable, sum(r.base_params for r in rows))
