"""Converting RVC files to Flax (Orbax) and exporting (merged) models back to RVC ``.pth``.

``convert_file(FILE.pth, OUT_DIR)`` writes::

    OUT_DIR/model.json                      what the model is (version, f0, sr, RVC config
                                            list, layout, source key order, metadata)
    OUT_DIR/params/                         Flax params (Orbax, fp32, weight norm folded)
    OUT_DIR/weight_norm_source.safetensors  the source's original (g, v) pairs

``export(source, OUT.pth, adapter=...)`` merges an adapter (a directory, or an adapter
object already in memory) with the pure :func:`rvclora_jax.lora.merge` (in fp32) and
writes an RVC file. Weight norm is
re-factored the way RVC stores it (``weight_g``/``weight_v``, norm over every axis but 0
— per *input* channel for the ``ups`` ConvTranspose1d): ``v = W + ΔW``, ``g = ‖v‖``.
Layers the adapter did not change get their original ``(g, v)`` back bit for bit, so a
round trip without an adapter reproduces the input file's tensors exactly.

Loading a source never initialises a model at random: the structure comes from the
model family's :meth:`~rvclora_jax.families.Family.abstract` and is materialised with
the file's (or the directory's) weights.

Every write goes to a temporary name in the target directory and is renamed into place.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from flax import nnx

from . import torchfile
from .pth import LAYOUTS, RVCFile, RVCFileError, check_metadata, load_rvc_file, to_flax
from .state_dict import (LEGACY_G, LEGACY_V, NEW_G, NEW_V, flax_to_torch, fold_weight_norm)
from rvclora_jax import adapters, families, lora
from rvclora_jax.families import ModelSpec
from rvclora_jax.fileio import apply_umask, atomic_write, require_regular_file
from rvclora_jax.models.synthesizer import SynthConfig
from rvclora_jax.train import TrainConfig
from rvclora_jax.tree import flatten, unflatten

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
WN_SOURCE = "weight_norm_source.safetensors"
FORMAT = "rvclora-model"
EXPORT_LAYOUTS = ("inference", "train-checkpoint", "base")


@dataclasses.dataclass
class Source:
    """A base model ready to export: from an RVC file or a converted directory."""

    path: str
    kind: str
    version: str
    f0: bool | None
    config: SynthConfig | None
    layout: str
    model: nnx.Module
    params: dict
    key_order: list[str]              # legacy-style torch keys, in the source's order
    wn_source: dict[str, tuple[np.ndarray, np.ndarray]]  # prefix -> original (g, v)
    metadata: dict[str, Any]
    family: str = "rvc"               # the model family (rvclora_jax.families)

    @property
    def has_training_only(self) -> bool:
        """Whether the source holds the family's training-only subtree (RVC: enc_q)."""
        fam = families.get(self.family)
        return any(fam.is_training_only(k) for k in self.key_order)


def _legacy(key: str) -> str:
    return key.replace("." + NEW_G, "." + LEGACY_G).replace("." + NEW_V, "." + LEGACY_V)


