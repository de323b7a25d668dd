"""Adapter arithmetic: exact mixing, SVD re-compression, extraction from a fine-tuned
voice, and a human-readable summary.

Every layer kind is a plain matrix product ``M = A·B`` in its *LoRA basis*, which the
layer class owns (:meth:`~rvclora_jax.layers.Adaptable.to_matrix` /
:meth:`~rvclora_jax.layers.Adaptable.from_matrix`, see ``layers.py``)::

    Dense            M = ΔW                        [in, out]      A = a, B = b
    Conv1d           M = ΔW.reshape(K·in, out)     A = a.reshape(K·in, r), B = b
    ConvTranspose1d  M = ΔW.transpose(1,0,2)       [in, K·out],   A = a,
                         .reshape(in, K·out)       B = b.transpose(1,0,2).reshape(r, K·out)

so the best rank-k adapter of a layer (in Frobenius norm) is the truncated SVD of M.
The kind of every layer comes from the adapter (``Adapter.kinds``, recorded in its
file) or from the model, never from its name.

* :func:`mix` is *exact*: ranks are concatenated per layer (along each factor's rank
  axis, :meth:`~rvclora_jax.layers.Adaptable.rank_axes`). Each output layer gets
  scaling 1 (``alpha_pattern`` = its rank, no rsLoRA) and the factors of adapter ``j``
  enter as ``[a_j]`` / ``[w_j·s_j·b_j]``, so ``A_mix·B_mix = Σ_j w_j s_j A_j B_j``.
  Embedding deltas (``lora_delta``) add as ``Σ_j w_j·delta_j``.
* :func:`compress` re-factors each layer by SVD (``a = U√σ``, ``b = √σ Vᵀ``, scaling 1)
  and reports the kept energy ``Σσ_kept² / Σσ²``.
* :func:`extract` builds an adapter from ``W_voice − W_base`` (weight norm already folded
  by the converters), and reports what an adapter cannot hold (biases, LayerNorm,
  relative attention embeddings, untargeted kernels, the speaker table unless
  ``keep_full``).

Plain parameter trees in, :class:`~rvclora_jax.adapters.files.Adapter` objects out; no
file formats (``.pth`` files are read by the CLI through ``rvclora_convert``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Sequence

import numpy as np

from .. import lora
from ..families.rvc import RVC
from ..layers import layer_kind
from ..lora import DELTA_KEY, LoRAConfig
from ..tree import flatten, leaf_name, parent, unflatten
from .files import ADAPTER_WEIGHTS, Adapter


# ---------------------------------------------------------------------------------
# SVD in a layer's LoRA basis
# ---------------------------------------------------------------------------------
def _svd_factors(delta: np.ndarray, kind: str, rank: int):
    """Truncated SVD of ΔW in the LoRA basis: ``(a, b, sigma, kept)`` with scaling 1."""
    cls = layer_kind(kind)
    M = cls.to_matrix(np.asarray(delta, np.float64))
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    k = max(1, min(int(rank), S.size))
    root = np.sqrt(S[:k])
    A = U[:, :k] * root[None, :]
    B = root[:, None] * Vt[:k]
    a, b = cls.from_matrix(A, B, np.shape(delta))
    return a.astype(np.float32), b.astype(np.float32), S, k


@dataclasses.dataclass
class LayerEnergy:
    path: str
    kind: str
    kernel_shape: tuple[int, ...]
    full_rank: int          # min(M.shape): the most an adapter of this layer can need
    rank_in: int            # rank of the input adapter (compress) / numerical rank of ΔW (extract)
    rank_kept: int
    energy: float           # Σσ² = ‖ΔW‖_F²
    kept: float             # Σσ_kept² / Σσ² (1.0 for a zero delta)
    discarded: float        # Σσ_discarded² (absolute)
    rel_weight_change: float | None = None  # ‖ΔW‖ / ‖W_base‖ (extract only)

    def row(self) -> str:
        rw = "" if self.rel_weight_change is None else f" {self.rel_weight_change:>9.2e}"
        return (f"{self.path.replace('/', '.'):<40} {self.kind:<15} {self.rank_kept:>4}/{self.full_rank:<5} "
                f"{100 * self.kept:>9.4f}% {self.discarded:>10.3e}{rw}")


def _energy_row(path, kind, shape, S, k, rank_in, rel=None) -> LayerEnergy:
    S2 = np.asarray(S, np.float64) ** 2
    total = float(S2.sum())
    kept_e = float(S2[:k].sum())
    return LayerEnergy(path, kind, tuple(int(x) for x in shape), int(S.size), int(rank_in), int(k), total,
                       1.0 if total == 0 else kept_e / total, float(S2[k:].sum()), rel)


def _exact(path: str) -> str:
    return re.escape(path)


def _config_for(ranks: Mapping[str, int], embeddings: Sequence[str], rank: int | None = None) -> LoRAConfig:
    """A config that adapts exactly ``ranks`` (path → rank), each with scaling 1."""
    paths = sorted(ranks)
    default = int(rank or (max(ranks.values()) if ranks else 1))
    return LoRAConfig(rank=default, alpha=float(default), use_rslora=False,
                      targets=tuple(_exact(p) for p in paths), exclude=(),
                      rank_pattern=tuple((_exact(p), int(ranks[p])) for p in paths),
                      alpha_pattern=tuple((_exact(p), float(ranks[p])) for p in paths),
                      preset=None, train_embeddings=tuple(sorted(embeddings)))


def _weights_file(ad: Adapter) -> str:
    return os.path.join(ad.directory, ADAPTER_WEIGHTS) if ad.directory else "adapter"


# ---------------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------------
def mix(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Exact weighted sum ``Σ_j w_j·ΔW_j`` of adapters, by concatenating ranks per layer.

    The mixed layer ``p`` has rank ``Σ_j r_j`` (over the adapters that have ``p``) and
    scaling 1 (``alpha_pattern[p] = rank``); adapter ``j``'s block is ``a_j`` in the A
    factor and ``w_j·s_j·b_j`` in the B factor (``s_j`` its own scaling). Layers present
    in only some adapters are fine (the others contribute zero). Embedding deltas add as
    ``Σ_j w_j·delta_j``. Raises ``ValueError`` if the adapters were made for different
    model architectures (base fingerprint ``structure``) or disagree on a layer's kind
    or shape. The result (not saved: ``directory`` is ``""``) carries
    :func:`mixed_fingerprint` and ``metadata["mixed_from"]``."""
    adapters, weights = list(adapters), list(weights)
    if not adapters:
        raise ValueError("mix: no adapters given")
    if len(adapters) != len(weights):
        raise ValueError(f"mix: {len(adapters)} adapters but {len(weights)} weights")
    for ad, w in zip(adapters, weights):
        ok = isinstance(w, (int, float, np.integer, np.floating)) and not isinstance(w, (bool, np.bool_))
        if not ok or not np.isfinite(float(w)):
            raise ValueError(f"{ad.directory or 'adapter'}: mix weight {w!r} is not a finite number")
    weights = [float(w) for w in weights]
    ref = next((ad for ad in adapters if ad.base_fingerprint.get("structure")), None)
    for ad in adapters:
        s = ad.base_fingerprint.get("structure")
        if ref is not None and s and s != ref.base_fingerprint["structure"]:
            raise ValueError(f"mix: {ad.directory} and {ref.directory} were made for different model "
                             f"architectures (base structure {s} != {ref.base_fingerprint['structure']})")
    blocks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    shapes: dict[str, tuple[tuple, str, str]] = {}
    deltas: dict[str, np.ndarray] = {}
    for ad, w in zip(adapters, weights):
        layers = lora.adapter_layers(ad.params)
        for path, (a, b) in layers.items():
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            kind = ad.kinds[path]
            cls = layer_kind(kind)
            try:
                shape = cls.kernel_shape_of(a.shape, b.shape)
            except ValueError as e:
                raise ValueError(f"{_weights_file(ad)}: {path.replace('/', '.')}: {e}") from None
            if path in shapes and shapes[path][:2] != (shape, kind):
                raise ValueError(f"mix: {path.replace('/', '.')} is a {kind} {shape} in {ad.directory} but a "
                                 f"{shapes[path][1]} {shapes[path][0]} in {shapes[path][2]}")
            shapes.setdefault(path, (shape, kind, ad.directory))
            s = ad.config.scaling_for(path, cls.rank_of(a.shape))
            wb = w * s * b
            if not (np.isfinite(s) and np.all(np.isfinite(a)) and np.all(np.isfinite(wb))
                    and np.all(np.abs(wb) <= np.finfo(np.float32).max)):
                raise ValueError(f"{ad.directory or 'adapter'}: mix: {path.replace('/', '.')} times weight {w:g} "
                                 f"(scaling {s:g}) is not finite in float32")
            blocks.setdefault(path, []).append((a, wb))
        for path, dv in lora.adapter_deltas(ad.params).items():
            dv = np.asarray(dv, np.float64)
            if path in deltas and deltas[path].shape != dv.shape:
                raise ValueError(f"mix: {path}.{DELTA_KEY} has shape {dv.shape} in {ad.directory}, "
                                 f"{deltas[path].shape} elsewhere")
            deltas[path] = deltas.get(path, 0.0) + w * dv
    flat: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for path, bl in blocks.items():
        kinds[path] = shapes[path][1]
        a_axis, b_axis = layer_kind(kinds[path]).rank_axes()
        a = np.concatenate([x for x, _ in bl], axis=a_axis)
        b = np.concatenate([y for _, y in bl], axis=b_axis)
        flat[f"{path}/lora_a"], flat[f"{path}/lora_b"] = a.astype(np.float32), b.astype(np.float32)
        ranks[path] = int(a.shape[a_axis])
    for path, dv in deltas.items():
        flat[f"{path}/{DELTA_KEY}"] = np.asarray(dv, np.float32)
    for key, v in flat.items():  # never write a non-finite adapter (float32 overflow included)
        if not np.all(np.isfinite(v)):
            where = ", ".join(ad.directory or "adapter" for ad in adapters)
            raise ValueError(f"{where}: mix: {key.replace('/', '.')} is not finite in float32 (weights {weights})")
    meta = {"mixed_from": [f"{ad.directory}:{w:g}" for ad, w in zip(adapters, weights)]}
    return Adapter(unflatten(flat), _config_for(ranks, list(deltas)), mixed_fingerprint(adapters), meta,
                   kinds=kinds)


