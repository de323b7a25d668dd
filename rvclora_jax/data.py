"""RVC training data: experiment scanning, RVC's per-item loader, fixed-shape batches.

Layouts (:data:`LAYOUTS`)
-------------------------
``"rvc"`` (``logs/<exp>/``)::

    0_gt_wavs/<name>.wav            float32 mono wav at the model's sample rate
    2a_f0/<name>.wav.npy            coarse pitch, int 1..255, 100 fps      (f0 models)
    2b-f0nsf/<name>.wav.npy         f0 in Hz, float, 0 = unvoiced, 100 fps (f0 models)
    3_feature256/<name>.npy         [T, 256] float32 at 50 fps (v1)
    3_feature768/<name>.npy         [T, 768] float32 at 50 fps (v2)
    filelist.txt                    optional: wav|feature|coarse|f0nsf|spk  (nono: wav|feature|spk)

``"applio"``: ``sliced_audios/``, ``f0/`` (coarse), ``f0_voiced/`` (Hz), ``extracted/``
(768-d), ``model_info.json``; the speaker id is parsed from the ``{sid}_{idx0}_{idx1}``
stem. Pitch files may be named ``<name>.wav.npy`` (RVC, Applio) or ``<name>.npy``
(:func:`rvclora_jax.utterance.pitch_file`). A new layout is one more :class:`Layout` row.

Policies
--------
* **filelist.txt** is used when present (``use_filelist=True``). Paths may be absolute
  or relative; relative paths are resolved against the experiment folder. An absolute
  path that does not exist is re-rooted onto the experiment folder by its last two
  components (``0_gt_wavs/x.wav``), so a moved experiment still loads. RVC's two
  appended "mute" lines point at ``logs/mute/...``: they are used when their files
  exist and skipped with a warning when they do not (the mute assets are not shipped).
* Without a filelist, every wav in the wav folder is an item. A wav whose feature or
  pitch file is missing raises ``FileNotFoundError`` naming the missing file (RVC would
  silently drop it); ``strict=False`` skips such wavs with a warning instead. Extra
  feature/pitch files without a wav are ignored (like RVC's name intersection).
* Feature files must be ``[T, 256]`` (v1) or ``[T, 768]`` (v2), wavs mono at ``sr``;
  otherwise ``ValueError`` naming the file. An empty folder raises ``ValueError`` naming it.
* int16/int32/uint8 wavs are scaled to [-1, 1] (÷32768, ÷2³¹, (x−128)/128). RVC does
  *not* divide; that only matters for non-zero integer files (its int16 mute file is
  all zeros, so it loads identically). float wavs are used as stored, like RVC.

Batches
-------
Items are loaded once into memory (specs computed up front in a few batched, jitted
JAX calls, optionally cached on disk). Each batch pads to a length ``T`` taken from a
small bucket set (default multiples of 100 frames up to 900), so a jitted train step
compiles at most ``len(buckets)`` times. See :class:`Batches`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import threading
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from scipy.io import wavfile

from .audio import MelConfig
from .fileio import require_regular_file
from .utterance import (FEATURE_DIM, collate, cut, load_coarse_pitch, load_f0, load_features,
                        pitch_file, repeat_features)

log = logging.getLogger(__name__)

MAX_FRAMES = 900  # RVC's loader cuts phone/pitch to 900 frames (DistributedBucketSampler's max)
DEFAULT_BUCKETS = (100, 200, 300, 400, 500, 600, 700, 800, 900)

def example_dir() -> str:
    """Path of the built-in example experiment (RVC layout, v2, 40 kHz, f0, speaker 0)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "example_data")


# --------------------------------------------------------------------------- scanning


@dataclasses.dataclass(frozen=True)
class Item:
    """One training utterance: file paths plus what the scan learned from headers."""

    wav: str
    feature: str
    pitch: str | None  # coarse pitch (.npy, int 1..255), None for nono models
    pitchf: str | None  # f0 in Hz (.npy), None for nono models
    sid: int
    sr: int
    num_samples: int
    feature_frames: int

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.wav))[0]


