"""Loading HuBERT / ContentVec weights: fairseq ``hubert_base.pt`` and Hugging Face folders.

:func:`load_hubert` accepts

* a fairseq checkpoint (RVC WebUI's ``assets/hubert/hubert_base.pt``, ContentVec's
  ``checkpoint_best_legacy_500.pt``): a dict with ``model`` (the state dict) and
  ``cfg`` (fairseq ≥ 0.10: a plain dict) or ``args`` (older: an ``argparse.Namespace``),
  plus ``task_state`` (``fairseq.data.dictionary.Dictionary`` objects), optimizer
  history and so on;
* a Hugging Face ``HubertModel`` folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), the folder's ``config.json``, or its weight file, including
  Applio's ``HubertModelWithFinalProj`` (a ``final_proj`` Linear on top).

Nothing in a file is ever run. ``.pt``/``.bin`` files are read with
:func:`rvclora_convert.torchfile.load` (numpy only, a restricted unpickler like
``torch.load(weights_only=True)``'s). fairseq checkpoints also name Python classes
(``Dictionary``, ``Namespace``, OmegaConf containers) that such an unpickler refuses;
those from the known non-tensor namespaces (:data:`_INERT_PREFIXES`) are bound to
:class:`_Inert`, a plain record that only stores the constructor arguments and state it
is given. Any other global (``os.system``, ``builtins.eval``, ...) is refused, naming it. Config values are
read from these records as plain data; fairseq's ``conv_feature_layers`` string (a
Python expression fairseq ``eval``s) is parsed by a small literal evaluator instead.

fairseq's key names are mapped onto Hugging Face's (:func:`fairseq_to_hf`, the table of
transformers' converter); weight norm of the positional conv (``dim=2``, one g per
kernel tap) is folded here; the family (:mod:`rvclora_jax.families.hubert`) reads the
architecture from the shapes and the model is filled strictly. Every problem is a
:class:`HubertFileError` (an :class:`~rvclora_convert.pth.RVCFileError`) whose one-line
message starts with the path.
"""

from __future__ import annotations

import ast
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from . import torchfile
from .pth import RVCFileError, read_checkpoint
from .state_dict import StateDictError, flax_to_torch, torch_to_flax
from rvclora_jax import families
from rvclora_jax.families import DetectionError
from rvclora_jax.fileio import atomic_write, require_regular_file
from rvclora_jax.frontend.hubert import Hubert
from rvclora_jax.tree import TreeMismatch


class HubertFileError(RVCFileError):
    """A HuBERT/ContentVec file cannot be used; the one-line message starts with the path."""


def _fail(path: str, msg: str) -> HubertFileError:
    return HubertFileError(f"{path}: " + " ".join(str(msg).split()))


# --------------------------------------------------------------------------- restricted loading

# Namespaces of the non-tensor objects fairseq checkpoints hold. Their globals become
# inert records; anything else a pickle names stays refused.
_INERT_PREFIXES = ("fairseq.", "omegaconf.", "argparse.", "typing.", "enum.", "pathlib.", "numpy.",
                   "collections.defaultdict", "builtins.dict", "builtins.list", "builtins.tuple",
                   "builtins.set", "builtins.frozenset", "builtins.int", "builtins.float", "builtins.str",
                   "builtins.bool", "builtins.object", "builtins.NoneType")


class _Inert:
    """What a refused-but-harmless class becomes: it records its arguments and pickled
    state and runs nothing (no ``__init__`` logic, no ``__setstate__`` logic of the
    original class)."""

    _name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.__dict__["_args"] = args
        self.__dict__["_state"] = None
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def data(self) -> Any:
        """The record as plain data: a dict state (Namespace, most objects) when there is
        one, else the constructor arguments."""
        st = self._state
        if isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict)):
            st = {**(st[0] or {}), **(st[1] or {})}
        if isinstance(st, dict):
            return st
        return st if st is not None else list(self._args)

    def __repr__(self):
        return f"<inert {self._name}>"


def _inert_class(name: str) -> type:
    return type(f"Inert_{re.sub(r'[^0-9A-Za-z_]', '_', name)}", (_Inert,), {"_name": name})


_MAX_STUBS = 64  # distinct record classes one file may name (fairseq's name about a dozen)