def mixed_fingerprint(adapters: Sequence[Adapter]) -> dict:
    """Base fingerprint for a mix: the shared structure, plus the weights hash if all agree."""
    fps = [ad.base_fingerprint for ad in adapters if ad.base_fingerprint]
    if not fps:
        return {}
    out = {"structure": fps[0].get("structure")}
    ws = {fp.get("weights") for fp in fps}
    if len(fps) == len(adapters) and len(ws) == 1 and None not in ws:
        out["weights"] = ws.pop()
    return out


# ---------------------------------------------------------------------------------
# SVD compression
# ---------------------------------------------------------------------------------
@dataclasses.dataclass
class EnergyReport:
    layers: list[LayerEnergy]

    @property
    def total_energy(self) -> float:
        return float(sum(r.energy for r in self.layers))

    @property
    def discarded_energy(self) -> float:
        return float(sum(r.discarded for r in self.layers))

    @property
    def kept(self) -> float:
        t = self.total_energy
        return 1.0 if t == 0 else 1.0 - self.discarded_energy / t

    def format(self, max_rows: int | None = None, rel: bool = False) -> str:
        head = (f"{'module':<40} {'kind':<15} {'rank/full':<10} {'kept':>10} {'discarded':>10}"
                + (f" {'|dW|/|W|':>9}" if rel else ""))
        rows = sorted(self.layers, key=lambda r: r.kept)  # worst first
        shown = rows if max_rows is None else rows[:max_rows]
        lines = [head, "-" * len(head)] + [r.row() for r in shown]
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more layers (better kept)")
        lines.append("-" * len(head))
        lines.append(f"layers: {len(rows)}   energy kept: {100 * self.kept:.4f}%   "
                     f"discarded: {self.discarded_energy:.4e} of {self.total_energy:.4e} (sum of sigma^2)")
        return "\n".join(lines)


