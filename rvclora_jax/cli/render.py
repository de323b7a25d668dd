"""``rvclora render``: WAVs from content features + f0 with a model (+ adapter).

The rendering itself is :mod:`rvclora_jax.render` (no files of models, no torch); this
module resolves MODEL (an RVC ``.pth``, a converted directory, or a training RUN_DIR) into a
merged synthesizer through ``rvclora_convert`` and writes the WAVs.
"""

from __future__ import annotations

import json
import os

from ..fileio import require_torch
from ..models.synthesizer import INFER_NOISE_SCALE


def load_model(path: str, adapter: str | None, scale: float):
    """MODEL.pth | converted dir | RUN_DIR (adapter dir whose metadata names its base) →
    ``(Synthesizer with the adapter merged in, its rvclora_convert Source)``."""
    require_torch("reading .pth files")
    from rvclora_convert.export import load_source, merge_adapter

    from .. import lora
    from ..params import load_params

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file or folder")
    cfg_path = os.path.join(path, adapters.ADAPTER_CONFIG) if os.path.isdir(path) else None
    if cfg_path and os.path.exists(cfg_path):
        if adapter is not None:
            raise ValueError(f"{path}: is a training run (an adapter directory); it brings its own adapter, "
                             f"so do not pass --adapter")
        with open(cfg_path) as fh:
            try:
                meta = json.load(fh).get("metadata", {})
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        base = meta.get("base")
        if not base:
            raise ValueError(f"{cfg_path}: the adapter's metadata names no base model; pass the base model "
                             f"and --adapter {path}")
        adapter, path = path, base
    src = load_source(path)
    if src.kind != "generator":
        raise ValueError(f"{src.path}: is a {src.kind}; render needs a generator (an RVC voice model)")
    if adapter is not None:
        merged, _ = merge_adapter(src, adapter, scale)
        load_params(src.model, merged)
    elif scale != 1.0:
        raise ValueError("--scale needs --adapter (or a RUN_DIR)")
    return src.model, src


def _cmd_render(args) -> int:
    from ..render import collect_inputs, render, write_wav

    model, _ = load_model(args.model, args.adapter, args.scale)
    inputs = collect_inputs(model, args.features, args.f0, f0_up_key=args.f0_up_key)
    if args.noise_scale < 0:
        raise ValueError(f"--noise-scale must be ≥ 0, got {args.noise_scale}")
    outs = render(model, inputs, sid=args.sid, noise_scale=args.noise_scale, seed=args.seed)
    sr = int(model.config.sr)
    if os.path.isdir(args.features):
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"{args.out}: --features is a folder, so --out must be a folder")
        paths = [os.path.join(args.out, x["name"] + ".wav") for x in inputs]
    else:
        out = args.out
        if os.path.isdir(out):
            out = os.path.join(out, inputs[0]["name"] + ".wav")
        paths = [out]
    for p, y in zip(paths, outs):
        write_wav(p, y, sr)
        print(f"{p}: {len(y) / sr:.2f} s at {sr} Hz")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "render", help="render audio from content features + f0 with a model (+ adapter)",
        description="Render WAVs from RVC content features (50 fps .npy, 3_feature256/768) and f0 in Hz "
                    "(100 fps .npy, 2b-f0nsf). MODEL is an RVC .pth, a converted directory, or a training "
                    "RUN_DIR (its adapter on the base named in its metadata). noise-scale 0 renders "
                    "deterministically (no prior noise, no NSF noise).")
    p.add_argument("model", metavar="MODEL", help="MODEL.pth | CONVERTED_DIR | RUN_DIR")
    p.add_argument("--adapter", help="adapter directory (or its adapter.safetensors) to merge into MODEL")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength (default 1)")
    p.add_argument("--features", required=True, metavar="F.npy|DIR",
                   help="content features [frames, dim] at 50 fps")
    p.add_argument("--f0", metavar="F0.npy|DIR", help="f0 in Hz at 100 fps (required for f0 models); "
                   "in a folder <name>.npy or <name>.wav.npy")
    p.add_argument("--out", required=True, metavar="OUT.wav|OUTDIR",
                   help="output WAV (folder for a feature folder)")
    p.add_argument("--sid", type=int, default=0, help="speaker id (row of emb_g, default 0)")
    p.add_argument("--f0-up-key", type=float, default=0.0, metavar="SEMITONES", help="pitch shift (default 0)")
    p.add_argument("--noise-scale", type=float, default=INFER_NOISE_SCALE,
                   help=f"prior noise scale (RVC: {INFER_NOISE_SCALE}); 0 = deterministic")
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    p.set_defaults(func=_cmd_render)
