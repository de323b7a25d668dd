"""``rvclora inspect``, ``rvclora convert`` and ``rvclora export``: the RVC ``.pth`` side,
all through ``rvclora_convert`` (imported inside the handlers, the composition root)."""

from __future__ import annotations

import os
import shutil
import tempfile

from . import _args as A
from ._outputs import add_overwrite, guard


def describe_source(src) -> str:
    """One line naming what a loaded ``rvclora_convert.export.Source`` is."""
    return (f"{src.path}: {src.layout} {src.kind} {src.version}"
            + (f" {src.config.sr // 1000}k {'f0' if src.f0 else 'nof0'}" if src.config else ""))


def _json_safe(x):
    import math

    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _cmd_inspect(args) -> int:
    import json

    from rvclora_convert.pth import load_rvc_file

    f = load_rvc_file(args.file)
    info = {
        "path": f.path, "layout": f.layout, "kind": f.kind, "version": f.version, "f0": f.f0, "sr": f.sr,
        "params": f.num_params, "tensors": len(f.state_dict), "dtype": f.dtype,
        "weight_norm": f.weight_norm_style, "enc_q": f.has_enc_q, "optimizer": f.has_optimizer,
        "speakers": f.n_speakers, "config": f.config.to_list() if f.config else None,
        "metadata": f.metadata,
    }
    if args.json:
        # Strict JSON: a NaN or infinite number in a file's config or metadata is printed as a string.
        print(json.dumps(_json_safe(info), default=str, allow_nan=False))
        return 0
    w = max(len(k) for k in info)
    for k, v in info.items():
        if k == "metadata":
            for mk, mv in v.items():
                print(f"{'  ' + mk:<{w + 2}}  {mv}")
        else:
            print(f"{k:<{w}}    {v}")
    return 0


def _adapter_inputs(adapter: str | None) -> list[str]:
    """An adapter argument (a directory or its .safetensors) as the files it reads (not the
    directory: `export ... RUN/model.pth --adapter RUN --overwrite` re-exports a run)."""
    if not adapter:
        return []
    from ..adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    d = adapter if os.path.isdir(adapter) else os.path.dirname(os.path.abspath(adapter))
    return [os.path.join(d, ADAPTER_WEIGHTS), os.path.join(d, ADAPTER_CONFIG)]


def _cmd_convert(args) -> int:
    g = guard([args.file], dirs=[args.out_dir], overwrite=args.overwrite)
    with g.cleanup_on_failure():
        return _convert(args)


def _convert(args) -> int:
    from rvclora_convert.export import MODEL_JSON, PARAMS_DIR, convert_file

    out = os.path.abspath(args.out_dir)
    if os.path.isdir(out) and os.listdir(out):  # --overwrite (the guard refused it otherwise)
        # Converted beside it, then swapped in: the old directory goes only once the new one is complete.
        stage = tempfile.mkdtemp(prefix=".tmp-rvclora-", dir=os.path.dirname(out))
        old = stage + ".old"
        try:
            src = convert_file(args.file, os.path.join(stage, "new"))
            os.replace(out, old)
            os.replace(os.path.join(stage, "new"), out)
        finally:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(stage, ignore_errors=True)
    else:
        src = convert_file(args.file, args.out_dir)
    print(describe_source(src))
    print(f"wrote {args.out_dir}/{PARAMS_DIR} (Orbax, fp32) and {args.out_dir}/{MODEL_JSON}")
    return 0


def _cmd_export(args) -> int:
    if args.adapter is None and args.scale is not None:
        raise ValueError("--scale needs --adapter (without an adapter there is nothing to scale)")
    g = guard([args.source] + _adapter_inputs(args.adapter), files=[args.out], overwrite=args.overwrite)
    with g.cleanup_on_failure():
        return _export(args)


def _export(args) -> int:
    from rvclora_convert.export import export, load_source

    src = load_source(args.source)
    rep = export(src, args.out, adapter=args.adapter, scale=1.0 if args.scale is None else args.scale, layout=args.layout, fp32=args.fp32,
                 info=args.info)
    what = f"merged with {rep['adapter']} (scale {rep['scale']:g})" if rep["adapter"] else "no adapter"
    print(f"wrote {rep['path']}: {rep['layout']}, {rep['keys']} tensors, {rep['dtype']}, "
          f"{rep['bytes'] / 1e6:.1f} MB; {what}")
    return 0


def register(subparsers) -> None:
    ins = subparsers.add_parser("inspect", help="identify an RVC .pth file (layout, version, f0, rate, ...)")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=_cmd_inspect)

    cv = subparsers.add_parser("convert", help="RVC .pth -> Flax params (Orbax) + model.json")
    cv.add_argument("file")
    cv.add_argument("out_dir")
    add_overwrite(cv)
    cv.set_defaults(func=_cmd_convert)

    exp = subparsers.add_parser("export", help="write an RVC .pth (optionally merged with an adapter)")
    exp.add_argument("source", help="an RVC .pth file or a directory from `rvclora convert`")
    exp.add_argument("out", help="output .pth")
    exp.add_argument("--adapter",
                     help="adapter directory (adapter.safetensors + adapter_config.json) or the .safetensors")
    exp.add_argument("--scale", type=A.finite_float, default=None,
                     help="adapter strength (default 1; needs --adapter)")
    exp.add_argument("--layout", default="inference", choices=["inference", "train-checkpoint", "base"])
    exp.add_argument("--fp32", action="store_true", help="inference model in fp32 (default fp16, as RVC)")
    exp.add_argument("--info", default=None, help="text for the inference model's 'info' field")
    add_overwrite(exp)
    exp.set_defaults(func=_cmd_export)