def compress(adapter: Adapter, rank: int) -> tuple[Adapter, EnergyReport]:
    """Re-factor every adapter layer by truncated SVD to at most ``rank`` (scaling 1).

    Keeps the top ``min(rank, full)`` singular triplets of ΔW in the layer's LoRA basis,
    so the result is the best rank-``rank`` adapter of each layer in Frobenius norm;
    lossless when ``rank`` reaches the layer's current rank. Embedding deltas are kept
    as they are; so are the fingerprint and metadata (plus ``compressed_rank`` and
    ``energy_kept``). The report gives per layer ``Σσ_kept²/Σσ²`` and ``Σσ_discarded²``."""
    if int(rank) < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    params, config = adapter.params, adapter.config
    flat: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    rows = []
    for path, (a, b) in lora.adapter_layers(params).items():
        kind = adapter.kinds[path]
        cls = layer_kind(kind)
        r_in = cls.rank_of(np.shape(a))
        delta = cls.delta(a, b, config.scaling_for(path, r_in), xp=np)
        na, nb, S, k = _svd_factors(delta, kind, min(int(rank), r_in))
        flat[f"{path}/lora_a"], flat[f"{path}/lora_b"] = na, nb
        ranks[path] = k
        rows.append(_energy_row(path, kind, delta.shape, S, k, r_in))
    for path, dv in lora.adapter_deltas(params).items():
        flat[f"{path}/{DELTA_KEY}"] = np.asarray(dv, np.float32)
    emb = list(lora.adapter_deltas(params))
    report = EnergyReport(rows)
    meta = {**adapter.metadata, "compressed_rank": int(rank), "energy_kept": report.kept}
    out = Adapter(unflatten(flat), _config_for(ranks, emb, rank), dict(adapter.base_fingerprint), meta,
                  kinds={p: adapter.kinds[p] for p in ranks})
    return out, report