def _restricted_load(path: str) -> Any:
    classes: dict[str, type] = {}

    def inert(name: str) -> type | None:  # one record class per name, a few dozen names at most
        if not name.startswith(_INERT_PREFIXES) or (name not in classes and len(classes) >= _MAX_STUBS):
            return None
        return classes.setdefault(name, _inert_class(name))
    return read_checkpoint(path, fail=_fail, inert=inert, kind="model file",
                           never="HuBERT weight files never need this")


def _plain(v: Any, depth: int = 0) -> Any:
    """Records and containers as plain dicts/lists/scalars (bounded depth)."""
    if depth > 20:
        return None
    if isinstance(v, _Inert):
        v = v.data()
    if isinstance(v, Mapping):
        out = {}
        for k, x in v.items():
            k = k.data() if isinstance(k, _Inert) else k
            if isinstance(k, (str, int)):
                out[k] = _plain(x, depth + 1)
        # OmegaConf DictConfig state keeps its items under '_content'
        if "_content" in out and isinstance(out["_content"], Mapping):
            return out["_content"]
        return out
    if isinstance(v, (list, tuple)):
        return [_plain(x, depth + 1) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return None


def _node_value(v: Any) -> Any:
    # OmegaConf value nodes pickle their value under '_val'
    if isinstance(v, Mapping) and "_val" in v:
        return v["_val"]
    return v


def _literal(expr: str) -> Any:
    """fairseq's ``conv_feature_layers`` (e.g. ``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``):
    lists and tuples of integers joined by ``+`` and repeated by ``* int``, evaluated
    without ``eval``."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            a, b = ev(node.left), ev(node.right)
            if isinstance(a, list) and isinstance(b, list):
                return a + b
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            a, b = ev(node.left), ev(node.right)
            if isinstance(a, list) and isinstance(b, int) and 0 <= b <= 64:
                return a * b
        raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")
    if len(expr) > 500:
        raise ValueError("expression too long")
    return ev(ast.parse(expr, mode="eval"))


# --------------------------------------------------------------------------- key maps

# fairseq (left) → Hugging Face (right): the table of transformers' hubert converter.
_FAIRSEQ_RULES = [
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"^feature_extractor\.conv_layers\.0\.2\.(weight|bias)$", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"^layer_norm\.(weight|bias)$", r"feature_projection.layer_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"feature_projection.projection.\1"),
    (r"^encoder\.pos_conv\.0\.(weight_g|weight_v|bias|weight)$", r"encoder.pos_conv_embed.conv.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)$", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"encoder.layers.\1.layer_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"encoder.layer_norm.\1"),
    (r"^final_proj\.(weight|bias)$", r"final_proj.\1"),
]
# Pretraining-only tensors: the mask embedding, the label embeddings, the target GLU.
_FAIRSEQ_DROP = re.compile(r"^(mask_emb|label_embs_concat|target_glu\..*)$")
_HF_DROP = re.compile(r"^(masked_spec_embed)$")


def fairseq_to_hf(sd: Mapping[str, Any], *, source: str = "state dict") -> dict[str, Any]:
    """fairseq HuBERT key names → Hugging Face's; pretraining-only tensors dropped. An
    unknown key is an error naming it (a ContentVec variant with speaker layers, a
    fine-tuned model's head, ...)."""
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if _FAIRSEQ_DROP.match(k):
            continue
        for rx, repl in _FAIRSEQ_RULES:
            new, n = re.subn(rx, repl, k)
            if n:
                break
        else:
            raise StateDictError(f"{source}: key {k} is not part of a fairseq HuBERT base model")
        if new in out:
            raise StateDictError(f"{source}: two keys map to {new}")
        out[new] = v
    return out


def fold_pos_conv(sd: Mapping[str, Any], *, source: str = "state dict") -> dict[str, Any]:
    """Fold the positional conv's weight norm (``dim=2``: ``g [1, 1, K]``, norm of ``v``
    over its two channel axes) into ``encoder.pos_conv_embed.conv.weight``; the other
    keys pass through."""
    out = dict(sd)
    base = "encoder.pos_conv_embed.conv."
    styles = [("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")]
    found = [(g, v) for g, v in styles if base + g in out or base + v in out]
    if len(found) > 1 or (found and base + "weight" in out):
        raise StateDictError(f"{source}: the positional conv's weight is given in more than one key style")
    if not found:
        return out
    gk, vk = base + found[0][0], base + found[0][1]
    if gk not in out or vk not in out:
        raise StateDictError(f"{source}: {gk if gk not in out else vk} missing (weight norm needs both g and v)")
    g, v = np.asarray(out.pop(gk), np.float64), np.asarray(out.pop(vk), np.float64)
    if v.ndim != 3 or g.size != v.shape[2]:
        raise StateDictError(f"{source}: {gk} has shape {list(g.shape)} and {vk} {list(v.shape)}; expected "
                             f"g [1, 1, K] for v [out, in/groups, K] (weight norm over dim 2)")
    norm = np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))
    out[base + "weight"] = (g.reshape(1, 1, -1) * v / norm).astype(np.float32)
    return out