def _speaker_zero(name: str, wav: str) -> int:
    return 0  # RVC's preprocessing writes one speaker per experiment, id 0


def _speaker_from_stem(name: str, wav: str) -> int:
    try:
        return int(name.split("_")[0])
    except ValueError:
        raise ValueError(f"{wav}: cannot parse the speaker id from the stem "
                         "(expected {sid}_{idx0}_{idx1})") from None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one experiment layout keeps its files (folders relative to the experiment).

    Every utterance ``<name>`` has ``{wavs}/<name>.wav``, ``{features}/<name>.npy`` (the
    folder name may depend on the feature width, ``{dim}``) and, for f0 models,
    ``{pitch}/<name>.wav.npy`` (coarse) and ``{pitchf}/<name>.wav.npy`` (Hz)."""

    title: str
    wavs: str
    features: str
    pitch: str
    pitchf: str
    speaker: Callable[[str, str], int]  # (name, wav path) -> speaker id

    def feature_dir(self, exp_dir: str, version: str) -> str:
        return os.path.join(exp_dir, self.features.format(dim=FEATURE_DIM[version]))


LAYOUTS: dict[str, Layout] = {
    "rvc": Layout("RVC", "0_gt_wavs", "3_feature{dim}", "2a_f0", "2b-f0nsf", _speaker_zero),
    "applio": Layout("Applio", "sliced_audios", "extracted", "f0", "f0_voiced", _speaker_from_stem),
}


def detect_layout(exp_dir: str) -> str:
    """The :data:`LAYOUTS` key whose wav folder ``exp_dir`` has (``"rvc"``: ``0_gt_wavs/``,
    ``"applio"``: ``sliced_audios/``)."""
    if not os.path.isdir(exp_dir):
        raise FileNotFoundError(f"experiment folder not found: {exp_dir}")
    for name, layout in LAYOUTS.items():
        if os.path.isdir(os.path.join(exp_dir, layout.wavs)):
            return name
    raise ValueError(f"{exp_dir}: neither " + " nor ".join(
        f"an {layout.title} experiment (no {layout.wavs}/)" for layout in LAYOUTS.values()))


def _feature_dir(exp_dir: str, layout: Layout, version: str) -> str:
    want = layout.feature_dir(exp_dir, version)
    if not os.path.isdir(want):
        hint = ""
        for other in FEATURE_DIM:  # the other version's folder: a likely mix-up
            alt = layout.feature_dir(exp_dir, other)
            if alt != want and os.path.isdir(alt):
                hint = f" (found {alt}: use version={other!r}?)"
        raise FileNotFoundError(f"feature folder not found: {want}{hint}")
    return want


def _wav_header(path: str) -> tuple[int, int, int]:
    """(sample rate, number of samples, channels) without reading the samples."""
    require_regular_file(path, "wav file")
    try:
        rate, data = wavfile.read(path, mmap=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is reported with the path
        raise ValueError(f"{path}: cannot read wav ({e})") from None
    channels = 1 if data.ndim == 1 else data.shape[1]
    return int(rate), int(data.shape[0]), channels


def _check_item(wav, feature, pitch, pitchf, sid, *, sr, dim) -> Item:
    rate, n, channels = _wav_header(wav)
    if rate != sr:
        raise ValueError(f"{wav}: sample rate {rate} Hz, expected {sr} Hz")
    if channels != 1:
        raise ValueError(f"{wav}: {channels} channels, expected mono")
    require_regular_file(feature, "feature file")
    try:  # the header only (mmap); the values are checked when the item is loaded
        feat = np.load(feature, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{feature}: cannot read feature file ({e or type(e).__name__})") from None
    if not isinstance(feat, np.ndarray) or feat.dtype.names is not None or feat.dtype.kind != "f":
        raise ValueError(f"{feature}: features have dtype {getattr(feat, 'dtype', '?')}, expected float")
    if feat.ndim != 2 or feat.shape[1] != dim:
        raise ValueError(f"{feature}: feature shape {tuple(feat.shape)}, expected [T, {dim}] "
                         f"for {next(v for v, d in FEATURE_DIM.items() if d == dim)}")
    return Item(wav, feature, pitch, pitchf, int(sid), rate, n, int(feat.shape[0]))


def _missing(path: str, wav: str, strict: bool) -> bool:
    """True if ``path`` is missing; raises in strict mode."""
    if os.path.exists(path):
        return False
    msg = f"missing {path} for {wav}"
    if strict:
        raise FileNotFoundError(msg)
    warnings.warn(msg + "; skipping this wav", stacklevel=3)
    return True


def _resolve(path: str, exp_dir: str) -> str:
    if not os.path.isabs(path):
        return os.path.normpath(os.path.join(exp_dir, path))
    if os.path.exists(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) >= 2:  # moved experiment: re-root <folder>/<file> onto exp_dir
        moved = os.path.join(exp_dir, parts[-2], parts[-1])
        if os.path.exists(moved):
            return moved
    return path


def _is_mute(path: str) -> bool:
    parts = os.path.normpath(path).split(os.sep)
    return any(p == "mute" or p.startswith("mute_") for p in parts[:-1])


def _scan_filelist(exp_dir, filelist, *, f0, sr, dim, strict) -> list[Item]:
    items = []
    require_regular_file(filelist, "filelist", max_bytes=64 << 20)
    try:
        with open(filelist, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
    except UnicodeDecodeError as e:
        raise ValueError(f"{filelist}: not UTF-8 text ({e})") from None
    want = 5 if f0 else 3
    for lineno, line in enumerate(lines, 1):
        if not line:
            continue
        fields = line.split("|")
        if len(fields) != want:
            raise ValueError(f"{filelist}:{lineno}: {len(fields)} fields, expected {want} "
                             f"({'wav|feature|coarse|f0nsf|spk' if f0 else 'wav|feature|spk'})")
        paths = [_resolve(p, exp_dir) for p in fields[:-1]]
        try:
            sid = int(fields[-1])
        except ValueError:
            raise ValueError(f"{filelist}:{lineno}: speaker id {fields[-1]!r} is not an integer") from None
        wav = paths[0]
        if _is_mute(wav) and not all(os.path.exists(p) for p in paths):
            warnings.warn(f"{filelist}:{lineno}: skipping RVC mute line (files not found: {wav})",
                          stacklevel=3)
            continue
        if any(_missing(p, wav, strict) for p in paths):
            continue
        feature, pitch, pitchf = paths[1], (paths[2] if f0 else None), (paths[3] if f0 else None)
        items.append(_check_item(wav, feature, pitch, pitchf, sid, sr=sr, dim=dim))
    if not items:
        raise ValueError(f"{filelist}: no usable items")
    return items


def scan_experiment(exp_dir: str, *, version: str = "v2", f0: bool = True, sr: int = 40000,
                    strict: bool = True, use_filelist: bool = True) -> list[Item]:
    """List the training items of an RVC or Applio experiment folder (see module docs).

    Checks every file's existence, every wav's sample rate/channels and every feature's
    dimension from headers only (cheap). Items come back sorted by wav path (or in
    filelist order)."""
    if version not in FEATURE_DIM:
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    MelConfig.for_rate(sr)  # a supported rate
    exp_dir = os.path.abspath(exp_dir)
    layout = LAYOUTS[detect_layout(exp_dir)]
    dim = FEATURE_DIM[version]
    filelist = os.path.join(exp_dir, "filelist.txt")
    if use_filelist and os.path.isfile(filelist):
        return _scan_filelist(exp_dir, filelist, f0=f0, sr=sr, dim=dim, strict=strict)

    wav_dir = os.path.join(exp_dir, layout.wavs)
    feat_dir = _feature_dir(exp_dir, layout, version)
    pitch_dirs = (os.path.join(exp_dir, layout.pitch), os.path.join(exp_dir, layout.pitchf)) if f0 else ()
    for d in (feat_dir,) + pitch_dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"folder not found: {d}")
    wavs = sorted(f for f in os.listdir(wav_dir) if f.lower().endswith(".wav"))
    if not wavs:
        raise ValueError(f"no .wav files in {wav_dir}")
    for d in (feat_dir,) + pitch_dirs:
        if not any(f.endswith(".npy") for f in os.listdir(d)):
            raise ValueError(f"no .npy files in {d}")
    items = []
    for fname in wavs:
        name = fname[:-4]
        wav = os.path.join(wav_dir, fname)
        feature = os.path.join(feat_dir, name + ".npy")
        paths = [feature]
        if f0:
            paths += [pitch_file(pitch_dirs[0], name), pitch_file(pitch_dirs[1], name)]
        if any(_missing(p, wav, strict) for p in paths):
            continue
        sid = layout.speaker(name, wav)
        pitch, pitchf = (paths[1], paths[2]) if f0 else (None, None)
        items.append(_check_item(wav, feature, pitch, pitchf, sid, sr=sr, dim=dim))
    if not items:
        raise ValueError(f"{wav_dir}: no usable items (every wav lacks a feature or pitch file)")
    return items


def model_info(exp_dir: str) -> dict:
    """Applio's ``model_info.json`` (``{}`` when absent)."""
    path = os.path.join(exp_dir, "model_info.json")
    if not os.path.isfile(path):
        return {}
    require_regular_file(path, "model info", max_bytes=16 << 20)
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: must be a JSON object")
    return info