# ---------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------
@dataclasses.dataclass
class FullChange:
    path: str              # parameter path (e.g. dec/ups/0/bias)
    what: str              # "bias", "embedding", "layernorm", "untargeted kernel", ...
    rel_change: float      # ‖W_voice − W_base‖ / ‖W_base‖
    stored: bool           # True if kept in the adapter (embedding lora_delta)


@dataclasses.dataclass
class ExtractReport:
    energy: EnergyReport
    unchanged: list[str]                     # targeted layers whose kernel did not change
    full: list[FullChange]                   # changed tensors an adapter cannot hold (or stored in full)
    only_in_base: list[str]
    only_in_voice: list[str]
    probe: dict | None = None                # output error of re-merging on a probe input

    def format(self, max_rows: int | None = 20) -> str:
        lines = [self.energy.format(max_rows, rel=True)]
        if self.unchanged:
            lines.append(f"unchanged targeted layers (not stored): {len(self.unchanged)}")
        if self.full:
            lines.append("changed tensors outside the low-rank adapter "
                         "(stored=full delta kept in the adapter; otherwise reported only, NOT reproduced):")
            for c in sorted(self.full, key=lambda c: -c.rel_change)[: (max_rows or len(self.full))]:
                lines.append(f"  {c.path.replace('/', '.'):<46} {c.what:<18} rel change {c.rel_change:.3e}"
                             f"{'  stored' if c.stored else ''}")
            if max_rows and len(self.full) > max_rows:
                lines.append(f"  ... {len(self.full) - max_rows} more")
        else:
            lines.append("no changed tensors outside the targeted kernels")
        for name, lst in (("only in base", self.only_in_base), ("only in voice", self.only_in_voice)):
            if lst:
                lines.append(f"{name} (ignored): {len(lst)} tensors, e.g. {lst[0].replace('/', '.')}")
        if self.probe:
            p = self.probe
            lines.append(f"probe ({p['frames']} frames, noise off): max |voice - (base+adapter)| = "
                         f"{p['max_abs_err']:.3e} (relative {p['rel_err']:.3e}; voice vs base differ by "
                         f"{p['voice_vs_base']:.3e})")
        return "\n".join(lines)