def _to_numpy(path: str, where: str, sd: Any) -> dict[str, np.ndarray]:
    if not isinstance(sd, Mapping):
        raise _fail(path, f"'{where}' should be a state dict (str -> tensor), got {torchfile.type_name(sd)}")
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise _fail(path, f"'{where}' has a non-string key {k!r}")
        if isinstance(v, torchfile.BadTensor):  # reaches past its stored bytes: nothing was allocated
            raise _fail(path, f"{k} {v.reason}")
        if not isinstance(v, np.ndarray):
            raise _fail(path, f"{k}: expected a tensor in '{where}', got {torchfile.type_name(v)}")
        a = v.astype(np.float32) if v.dtype.name == "bfloat16" else v  # numpy has no bfloat16 maths
        if a.dtype.kind != "f":
            raise _fail(path, f"{k} is a {a.dtype} array; HuBERT weights are floats")
        if not np.all(np.isfinite(a)):
            raise _fail(path, f"{k} contains NaN or inf values")
        out[k] = a
    if not out:
        raise _fail(path, f"'{where}' is an empty state dict")
    return out


# --------------------------------------------------------------------------- file kinds

_NOT_HUBERT_HINT = ("an RVC voice model (.pth with 'weight' + 'config'), not a HuBERT/ContentVec model; "
                    "pass hubert_base.pt or a Hugging Face HubertModel folder")


def _fairseq_claims(path: str, ckpt: Mapping[str, Any]) -> dict[str, Any]:
    cfg = _plain(ckpt.get("cfg"))
    model_cfg, task_cfg = {}, {}
    if isinstance(cfg, Mapping):
        model_cfg = _plain(cfg.get("model")) or {}
        task_cfg = _plain(cfg.get("task")) or {}
    if not model_cfg:
        args = _plain(ckpt.get("args"))
        if isinstance(args, Mapping):
            model_cfg = task_cfg = args
    get = lambda d, k: _node_value(d.get(k)) if isinstance(d, Mapping) else None  # noqa: E731
    claims: dict[str, Any] = {}
    layers = get(model_cfg, "conv_feature_layers")
    if layers is not None:
        try:
            conv = _literal(layers) if isinstance(layers, str) else layers
            claims["conv_layers"] = [tuple(int(x) for x in c) for c in conv]
            if any(len(c) != 3 for c in claims["conv_layers"]):
                raise ValueError("each conv needs (dim, kernel, stride)")
        except (ValueError, TypeError, SyntaxError) as e:
            raise _fail(path, f"cfg.model.conv_feature_layers {str(layers)[:80]!r} is not a list of "
                              f"(dim, kernel, stride): {e}") from None
    mode = get(model_cfg, "extractor_mode")
    if mode is not None:
        claims["extractor"] = {"default": "group"}.get(mode, mode)
    for src, dst in (("layer_norm_first", "layer_norm_first"), ("encoder_attention_heads", "num_heads")):
        v = get(model_cfg, src)
        if v is not None:
            claims[dst] = v
    norm = get(task_cfg, "normalize")
    if norm is not None:
        claims["normalize_waveform"] = bool(norm)
    return claims