def _wn_pairs(sd: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for k, v in sd.items():
        lk = _legacy(k)
        if lk.endswith("." + LEGACY_G):
            prefix = lk[: -len(LEGACY_G) - 1]
            vk = next(c for c in (prefix + "." + LEGACY_V, prefix + "." + NEW_V) if c in sd)
            out[prefix] = (np.asarray(v), np.asarray(sd[vk]))
    return out


def source_from_rvc_file(f: RVCFile, model: nnx.Module | None = None, params: dict | None = None) -> Source:
    """A :class:`Source` from a file already read; pass ``model, params`` if it was already
    converted with :func:`~rvclora_convert.pth.to_flax` (e.g. by ``rvclora train``), so the
    weights are not converted twice."""
    if (model is None) != (params is None):
        raise ValueError("give both model and params (from to_flax) or neither")
    if model is None:
        model, params = to_flax(f)
    return Source(path=f.path, kind=f.kind, version=f.version, f0=f.f0, config=f.config, layout=f.layout,
                  model=model, params=params, key_order=[_legacy(k) for k in f.state_dict],
                  wn_source=_wn_pairs(f.state_dict), metadata=dict(f.metadata), family=f.spec.family)


def source_from_file(path: str) -> Source:
    return source_from_rvc_file(load_rvc_file(path))


def _check_finite(out_path: str, tensors: dict) -> None:
    """Refuse, before anything is written, a tensor that is not finite in the dtype it is
    written in (fp16 overflows to inf above 65504: a huge adapter or ``--scale``)."""
    for k, t in tensors.items():
        a = np.asarray(t)
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            dt = a.dtype.name
            hint = " (float16 holds at most 65504: lower --scale or export with --fp32)" if dt == "float16" else ""
            raise ValueError(f"{out_path}: not written: {k} would hold non-finite values as {dt}{hint}")


def _no_space(path: str, e: OSError) -> OSError:
    """A write error as one line naming the file (``[Errno 28]`` alone names nothing)."""
    out = OSError(f"{path}: could not be written ({e.strerror or e}); nothing was left behind")
    out.errno = e.errno
    return out


def _atomic_write(path: str, write, *, suffix: str = "") -> str:
    try:
        return atomic_write(path, write, suffix=suffix)
    except OSError as e:
        raise _no_space(path, e) from None


def _atomic_dir(out_dir: str):
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir}: exists and is not an empty directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return out_dir, tempfile.mkdtemp(prefix=".tmp-rvclora-", dir=parent)


