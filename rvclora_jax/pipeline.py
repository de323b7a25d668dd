"""Audio in, converted audio out: RVC's inference pipeline (``Pipeline.pipeline`` + ``vc``).

Life cycle::

    wav = load_input("song.wav")                       # mono 16 kHz float32, peak ≤ 0.95 (vc_single)
    vc = VoiceConverter(synth, ContentFeatures(hubert, "v2"), pitch=RMVPEPitch(rmvpe),
                        index=read_index("added.index"), config=PipelineConfig(protect=0.33))
    pcm = vc(wav)                                      # int16 at vc.out_sr, what RVC returns
    pcms = vc.batch([wav_a, wav_b], progress=print)    # many files, their chunks batched

What one input goes through (RVC's order, RVC's numbers; ``rvc==0.3.5`` is the reference):

1. A zero-phase 5th-order Butterworth high-pass at 48 Hz (scipy ``filtfilt``, float64).
2. Inputs longer than ``x_max`` seconds get split points: near every ``x_center`` seconds,
   the quietest 10 ms (sum of |x| over 160 samples) within ±``x_query`` seconds, rounded
   down to a 10 ms frame.
3. The filtered audio is reflect-padded by ``x_pad`` seconds on each side; the f0 tracker
   runs once over the whole padded signal (key shift, RVC's coarse pitch).
4. Each chunk (from one split point to the next, plus ``2·x_pad`` seconds of overlap)
   gets its own HuBERT features (no waveform normalisation, as RVC), the retrieval blend
   (:func:`rvclora_jax.retrieval.blend`), the ×2 repeat to 100 fps, the ``protect`` blend
   of unvoiced frames back towards the pre-retrieval features, and the synthesizer; its
   output is trimmed by ``x_pad`` seconds at the model rate on each side.
5. The chunks are concatenated, the RMS envelope is mixed (``rms_mix_rate``), the audio
   is optionally resampled (soxr HQ = ``librosa.resample``'s default) and converted to
   int16 the way RVC does (peaks above 0.99 scaled down, then truncation).

Unlike RVC, which runs each chunk through HuBERT and the synthesizer on its own, all the
chunks of one or many inputs go through both in batches padded to bucket lengths
(:func:`rvclora_jax.frontend.hubert.bucket_frames`): both networks mask their padding,
so a chunk's result does not depend on its bucket or neighbours, and a long file
compiles a handful of programs instead of one per chunk length. The f0 is not chunked
(RVC tracks the whole file), so neither are the trackers here.

``noise_scale=0`` is fully deterministic; otherwise the prior and NSF noise of chunk
``k`` of an input is drawn from ``fold_in(key(seed), k)``, so :meth:`VoiceConverter.batch`
and single calls agree.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np

from . import render as _render
from .frontend import pitch as _pitch
from .frontend.audio_io import AudioError, _extra, load_audio
from .frontend.fcpe import FCPEPitch
from .frontend.hubert import ContentFeatures, bucket_frames
from .frontend.rmvpe import RMVPEPitch, cents_to_hz, to_local_average_cents
from .models.synthesizer import INFER_NOISE_SCALE

SR = 16000          # HuBERT's and the trackers' rate
WINDOW = 160        # samples per 10 ms frame
HIGHPASS_HZ = 48    # RVC's Butterworth cut-off, order 5, at 16 kHz
INPUT_PEAK = 0.95   # vc_single scales louder inputs down to this peak
OUTPUT_PEAK = 0.99  # the int16 conversion scales louder outputs down to this peak

# Memory bounds per compiled call, so a long file (RVC's chunks are up to ~52 s) runs one
# chunk at a time, as RVC does, while short clips still share batches:
# HuBERT's attention logits cost 4 bytes × heads × rows × T² (T: 50 fps frames), ~400 MB
# for one 52 s chunk of hubert-base; the synthesizer's decoder keeps a few activations of
# ~32-256 channels at the output rate, ~1 GB per 2.5 M output samples (52 s at 48 kHz);
# RMVPE's U-Net keeps ~0.3 GB per minute of audio (T: 100 fps frames).
HUBERT_FRAMES2_BUDGET = 2600 ** 2   # rows × T² per HuBERT call
SYNTH_SAMPLES_BUDGET = 2_600_000    # rows × output samples per synthesizer call
F0_FRAMES_BUDGET = 60_000           # rows × frames per RMVPE / FCPE call (10 minutes)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """RVC's pipeline settings. The ``x_*`` are seconds (RVC's CPU/fp32 config by default:
    its half-precision GPU config is 3/10/60/65); they may be fractional as long as
    ``16000·x`` (and the model rate × ``x_pad``) are whole samples.

    ``x_pad``: overlap added on each side of every chunk; ``x_query``: half-width of the
    window searched for a quiet split point; ``x_center``: spacing of the split points;
    ``x_max``: inputs up to this long are not split. ``index_rate``: weight of the
    retrieved features (0: no retrieval); ``protect``: < 0.5 keeps unvoiced frames this
    much of the retrieved/converted features (0.5 and above: off); ``rms_mix_rate``: 1
    keeps the output's own loudness envelope, 0 imposes the input's; ``filter_radius`` >
    2: a 3-tap median filter on harvest's f0; ``resample_sr`` ≥ 16000 and different from
    the model's rate: resample the output to it (0: the model's rate)."""

    x_pad: float = 1
    x_query: float = 6
    x_center: float = 38
    x_max: float = 41
    f0_up_key: float = 0.0
    index_rate: float = 0.75
    protect: float = 0.33
    rms_mix_rate: float = 0.25
    filter_radius: int = 3
    resample_sr: int = 0

    def samples(self, seconds: float, rate: int, what: str) -> int:
        n = float(seconds) * rate
        if not np.isfinite(n) or n != round(n):
            raise ValueError(f"{what}={seconds} s is not a whole number of samples at {rate} Hz")
        return int(round(n))

    def check(self) -> None:
        for name in ("x_pad", "x_query", "x_center", "x_max"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not self.x_query < self.x_center:
            raise ValueError(f"x_query ({self.x_query}) must be shorter than x_center ({self.x_center})")
        for name in ("index_rate", "rms_mix_rate"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not np.isfinite(float(self.protect)) or not np.isfinite(float(self.f0_up_key)):
            raise ValueError("protect and f0_up_key must be finite numbers")
        if int(self.resample_sr) < 0:
            raise ValueError(f"resample_sr must be 0 (off) or a rate >= 16000, got {self.resample_sr}")


def load_input(path: str) -> np.ndarray:
    """A recording as RVC's ``vc_single`` feeds it to the pipeline: mono at 16 kHz
    (:func:`rvclora_jax.frontend.audio_io.load_audio`), float32, divided by peak/0.95 when
    its peak exceeds 0.95. Unreadable, empty or silent files raise a one-line
    :class:`AudioError` naming the file."""
    x = load_audio(path, SR)
    peak = np.abs(x).max() / INPUT_PEAK
    if not peak > 0:
        raise AudioError(f"{path}: the audio is silent (every sample is 0)")
    if peak > 1:
        x = x / peak
    return np.ascontiguousarray(x, np.float32)


# --------------------------------------------------------------------------- signal steps


@functools.lru_cache(maxsize=None)
def _highpass_coefficients():
    from scipy import signal

    return signal.butter(N=5, Wn=HIGHPASS_HZ, btype="high", fs=SR)


def highpass(wav16k: np.ndarray) -> np.ndarray:
    """RVC's zero-phase high-pass (float64 out, scipy's default odd padding of 18)."""
    _extra("scipy", "the inference pipeline's high-pass filter")
    from scipy import signal

    b, a = _highpass_coefficients()
    return signal.filtfilt(b, a, wav16k)


def split_points(audio: np.ndarray, t_center: int, t_query: int, t_max: int) -> list[int]:
    """RVC's split points (samples, before rounding to a frame) of the filtered audio.

    Only the query windows' 160-sample sums are computed, and in RVC's order (a running
    sum of the 160 shifted |x|), so ties and near-ties resolve to the same sample."""
    n = audio.shape[0]
    if n + WINDOW <= t_max:
        return []
    padded = np.pad(audio, (WINDOW // 2, WINDOW // 2), mode="reflect")
    out = []
    for t in range(t_center, n, t_center):
        lo, hi = t - t_query, min(t + t_query, n)
        acc = np.zeros(hi - lo, dtype=audio.dtype)
        for i in range(WINDOW):
            acc += np.abs(padded[lo + i: hi + i])
        out.append(lo + int(np.argmin(acc)))  # argmin: the first minimum, as RVC's np.where(...)[0][0]
    return out


def rms_envelope(x: np.ndarray, sr: int) -> np.ndarray:
    """``librosa.feature.rms(y=x, frame_length=sr//2*2, hop_length=sr//2)``: centred frames,
    zero padding, float32 (librosa's default dtype)."""
    frame, hop = sr // 2 * 2, sr // 2
    y = np.pad(x, (frame // 2, frame // 2), mode="constant")
    n = 1 + (y.shape[0] - frame) // hop
    frames = np.lib.stride_tricks.sliding_window_view(y, frame)[::hop][:n]
    return np.sqrt(np.mean(np.square(frames, dtype=np.float32), axis=-1))


def interp_linear(v: np.ndarray, size: int) -> np.ndarray:
    """``F.interpolate(v[None, None], size, mode="linear")`` (align_corners=False), float32."""
    n = v.shape[0]
    scale = np.float32(n / size)
    src = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return (np.float32(1) - lam) * v[i0] + lam * v[i1]


def mix_rms(source16k: np.ndarray, out: np.ndarray, out_sr: int, rate: float) -> np.ndarray:
    """RVC's ``change_rms``: scale ``out`` by (rms_in / rms_out)^(1 − rate), both envelopes
    at half-second hops, linearly interpolated to every output sample, rms_out ≥ 1e-6."""
    r1 = interp_linear(rms_envelope(source16k, SR), out.shape[0])
    r2 = np.maximum(interp_linear(rms_envelope(out, out_sr), out.shape[0]), np.float32(1e-6))
    gain = np.power(r1, np.float32(1 - rate)) * np.power(r2, np.float32(rate - 1))
    return (out * gain).astype(np.float32)


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``librosa.resample(x, orig_sr, target_sr)`` with librosa ≥ 0.10's default: soxr HQ,
    then fixed to ``ceil(N·target/orig)`` samples."""
    soxr = _extra("soxr", "resampling the output (resample_sr)")
    y = np.asarray(soxr.resample(x, orig_sr, target_sr, quality="soxr_hq"), x.dtype)
    n = int(np.ceil(x.shape[0] * float(target_sr) / orig_sr))
    return y[:n] if y.shape[0] >= n else np.pad(y, (0, n - y.shape[0]))


def to_int16(x: np.ndarray) -> np.ndarray:
    """RVC's conversion: scale 32768, or 32768·0.99/peak when the peak exceeds 0.99; truncate."""
    if x.size == 0:
        return np.zeros((0,), np.int16)
    peak = np.abs(x).max() / OUTPUT_PEAK
    scale = 32768
    if peak > 1:
        scale /= peak
    return (x * scale).astype(np.int16)


def coarse_like_rvc(f0: np.ndarray) -> np.ndarray:
    """RVC's coarse pitch (:func:`rvclora_jax.render.coarse_pitch`) with ``get_f0``'s dtypes:
    the mel curve in the tracker's own dtype (float64 for rmvpe and harvest, float32 for
    a float32 tracker), the affine map in float64 but stored back into that dtype, then
    rint. Equal to ``coarse_pitch`` for float64 curves; int32."""
    mel = 1127 * np.log(1 + f0 / 700)
    lo, hi = _render._mel(_render.F0_MIN), _render._mel(_render.F0_MAX)
    q = np.where(mel > 0, (mel - lo) * 254 / (hi - lo) + 1, mel).astype(mel.dtype)
    q = np.where(q <= 1, 1, q)
    q = np.where(q > 255, 255, q)
    return np.rint(q).astype(np.int32)


def protect_mask(pitchf: np.ndarray, protect: float) -> np.ndarray:
    """RVC's ``pitchff``: 1 on voiced frames (f0 ≥ 1 Hz), ``protect`` elsewhere (float32)."""
    return np.where(pitchf < 1, np.float32(protect), np.float32(1)).astype(np.float32)


# --------------------------------------------------------------------------- the converter


@dataclasses.dataclass
class _Chunk:
    item: int          # which input
    k: int             # chunk number within it
    start: int         # sample range in the padded 16 kHz audio
    stop: int
    f0_lo: int         # frame range of its pitch
    f0_hi: int | None
    span: int          # input samples it accounts for (progress)


class VoiceConverter:
    """RVC's ``Pipeline.pipeline`` for one voice model (see the module docstring).

    ``synth``: an RVC :class:`~rvclora_jax.models.synthesizer.Synthesizer` (adapters merged
    or live); ``content``: the HuBERT feature extractor for its version (``"v1"``: 256-d,
    ``"v2"``: 768-d); ``pitch``: the f0 tracker for f0 models — an :class:`RMVPEPitch`,
    :class:`FCPEPitch`, :func:`rvclora_jax.frontend.pitch.harvest` (given the config's
    ``filter_radius``) or any callable ``wav16k -> f0 Hz`` at 100 fps; ignored for models
    without pitch (as RVC ignores its f0 method). ``index``: an
    :class:`~rvclora_jax.retrieval.IVFFlatIndex` for the retrieval blend. ``sid``: speaker
    row. ``batch_size``: chunks per synthesizer call (HuBERT batches by ``content``'s own).
    ``bucket``: the synthesizer's padded length for a chunk of ``T`` frames at 100 fps
    (default :func:`~rvclora_jax.frontend.hubert.bucket_frames`: ≤ 12.5 % padding); a
    coarser rule compiles fewer programs (the result is the same: padding is masked).
    """

    def __init__(self, synth, content: ContentFeatures, *, pitch=None, index=None,
                 config: PipelineConfig = PipelineConfig(), sid: int = 0,
                 noise_scale: float = INFER_NOISE_SCALE, seed: int = 0, batch_size: int = 4,
                 bucket: Callable[[int], int] | None = None):
        config.check()
        self.synth, self.config, self.index = synth, config, index
        self.noise_scale, self.seed = float(noise_scale), int(seed)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.bucket = bucket_frames if bucket is None else bucket
        c = synth.config
        self.tgt_sr, self.hop = int(c.sr), int(c.hop_length)
        n_spk = int(c.spk_embed_dim)
        if isinstance(sid, bool) or not isinstance(sid, (int, np.integer)) or not 0 <= int(sid) < n_spk:
            raise ValueError(f"speaker id {sid!r} is out of range: the model has {n_spk} speaker"
                             f"{'s' if n_spk != 1 else ''} (sid 0..{n_spk - 1})")
        self.sid = int(sid)
        dim = int(getattr(synth, "feature_dim", 256 if synth.version == "v1" else 768))
        if content.dim != dim:
            raise ValueError(f"the HuBERT output {content.output!r} gives {content.dim}-d features but the "
                             f"{synth.version} model takes {dim}-d (v1 models: 'v1', v2 models: 'v2')")
        if content.normalize:  # RVC's pipeline never layer-normalises the waveform
            content = copy.copy(content)
            content.normalize = False
        self.content = content
        if index is not None:
            from . import retrieval

            retrieval.check_features(index, dim, what=f"the {synth.version} model")
        self.f0 = bool(synth.f0)
        if self.f0 and pitch is None:
            raise ValueError("the model has pitch (f0) input: give an f0 tracker (pitch=)")
        if pitch is _pitch.harvest:
            pitch = functools.partial(_pitch.harvest, filter_radius=int(config.filter_radius))
        self.pitch = pitch if self.f0 else None
        cfg = config
        self.t_pad = cfg.samples(cfg.x_pad, SR, "x_pad")
        self.t_pad_tgt = cfg.samples(cfg.x_pad, self.tgt_sr, "x_pad")
        self.t_query = cfg.samples(cfg.x_query, SR, "x_query")
        self.t_center = cfg.samples(cfg.x_center, SR, "x_center")
        self.t_max = cfg.samples(cfg.x_max, SR, "x_max")

    @property
    def out_sr(self) -> int:
        r = int(self.config.resample_sr)
        return r if self.tgt_sr != r >= 16000 else self.tgt_sr

    def __call__(self, wav16k) -> np.ndarray:
        return self.batch([wav16k])[0]

    # ------------------------------------------------------------------ stages

    def _f0(self, padded: list[np.ndarray]) -> list[np.ndarray]:
        """f0 in Hz over each whole padded input, float64 where RVC's tracker gives it."""
        p = self.pitch
        n_frames = [x.shape[0] // WINDOW for x in padded]
        if isinstance(p, RMVPEPitch):
            # decoded here rather than by RMVPEPitch.decode, which rounds to float32: RVC's
            # coarse pitch is computed from the float64 curve
            out = [None] * len(padded)
            for group in self._f0_groups(n_frames):
                sal = p.batch_salience([padded[i].astype(np.float32) for i in group], batch_size=len(group))
                for i, s in zip(group, sal):
                    out[i] = cents_to_hz(to_local_average_cents(s, p.threshold))
            return out
        if isinstance(p, FCPEPitch):  # Applio: torchfcpe resized to the padded frame count
            out = [None] * len(padded)
            for group in self._f0_groups(n_frames):
                f0s = p.batch([padded[i].astype(np.float32) for i in group], target_length=[n_frames[i] for i in group])
                for i, f in zip(group, f0s):
                    out[i] = f
            return out
        return [np.asarray(p(x)) for x in padded]

    def _f0_groups(self, n_frames: list[int]) -> list[list[int]]:
        """Inputs sorted by length, in groups of at most ``batch_size`` whose padded size
        (rows × longest) stays within :data:`F0_FRAMES_BUDGET` (one input at least)."""
        order = sorted(range(len(n_frames)), key=lambda i: n_frames[i])
        groups: list[list[int]] = []
        for i in order:
            g = groups[-1] if groups else None
            if g is not None and len(g) < self.batch_size and (len(g) + 1) * n_frames[i] <= F0_FRAMES_BUDGET:
                g.append(i)
            else:
                groups.append([i])
        return groups

    def _content(self, segs: list[np.ndarray]) -> list[np.ndarray]:
        """HuBERT features of every chunk; chunks of one bucket share calls of as many rows
        as :data:`HUBERT_FRAMES2_BUDGET` allows (at most ``content.batch_size``)."""
        by_bucket: dict[int, list[int]] = {}
        for j, x in enumerate(segs):
            by_bucket.setdefault(self.content.bucket_for(max(self.content.frames(x.size), 1)), []).append(j)
        out: list = [None] * len(segs)
        for tb, idx in by_bucket.items():
            c = self.content
            rows = max(1, min(c.batch_size, HUBERT_FRAMES2_BUDGET // (tb * tb)))
            if rows != c.batch_size:
                c = copy.copy(c)
                c.batch_size = rows
            for j, f in zip(idx, c.batch([segs[j] for j in idx])):
                out[j] = f
        return out

    def _pitch_curves(self, padded):
        out = []
        for x, f0 in zip(padded, self._f0(padded)):
            p_len = x.shape[0] // WINDOW
            f0 = np.array(f0, copy=True).reshape(-1)
            if not np.issubdtype(f0.dtype, np.floating):
                f0 = f0.astype(np.float64)
            if f0.shape[0] < p_len:  # a tracker with fewer frames: the tail is unvoiced
                f0 = np.pad(f0, (0, p_len - f0.shape[0]))
            f0 *= pow(2, float(self.config.f0_up_key) / 12)
            out.append((coarse_like_rvc(f0)[:p_len], f0[:p_len].astype(np.float32)))
        return out

    def _plan(self, wavs):
        """Filter, split, pad: per input (filtered audio, padded audio, chunks)."""
        plans = []
        for i, w in enumerate(wavs):
            w = np.asarray(w)
            if w.ndim != 1:
                raise ValueError(f"input {i}: expected a mono 16 kHz waveform of shape (N,), got {w.shape}")
            if not np.issubdtype(w.dtype, np.floating):
                raise ValueError(f"input {i}: expected float samples in [-1, 1], got {w.dtype} (use load_input)")
            if w.shape[0] <= 18:
                raise ValueError(f"input {i}: {w.shape[0]} samples is too short (RVC's high-pass filter "
                                 f"needs more than 18)")
            if not np.all(np.isfinite(w)):
                raise ValueError(f"input {i}: the waveform contains NaN or inf")
            audio = highpass(w)
            opt = split_points(audio, self.t_center, self.t_query, self.t_max)
            pad = np.pad(audio, (self.t_pad, self.t_pad), mode="reflect")
            chunks, s, t = [], 0, None
            for k, t in enumerate(opt):
                t = t // WINDOW * WINDOW
                chunks.append(_Chunk(i, k, s, t + 2 * self.t_pad + WINDOW, s // WINDOW,
                                     (t + 2 * self.t_pad) // WINDOW, t - s))
                s = t
            last = 0 if t is None else t
            chunks.append(_Chunk(i, len(opt), last, pad.shape[0], last // WINDOW, None, audio.shape[0] - last))
            plans.append((audio, pad, chunks))
        return plans

    def _noise(self, chunk: _Chunk, T: int):
        key = jax.random.fold_in(jax.random.key(self.seed), chunk.k)
        k_eps, k_src = jax.random.split(key)
        eps = np.asarray(jax.random.normal(k_eps, (T, int(self.synth.config.inter_channels))), np.float32)
        src = np.asarray(jax.random.normal(k_src, (T * self.hop, 1)), np.float32) if self.f0 else None
        return eps, src

    def _synthesize(self, inputs: list[dict], chunks: list[_Chunk], progress, total_done):
        """Render every chunk, grouped by bucket length, ``batch_size`` at a time."""
        out: list = [None] * len(inputs)
        groups: dict[int, list[int]] = {}
        for j, x in enumerate(inputs):
            tb = int(self.bucket(x["length"]))
            if tb < x["length"]:
                raise ValueError(f"bucket({x['length']}) = {tb} frames is shorter than the chunk")
            groups.setdefault(tb, []).append(j)
        done = total_done
        for tb in sorted(groups):
            idx = groups[tb]
            per_call = max(1, min(self.batch_size, SYNTH_SAMPLES_BUDGET // (tb * self.hop)))
            for s in range(0, len(idx), per_call):
                part = idx[s: s + per_call]
                rows = min(per_call, 1 << (len(part) - 1).bit_length())
                batch = [inputs[j] for j in part] + [inputs[part[-1]]] * (rows - len(part))  # filler rows
                kw = {}
                if self.noise_scale != 0.0:
                    eps = np.zeros((rows, tb, int(self.synth.config.inter_channels)), np.float32)
                    src = np.zeros((rows, tb * self.hop, 1), np.float32) if self.f0 else None
                    for r, j in enumerate(part):
                        e, n = self._noise(chunks[j], inputs[j]["length"])
                        eps[r, : e.shape[0]] = e
                        if src is not None:
                            src[r, : n.shape[0]] = n
                    kw = dict(eps=eps, source_noise=src)
                ys = _render.render_arrays(self.synth, batch, sid=self.sid, noise_scale=self.noise_scale,
                                           frames=tb, **kw)
                for j, y in zip(part, ys):
                    out[j] = y
                    done += chunks[j].span / SR
                if progress is not None:
                    progress(done)
        return out

    # ------------------------------------------------------------------ the pipeline

    def batch(self, wavs: Sequence, progress: Callable[[float], object] | None = None) -> list[np.ndarray]:
        """Convert every input (16 kHz mono float waveforms, e.g. from :func:`load_input`);
        int16 arrays at :attr:`out_sr`, in order. The chunks of all inputs share the
        HuBERT and synthesizer batches. ``progress(seconds)`` is called after each
        synthesizer batch with the seconds of input audio converted so far (cumulative)."""
        wavs = list(wavs)
        if not wavs:
            return []
        cfg = self.config
        plans = self._plan(wavs)
        curves = self._pitch_curves([p[1] for p in plans]) if self.f0 else None
        chunks = [c for p in plans for c in p[2]]
        segs = [plans[c.item][1][c.start: c.stop].astype(np.float32) for c in chunks]
        feats = self._content(segs)
        use_index = self.index is not None and cfg.index_rate != 0
        protect = self.f0 and cfg.protect < 0.5
        if use_index:
            from . import retrieval

            allf = np.concatenate(feats, 0)
            retrieval.check_features(self.index, allf, what="this HuBERT model")
            blended = retrieval.blend(allf, self.index, float(cfg.index_rate))
            bounds = np.cumsum([0] + [f.shape[0] for f in feats])
            retrieved = [np.asarray(blended[a:b], np.float32) for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            retrieved = feats
        inputs = []
        for c, f0feat, f in zip(chunks, feats, retrieved):
            phone = np.repeat(f, 2, axis=0)  # RVC: nearest ×2 (F.interpolate scale_factor=2)
            T = min(phone.shape[0], (c.stop - c.start) // WINDOW)
            x = {"phone": phone[:T], "pitch": None, "pitchf": None, "length": int(T), "name": f"chunk{c.k}"}
            if self.f0:
                pitch, pitchf = curves[c.item]
                x["pitch"] = pitch[c.f0_lo: c.f0_hi][:T]
                x["pitchf"] = pitchf[c.f0_lo: c.f0_hi][:T]
                if x["pitchf"].shape[0] < T:
                    raise ValueError(f"input {c.item}: {x['pitchf'].shape[0]} f0 frames for {T} feature frames")
                if protect:
                    m = protect_mask(x["pitchf"], cfg.protect)[:, None]
                    feats0 = np.repeat(f0feat, 2, axis=0)[:T]
                    x["phone"] = (x["phone"] * m + feats0 * (np.float32(1) - m)).astype(np.float32)
            if T == 0:
                raise ValueError(f"input {c.item}: a chunk of {c.stop - c.start} samples gives no feature frames")
            inputs.append(x)
        audio = self._synthesize(inputs, chunks, progress, 0.0)
        results = []
        for i, (src, _, ch) in enumerate(plans):
            parts = [audio[j][self.t_pad_tgt: -self.t_pad_tgt] for j, c in enumerate(chunks) if c.item == i]
            out = np.concatenate(parts).astype(np.float32)
            if cfg.rms_mix_rate != 1 and out.size:
                out = mix_rms(src, out, self.tgt_sr, float(cfg.rms_mix_rate))
            if self.out_sr != self.tgt_sr and out.size:
                out = resample(out, self.tgt_sr, self.out_sr)
            results.append(to_int16(out))
        return results


__all__ = ["PipelineConfig", "VoiceConverter", "load_input", "highpass", "split_points", "rms_envelope",
           "interp_linear", "mix_rms", "resample", "to_int16", "protect_mask", "SR", "WINDOW"]