def _what(path: str, leaf: str, kernels_adaptable: set[str]) -> str:
    mod = path.rsplit("/", 1)[0] if "/" in path else ""
    if leaf == "kernel":
        return "untargeted kernel" if mod in kernels_adaptable else "kernel"
    if leaf == "bias":
        return "bias"
    if leaf == "embedding":
        return "embedding"
    if leaf in ("gamma", "beta", "scale"):
        return "layernorm"
    if "emb_rel" in leaf:
        return "rel. attention emb"
    return leaf


def _rel(d, w) -> float:
    nw = float(np.linalg.norm(np.asarray(w, np.float64)))
    nd = float(np.linalg.norm(np.asarray(d, np.float64)))
    return nd / nw if nw > 0 else (0.0 if nd == 0 else float("inf"))


def extract(base_params: Mapping, voice_params: Mapping, *, rank: int, model,
            config_targets: LoRAConfig | str = "generator+prior", keep_full: bool = False,
            probe: bool = True, probe_frames: int = 24, seed: int = 0, family=RVC) -> tuple[Adapter, ExtractReport]:
    """Adapter (≤ ``rank`` per layer, scaling 1) that best approximates ``voice − base``.

    ``base_params`` / ``voice_params``: nested fp32 trees with weight norm folded (as from
    ``rvclora_convert.export.load_source(...).params``). ``model``: an NNX model of that
    architecture; it gives each layer's kind and the embedding tables, and (if ``probe``)
    renders a short random input through ``infer`` with noise off, with the voice weights
    and with base + extracted adapter; it is left unchanged. ``config_targets``: a
    :class:`LoRAConfig` (only its ``targets`` / ``exclude`` are used) or a preset name of
    ``family``. ``keep_full``: store a changed embedding table (RVC's speaker table
    ``emb_g``) as a full ``lora_delta`` (``train_embeddings``); every other tensor an
    adapter cannot hold (biases, LayerNorm, ``emb_rel_*``, untargeted kernels,
    ``emb_pitch``) is reported only. The family's training-only subtree (RVC: ``enc_q``)
    is ignored. The result carries no fingerprint or metadata (the caller knows the files)."""
    if int(rank) < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if model is None:
        raise ValueError("extract: needs the model (for its layer kinds and embedding tables)")
    sel = (LoRAConfig.from_preset(config_targets, family=family) if isinstance(config_targets, str)
           else config_targets)
    fb = {p: v for p, v in flatten(base_params).items() if not family.is_training_only(p)}
    fv = {p: v for p, v in flatten(voice_params).items() if not family.is_training_only(p)}
    for name, f in (("base", fb), ("voice", fv)):
        bad = [p for p in f if leaf_name(p) in lora.ADAPTER_LEAVES]
        if bad:
            raise ValueError(f"extract: the {name} params contain adapter leaves ({bad[0]}); merge them first")
    common = [p for p in fb if p in fv]
    for p in common:
        if np.shape(fb[p]) != np.shape(fv[p]):
            raise ValueError(f"extract: {p.replace('/', '.')} has shape {np.shape(fb[p])} in the base but "
                             f"{np.shape(fv[p])} in the voice (different architectures)")
    kinds = lora.layer_kinds(model)
    embeds = {p for p, _ in lora.iter_embeddings(model)}
    targets = sorted(p for p in kinds if sel.matches(p) and f"{p}/kernel" in fv and f"{p}/kernel" in fb)
    if not targets:
        raise ValueError(f"extract: targets {list(sel.targets)} match no adaptable layer of the model")
    flat: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    rows, unchanged, full = [], [], []
    tset = set(targets)
    stored_emb = []
    for p in common:
        mod, leaf = parent(p), leaf_name(p)
        wb, wv = np.asarray(fb[p], np.float64), np.asarray(fv[p], np.float64)
        d = wv - wb
        if leaf == "kernel" and mod in tset:
            if not np.any(d):
                unchanged.append(mod)
                continue
            kind = kinds[mod]
            a, b, S, k = _svd_factors(d, kind, rank)
            flat[f"{mod}/lora_a"], flat[f"{mod}/lora_b"] = a, b
            ranks[mod] = k
            tol = S[0] * max(layer_kind(kind).to_matrix(d).shape) * np.finfo(np.float32).eps
            rows.append(_energy_row(mod, kind, d.shape, S, k, int((S > tol).sum()), _rel(d, wb)))
            continue
        if not np.any(d):
            continue
        stored = bool(keep_full and leaf == "embedding" and mod in embeds)
        if stored:
            flat[f"{mod}/{DELTA_KEY}"] = d.astype(np.float32)
            stored_emb.append(mod)
        full.append(FullChange(p, _what(p, leaf, set(kinds)), _rel(d, wb), stored))
    report = ExtractReport(EnergyReport(rows), unchanged, full,
                           sorted(p for p in fb if p not in fv), sorted(p for p in fv if p not in fb))
    adapter = Adapter(unflatten(flat), _config_for(ranks, stored_emb, rank), kinds={p: kinds[p] for p in ranks})
    if probe:
        report.probe = probe_error(model, base_params, voice_params, adapter, frames=probe_frames, seed=seed)
    return adapter, report


