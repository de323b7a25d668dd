"""``rvclora prepare RAW_DIR --out EXP_DIR``: recordings → RVC training folder, in JAX.

This module composes the model loaders (``rvclora_convert``, torch-side, imported inside
the factories) with the JAX front end (:mod:`rvclora_jax.frontend`): the content-feature
extractor from ``--hubert`` and, for ``--f0-method rmvpe|fcpe``, the pitch tracker from
``--f0-model``. Importing it registers the rmvpe and fcpe factories in
:data:`rvclora_jax.frontend.pitch.PITCH_METHODS`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

from ..frontend.pitch import register_pitch_method
from . import _args as A

FCPE_ASSET = os.path.join("assets", "fcpe_c_v001.pt")  # inside the torchfcpe wheel (MIT)


def _file_key(path: str) -> str:
    """A short content hash of a model file, or of a Hugging Face folder's files."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    for f in files:
        h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _require_model(path: str | None, flag: str, what: str) -> str:
    if not path:
        raise ValueError(f"{what} needs {flag} FILE")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: {what} file not found ({flag})")
    return path


def _load(module: str, name: str):
    """``module.name``, or a one-line error when that part of the front end is not installed."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"{module}.{name} is not available ({e}); reinstall rvclora-jax") from None


def _rmvpe_factory(model_path: str | None = None):
    path = _require_model(model_path, "--f0-model", "the rmvpe f0 method (rmvpe.pt)")
    load_rmvpe = _load("rvclora_convert.rmvpe", "load_rmvpe")
    return _load("rvclora_jax.frontend.rmvpe", "RMVPEPitch")(load_rmvpe(path))


def fcpe_default_path() -> str | None:
    """The FCPE weights shipped in an installed ``torchfcpe`` (found without importing it)."""
    spec = importlib.util.find_spec("torchfcpe")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(folder, FCPE_ASSET)
        if os.path.isfile(p):
            return p
    return None


def _fcpe_factory(model_path: str | None = None):
    path = model_path or fcpe_default_path()
    path = _require_model(path, "--f0-model", "the fcpe f0 method (fcpe_c_v001.pt; or install torchfcpe)")
    load_fcpe = _load("rvclora_convert.fcpe", "load_fcpe")
    return _load("rvclora_jax.frontend.fcpe", "FCPEPitch")(load_fcpe(path))


register_pitch_method("rmvpe", _rmvpe_factory)
register_pitch_method("fcpe", _fcpe_factory)


def content_features(path: str, output: str):
    """``ContentFeatures`` of the HuBERT/ContentVec model at ``path`` (fairseq ``.pt`` or HF folder)."""
    _require_model(path, "--hubert", "content features (hubert_base.pt or a ContentVec folder)")
    load_hubert = _load("rvclora_convert.hubert", "load_hubert")
    return _load("rvclora_jax.frontend.hubert", "ContentFeatures")(load_hubert(path), output=output)


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def is_recordings_folder(path: str) -> bool:
    """True for a folder of recordings (for ``rvclora train --data``): a directory that is not
    an experiment (no ``0_gt_wavs/`` or ``sliced_audios/``) and holds at least one audio file."""
    from ..data import LAYOUTS
    from ..frontend.audio_io import AUDIO_EXTENSIONS

    if not os.path.isdir(path) or any(os.path.isdir(os.path.join(path, lay.wavs)) for lay in LAYOUTS.values()):
        return False
    return any(f.lower().endswith(AUDIO_EXTENSIONS) for f in os.listdir(path))


def run_prepare(raw_dir: str, out: str, *, hubert: str, sr="40k", version: str = "v2", f0: bool = True,
                f0_method: str = "rmvpe", f0_model: str | None = None, hubert_output: str | None = None,
                per: float = 3.7, numbering: str = "sequential", downmix: str = "rvc", layout: str = "rvc",
                speaker_id: int = 0, mute: bool = False, progress: bool = True, batch_size: int = 8,
                overwrite: bool = False):
    """Load the models named by the flags, then :func:`rvclora_jax.frontend.prepare.prepare`
    (the whole of ``rvclora prepare``; ``rvclora train --data RAW_DIR`` can call it into its
    run directory). Returns the :class:`~rvclora_jax.frontend.prepare.PrepareResult`."""
    from ..frontend.pitch import pitch_method
    from ..frontend.prepare import parse_sr, prepare

    sr = parse_sr(sr)
    raw, real_out = os.path.realpath(raw_dir), os.path.realpath(out)
    if not os.path.isdir(raw):
        raise FileNotFoundError(f"{raw_dir}: recordings folder not found")
    if _inside(real_out, raw) or _inside(raw, real_out):
        raise ValueError(f"{out}: the experiment folder and the recordings folder {raw_dir} "
                         "must not contain each other")
    # The shared output guard, before any work: the experiment folder is never a model file
    # or folder we read, and an existing non-empty folder is only written into when it is
    # an earlier prepare run (which this one continues) or with --overwrite.
    from ..frontend.prepare import MANIFEST
    from ._outputs import guard

    guard([raw_dir, hubert, f0_model], dirs=[out],
          overwrite=overwrite or os.path.isfile(os.path.join(out, MANIFEST)))
    output = hubert_output or version
    if output[:2] != version:
        raise ValueError(f"--hubert-output {output} gives {output[:2]} features, but --version is {version}")
    # Load the models (and fail on a wrong file) before any recording is touched.
    _require_model(hubert, "--hubert", "content features (hubert_base.pt or a ContentVec folder)")
    features_fn = content_features(hubert, output)
    features_key = f"hubert:{_file_key(hubert)}:{output}"
    pitch_fn = pitch_key = None
    if f0:
        pitch_fn = pitch_method(f0_method, f0_model)
        model = f0_model or (fcpe_default_path() if f0_method == "fcpe" else None)
        pitch_key = f0_method + (f":{_file_key(model)}" if model else "")
    return prepare(raw_dir, out, sr=sr, version=version, f0=f0, f0_method=f0_method, pitch_fn=pitch_fn,
                   pitch_key=pitch_key, features_fn=features_fn, features_key=features_key, per=per,
                   numbering=numbering, downmix=downmix, layout=layout, speaker_id=speaker_id, mute=mute,
                   progress=progress, batch_size=batch_size)


def _cmd_prepare(args) -> int:
    res = run_prepare(args.raw_dir, args.out, hubert=args.hubert, sr=args.sr, version=args.version,
                      f0=not args.no_f0, f0_method=args.f0_method, f0_model=args.f0_model,
                      hubert_output=args.hubert_output, per=args.per, numbering=args.numbering,
                      downmix=args.downmix, layout=args.layout, speaker_id=args.speaker_id, mute=args.mute,
                      progress=not args.no_progress, batch_size=args.batch_size, overwrite=args.overwrite)
    done = ", ".join(f"{k} {res.done[k]}" for k in res.done)
    kept = ", ".join(f"{k} {res.reused[k]}" for k in res.reused)
    print(f"{res.out_dir}: {len(res.items)} pieces ready in {res.seconds:.1f} s "
          f"(computed: {done}; kept from an earlier run: {kept})")
    if res.skipped:
        print(f"  {len(res.skipped)} skipped (listed above)")
    print(f"  train with: rvclora train --data {res.out_dir} --base {'' if args.no_f0 else 'f0'}G{args.sr}.pth "
          "--out RUN_DIR")
    return 0


def add_model_flags(p) -> None:
    """``--hubert``, ``--f0-method``, ``--f0-model`` (shared with ``rvclora train --data RAW_DIR``)."""
    p.add_argument("--f0-method", default="rmvpe", choices=["rmvpe", "fcpe", "harvest"])
    p.add_argument("--f0-model", help="rmvpe.pt (rmvpe), or fcpe weights (default: torchfcpe's own)")
    p.add_argument("--hubert", help="hubert_base.pt (RVC) or a ContentVec/HuBERT folder (HF)")
    p.add_argument("--hubert-output", choices=["v2", "v1", "v1-applio"], default=None,
                   help="v1-applio: Applio's v1 features (last layer through final_proj); default: --version")


def register(sub) -> None:
    p = sub.add_parser("prepare", help="recordings -> RVC training folder (slice, pitch, HuBERT features)",
                       description="Slice and resample a folder of recordings as RVC's preprocessing does, "
                                   "track pitch and extract content features (all in JAX), and write RVC's "
                                   "experiment layout. Re-running continues or updates an earlier run.")
    p.add_argument("raw_dir", metavar="RAW_DIR", help="folder of wav/flac/mp3/... recordings")
    p.add_argument("--out", required=True, help="experiment folder to create or continue")
    p.add_argument("--sr", default="40k", choices=["32k", "40k", "48k"], help="model sample rate (default 40k)")
    p.add_argument("--version", default="v2", choices=["v1", "v2"], help="v2: 768-d features, v1: 256-d")
    add_model_flags(p)
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty folder that is not an earlier prepare run "
                        "(never a model file or the recordings)")
    p.add_argument("--no-f0", action="store_true", help="a model without pitch (nono): no 2a_f0/2b-f0nsf")
    p.add_argument("--per", type=A.positive_float, default=3.7,
                   help="piece length in seconds (RVC: 3.7, or 3.0 on CPU-only machines)")
    p.add_argument("--numbering", choices=["sequential", "rvc"], default="sequential",
                   help="rvc: RVC's piece names, which skip an index and lose each slice's last piece")
    p.add_argument("--downmix", choices=["rvc", "mean"], default="rvc",
                   help="stereo to mono: rvc = (L+R)/sqrt(2) as ffmpeg gives RVC, mean = Applio's")
    p.add_argument("--layout", choices=["rvc", "applio"], default="rvc")
    p.add_argument("--speaker-id", type=A.non_negative_int, default=0)
    p.add_argument("--mute", action="store_true", help="add RVC's two mute (silence) lines to filelist.txt")
    p.add_argument("--batch-size", type=A.positive_int, default=8, help="pieces per feature-extraction batch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_prepare)


__all__ = ["register", "run_prepare", "is_recordings_folder", "add_model_flags", "content_features",
           "fcpe_default_path"]
