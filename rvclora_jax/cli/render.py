"""``rvclora render``: WAVs from content features + f0 with a model (+ adapter).

The rendering itself is :mod:`rvclora_jax.render` (no files of models, no torch); this
module resolves MODEL (an RVC ``.pth``, a converted directory, or a training RUN_DIR) into a
merged synthesizer through ``rvclora_convert`` and writes the WAVs.
"""

from __future__ import annotations

import json
import os

from ..models.synthesizer import INFER_NOISE_SCALE
from . import _args as A
from ._outputs import add_overwrite, guard


def resolve_model(path: str, adapter: str | None) -> tuple[str, str | None]:
    """MODEL.pth | converted dir | RUN_DIR → ``(the model path, the adapter path or None)``:
    a RUN_DIR (an adapter directory) brings its adapter and names its base in its metadata."""
    from .. import adapters

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
    return path, adapter


def load_model(path: str, adapter: str | None, scale: float):
    """MODEL.pth | converted dir | RUN_DIR (adapter dir whose metadata names its base) →
    ``(Synthesizer with the adapter merged in, its rvclora_convert Source)``."""
    if adapter is None and scale != 1.0 and not _is_run_dir(path):
        raise ValueError("--scale needs --adapter (or a RUN_DIR)")
    return load_voice(path, [] if adapter is None else [(adapter, scale)], run_scale=scale)


def _is_run_dir(path: str) -> bool:
    from .. import adapters

    return os.path.isdir(path) and os.path.isfile(os.path.join(path, adapters.ADAPTER_CONFIG))


def load_voice(path: str, specs: list[tuple[str, float]], *, run_scale: float = 1.0):
    """MODEL (``.pth`` | converted dir | RUN_DIR) + weighted adapters → ``(Synthesizer with
    them merged in, its Source)``. One adapter merges at its weight (its scale); several are
    first mixed exactly (:func:`rvclora_jax.adapters.mix`, the rank-concatenating sum
    ``Σ w_j·ΔW_j`` that ``rvclora adapters mix`` writes), then merged at scale 1, so A/B-ing
    a blend needs no exported file. A RUN_DIR brings its own adapter (at ``run_scale``)."""
    from rvclora_convert.export import load_source, merge_adapter

    from .. import adapters
    from ..params import load_params

    # (a RUN_DIR given adapters too is refused there; a missing path too)
    path, adapter = resolve_model(path, specs[0][0] if specs else None)
    if adapter is not None and not specs:
        specs = [(adapter, run_scale)]
    src = load_source(path)
    if src.kind != "generator":
        raise ValueError(f"{src.path}: is a {src.kind}; this needs a generator (an RVC voice model)")
    if len(specs) == 1:
        merged, _ = merge_adapter(src, specs[0][0], specs[0][1])
        load_params(src.model, merged)
    elif specs:
        mixed = adapters.mix([adapters.load_adapter(p) for p, _ in specs], [w for _, w in specs])
        merged, _ = merge_adapter(src, mixed, 1.0)
        load_params(src.model, merged)
    return src.model, src


def _cmd_render(args) -> int:
    from .. import adapters

    if args.scale != 1.0 and args.adapter is None and not os.path.isfile(
            os.path.join(args.model, adapters.ADAPTER_CONFIG)):
        raise ValueError("--scale needs --adapter (or a RUN_DIR)")
    model_path, adapter = resolve_model(args.model, args.adapter)
    inputs = [model_path, args.features, args.f0]
    if adapter is not None:  # its files, not its folder: a RUN_DIR may take new renders
        d = adapter if os.path.isdir(adapter) else os.path.dirname(os.path.abspath(adapter))
        inputs += [os.path.join(d, adapters.ADAPTER_WEIGHTS), os.path.join(d, adapters.ADAPTER_CONFIG)]
    folder = os.path.isdir(args.features)
    if folder:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"{args.out}: --features is a folder, so --out must be a folder")
        g = guard(inputs, into=[args.out], overwrite=args.overwrite)
    elif os.path.isdir(args.out):
        g = guard(inputs, into=[args.out], overwrite=args.overwrite)  # the file's name comes from the features
    else:
        g = guard(inputs, files=[args.out], overwrite=args.overwrite)
    with g.cleanup_on_failure():
        return _render(args, g)


def _render(args, g) -> int:
    from ..render import collect_inputs, render, write_wav

    model, _ = load_model(args.model, args.adapter, args.scale)
    inputs = collect_inputs(model, args.features, args.f0, f0_up_key=args.f0_up_key)
    if os.path.isdir(args.features) or os.path.isdir(args.out):
        paths = [os.path.join(args.out, x["name"] + ".wav") for x in inputs]
        g.add_files(paths)  # before any rendering: no WAV replaces an input or, silently, an old WAV
    else:
        paths = [args.out]
    outs = render(model, inputs, sid=args.sid, noise_scale=args.noise_scale, seed=args.seed)
    sr = int(model.config.sr)
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
    p.add_argument("--scale", type=A.finite_float, default=1.0, help="adapter strength (default 1)")
    p.add_argument("--features", required=True, metavar="F.npy|DIR",
                   help="content features [frames, dim] at 50 fps")
    p.add_argument("--f0", metavar="F0.npy|DIR", help="f0 in Hz at 100 fps (required for f0 models); "
                   "in a folder <name>.npy or <name>.wav.npy")
    p.add_argument("--out", required=True, metavar="OUT.wav|OUTDIR",
                   help="output WAV (folder for a feature folder)")
    p.add_argument("--sid", type=A.non_negative_int, default=0, help="speaker id (row of emb_g, default 0)")
    p.add_argument("--f0-up-key", type=A.finite_float, default=0.0, metavar="SEMITONES", help="pitch shift (default 0)")
    p.add_argument("--noise-scale", type=A.non_negative_float, default=INFER_NOISE_SCALE,
                   help=f"prior noise scale (RVC: {INFER_NOISE_SCALE}); 0 = deterministic")
    p.add_argument("--seed", type=A.seed, default=0, help="random seed of the noise (default 0)")
    add_overwrite(p)
    p.set_defaults(func=_cmd_render)
