"""RVC's training preprocessing of one recording: filter, slice, segment, normalise.

Life cycle: :func:`preprocess_file` (or :func:`preprocess_audio` on samples already at the
model rate) returns the :class:`Segment` list that RVC's ``infer/modules/train/preprocess.py``
would write as ``0_gt_wavs/{idx0}_{idx1}.wav`` (model rate) and ``1_16k_wavs/…`` (16 kHz);
:mod:`rvclora_jax.frontend.prepare` writes them. Per recording, in RVC's order:

1. load at the model rate, mono (:func:`rvclora_jax.frontend.audio_io.load_audio`);
2. 5th-order Butterworth high-pass at 48 Hz designed at the model rate, applied with the
   *causal* ``lfilter`` (RVC left ``filtfilt`` commented out: zero-phase filtering rings
   before transients); the result is float64 from here on, as in RVC;
3. RVC's silence slicer (:data:`rvclora_jax.frontend.slicer.RVC_SLICER`);
4. each slice into ``per``-second pieces every ``per − 0.3`` s; once no more than
   ``per + 0.3`` s remain, the rest is the last piece (so a last piece is up to 4.0 s at
   the default ``per`` of 3.7 s; RVC uses 3.0 on CPU-only machines);
5. a piece with peak ``m`` > 2.5 is dropped; otherwise it becomes
   ``x/m·0.9·0.75 + 0.25·x`` (peak 0.675 + 0.25·m), then float32, and its 16 kHz copy is
   the float64 piece resampled (soxr HQ, bit-identical to RVC's ``librosa.resample``).

Numbering (``numbering=``): RVC's own counter skips an index before every slice's last
piece, and the next slice's first piece then *overwrites* that last piece (a slice shorter
than ``per + 0.3`` s is lost entirely). ``"sequential"`` (the default, as Applio fixed it)
numbers the same pieces 0, 1, 2, … and keeps all of them; ``"rvc"`` reproduces RVC's names
and drops each piece RVC would overwrite (with a note). What RVC would write but cannot
train on is skipped with a note too: an empty piece (RVC's process fails on the whole
file) and a piece of digital silence (RVC writes 0/0 = NaN).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .audio_io import AudioError, load_audio, to_16k
from .slicer import RVC_SLICER, Slicer

PER = 3.7          # seconds per piece (RVC's config.py; 3.0 when it falls back to fp32/CPU)
OVERLAP = 0.3      # seconds shared by consecutive pieces of a slice
NORM_MAX = 0.9     # RVC's target peak ...
NORM_ALPHA = 0.75  # ... mixed with the unnormalised piece: x/m·max·alpha + (1 − alpha)·x
DROP_PEAK = 2.5    # pieces louder than this are dropped, as clipping or garbage
HIGHPASS_HZ = 48
HIGHPASS_ORDER = 5
NUMBERING = ("sequential", "rvc")


@dataclasses.dataclass
class Segment:
    """One piece of a recording, ready to write as ``{idx0}_{idx1}.wav``."""

    idx1: int
    wav: np.ndarray     # float32 at the model rate
    wav16k: np.ndarray  # float32 at 16 kHz
    start: int          # first sample within the filtered recording (model rate)
    peak: float         # the piece's peak before normalisation


@dataclasses.dataclass
class Preprocessed:
    segments: list[Segment]
    notes: list[str]        # what was dropped and why (one line each)
    num_samples: int        # the recording's length at the model rate


def highpass(x: np.ndarray, sr: int) -> np.ndarray:
    """RVC's 48 Hz high-pass (Butterworth order 5, causal ``lfilter``); returns float64."""
    from scipy import signal

    b, a = signal.butter(N=HIGHPASS_ORDER, Wn=HIGHPASS_HZ, btype="high", fs=sr)
    return signal.lfilter(b, a, x)


