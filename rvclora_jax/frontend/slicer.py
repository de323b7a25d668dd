"""RVC's silence slicer: cut a recording at its pauses, keeping up to ``max_sil_kept`` ms of
each pause on both sides.

Life cycle: build a :class:`Slicer` once per sample rate with the parameters in
milliseconds and dB (RVC's preprocessing uses :data:`RVC_SLICER`), then
:meth:`Slicer.slice` each waveform (or :meth:`Slicer.spans` for the sample ranges).

The decisions are exactly those of ``rvc.lib.slicer2.Slicer`` (tested for equal output),
computed here from the runs of quiet frames rather than frame by frame:

* loudness is a frame RMS (window ``min(min_interval, 4·hop)``, hop ``hop_size``, zero
  padding of half a window each side, frame j centred on sample j·hop);
* a quiet run that ends at loud frame ``i`` is cut when it is leading silence longer
  than ``max_sil_kept``, or when it is at least ``min_interval`` long and at least
  ``min_length`` frames have passed since the previous cut; where it is cut (one point,
  or a removed span between the quietest frames near either end) depends on its length;
* a trailing quiet run of at least ``min_interval`` frames is removed from its quietest
  frame within ``max_sil_kept`` of its start;
* RVC compares the *sample* count with the frame count ``min_length`` for its "too short
  to slice" early exit; that quirk is kept so results stay identical.
"""

from __future__ import annotations

import numpy as np

# RVC's preprocess.py parameters (ms, dB): the same for every sample rate.
RVC_SLICER = dict(threshold=-42.0, min_length=1500, min_interval=400, hop_size=15, max_sil_kept=500)

_BLOCK = 1024  # frames per RMS block: bounds the [win, block] temporary, not the result


class Slicer:
    """Silence slicer for one sample rate (parameters in ms and dB, as RVC's)."""

    def __init__(self, sr: int, threshold: float = -40.0, min_length: int = 5000, min_interval: int = 300,
                 hop_size: int = 20, max_sil_kept: int = 5000):
        if not min_length >= min_interval >= hop_size:
            raise ValueError("slicer: need min_length >= min_interval >= hop_size")
        if not max_sil_kept >= hop_size:
            raise ValueError("slicer: need max_sil_kept >= hop_size")
        self.sr = int(sr)
        interval = self.sr * min_interval / 1000  # samples
        self.threshold = 10 ** (threshold / 20.0)  # linear RMS
        self.hop = round(self.sr * hop_size / 1000)
        self.win = min(round(interval), 4 * self.hop)
        # the rest in frames
        self.min_length = round(self.sr * min_length / 1000 / self.hop)
        self.min_interval = round(interval / self.hop)
        self.max_sil_kept = round(self.sr * max_sil_kept / 1000 / self.hop)

    def rms(self, samples: np.ndarray) -> np.ndarray:
        """Frame RMS ``[1 + N // hop]`` (for an even window), in the input's float dtype."""
        x = np.asarray(samples)
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        half = self.win // 2
        padded = np.pad(x, (half, half))
        frames = np.lib.stride_tricks.sliding_window_view(padded, self.win)[:: self.hop]
        out = np.empty(frames.shape[0], x.dtype)
        for s in range(0, frames.shape[0], _BLOCK):
            # [win, block], reduced over the window axis: the layout RVC's get_rms reduces,
            # so the float rounding (and with it every threshold test and argmin) matches.
            block = frames[s:s + _BLOCK].T
            out[s:s + _BLOCK] = np.sqrt(np.mean(np.abs(block) ** 2, axis=0))
        return out

    def _removed(self, rms: np.ndarray) -> list[tuple[int, int]]:
        """The removed frame spans ``(begin, end)``, in order (RVC's ``sil_tags``)."""
        quiet = np.concatenate([[False], rms < self.threshold, [False]])
        edges = np.flatnonzero(quiet[1:] != quiet[:-1])
        runs = edges.reshape(-1, 2)  # [start, end) of each quiet run; end = the loud frame after it
        total = rms.shape[0]
        keep = self.max_sil_kept
        tags: list[tuple[int, int]] = []
        clip_start = 0

        def quietest(a: int, b: int) -> int:  # first argmin of rms[a:b]
            return a + int(np.argmin(rms[a:b]))

        for start, end in runs:
            start, end = int(start), int(end)
            if end == total:  # trailing silence
                if total - start >= self.min_interval:
                    tags.append((quietest(start, min(total, start + keep) + 1), total + 1))
                break
            leading = start == 0 and end > keep
            long_enough = end - start >= self.min_interval and end - clip_start >= self.min_length
            if not (leading or long_enough):
                continue
            length = end - start
            if length <= keep:
                pos = quietest(start, end + 1)
                tags.append((0, pos) if start == 0 else (pos, pos))
                clip_start = pos
                continue
            left = quietest(start, start + keep + 1)
            right = quietest(end - keep, end + 1)
            if start == 0:
                tags.append((0, right))
                clip_start = right
            elif length <= 2 * keep:
                mid = quietest(end - keep, start + keep + 1)  # where both windows overlap
                tags.append((min(left, mid), max(right, mid)))
                clip_start = max(right, mid)
            else:
                tags.append((left, right))
                clip_start = right
        return tags

    def spans(self, samples: np.ndarray) -> list[tuple[int, int]]:
        """The kept sample ranges ``[begin, end)`` of a mono waveform, in order."""
        x = np.asarray(samples)
        n = x.shape[0]
        if n <= self.min_length:  # RVC's early exit (samples vs frames, see module docs)
            return [(0, n)]
        rms = self.rms(x)
        tags = self._removed(rms)
        if not tags:
            return [(0, n)]
        total = rms.shape[0]
        bounds = []
        if tags[0][0] > 0:
            bounds.append((0, tags[0][0]))
        bounds += [(a[1], b[0]) for a, b in zip(tags, tags[1:])]
        if tags[-1][1] < total:
            bounds.append((tags[-1][1], total))
        return [(b * self.hop, min(n, e * self.hop)) for b, e in bounds]

    def slice(self, waveform: np.ndarray) -> list[np.ndarray]:
        """The kept chunks of ``waveform`` (``[N]``, or ``[C, N]`` whose channel mean is
        analysed), as views."""
        w = np.asarray(waveform)
        mono = w.mean(axis=0) if w.ndim > 1 else w
        return [w[..., b:e] for b, e in self.spans(mono)]


def rvc_slicer(sr: int) -> Slicer:
    """The slicer RVC's preprocessing builds for sample rate ``sr``."""
    return Slicer(sr, **RVC_SLICER)


__all__ = ["Slicer", "RVC_SLICER", "rvc_slicer"]
