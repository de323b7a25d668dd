"""Generate the built-in example dataset ``rvclora_jax/example_data/`` (dev-time only).

Needs ``espeak-ng`` (Debian package) and ``pyworld`` (PyPI) besides numpy/scipy. The
output is committed; users never run this script.

    python benchmarks/make_example_data.py [--out rvclora_jax/example_data]

Pipeline, following RVC's ``preprocess.py`` / ``extract_f0_print.py`` where it can:

1. espeak-ng speaks short English phrases with a few voices and pitches (22050 Hz int16).
2. Leading/trailing silence is trimmed, the clip is resampled to 40 kHz, high-passed
   (5th-order Butterworth at 48 Hz, ``lfilter``, like RVC) and normalised like RVC's
   chunks: ``x / max|x| * 0.9 * 0.75 + 0.25 * x``. Written as float32 mono WAV to
   ``0_gt_wavs/{idx0}_{idx1}.wav``.
3. A 16 kHz copy (resampled from the 40 kHz chunk, as RVC does) is analysed with
   pyworld harvest + stonemask at 100 fps (frame period 10 ms, f0 50..1100 Hz) and a
   3-tap median filter (RVC's harvest path) -> ``2b-f0nsf/<name>.wav.npy`` (float64 Hz)
   and RVC's coarse quantisation -> ``2a_f0/<name>.wav.npy`` (int64, 1..255).
4. STAND-IN content features (HuBERT weights cannot be downloaded here): a fixed random
   projection of 80-band log-mel frames of the 16 kHz audio to 768 dims, at HuBERT's
   frame count ``(N16 - 400) // 320 + 1`` (50 fps) -> ``3_feature768/<name>.npy``
   float32 ``[T, 768]``.
5. ``filelist.txt`` with paths relative to the experiment folder, speaker id 0.

The package-data budget (< 3 MB) bounds the total audio: each second costs ~160 kB of
float32 40 kHz wav plus ~154 kB of 768-d float32 features, so the phrases are short
(~0.7-1.2 s, about 8.5 s in total).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
from scipy import signal
from scipy.io import wavfile

SR = 40000
# (text, espeak voice, pitch 0..99, words per minute)
PHRASES = [
    ("Hello there.", "en-us+m3", 40, 190),
    ("The quick brown fox.", "en-us+f3", 65, 180),
    ("Voices change with time.", "en+m1", 30, 185),
    ("Good morning to you all.", "en-us+f2", 70, 190),
    ("One, two, three, four.", "en+m3", 50, 170),
    ("It is a lovely day.", "en-us+f4", 60, 180),
    ("Please sing along now.", "en+m2", 35, 175),
    ("See you soon.", "en-us+f1", 75, 185),
]
MAX_SECONDS = 1.2


def _import_pyworld():
    # pyworld's __init__ asks pkg_resources (removed from recent setuptools) for its
    # version string only; give it a stub so the compiled extension loads.
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")
        stub.get_distribution = lambda name: types.SimpleNamespace(version="unknown")
        sys.modules["pkg_resources"] = stub
    import pyworld
    return pyworld


def speak(text: str, voice: str, pitch: int, speed: int) -> tuple[int, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", path, text],
                       check=True, capture_output=True)
        sr, x = wavfile.read(path)
    return sr, x.astype(np.float64) / 32768.0


def trim(x: np.ndarray, sr: int, thresh: float = 0.01, keep: float = 0.05) -> np.ndarray:
    idx = np.nonzero(np.abs(x) > thresh)[0]
    a = max(0, idx[0] - int(keep * sr))
    b = min(len(x), idx[-1] + int(keep * sr))
    return x[a:b]


def standin_features(x16: np.ndarray, proj: np.ndarray, mel_fb: np.ndarray) -> np.ndarray:
    """STAND-IN for HuBERT: log-mel (n_fft 400, hop 320, no centring) @ fixed projection."""
    n = (len(x16) - 400) // 320 + 1
    idx = np.arange(400)[None, :] + 320 * np.arange(n)[:, None]
    frames = x16[idx] * np.hanning(400)
    power = np.abs(np.fft.rfft(frames, n=512, axis=-1)) ** 2
    logmel = np.log(np.maximum(power @ mel_fb.T, 1e-6))
    logmel = (logmel - logmel.mean()) / (logmel.std() + 1e-6)
    return (np.tanh(logmel @ proj)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "rvclora_jax", "example_data"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    pyworld = _import_pyworld()
    import librosa  # mel filterbank only
    from rvclora_jax.render import coarse_pitch  # RVC's quantisation (pipeline.get_f0)

    dirs = {k: os.path.join(out, k) for k in ("0_gt_wavs", "2a_f0", "2b-f0nsf", "3_feature768")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
    rng = np.random.default_rng(0)
    proj = (rng.standard_normal((80, 768)) / np.sqrt(80)).astype(np.float64)
    mel_fb = librosa.filters.mel(sr=16000, n_fft=512, n_mels=80)
    b, a = signal.butter(N=5, Wn=48, btype="high", fs=SR)
    lines = []
    for i, (text, voice, pitch, speed) in enumerate(PHRASES):
        sr0, x = speak(text, voice, pitch, speed)
        x = trim(x, sr0)
        g = np.gcd(sr0, SR)
        x = signal.resample_poly(x, SR // g, sr0 // g)[: int(MAX_SECONDS * SR)]
        x = signal.lfilter(b, a, x)
        peak = np.abs(x).max()
        x = (x / peak * (0.9 * 0.75)) + (1 - 0.75) * x
        x = x.astype(np.float32)
        name = f"{i}_0"
        wav = os.path.join(dirs["0_gt_wavs"], name + ".wav")
        wavfile.write(wav, SR, x)
        x16 = signal.resample_poly(x.astype(np.float64), 2, 5)
        f0, t = pyworld.harvest(x16, fs=16000, f0_ceil=1100, f0_floor=50, frame_period=10)
        f0 = pyworld.stonemask(x16, f0, t, 16000)
        f0 = signal.medfilt(f0, 3)
        np.save(os.path.join(dirs["2b-f0nsf"], name + ".wav.npy"), f0, allow_pickle=False)
        np.save(os.path.join(dirs["2a_f0"], name + ".wav.npy"), coarse_pitch(f0).astype(np.int64),
                allow_pickle=False)
        feats = standin_features(x16, proj, mel_fb)
        np.save(os.path.join(dirs["3_feature768"], name + ".npy"), feats, allow_pickle=False)
        lines.append(f"0_gt_wavs/{name}.wav|3_feature768/{name}.npy|2a_f0/{name}.wav.npy|2b-f0nsf/{name}.wav.npy|0")
        voiced = f0[f0 > 0]
        print(f"{name}: {len(x) / SR:.2f}s voice={voice} p={pitch} frames={len(x) // 400} "
              f"f0={len(f0)} feat={feats.shape} voiced={len(voiced)} median={np.median(voiced):.0f}Hz")
    with open(os.path.join(out, "filelist.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