def _hf_claims(path: str, config: Mapping[str, Any]) -> dict[str, Any]:
    mt = config.get("model_type")
    if mt is not None and mt != "hubert":
        raise _fail(path, f"config.json has model_type {mt!r}; a HuBERT/ContentVec model ('hubert') was expected")
    claims: dict[str, Any] = {}
    try:
        if "conv_dim" in config or "conv_kernel" in config or "conv_stride" in config:
            dims, ks, ss = config.get("conv_dim"), config.get("conv_kernel"), config.get("conv_stride")
            if not (isinstance(dims, list) and isinstance(ks, list) and isinstance(ss, list)
                    and len(dims) == len(ks) == len(ss)):
                raise ValueError("conv_dim, conv_kernel and conv_stride must be lists of one length")
            claims["conv_layers"] = [(int(d), int(k), int(s)) for d, k, s in zip(dims, ks, ss)]
        if "num_attention_heads" in config:
            claims["num_heads"] = int(config["num_attention_heads"])
        if "layer_norm_eps" in config:
            claims["layer_norm_eps"] = float(config["layer_norm_eps"])
    except (TypeError, ValueError) as e:
        raise _fail(path, f"config.json: {e}") from None
    if config.get("feat_extract_norm", "group") != "group":
        claims["extractor"] = config["feat_extract_norm"]
    if config.get("do_stable_layer_norm", False):
        claims["layer_norm_first"] = True
    if config.get("feat_proj_layer_norm", True) is not True:
        raise _fail(path, "config.json has feat_proj_layer_norm false; HuBERT base has a LayerNorm there")
    for k, want in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu")):
        if config.get(k, want) != want:
            raise _fail(path, f"config.json has {k} {config[k]!r}; only 'gelu' (hubert-base) is supported")
    return claims


def _hf_weights(path: str, folder: str) -> tuple[str, dict[str, np.ndarray]]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return p, _read_weight_file(p)
    raise _fail(folder, "no model.safetensors or pytorch_model.bin in the Hugging Face model folder")


def _read_weight_file(p: str) -> dict[str, np.ndarray]:
    _check_file(p)
    if p.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            sd = load_file(p)
        except (SafetensorError, OSError, ValueError) as e:
            raise _fail(p, f"not a readable safetensors file ({' '.join(str(e).split())[:120]})") from None
        return _to_numpy(p, "state dict", {k: v.astype(np.float32) if v.dtype == np.float16 else v
                                           for k, v in sd.items()})
    obj = _restricted_load(p)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return _to_numpy(p, "state dict", obj)


def _check_file(p: str) -> None:
    try:
        require_regular_file(p, "model file")
    except (OSError, ValueError) as e:
        raise HubertFileError(" ".join(str(e).split())) from None
    if os.path.getsize(p) == 0:
        raise _fail(p, "file is empty")