def probe_error(model, base_params: Mapping, voice_params: Mapping, adapter: Adapter, *,
                frames: int = 24, seed: int = 0) -> dict:
    """Render one random input through ``model.infer`` (noise off, speaker 0) with the voice
    weights and with ``merge(base, adapter)``; ``model`` is restored afterwards."""
    import jax.numpy as jnp
    from flax import nnx

    from ..params import load_params

    state = nnx.state(model, nnx.Param)
    keys = flatten(nnx.to_pure_dict(state))
    saved = {p: np.asarray(v) for p, v in keys.items()}
    merged = (flatten(lora.merge(base_params, adapter.params, adapter.config, kinds=adapter.kinds))
              if flatten(adapter.params) else flatten(base_params))
    fb, fv = flatten(base_params), flatten(voice_params)
    rng = np.random.default_rng(seed)
    B, T = 1, int(frames)
    phone = rng.standard_normal((B, T, model.feature_dim)).astype(np.float32)
    pitch = rng.integers(1, 256, (B, T)).astype(np.int32)
    pitchf = (100 + 150 * rng.random((B, T))).astype(np.float32)
    args = (jnp.asarray(phone), jnp.asarray([T], jnp.int32), jnp.asarray(pitch), jnp.asarray(pitchf),
            jnp.asarray([0], jnp.int32))

    def render(src, fallback):
        load_params(model, {p: src.get(p, fallback.get(p, saved[p])) for p in keys})
        return np.asarray(model.infer(*args)[0], np.float64)

    try:
        y_voice = render(fv, fb)
        y_adapted = render(merged, fb)
        y_base = render(fb, fb)
    finally:
        load_params(model, saved)
    err = float(np.abs(y_voice - y_adapted).max())
    peak = float(np.abs(y_voice).max())
    return {"frames": T, "max_abs_err": err, "rel_err": err / peak if peak > 0 else err,
            "voice_vs_base": float(np.abs(y_voice - y_base).max()), "peak": peak}