# --------------------------------------------------------------------------- loading


def read_wav(path: str, sr: int | None = None) -> np.ndarray:
    """Mono float32 samples; integer PCM is scaled to [-1, 1] (see module docs)."""
    require_regular_file(path, "wav file")
    try:
        rate, data = wavfile.read(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is reported with the path
        raise ValueError(f"{path}: cannot read wav ({e})") from None
    if sr is not None and rate != sr:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {sr} Hz")
    if data.ndim != 1:
        raise ValueError(f"{path}: {data.shape[1]} channels, expected mono")
    if data.dtype == np.int16:
        return data.astype(np.float32) / 32768.0
    if data.dtype == np.int32:
        return (data.astype(np.float64) / 2147483648.0).astype(np.float32)
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if data.dtype.kind != "f":
        raise ValueError(f"{path}: {data.dtype} samples are not a supported PCM format")
    out = data.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{path}: samples contain NaN or inf")
    return out


_SPEC_FNS: dict = {}


def _spec_fn(mel: MelConfig):
    if mel not in _SPEC_FNS:
        import jax

        _SPEC_FNS[mel] = jax.jit(mel.spectrogram)
    return _SPEC_FNS[mel]


def spectrograms(wavs: Sequence[np.ndarray], sr: int, *, chunk: int = 8,
                 granule: int | None = None, names: Sequence[str] | None = None) -> list[np.ndarray]:
    """RVC linear spectrograms ``[N // hop, n_fft//2+1]`` of whole waveforms, batched.

    Waveforms are grouped by padded length (multiples of ``granule`` samples, default
    50 frames) and each group runs as ``[chunk, L]`` batches through one jitted
    :meth:`rvclora_jax.audio.MelConfig.spectrogram`. Exactness: each row holds the waveform plus
    its own right reflect-padding, then zeros; every frame k < N // hop only reads
    samples in [−pad, N + pad), so the result equals the per-file spectrogram."""
    mel = MelConfig.for_rate(sr)
    hop = mel.hop_length
    pad = int((mel.filter_length - hop) / 2)
    granule = granule or 50 * hop
    out: list[np.ndarray | None] = [None] * len(wavs)
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(wavs):
        if len(w) <= pad:
            what = names[i] if names is not None else f"waveform {i}"
            raise ValueError(f"{what}: {len(w)} samples; the spectrogram needs more than {pad}")
        L = -(-(len(w) + pad + 1) // granule) * granule
        groups.setdefault(L, []).append(i)
    fn = _spec_fn(mel)
    for L, idx in sorted(groups.items()):
        for s in range(0, len(idx), chunk):
            part = idx[s:s + chunk]
            y = np.zeros((chunk, L), np.float32)
            for r, i in enumerate(part):
                w = np.asarray(wavs[i], np.float32)
                y[r, :len(w) + pad] = np.pad(w, (0, pad), mode="reflect")
            spec = np.asarray(fn(y))
            for r, i in enumerate(part):
                out[i] = spec[r, :len(wavs[i]) // hop].copy()
    return out  # type: ignore[return-value]


def _cache_path(cache_dir: str, item: Item, mel: MelConfig) -> str:
    st = os.stat(item.wav)
    stft = (mel.filter_length, mel.hop_length, mel.win_length)
    key = f"{os.path.abspath(item.wav)}|{st.st_size}|{st.st_mtime_ns}|{stft}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{item.name}-{digest}.spec.npy")


def _labels(item: Item) -> dict:
    """The item's features (×2 to 100 fps) and pitch, cut to RVC's 900 frames."""
    # The strict loaders check every value (finite, in range, dtype) and name the file:
    # a NaN or an out-of-range pitch would otherwise train to NaN without a word.
    phone = repeat_features(load_features(item.feature))
    n = min(phone.shape[0], MAX_FRAMES)
    utt = {"phone": phone[:n].astype(np.float32), "pitch": None, "pitchf": None}
    if item.pitch is not None:
        utt["pitch"] = load_coarse_pitch(item.pitch)[:n]
        utt["pitchf"] = load_f0(item.pitchf)[:n].astype(np.float32)
    return utt


def _utterance(item: Item, labels: dict, wave: np.ndarray, spec: np.ndarray, hop: int) -> dict:
    """RVC's ``TextAudioLoaderMultiNSFsid.get_audio_text_pair`` on loaded audio (see :func:`load_item`)."""
    utt = dict(labels, spec=spec, wave=wave, sid=item.sid)
    n = labels["phone"].shape[0]
    if n != spec.shape[0]:  # RVC cuts everything to the shorter only when they differ
        utt = cut(utt, min(n, spec.shape[0]), hop)
    return utt


def load_item(item: Item, sr: int | None = None, *, cache_dir: str | None = None) -> dict:
    """One item with RVC's loader semantics (``TextAudioLoaderMultiNSFsid``), channels-last.

    phone = repeat(feature, 2) cut to n = min(len, 900), pitch/pitchf cut to n; the
    spectrogram is of the whole wav; if len(phone) ≠ spec frames all are cut to the
    shorter m (wave to m·hop). As in RVC the wave keeps its full length when no cut is
    needed. Returns float32 ``phone [T,C]``, ``spec [T,F]``, ``wave [N]``, ``pitchf [T]``,
    int32 ``pitch [T]`` (``None`` for nono items) and ``sid``.

    ``cache_dir`` reads/writes the spectrogram there."""
    return load_items([item], sr, cache_dir=cache_dir)[0]


def _save_quietly(path: str, arr: np.ndarray) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
    except OSError as e:  # read-only experiment folder (e.g. installed package data)
        log.debug("spec cache not written (%s): %s", path, e)


def load_items(items: Sequence[Item], sr: int | None = None, *,
               cache_dir: str | None = None) -> list[dict]:
    """:func:`load_item` for many items, with all missing spectrograms computed in a few
    batched calls (one jitted shape per 0.5 s length group)."""
    if not items:
        return []
    mel = MelConfig.for_rate(sr or items[0].sr)
    # Every file is read and validated before any spectrogram is computed or cached, so bad
    # data is refused before anything is written beside it.
    labels = [_labels(it) for it in items]
    waves = [read_wav(it.wav, mel.sampling_rate) for it in items]
    specs: list[np.ndarray | None] = [None] * len(items)
    paths = [_cache_path(cache_dir, it, mel) if cache_dir else None for it in items]
    for i, p in enumerate(paths):
        if p and os.path.exists(p):
            try:
                s = np.load(p, allow_pickle=False)
                if (s.shape == (len(waves[i]) // mel.hop_length, mel.n_freq) and s.dtype == np.float32
                        and np.all(np.isfinite(s))):
                    specs[i] = s
            except (OSError, ValueError):
                pass
    todo = [i for i, s in enumerate(specs) if s is None]
    for i, s in zip(todo, spectrograms([waves[i] for i in todo], mel.sampling_rate,
                                       names=[items[i].wav for i in todo])):
        specs[i] = s
        if paths[i]:
            _save_quietly(paths[i], s)
    return [_utterance(it, lab, wave, spec, mel.hop_length)
            for it, lab, wave, spec in zip(items, labels, waves, specs)]


# --------------------------------------------------------------------------- batching


class Batches:
    """Fixed-shape, deterministic, resumable batches over in-memory items.

    * Every item is loaded once (:func:`load_items`). Items with fewer than
      ``segment_frames`` frames are dropped with a warning (RVC's random slicer would
      crash on them). Unlike RVC there is no ≤100/>900 "length unit" filter; items
      longer than 900 frames are already cut to 900 by the loader.
    * ``buckets``: the allowed padded lengths T (sorted; default 100, 200, …, 900), or
      an int step (T = multiples of step up to 900, plus 900). Each item goes to the
      smallest bucket ≥ its length; a batch only holds items of one bucket, zero-padded
      to T like RVC's collate (rows sorted by length, longest first). So a jitted step
      sees at most ``len(buckets)`` shapes (:attr:`shapes` lists the ones in use).
    * Incomplete batches: ``last="repeat"`` (default) fills a bucket's last batch with
      items repeated from the same bucket (what RVC's DistributedBucketSampler does), so
      nothing is dropped and B is fixed; ``last="drop"`` drops the remainder.
    * Order: items are shuffled within buckets and batches are shuffled across buckets
      with ``np.random.default_rng([seed, epoch])``, so any (seed, epoch) reproduces its
      order; ``iterate(epoch, start=k)`` resumes an epoch at batch k.
    * Batch dict (numpy): phone [B,T,C] f32, phone_lengths [B] i32, pitch [B,T] i32,
      pitchf [B,T] f32 (f0 items only), spec [B,T,F] f32, spec_lengths [B] i32,
      wave [B,T·hop] f32, wave_lengths [B] i32, sid [B] i32. Waves are cut to
      frames·hop samples (training slices never read past the last full frame).
    """

    def __init__(self, items: Sequence[Item], batch_size: int, segment_frames: int, *, seed: int = 1234,
                 buckets: Sequence[int] | int = DEFAULT_BUCKETS, last: str = "repeat",
                 sr: int | None = None, cache_dir: str | None = None,
                 data: Sequence[dict] | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")
        if last not in ("repeat", "drop"):
            raise ValueError("last must be 'repeat' or 'drop'")
        if not items:
            raise ValueError("no items")
        self.sr = sr or items[0].sr
        self.hop = MelConfig.for_rate(self.sr).hop_length
        self.batch_size, self.segment_frames, self.seed, self.last = batch_size, segment_frames, seed, last
        if isinstance(buckets, int):
            buckets = tuple(range(buckets, MAX_FRAMES, buckets)) + (MAX_FRAMES,)
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        data = list(data) if data is not None else load_items(items, self.sr, cache_dir=cache_dir)
        self.items, self.data = [], []
        for it, d in zip(items, data):
            n = d["spec"].shape[0]
            if n < segment_frames:
                warnings.warn(f"{it.wav}: {n} frames < segment of {segment_frames}; dropped", stacklevel=2)
                continue
            if n > self.buckets[-1]:
                raise ValueError(f"{it.wav}: {n} frames exceed the largest bucket {self.buckets[-1]}")
            d = dict(d)
            d["wave"] = d["wave"][: n * self.hop]
            self.items.append(it)
            self.data.append(d)
        if not self.data:
            raise ValueError(f"no item has at least {segment_frames} frames")
        self.f0 = self.data[0]["pitch"] is not None
        self.groups: dict[int, list[int]] = {}
        for i, d in enumerate(self.data):
            T = next(b for b in self.buckets if b >= d["spec"].shape[0])
            self.groups.setdefault(T, []).append(i)
        self._num = sum(self._batches_in(len(v)) for v in self.groups.values())
        if self._num == 0:
            raise ValueError(f"batch_size {batch_size} with last='drop' leaves no batch")

    def _batches_in(self, n: int) -> int:
        return -(-n // self.batch_size) if self.last == "repeat" else n // self.batch_size

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        return self._num

    @property
    def shapes(self) -> list[int]:
        """The padded lengths T that batches use."""
        return sorted(self.groups)

    def plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        """The epoch's batches as ``(T, item indices)``; a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        B = self.batch_size
        batches = []
        for T in sorted(self.groups):
            idx = [self.groups[T][j] for j in rng.permutation(len(self.groups[T]))]
            if self.last == "repeat" and len(idx) % B:
                rem = B - len(idx) % B
                idx = idx + (idx * (rem // len(idx) + 1))[:rem]
            for s in range(0, len(idx) - B + 1, B):
                batches.append((T, idx[s:s + B]))
        order = rng.permutation(len(batches))
        return [batches[j] for j in order]

    def collate(self, T: int, idx: Sequence[int]) -> dict:
        rows = sorted(idx, key=lambda i: -self.data[i]["spec"].shape[0])  # RVC: longest first
        return collate([self.data[i] for i in rows], T, hop=self.hop)

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The batches of ``epoch`` from batch index ``start`` on."""
        for T, idx in self.plan(epoch)[start:]:
            yield self.collate(T, idx)

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(0)


def make_batches(items: Sequence[Item], batch_size: int, segment_frames: int, *, seed: int = 1234,
                 buckets: Sequence[int] | int = DEFAULT_BUCKETS, **kwargs) -> Batches:
    """:class:`Batches` (loads every item into memory once)."""
    return Batches(items, batch_size, segment_frames, seed=seed, buckets=buckets, **kwargs)


# --------------------------------------------------------------------------- prefetch


_DONE = object()


class _Error:
    def __init__(self, exc: BaseException):
        self.exc = exc


class prefetch:  # noqa: N801 - used like a function: ``for b in prefetch(it): ...``
    """Run ``iterator`` in a daemon thread, ``size`` items ahead (optionally mapped by
    ``transform``, e.g. ``jax.device_put``). Exceptions re-raise in the consumer;
    ``close()`` (or leaving a ``with`` block / dropping the generator) stops the thread."""

    def __init__(self, iterator: Iterable, size: int = 2, transform=None):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterator), transform), daemon=True)
        self._thread.start()

    def _put(self, x) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it, transform):
        try:
            for x in it:
                if not self._put(transform(x) if transform else x):
                    return
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            self._put(_Error(e))
            return
        self._put(_DONE)

    def __iter__(self):
        return self

    def __next__(self):
        x = self._q.get()
        if x is _DONE:
            self._stop.set()
            raise StopIteration
        if isinstance(x, _Error):
            self._stop.set()
            raise x.exc
        return x

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self._stop.set()
