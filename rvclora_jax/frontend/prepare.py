"""From a folder of recordings to a training folder RVC, Applio and :mod:`rvclora_jax.data` read.

Life cycle of :func:`prepare` (``rvclora prepare`` is this plus the model loaders):

1. **preprocess** each recording of ``raw_dir`` (:func:`rvclora_jax.frontend.preprocess.preprocess_file`)
   into ``0_gt_wavs/{idx0}_{idx1}.wav`` (model rate) and ``1_16k_wavs/`` (16 kHz), idx0
   being the file's position in the sorted listing, as in RVC;
2. **pitch** (f0 models): ``pitch_fn(wav16k)`` → ``2b-f0nsf/<name>.wav.npy`` (Hz, float64) and
   its :func:`rvclora_jax.frontend.pitch.coarse` → ``2a_f0/<name>.wav.npy`` (int64);
3. **content features**: ``features_fn(wav16k)`` → ``3_feature768/<name>.npy`` (v2) or
   ``3_feature256/`` (v1), float32 ``[T, C]`` at 50 fps; a callable with a ``batch(list)``
   method (``ContentFeatures``) is given several pieces at once;
4. **filelist.txt**: ``wav|feature|coarse|f0nsf|speaker`` (nono: ``wav|feature|speaker``)
   with absolute paths, as RVC's trainer writes it, plus with ``mute=True`` RVC's two mute
   lines (3 s of silence, whose files are made here under ``mute/``, the features being
   ``features_fn`` of silence as in RVC's shipped ones).

``layout="applio"`` writes Applio's names instead (``sliced_audios/{sid}_{idx0}_{idx1}.wav``,
``sliced_audios_16k/``, ``f0/``, ``f0_voiced/``, ``extracted/``, ``model_info.json``).

Re-running skips what is already done, judged by content: a recording whose SHA-256 and
position are unchanged keeps its pieces; a piece keeps its pitch and features while its
16 kHz audio hash and the extractor's key (``pitch_key``/``features_key``: name the
method and the model file's hash) are unchanged. The record is
``.rvclora_prepare.json`` (rewritten atomically as work completes, so an interrupted run
continues where it stopped); changing a preprocessing setting (rate, ``per``, numbering,
layout, ...) redoes everything, and the outputs of a recording that changed or left the
folder are removed. Every file is written to a temporary name and renamed.

Bad input never stops the run and is never silent: each recording that cannot be read,
is empty, silent, or yields no usable piece is reported in one line naming it (``report``)
and skipped; so is a piece whose extractor output is unusable (NaN, wrong shape). Only
when nothing usable is left does :func:`prepare` raise (``ValueError`` naming ``raw_dir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Callable

import numpy as np

from ..data import LAYOUTS
from ..fileio import atomic_write
from ..utterance import FEATURE_DIM
from .audio_io import AUDIO_EXTENSIONS, DOWNMIX, AudioError, write_wav
from .pitch import coarse
from .preprocess import NUMBERING, PER, preprocess_file
from .slicer import RVC_SLICER, Slicer

MANIFEST = ".rvclora_prepare.json"
MANIFEST_VERSION = 1
SAMPLE_RATES = {"32k": 32000, "40k": 40000, "48k": 48000}
WAV16K = {"rvc": "1_16k_wavs", "applio": "sliced_audios_16k"}
HUBERT_WINDOW = 400  # a 16 kHz piece shorter than one HuBERT window has no content frame
MUTE_SECONDS = 3     # RVC's shipped mute clips: 3 s of zeros, 301 pitch frames, 149 feature frames

FeaturesFn = Callable[[np.ndarray], np.ndarray]


def parse_sr(sr) -> int:
    """``40000``, ``"40000"`` or ``"40k"`` → 40000 (RVC's rates: 32k, 40k, 48k)."""
    s = str(sr).strip().lower()
    rate = SAMPLE_RATES.get(s) or (int(s) if s.isdigit() else None)
    if rate not in SAMPLE_RATES.values():
        raise ValueError(f"sample rate must be one of {', '.join(SAMPLE_RATES)}, got {sr!r}")
    return rate


def content_frames(num_samples_16k: int) -> int:
    """RVC's number of 50 fps content frames for a 16 kHz clip (HuBERT's conv stack: window 400, hop 320)."""
    return max(0, (num_samples_16k - HUBERT_WINDOW) // 320 + 1)


@dataclasses.dataclass
class PrepareResult:
    out_dir: str
    layout: str
    items: list[str]            # piece names in the filelist, sorted
    skipped: list[str]          # one line per recording or piece that was skipped
    notes: list[str]            # pieces dropped by RVC's own rules (peak > 2.5, ...)
    done: dict                  # stage -> pieces computed this run
    reused: dict                # stage -> pieces kept from an earlier run
    filelist: str | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Paths:
    out: str
    gt: str
    w16: str
    coarse: str
    hz: str
    feat: str

    def of(self, name: str) -> dict:
        return {"gt": os.path.join(self.gt, name + ".wav"), "w16": os.path.join(self.w16, name + ".wav"),
                "coarse": os.path.join(self.coarse, name + ".wav.npy"),
                "hz": os.path.join(self.hz, name + ".wav.npy"),
                "feat": os.path.join(self.feat, name + ".npy")}


def _paths(out_dir: str, layout: str, version: str) -> _Paths:
    lay = LAYOUTS[layout]
    return _Paths(out_dir, os.path.join(out_dir, lay.wavs), os.path.join(out_dir, WAV16K[layout]),
                  os.path.join(out_dir, lay.pitch), os.path.join(out_dir, lay.pitchf),
                  lay.feature_dir(out_dir, version))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_array(x: np.ndarray) -> str:
    x = np.ascontiguousarray(x)
    return hashlib.sha256(str(x.dtype).encode() + str(x.shape).encode() + x.tobytes()).hexdigest()


def _save_npy(path: str, arr: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, arr, allow_pickle=False), suffix=".npy")


def _remove(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _default_report(msg: str) -> None:
    print(f"rvclora prepare: {msg}", file=sys.stderr, flush=True)


class _Manifest:
    """The record of finished work (see the module docs); saved atomically, at most every
    few seconds during a stage and always at the end of one."""

    def __init__(self, path: str):
        self.path = path
        self.data = {"version": MANIFEST_VERSION, "settings": None, "sources": {}, "segments": {}}
        self._saved = time.monotonic()
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    d = json.load(fh)
                if isinstance(d, dict) and d.get("version") == MANIFEST_VERSION:
                    self.data.update({k: d[k] for k in ("settings", "sources", "segments", "mute") if k in d})
            except (OSError, ValueError):
                pass  # unreadable record: everything is redone (and the outputs rewritten)
        self.existed = os.path.isfile(path)

    def save(self, *, force: bool = True) -> None:
        if force or time.monotonic() - self._saved > 5.0:
            text = json.dumps(self.data, indent=1, sort_keys=True)
            atomic_write(self.path, lambda tmp: open(tmp, "w", encoding="utf-8").write(text))
            self._saved = time.monotonic()


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="file" if desc == "preprocess" else "piece",
                file=sys.stderr, leave=False)


def _extract(todo: list[str], fn, read, batch_size: int, progress: bool, desc: str):
    """``(name, fn(wav16k), None)`` or ``(name, None, one-line error)`` for each piece, in
    order; a callable with a ``batch(list)`` method (the JAX extractors: bucketed, jitted)
    gets ``batch_size`` pieces at a time."""
    batched = hasattr(fn, "batch")
    step = batch_size if batched else 1
    bar = _progress(None, len(todo), desc, progress) if progress else None
    try:
        for s in range(0, len(todo), step):
            group = todo[s:s + step]
            wavs = [read(n) for n in group]
            try:
                outs = list(fn.batch(wavs)) if batched else [fn(wavs[0])]
                if len(outs) != len(group):
                    raise ValueError(f"{len(outs)} results for {len(group)} clips")
                results = [(n, o, None) for n, o in zip(group, outs)]
            except (ValueError, RuntimeError, FloatingPointError) as e:
                results = [(n, None, " ".join(str(e).split()) or type(e).__name__) for n in group]
            yield from results
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()


def _natural(name: str) -> tuple:
    """``0_2`` before ``0_10``: the numbers of a piece name as integers."""
    return tuple(int(t) if t.isdigit() else t for t in name.split("_"))


def _listing(raw_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(raw_dir):
        raise FileNotFoundError(f"{raw_dir}: recordings folder not found")
    # RVC numbers every entry of the sorted listing (idx0), usable or not: a fixed or
    # added-back file keeps its place, and so its names.
    return list(enumerate(sorted(os.listdir(raw_dir))))


def prepare(raw_dir: str, out_dir: str, *, sr=40000, version: str = "v2", f0: bool = True,
            f0_method: str | None = None, pitch_fn: Callable[[np.ndarray], np.ndarray] | None = None,
            pitch_key: str | None = None, features_fn: FeaturesFn, features_key: str | None = None,
            per: float = PER, numbering: str = "sequential", downmix: str = "rvc", layout: str = "rvc",
            speaker_id: int = 0, mute: bool = False, progress: bool = True,
            report: Callable[[str], None] | None = None, batch_size: int = 8) -> PrepareResult:
    """Build (or complete) the experiment folder ``out_dir`` from the recordings in ``raw_dir``.

    ``pitch_fn``: ``wav16k -> f0_hz`` at 100 fps (required when ``f0``); ``features_fn``:
    ``wav16k -> [T, 256|768]``. ``pitch_key``/``features_key`` identify them in the
    record (default: ``f0_method``/the callable's name): change them when the model file
    changes. See the module docs for the layout and the skipping rules."""
    t0 = time.time()
    sr = parse_sr(sr)
    if version not in FEATURE_DIM:
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    if layout not in WAV16K:
        raise ValueError(f"layout must be one of {', '.join(WAV16K)}, got {layout!r}")
    if numbering not in NUMBERING:
        raise ValueError(f"numbering must be one of {NUMBERING}, got {numbering!r}")
    if downmix not in DOWNMIX:
        raise ValueError(f"downmix must be one of {DOWNMIX}, got {downmix!r}")
    if f0 and pitch_fn is None:
        raise ValueError("f0 models need pitch_fn (e.g. rvclora_jax.frontend.pitch.pitch_method('harvest'))")
    if speaker_id < 0:
        raise ValueError(f"speaker_id must be >= 0, got {speaker_id}")
    report = report or _default_report
    kwargs = dict(sr=sr, version=version, f0=f0, pitch_fn=pitch_fn, features_fn=features_fn, per=per,
                  numbering=numbering, downmix=downmix, layout=layout, speaker_id=speaker_id, mute=mute,
                  progress=progress, report=report, batch_size=batch_size)
    pitch_key = pitch_key or f0_method or getattr(pitch_fn, "__name__", "pitch")
    features_key = features_key or getattr(features_fn, "__name__", type(features_fn).__name__)
    raw_dir, out_dir = os.path.abspath(raw_dir), os.path.abspath(out_dir)
    r, o = os.path.realpath(raw_dir), os.path.realpath(out_dir)
    if r == o or o.startswith(r.rstrip(os.sep) + os.sep) or r.startswith(o.rstrip(os.sep) + os.sep):
        raise ValueError(f"{out_dir}: the experiment folder and the recordings folder {raw_dir} "
                         "must not contain each other")
    entries = _listing(raw_dir)
    P = _paths(out_dir, layout, version)
    man = _Manifest(os.path.join(out_dir, MANIFEST))
    if not man.existed and os.path.isdir(P.gt) and os.listdir(P.gt):
        raise ValueError(f"{out_dir}: already holds an experiment that rvclora prepare did not make "
                         f"({P.gt} is not empty); choose a new folder")
    try:
        return _run(raw_dir, out_dir, entries, P, man, pitch_key=pitch_key, features_key=features_key,
                    t0=t0, **kwargs)
    finally:
        man.save()  # also when interrupted: the next run continues from here


def _run(raw_dir, out_dir, entries, P, man, *, sr, version, f0, pitch_fn, features_fn, pitch_key, features_key,
         per, numbering, downmix, layout, speaker_id, mute, progress, report, batch_size, t0) -> PrepareResult:
    dim = FEATURE_DIM[version]
    settings = {"sr": sr, "per": per, "numbering": numbering, "downmix": downmix, "layout": layout,
                "speaker_id": speaker_id if layout == "applio" else 0, "slicer": RVC_SLICER}
    srcs, segs = man.data["sources"], man.data["segments"]
    if man.data["settings"] != settings:  # another preprocessing: nothing can be kept
        for rec in srcs.values():
            for name in rec.get("segments", []):
                _remove(P.of(name).values())
        srcs.clear()
        segs.clear()
        man.data["settings"] = settings
    for d in (P.gt, P.w16, P.feat) + ((P.coarse, P.hz) if f0 else ()):
        os.makedirs(d, exist_ok=True)

    skipped: list[str] = []
    notes: list[str] = []
    done = {"preprocess": 0, "f0": 0, "features": 0}
    reused = {"preprocess": 0, "f0": 0, "features": 0}

    def skip(msg: str) -> None:
        skipped.append(msg)
        report(f"skipped {msg}")

    def forget(fname: str) -> None:  # remove a recording's outputs and record
        rec = srcs.pop(fname, None)
        for name in (rec or {}).get("segments", []):
            _remove(P.of(name).values())
            segs.pop(name, None)

    # ------------------------------------------------------------------ 1. preprocess
    position = {fname: idx0 for idx0, fname in entries}
    for fname in [f for f, rec in srcs.items() if position.get(f) != rec.get("idx0")]:
        # the recording left the folder, or moved in the listing (its names change): its
        # outputs go before any other recording can be written under those names
        forget(fname)
    slicer = Slicer(sr, **RVC_SLICER)
    prefix = f"{speaker_id}_" if layout == "applio" else ""
    for idx0, fname in _progress(entries, len(entries), "preprocess", progress):
        path = os.path.join(raw_dir, fname)
        if fname.startswith(".") and not fname.lower().endswith(AUDIO_EXTENSIONS):
            continue  # hidden non-audio files (.DS_Store, editors' swap files) are not recordings
        if os.path.isdir(path):
            skip(f"{path}: a folder (recordings must be files directly in {raw_dir})")
            forget(fname)
            continue
        try:
            digest = _sha256_file(path)
        except OSError as e:
            skip(f"{path}: cannot read ({e.strerror or e})")
            forget(fname)
            continue
        rec = srcs.get(fname)
        if (rec and rec.get("sha256") == digest and rec.get("idx0") == idx0
                and all(os.path.exists(p) for n in rec["segments"] for p in (P.of(n)["gt"], P.of(n)["w16"]))):
            reused["preprocess"] += len(rec["segments"])
            notes.extend(rec.get("notes", []))
            if rec.get("error"):
                skip(rec["error"])
            continue
        forget(fname)
        try:
            pre = preprocess_file(path, sr, per=per, numbering=numbering, downmix=downmix, slicer=slicer)
        except (AudioError, OSError, ValueError) as e:
            msg = " ".join(str(e).split())
            skip(msg if msg.startswith(path) else f"{path}: {msg}")
            # a bad file is recorded too, so an unchanged one is not decoded again
            srcs[fname] = {"sha256": digest, "idx0": idx0, "segments": [], "notes": [], "error": skipped[-1]}
            man.save(force=False)
            continue
        names: list[str] = []
        # recorded before the first write (no hash yet: never reused), so the pieces of a run
        # interrupted inside this recording are removed by the next run, not left orphaned
        srcs[fname] = {"sha256": None, "idx0": idx0, "segments": names, "notes": []}
        for seg in pre.segments:
            name = f"{prefix}{idx0}_{seg.idx1}"
            if len(seg.wav16k) < HUBERT_WINDOW:
                pre.notes.append(f"{path}: piece {name} is {len(seg.wav16k)} samples at 16 kHz, shorter than "
                                 f"one content frame ({HUBERT_WINDOW}); skipped")
                continue
            p = P.of(name)
            names.append(name)  # before the writes: an interrupted write is cleaned up next time
            write_wav(p["gt"], seg.wav, sr)
            write_wav(p["w16"], seg.wav16k, 16000)
            segs[name] = {"wav16k": _sha256_array(seg.wav16k), "source": fname}
        done["preprocess"] += len(names)
        notes.extend(pre.notes)
        srcs[fname] = {"sha256": digest, "idx0": idx0, "segments": names, "notes": pre.notes}
        if not names:
            skip(f"{path}: no piece long enough to keep")
            srcs[fname]["error"] = skipped[-1]
        man.save(force=False)
    man.save()
    names = sorted((n for rec in srcs.values() for n in rec["segments"]), key=_natural)
    if not names:
        raise ValueError(f"{raw_dir}: no usable recordings" + (f" ({len(skipped)} skipped)" if skipped else ""))

    def read16k(name: str) -> np.ndarray:
        from scipy.io import wavfile

        return wavfile.read(P.of(name)["w16"])[1].astype(np.float32, copy=False)

    # ------------------------------------------------------------------ 2. pitch
    failed: set[str] = set()
    if f0:
        todo = []
        for name in names:
            rec, p = segs[name], P.of(name)
            if rec.get("f0") == [pitch_key, rec["wav16k"]] and os.path.exists(p["coarse"]) and os.path.exists(p["hz"]):
                reused["f0"] += 1
            else:
                todo.append(name)
        for name, out, err in _extract(todo, pitch_fn, read16k, batch_size, progress, "f0"):
            p = P.of(name)
            if err is None:
                hz = np.asarray(out, np.float64).reshape(-1)
                if not np.all(np.isfinite(hz)) or np.any(hz < 0):
                    err = "f0 has NaN, inf or negative values"
            if err is not None:
                skip(f"{p['w16']}: f0 ({pitch_key}) failed: {err}")
                failed.add(name)
                continue
            _save_npy(p["hz"], hz)  # RVC writes Hz (float64) first, then the coarse pitch
            _save_npy(p["coarse"], coarse(hz))
            segs[name]["f0"] = [pitch_key, segs[name]["wav16k"]]
            done["f0"] += 1
            man.save(force=False)
        man.save()

    # ------------------------------------------------------------------ 3. content features
    todo = []
    for name in names:
        rec = segs[name]
        if rec.get("features") == [features_key, rec["wav16k"]] and os.path.exists(P.of(name)["feat"]):
            reused["features"] += 1
        elif name not in failed:
            todo.append(name)
    for name, ft, err in _extract(todo, features_fn, read16k, batch_size, progress, "features"):
        where = P.of(name)["w16"]
        if err is None:
            ft = np.asarray(ft)
            if ft.ndim != 2 or ft.shape[1] != dim or ft.shape[0] < 1:
                err = f"shape {tuple(ft.shape)}, expected [T, {dim}] ({version})"
            elif not np.all(np.isfinite(ft)):  # RVC skips these too ("contains nan")
                err = "NaN or inf values"
        if err is not None:
            skip(f"{where}: content features failed: {err}")
            failed.add(name)
            continue
        _save_npy(P.of(name)["feat"], ft.astype(np.float32))
        segs[name]["features"] = [features_key, segs[name]["wav16k"]]
        done["features"] += 1
        man.save(force=False)
    man.save()

    # ------------------------------------------------------------------ 4. filelist
    items = [n for n in names if n not in failed]
    if not items:
        raise ValueError(f"{raw_dir}: no usable pieces (pitch or feature extraction failed for all)")
    lines = []
    for n in items:
        p = P.of(n)
        fields = [p["gt"], p["feat"]] + ([p["coarse"], p["hz"]] if f0 else []) + [str(speaker_id)]
        lines.append("|".join(fields))
    if mute:
        lines += _mute_lines(out_dir, sr=sr, version=version, f0=f0, speaker_id=speaker_id,
                             features_fn=features_fn, features_key=features_key, man=man)
    filelist = os.path.join(out_dir, "filelist.txt")
    text = "\n".join(lines)  # RVC writes no final newline
    atomic_write(filelist, lambda tmp: open(tmp, "w", encoding="utf-8").write(text))
    if layout == "applio":
        duration = sum(os.path.getsize(P.of(n)["gt"]) for n in items)  # float32 wav: 4 bytes a sample
        info = {"embedder_model": features_key, "speakers_id": 1,
                "total_dataset_duration": round(max(0, duration - 44 * len(items)) / 4 / sr, 3)}
        atomic_write(os.path.join(out_dir, "model_info.json"),
                     lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(info, indent=1)))
    return PrepareResult(out_dir, layout, items, skipped, notes, done, reused, filelist, time.time() - t0)


def _mute_lines(out_dir: str, *, sr: int, version: str, f0: bool, speaker_id: int,
                features_fn: FeaturesFn, features_key: str, man: _Manifest) -> list[str]:
    """RVC's two mute lines, pointing at files made here under ``out_dir/mute/`` (RVC ships
    them in ``logs/mute/``: int16 zeros, ``features_fn`` of 3 s of 16 kHz silence, coarse
    pitch 1 (int32) and f0 0 (float64) for 301 frames)."""
    from scipy.io import wavfile

    root = os.path.join(out_dir, "mute")
    dim = FEATURE_DIM[version]
    wav = os.path.join(root, "0_gt_wavs", f"mute{sr // 1000}k.wav")
    feat = os.path.join(root, f"3_feature{dim}", "mute.npy")
    c = os.path.join(root, "2a_f0", "mute.wav.npy")
    hz = os.path.join(root, "2b-f0nsf", "mute.wav.npy")
    key = [features_key, version, sr]
    if man.data.get("mute") != key or not all(os.path.exists(p) for p in (wav, feat, c, hz)):
        silence = np.zeros(MUTE_SECONDS * sr, np.int16)
        atomic_write(wav, lambda tmp: wavfile.write(tmp, sr, silence), suffix=".wav")
        ft = np.asarray(features_fn(np.zeros(MUTE_SECONDS * 16000, np.float32)), np.float32)
        if ft.ndim != 2 or ft.shape[1] != dim:
            raise ValueError(f"content features of silence have shape {tuple(ft.shape)}, expected [T, {dim}]")
        _save_npy(feat, ft)
        frames = MUTE_SECONDS * 100 + 1
        _save_npy(c, np.ones(frames, np.int32))
        _save_npy(hz, np.zeros(frames, np.float64))
        man.data["mute"] = key
        man.save()
    fields = [wav, feat] + ([c, hz] if f0 else []) + [str(speaker_id)]
    return ["|".join(fields)] * 2


__all__ = ["prepare", "PrepareResult", "parse_sr", "content_frames", "MANIFEST", "SAMPLE_RATES", "WAV16K"]