# ---------------------------------------------------------------------------------
# Info
# ---------------------------------------------------------------------------------
def info(adapter: Adapter) -> str:
    """Config, base fingerprint, file size, per-module rank / scaling / ‖ΔW‖_F, embedding deltas."""
    c = adapter.config
    lines = [f"adapter: {adapter.directory}"]
    wpath = os.path.join(adapter.directory, ADAPTER_WEIGHTS) if adapter.directory else None
    if wpath and os.path.exists(wpath):
        lines.append(f"file: {ADAPTER_WEIGHTS} {os.path.getsize(wpath):,} bytes")
    lines.append(f"config: rank={c.rank} alpha={c.alpha:g} rslora={c.use_rslora} dropout={c.dropout:g} "
                 f"preset={c.preset} init={c.init}")
    lines.append(f"  targets: {list(c.targets)[:6]}{' ...' if len(c.targets) > 6 else ''}")
    if c.exclude:
        lines.append(f"  exclude: {list(c.exclude)}")
    if c.rank_pattern:
        lines.append(f"  rank_pattern: {len(c.rank_pattern)} entries; alpha_pattern: {len(c.alpha_pattern)} entries")
    if c.train_embeddings:
        lines.append(f"  train_embeddings: {list(c.train_embeddings)}")
    fp = adapter.base_fingerprint
    lines.append(f"base fingerprint: structure={fp.get('structure', '-')} weights={fp.get('weights', '-')}")
    if adapter.metadata:
        md = ", ".join(f"{k}={v}" for k, v in list(adapter.metadata.items())[:8])
        lines.append(f"metadata: {md[:300]}")
    layers = lora.adapter_layers(adapter.params)
    head = f"{'module':<40} {'kind':<15} {'kernel':<15} {'rank':>4} {'scaling':>8} {'|dW|_F':>10} {'params':>8}"
    lines += [head, "-" * len(head)]
    total, tn = 0, 0.0
    for path in sorted(layers):
        a, b = layers[path]
        kind = adapter.kinds[path]
        cls = layer_kind(kind)
        try:
            kshape = cls.kernel_shape_of(np.shape(a), np.shape(b))
        except ValueError as e:
            raise ValueError(f"{_weights_file(adapter)}: {path.replace('/', '.')}: {e}") from None
        r = cls.rank_of(np.shape(a))
        s = c.scaling_for(path, r)
        n = float(np.linalg.norm(cls.delta(a, b, s, xp=np)))
        size = int(np.size(a) + np.size(b))
        total += size
        tn += n * n
        lines.append(f"{path.replace('/', '.'):<40} {kind:<15} "
                     f"{str(list(kshape)):<15} {r:>4} {s:>8.4g} {n:>10.4e} "
                     f"{size:>8,}")
    lines.append("-" * len(head))
    lines.append(f"low-rank modules: {len(layers)}   params: {total:,}   total |dW|_F: {np.sqrt(tn):.4e}")
    for path, dv in sorted(lora.adapter_deltas(adapter.params).items()):
        dv = np.asarray(dv)
        rows = int(np.any(dv != 0, axis=tuple(range(1, dv.ndim))).sum()) if dv.ndim > 1 else int(np.any(dv))
        lines.append(f"embedding delta {path.replace('/', '.')}: shape {list(dv.shape)} "
                     f"|delta|_F {np.linalg.norm(dv.astype(np.float64)):.4e}, rows changed {rows}")
    return "\n".join(lines)


__all__ = ["mix", "compress", "extract", "info", "probe_error", "mixed_fingerprint",
           "EnergyReport", "ExtractReport", "LayerEnergy", "FullChange"]