def _read_config(p: str) -> dict[str, Any]:
    try:
        require_regular_file(p, "config.json", max_bytes=1 << 20)
        with open(p, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise HubertFileError(" ".join(str(e).split()) if str(e).startswith(p) else
                              f"{p}: not a readable JSON config ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(cfg, dict):
        raise _fail(p, f"config.json should hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _strip_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    # HubertForCTC / ForSequenceClassification keep the encoder under "hubert."
    if sd and all(k.startswith("hubert.") or not k.startswith(("feature_extractor.", "encoder.")) for k in sd) \
            and any(k.startswith("hubert.") for k in sd):
        return {k[len("hubert."):]: v for k, v in sd.items() if k.startswith("hubert.")}
    return sd


def read_hubert_state_dict(path: str | os.PathLike) -> tuple[str, str, dict[str, np.ndarray], dict[str, Any]]:
    """``(source, layout, state dict in HF names with the positional conv folded, claims)``
    of a HuBERT file or folder (see the module docstring). Raises :class:`HubertFileError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _fail(path, "file not found")
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise _fail(path, "folder has no config.json (expected a Hugging Face HubertModel folder)")
        src, sd = _hf_weights(path, path)
        return src, "hf", sd, _hf_claims(cfg_path, _read_config(cfg_path))
    if os.path.basename(path) == "config.json":
        folder = os.path.dirname(path) or "."
        src, sd = _hf_weights(folder, folder)
        return src, "hf", sd, _hf_claims(path, _read_config(path))
    _check_file(path)
    folder = os.path.dirname(path) or "."
    if path.endswith(".safetensors"):
        sd = _read_weight_file(path)
        cfg_path = os.path.join(folder, "config.json")
        claims = _hf_claims(cfg_path, _read_config(cfg_path)) if os.path.exists(cfg_path) else {}
        return path, "hf", sd, claims
    obj = _restricted_load(path)
    if not isinstance(obj, Mapping):
        raise _fail(path, f"top level is a {torchfile.type_name(obj)}, expected a fairseq checkpoint dict with 'model' "
                          f"or a Hugging Face state dict")
    if "weight" in obj and "config" in obj:
        raise _fail(path, f"is {_NOT_HUBERT_HINT}")
    if "model" in obj and isinstance(obj["model"], Mapping):
        sd = _to_numpy(path, "model", obj["model"])
        if "enc_p.emb_phone.weight" in sd or "emb_g.weight" in sd or any(k.startswith("discriminators.") for k in sd):
            raise _fail(path, "is an RVC synthesizer/discriminator checkpoint, not a HuBERT/ContentVec model")
        if any(k.startswith(("encoder.pos_conv.0.", "post_extract_proj.")) for k in sd):
            try:
                sd = fairseq_to_hf(sd, source=path)
            except StateDictError as e:
                raise HubertFileError(" ".join(str(e).split())) from None
            return path, "fairseq", sd, _fairseq_claims(path, obj)
        return path, "hf", _strip_prefix(sd), {}
    if all(isinstance(k, str) for k in obj) and any(k.startswith("feature_extractor.") for k in obj):
        sd = _strip_prefix(_to_numpy(path, "state dict", obj))  # a bare HF state dict (pytorch_model.bin)
        cfg_path = os.path.join(folder, "config.json")
        claims = _hf_claims(cfg_path, _read_config(cfg_path)) if os.path.exists(cfg_path) else {}
        return path, "hf", sd, claims
    keys = sorted(map(str, obj))[:8]
    raise _fail(path, f"not a HuBERT/ContentVec checkpoint: top-level keys {keys}; expected a fairseq "
                      f"checkpoint ('model' + 'cfg') or a Hugging Face HubertModel state dict")


def load_hubert(path: str | os.PathLike, *, dtype=None, param_dtype=None) -> Hubert:
    """The :class:`~rvclora_jax.frontend.hubert.Hubert` of a fairseq ``hubert_base.pt`` or a
    Hugging Face HubertModel folder / ``config.json`` / weight file (module docstring),
    holding its weights (strict: every parameter given, nothing unknown)."""
    src, layout, sd, claims = read_hubert_state_dict(path)
    sd = {k: v for k, v in sd.items() if not _HF_DROP.match(k)}
    family = families.get("hubert")
    try:
        sd = fold_pos_conv(sd, source=src)
        spec = family.detect(sd, claims, layout=layout, where="model" if layout == "fairseq" else "state dict")
        params = torch_to_flax(family.abstract(spec), sd, source=src)
        return family.materialize(spec, params, source=src, dtype=dtype, param_dtype=param_dtype)
    except DetectionError as e:
        raise _fail(src, str(e)) from None
    except (StateDictError, TreeMismatch) as e:
        msg = " ".join(str(e).split())
        raise HubertFileError(msg if msg.startswith(src) else f"{src}: {msg}") from None


__all__ = ["HubertFileError", "load_hubert", "save_hf_folder", "read_hubert_state_dict", "fairseq_to_hf", "fold_pos_conv"]


def save_hf_folder(model: Hubert, folder: str | os.PathLike, *, dtype=np.float32) -> str:
    """Write ``model`` as a Hugging Face HubertModel folder (``config.json`` +
    ``model.safetensors``, HF's key names) that :func:`load_hubert` (and transformers) read.
    Used for the built-in example's random-weight stand-in (``dtype=float16`` halves its
    size; the loader reads it back in float32); each file goes to a temporary path first,
    then is renamed."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    cfg = model.config
    sd = {k: np.ascontiguousarray(v, dtype) for k, v in flax_to_torch(model).items()}
    hf = {"model_type": "hubert", "architectures": ["HubertModel"],
          "conv_dim": [c for c, _, _ in cfg.conv_layers], "conv_kernel": [k for _, k, _ in cfg.conv_layers],
          "conv_stride": [s for _, _, s in cfg.conv_layers], "conv_bias": cfg.conv_bias,
          "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
          "num_conv_pos_embeddings": cfg.conv_pos, "num_conv_pos_embedding_groups": cfg.conv_pos_groups,
          "layer_norm_eps": cfg.layer_norm_eps, "feat_extract_norm": "group", "do_stable_layer_norm": False,
          "hidden_act": "gelu", "feat_extract_activation": "gelu"}
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(sd, tmp), suffix=".safetensors")

    def write_config(tmp):
        with open(tmp, "w") as fh:
            json.dump(hf, fh, indent=1)
    atomic_write(os.path.join(folder, "config.json"), write_config, suffix=".json")
    return folder