def pieces(chunk: np.ndarray, sr: int, per: float = PER, overlap: float = OVERLAP) -> list[tuple[int, np.ndarray]]:
    """``(offset, piece)`` of one slice, in RVC's float arithmetic (offsets ``int(sr·(per−overlap)·i)``,
    length ``int(per·sr)``, the rest once at most ``(per+overlap)·sr`` samples remain)."""
    tail = per + overlap
    out = []
    i = 0
    while True:
        start = int(sr * (per - overlap) * i)
        i += 1
        if len(chunk[start:]) > tail * sr:
            out.append((start, chunk[start:start + int(per * sr)]))
        else:
            out.append((start, chunk[start:]))
            return out


def normalize(piece: np.ndarray) -> np.ndarray:
    """RVC's loudness mix ``x/m·0.9·0.75 + 0.25·x`` (m = peak), in float64."""
    m = np.abs(piece).max()
    return piece / m * (NORM_MAX * NORM_ALPHA) + (1 - NORM_ALPHA) * piece


def preprocess_audio(audio: np.ndarray, sr: int, *, per: float = PER, numbering: str = "sequential",
                     slicer: Slicer | None = None, name: str = "audio") -> Preprocessed:
    """Steps 2-5 (see the module docs) on float samples at the model rate ``sr``."""
    if numbering not in NUMBERING:
        raise ValueError(f"numbering must be one of {NUMBERING}, got {numbering!r}")
    if not per > OVERLAP:
        raise ValueError(f"per must be longer than the {OVERLAP} s overlap, got {per}")
    slicer = slicer or Slicer(sr, **RVC_SLICER)
    x = highpass(np.asarray(audio), sr)
    notes: list[str] = []
    # (idx1, offset, piece) in writing order; under "rvc" a later write of the same idx1 wins
    written: list[tuple[int, int, np.ndarray]] = []
    idx1 = 0
    for b, e in slicer.spans(x):
        chunk = x[b:e]
        parts = pieces(chunk, sr, per)
        for k, (off, p) in enumerate(parts):
            last = k == len(parts) - 1
            if numbering == "rvc" and last:
                idx1 += 1  # RVC counts before writing a slice's last piece
            written.append((idx1, b + off, p))
            if numbering == "sequential" or not last:
                idx1 += 1
    final: dict[int, Segment] = {}  # idx1 -> what ends up in that file
    for i, off, p in written:
        where = f"{name}: piece at {off / sr:.2f} s"
        if p.size == 0:
            notes.append(f"{where} is empty; skipped")
            continue
        m = float(np.abs(p).max())
        if m > DROP_PEAK:
            notes.append(f"{where} has peak {m:.2f} > {DROP_PEAK}; dropped as RVC does")
            continue
        if m == 0.0:
            notes.append(f"{where} is digital silence; skipped")
            continue
        if numbering == "sequential":  # dropped pieces leave no gap
            i = len(final)
        elif i in final:
            notes.append(f"{name}: piece at {final[i].start / sr:.2f} s overwritten by the next piece, "
                         "as RVC numbers them (numbering='sequential' keeps it)")
        y = normalize(p)
        final[i] = Segment(i, y.astype(np.float32), to_16k(y, sr).astype(np.float32), off, m)
    segments = sorted(final.values(), key=lambda s: s.idx1)
    return Preprocessed(segments, notes, int(x.shape[0]))


def preprocess_file(path: str, sr: int, *, per: float = PER, numbering: str = "sequential",
                    downmix: str = "rvc", slicer: Slicer | None = None) -> Preprocessed:
    """RVC's preprocessing of one recording (all steps). A file that cannot be read, or that
    yields nothing to train on (silent, or every piece dropped), raises :class:`AudioError`."""
    audio = load_audio(path, sr, downmix=downmix)
    if not np.any(audio):
        raise AudioError(f"{path}: silent (every sample is 0)")
    out = preprocess_audio(audio, sr, per=per, numbering=numbering, slicer=slicer, name=path)
    if not out.segments:
        why = "; ".join(n.split(": ", 1)[1] for n in out.notes) or "nothing left after slicing"
        raise AudioError(f"{path}: no usable piece ({why})")
    return out


__all__ = ["Segment", "Preprocessed", "PER", "OVERLAP", "NORM_MAX", "NORM_ALPHA", "DROP_PEAK", "NUMBERING",
           "highpass", "pieces", "normalize", "preprocess_audio", "preprocess_file"]