def convert_file(path: str, out_dir: str) -> Source:
    """``rvclora convert``: RVC file → Orbax params + ``model.json`` in ``out_dir``."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    src = source_from_file(path)
    for k, v in flatten(src.params).items():
        if not np.all(np.isfinite(np.asarray(v))):
            raise ValueError(f"{out_dir}: not written: {k.replace('/', '.')} is not finite")
    out_dir, tmp = _atomic_dir(out_dir)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), src.params)
        tensors = {}
        for prefix, (g, v) in src.wn_source.items():
            tensors[prefix + "." + LEGACY_G] = np.ascontiguousarray(g)
            tensors[prefix + "." + LEGACY_V] = np.ascontiguousarray(v)
        save_file(tensors, os.path.join(tmp, WN_SOURCE))
        meta = {
            "format": FORMAT, "format_version": 1, "kind": src.kind, "version": src.version,
            "f0": src.f0, "sr": src.config.sr if src.config else None,
            "config": src.config.to_list() if src.config else None,
            "layout": src.layout, "source": os.path.abspath(path), "key_order": src.key_order,
            "metadata": src.metadata, "has_enc_q": src.has_training_only, "family": src.family,
        }
        with open(os.path.join(tmp, MODEL_JSON), "w") as fh:
            json.dump(meta, fh, indent=1, allow_nan=False)
        apply_umask(tmp)  # mkdtemp made it 0700 (and safetensors 0600): give it what mkdir would
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _no_space(out_dir, e) from None
    except Exception as e:  # Orbax/tensorstore report failed writes (ENOSPC too) as their own types
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{out_dir}: could not be written ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}); nothing was left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return src


MODEL_JSON_MAX_BYTES = 16 << 20  # key order + config + metadata: a few hundred KB at most


class ModelDirError(ValueError):
    """A converted model directory cannot be used; the message starts with the path."""


def _no_json_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN/Infinity; convert never writes them


def _read_model_json(path: str) -> dict:
    """``model.json`` of a converted directory, every field checked (names the field)."""
    mpath = os.path.join(path, MODEL_JSON)
    if not os.path.lexists(mpath):
        raise FileNotFoundError(f"{path}: not a converted model directory (no {MODEL_JSON}); "
                                f"create one with `rvclora convert FILE.pth {path}`")
    require_regular_file(mpath, "model description", max_bytes=MODEL_JSON_MAX_BYTES)
    try:
        with open(mpath, "rb") as fh:
            meta = json.loads(fh.read().decode("utf-8"), parse_constant=_no_json_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelDirError(f"{mpath}: not valid JSON ({' '.join(str(e).split())[:200]})") from None

    def bad(field, want):
        return ModelDirError(f"{mpath}: field '{field}' = {json.dumps(meta.get(field))[:80]}: expected {want}")

    if not isinstance(meta, dict):
        raise ModelDirError(f"{mpath}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{mpath}: not an rvclora model description (format={meta.get('format')!r})")
    for field in ("kind", "version", "layout", "key_order", "metadata", "has_enc_q"):
        if field not in meta:
            raise ModelDirError(f"{mpath}: field '{field}' missing")
    family = meta.get("family", "rvc")  # directories written before families: RVC
    if not isinstance(family, str):
        raise bad("family", "a model family name")
    fam = families.get(family)
    if meta["kind"] not in ("generator", "discriminator"):
        raise bad("kind", "'generator' or 'discriminator'")
    if meta["version"] not in getattr(fam, "versions", (meta["version"],)) or not isinstance(meta["version"], str):
        raise bad("version", f"one of {list(getattr(fam, 'versions', ()))}")
    if meta["layout"] not in LAYOUTS:
        raise bad("layout", f"one of {list(LAYOUTS)}")
    if not isinstance(meta["key_order"], list) or not all(isinstance(k, str) for k in meta["key_order"]):
        raise bad("key_order", "a list of state-dict key names")
    if not isinstance(meta["metadata"], dict):
        raise bad("metadata", "an object")
    if not isinstance(meta["has_enc_q"], bool):
        raise bad("has_enc_q", "true or false")
    try:
        check_metadata(mpath, meta["metadata"])
    except RVCFileError as e:
        raise ModelDirError(str(e).replace("key '", "field 'metadata.", 1)) from None
    if meta["kind"] == "generator":
        if not isinstance(meta.get("f0"), bool):
            raise bad("f0", "true or false")
        if "config" not in meta:
            raise ModelDirError(f"{mpath}: field 'config' missing")
        try:
            cfg = SynthConfig.from_list(meta["config"])
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"{mpath}: field 'config': {' '.join(str(e).split())}") from None
        if meta.get("sr") != cfg.sr or isinstance(meta.get("sr"), bool):
            raise bad("sr", f"the config's rate ({cfg.sr})")
        if fam.name == "rvc":
            from rvclora_jax.families.rvc import check_config_rate
            try:
                check_config_rate(cfg, meta["version"], "config")
            except ValueError as e:
                raise ModelDirError(f"{mpath}: field {' '.join(str(e).split())}") from None
        meta["config"] = cfg
    else:
        if meta.get("config") is not None or meta.get("f0") is not None:
            raise ModelDirError(f"{mpath}: a discriminator has no 'config' or 'f0' (expected null)")
        sr = meta.get("sr")
        if sr is not None and (isinstance(sr, bool) or not isinstance(sr, int) or sr <= 0):
            raise bad("sr", "null or a sample rate in Hz")
        meta["config"] = None
    meta["family"] = fam.name
    return meta


def _read_wn_source(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The source's original weight-norm pairs (``weight_norm_source.safetensors``), checked."""
    from safetensors.numpy import load_file

    wpath = os.path.join(path, WN_SOURCE)
    if not os.path.lexists(wpath):
        return {}
    require_regular_file(wpath, "weight-norm source")
    try:
        wn = load_file(wpath)
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError)
        raise ModelDirError(f"{wpath}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    pairs = {}
    for k, g in wn.items():
        if k.endswith("." + LEGACY_G):
            prefix = k[: -len(LEGACY_G) - 1]
            vk = prefix + "." + LEGACY_V
            if vk not in wn:
                raise ModelDirError(f"{wpath}: {k} has no partner {vk}")
            v = wn[vk]
            for name, a in ((k, g), (vk, v)):
                if a.dtype.kind != "f" or a.ndim == 0 or not np.all(np.isfinite(a)):
                    raise ModelDirError(f"{wpath}: {name} must be a finite float tensor of at least one "
                                        f"dimension (got {a.dtype} {list(a.shape)})")
            if v.ndim < 2 or g.size != v.shape[0]:
                raise ModelDirError(f"{wpath}: {k} {list(g.shape)} does not fit {vk} {list(v.shape)}")
            pairs[prefix] = (g, v)
        elif not k.endswith("." + LEGACY_V) or k[: -len(LEGACY_V)] + LEGACY_G not in wn:
            raise ModelDirError(f"{wpath}: unexpected key {k} (only {LEGACY_G}/{LEGACY_V} pairs belong here)")
    return pairs


def source_from_dir(path: str) -> Source:
    import orbax.checkpoint as ocp

    meta = _read_model_json(path)
    cfg = meta["config"]
    fam = families.get(meta["family"])
    spec = ModelSpec(fam.name, meta["kind"], meta["version"], meta["f0"], cfg, meta["sr"], meta["has_enc_q"])
    pairs = _read_wn_source(path)
    # The structure (ShapeDtypeStructs) is Orbax's restore target; nothing is initialised.
    target = nnx.to_pure_dict(nnx.state(fam.abstract(spec), nnx.Param))
    pdir = os.path.join(os.path.abspath(path), PARAMS_DIR)
    if not os.path.isdir(pdir):
        raise ModelDirError(f"{pdir}: missing (the converted model's Orbax params)")
    try:
        with _quiet_asyncio(), ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(pdir, target)
    except Exception as e:  # Orbax / tensorstore raise many types; all mean "cannot read"
        raise ModelDirError(f"{pdir}: cannot read the Orbax params ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})") from None
    params = unflatten({k: np.asarray(v) for k, v in flatten(params).items()})
    for k, v in flatten(params).items():
        if v.dtype.kind != "f" or not np.all(np.isfinite(v)):
            raise ModelDirError(f"{pdir}: {k.replace('/', '.')} is not a finite float array")
    model = fam.materialize(spec, params, source=path)
    return Source(path=path, kind=meta["kind"], version=meta["version"], f0=meta["f0"], config=cfg,
                  layout=meta["layout"], model=model, params=params, key_order=list(meta["key_order"]),
                  wn_source=pairs, metadata=dict(meta["metadata"]), family=fam.name)


@contextlib.contextmanager
def _quiet_asyncio():
    """Orbax runs its reads on an asyncio loop; when a read fails, the loop's pending
    tasks are reported at exit ("Event loop is closed", "Task exception was never
    retrieved") on stderr, after the one-line error. Those reports say nothing the
    error does not, so asyncio's logger is silenced while Orbax works."""
    import logging

    log = logging.getLogger("asyncio")
    old = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(old)


def load_source(path: str) -> Source:
    """An RVC ``.pth`` file or a directory written by :func:`convert_file`."""
    if os.path.isdir(path):
        return source_from_dir(path)
    return source_from_file(path)


def merge_adapter(src: Source, adapter: Any, scale: float = 1.0) -> tuple[dict, adapters.Adapter]:
    """Base params + adapter → merged params (pure), after checking the adapter fits.

    ``adapter`` is an adapter directory (or its ``adapter.safetensors``), or an adapter
    already in memory: any object with ``.params``, ``.config``, ``.base_fingerprint``
    and ``.directory`` (:class:`rvclora_jax.adapters.Adapter`)."""
    if src.kind != "generator":
        raise ValueError(f"{src.path}: adapters apply to generators, this is a {src.kind}")
    ad = adapters.load_adapter(os.fspath(adapter)) if isinstance(adapter, (str, os.PathLike)) else adapter
    adapters.check_adapter_fits(src.model, ad, source=src.path)
    adapters.check_fingerprint(ad, src.params, source=src.path)
    merged = lora.merge(src.params, ad.params, ad.config, scale=scale, kinds=getattr(ad, "kinds", None))
    for k, v in flatten(merged).items():
        if not np.all(np.isfinite(np.asarray(v))):
            raise ValueError(f"{ad.directory}: merging gives non-finite values in {k.replace('/', '.')}")
    return merged, ad


def state_dict_for(src: Source, params: dict, *, keep_training_only: bool) -> dict[str, np.ndarray]:
    """RVC state dict (legacy weight-norm keys, source key order) for ``params`` in fp32."""
    sd = flax_to_torch(src.model, params, style="legacy")
    # Unchanged weight-normed layers: give back the source's own (g, v) pair.
    for prefix, (g, v) in src.wn_source.items():
        gk, vk = prefix + "." + LEGACY_G, prefix + "." + LEGACY_V
        if vk in sd and np.array_equal(sd[vk], fold_weight_norm(g.astype(np.float32), v.astype(np.float32))):
            sd[gk], sd[vk] = g.astype(np.float32), v.astype(np.float32)
    if not keep_training_only:
        fam = families.get(src.family)
        sd = {k: v for k, v in sd.items() if not fam.is_training_only(k)}
    order = [k for k in src.key_order if k in sd]
    order += [k for k in sd if k not in set(order)]
    return {k: sd[k] for k in order}


def _empty_adamw_state(n_params: int, lr: float, cfg: TrainConfig | None = None) -> dict:
    """A torch AdamW state dict with no moments yet (the trainer's hyper-parameters, which
    are RVC's), so RVC's ``load_checkpoint`` accepts the file and continues with fresh
    moments."""
    cfg = cfg or TrainConfig()
    return {"state": {}, "param_groups": [{
        "lr": lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
        "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
        "differentiable": False, "fused": None, "initial_lr": lr, "params": list(range(n_params))}]}


def export(src: Source, out_path: str, *, adapter: Any = None, scale: float = 1.0,
           layout: str = "inference", fp32: bool = False, info: str | None = None) -> dict:
    """Write ``src`` (merged with ``adapter`` if given: a path or an adapter object, see
    :func:`merge_adapter`) as an RVC ``.pth``; returns a report."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(EXPORT_LAYOUTS)}")
    if src.kind == "discriminator" and layout == "inference":
        raise ValueError(f"{src.path}: a discriminator cannot be exported as an inference model")
    params, ad = src.params, None
    if adapter is not None:
        params, ad = merge_adapter(src, adapter, scale)
    if layout != "inference" and src.kind == "generator" and not src.has_training_only:
        subtree = "/".join(families.get(src.family).training_only)
        raise ValueError(f"{src.path}: has no {subtree} (an inference model), so it cannot be written as a "
                         f"{layout} file, which RVC loads strictly with {subtree}")
    sd = state_dict_for(src, params, keep_training_only=layout != "inference")
    dtype = np.dtype(np.float16 if (layout == "inference" and not fp32) else np.float32)
    # a state dict is an OrderedDict in every file torch writes; RVC's loaders take either
    with np.errstate(over="ignore"):  # an fp16 overflow is refused by name below, not warned about
        tensors = collections.OrderedDict((k, np.asarray(v).astype(dtype)) for k, v in sd.items())
    md = src.metadata
    if layout == "inference":
        cfg = src.config.replace(segment_size=32)  # RVC's small models always store 32
        base_name = os.path.basename(src.path.rstrip("/"))
        ckpt = {
            "weight": tensors,
            "config": cfg.to_list(),
            "info": info or (f"rvclora-jax: {base_name}" + (f" + adapter {ad.directory} x{scale:g}" if ad else "")),
            "sr": families.get(src.family).sample_rate_name(cfg.sr),
            "f0": int(bool(src.f0)),
            "version": src.version,
        }
    elif layout == "train-checkpoint":
        lr = float(md.get("learning_rate", TrainConfig.lr))
        ckpt = {"model": tensors, "iteration": int(md.get("iteration", 1)),
                "optimizer": _empty_adamw_state(len(tensors), lr), "learning_rate": lr}
    else:
        ckpt = {"model": tensors}
    _check_finite(out_path, tensors)
    out_path = _atomic_write(out_path, lambda tmp: torchfile.save(ckpt, tmp), suffix=".pth")
    return {"path": out_path, "layout": layout, "dtype": dtype.name,
            "keys": len(tensors), "adapter": ad.directory if ad else None, "scale": scale,
            "bytes": os.path.getsize(out_path)}


def write_base_file(model: nnx.Module, path: str) -> str:
    """Write a synthesizer's weights as an RVC pretrained-style ``{"model": state_dict}`` file."""
    sd = collections.OrderedDict((k, np.array(v, np.float32)) for k, v in flax_to_torch(model).items())
    _check_finite(path, sd)
    return _atomic_write(path, lambda tmp: torchfile.save({"model": sd}, tmp), suffix=".pth")


__all__ = ["Source", "load_source", "source_from_rvc_file", "convert_file", "export", "merge_adapter",
           "state_dict_for", "write_base_file", "RVCFileError"]
