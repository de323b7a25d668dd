"""Render audio from content features + f0 with a (LoRA-adapted) RVC synthesizer.

The rendering core of ``rvclora render`` (:mod:`rvclora_jax.cli.render` loads the model)
and of the samples written during training (:class:`rvclora_jax.run.Validator`). It is
RVC's ``pipeline.vc`` minus feature extraction and pitch tracking:
the caller brings the HuBERT/ContentVec features (``[T50, C]`` at 50 fps, RVC's
``3_feature{256,768}/<name>.npy``) and the f0 in Hz at 100 fps (RVC's
``2b-f0nsf/<name>.wav.npy``). The features are repeated ×2 to 100 fps (RVC's
``F.interpolate(scale_factor=2)``, nearest), the f0 is shifted by ``2^(key/12)`` and
quantised to RVC's coarse pitch, and the synthesizer's ``infer`` renders the audio at the
model's sample rate.

Randomness. RVC draws the prior noise ``ε`` (scaled by 0.66666) and the NSF excitation
noise from the global torch RNG on every call. Here both come from ``jax.random`` with an
explicit ``seed``; ``noise_scale`` scales the prior noise like RVC's literal 0.66666.
**``noise_scale=0`` renders fully deterministically: no prior noise and no NSF noise**
(RVC's ``SineGen`` always adds its excitation noise, N(0, 0.003²) on voiced and
N(0, (0.1/3)²) on unvoiced samples, so RVC itself has no exactly noise-free mode).

Batching. Several inputs are rendered in one jit-compiled call, zero-padded to the
longest and cut back to their own ``T·hop`` samples. The text encoder and the flow are
masked, and the decoder is run with ``mask_decoder=True`` (activations past each row's
end are zeroed before every convolution), so every row equals rendering it on its own,
which is what RVC does (one utterance at a time).
"""

from __future__ import annotations

import functools
import os
import wave
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .fileio import atomic_write
from .models.synthesizer import INFER_NOISE_SCALE
from .utterance import FEATURE_DIM, collate, load_f0, load_features, pitch_file, repeat_features, stem

F0_MIN, F0_MAX = 50.0, 1100.0
# frames at 100 fps. RVC's own files differ by up to 3: f0 has N//160 + 1 frames, HuBERT
# (N − 400)//320 + 1 at 50 fps (the example data: f0 = 2·features + 1..3).
MAX_LENGTH_MISMATCH = 3


# --------------------------------------------------------------------------- inputs


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


def coarse_pitch(f0_hz) -> np.ndarray:
    """RVC's coarse pitch (``pipeline.get_f0``): mel = 1127·ln(1+f/700); for mel > 0
    q = (mel − mel(50))·254/(mel(1100) − mel(50)) + 1; clipped to [1, 255]; rint.
    Unvoiced (f0 = 0) → 1. Returns int32."""
    f0 = np.asarray(f0_hz, np.float64)
    mel = _mel(f0)
    mel_min, mel_max = _mel(F0_MIN), _mel(F0_MAX)
    mel = np.where(mel > 0, (mel - mel_min) * 254.0 / (mel_max - mel_min) + 1.0, mel)
    mel = np.where(mel <= 1, 1.0, mel)
    mel = np.where(mel > 255, 255.0, mel)
    return np.rint(mel).astype(np.int32)


def _feature_dim(model) -> int:
    return int(getattr(model, "feature_dim", FEATURE_DIM[model.version]))


def prepare_inputs(features, f0=None, *, f0_up_key: float = 0.0, model=None, name: str = "input") -> dict:
    """One utterance → ``{"phone" [T, C] f32, "pitch" [T] i32 | None, "pitchf" [T] f32 | None,
    "length": T, "name"}`` at 100 fps.

    ``features`` ``[T50, C]`` are repeated ×2; with ``f0`` ``[T100]`` (Hz) both are cut to the
    shorter length (a difference of more than 3 frames is an error; RVC's own feature/f0
    files differ by up to 3). ``f0_up_key`` shifts
    the pitch in semitones before quantising (as RVC). With ``model`` given, the feature
    width (256 v1 / 768 v2) and the presence of f0 (required iff the model has f0) are
    checked. ``name`` (a file name) is used in error messages."""
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise ValueError(f"{name}: features must be [frames, dim], got shape {feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise ValueError(f"{name}: features contain NaN or inf")
    if model is not None:
        dim = _feature_dim(model)
        if feats.shape[1] != dim:
            raise ValueError(f"{name}: feature dim {feats.shape[1]} does not match the {model.version} model's "
                             f"{dim} (v1 models take 256-d features, v2 models 768-d)")
        if model.f0 and f0 is None:
            raise ValueError(f"{name}: the model has pitch (f0) input; give its f0 (RVC's 2b-f0nsf/*.wav.npy, Hz)")
        if not model.f0 and f0 is not None:
            raise ValueError(f"{name}: the model has no pitch input (a nono model); do not give f0")
    phone = repeat_features(feats.astype(np.float32))
    pitch = pitchf = None
    if f0 is not None:
        f0 = np.asarray(f0)
        if f0.ndim == 2 and 1 in f0.shape:
            f0 = f0.reshape(-1)
        if f0.ndim != 1:
            raise ValueError(f"{name}: f0 must be one value per 10 ms frame, got shape {f0.shape}")
        if np.issubdtype(f0.dtype, np.integer):
            raise ValueError(f"{name}: f0 is integer (coarse pitch, RVC's 2a_f0?); give the f0 in Hz "
                             f"(RVC's 2b-f0nsf)")
        f0 = f0.astype(np.float64)
        if not np.all(np.isfinite(f0)):
            raise ValueError(f"{name}: f0 contains NaN or inf")
        if np.any(f0 < 0):
            raise ValueError(f"{name}: f0 contains negative values")
        if abs(len(f0) - len(phone)) > MAX_LENGTH_MISMATCH:
            raise ValueError(f"{name}: length mismatch: {len(phone)} feature frames at 100 fps "
                             f"({feats.shape[0]} at 50 fps) vs {len(f0)} f0 frames (more than "
                             f"{MAX_LENGTH_MISMATCH} apart)")
        n = min(len(f0), len(phone))
        phone, f0 = phone[:n], f0[:n]
        f0 = f0 * 2.0 ** (float(f0_up_key) / 12.0)
        pitch = coarse_pitch(f0)
        pitchf = f0.astype(np.float32)
    if len(phone) == 0:
        raise ValueError(f"{name}: no frames")
    return {"phone": phone, "pitch": pitch, "pitchf": pitchf, "length": int(len(phone)), "name": name}


def _check(model, inputs: Sequence[dict]) -> None:
    if not inputs:
        raise ValueError("nothing to render")
    dim = _feature_dim(model)
    for x in inputs:
        name = x.get("name", "input")
        if x["phone"].shape[1] != dim:
            raise ValueError(f"{name}: feature dim {x['phone'].shape[1]} does not match the {model.version} "
                             f"model's {dim}")
        if model.f0 and x.get("pitchf") is None:
            raise ValueError(f"{name}: the model has pitch (f0) input; the input has no f0")


# --------------------------------------------------------------------------- rendering


@functools.partial(jax.jit, static_argnums=(0,))
def _infer(graphdef, state, phone, lengths, pitch, pitchf, sid, eps, source_noise, noise_scale):
    model = nnx.merge(graphdef, state)
    o, _, _ = model.infer(phone, lengths, pitch, pitchf, sid, eps=eps, noise_scale=noise_scale,
                          source_noise=source_noise, mask_decoder=True)  # each row as if alone
    return o[..., 0]


def _sids(model, sid, B: int) -> np.ndarray:
    sids = np.broadcast_to(np.asarray(sid, np.int64), (B,)).astype(np.int64)
    n = int(model.config.spk_embed_dim)
    bad = [int(s) for s in sids if not 0 <= s < n]
    if bad:
        raise ValueError(f"speaker id {bad[0]} is outside the model's speaker rows 0..{n - 1}")
    return sids.astype(np.int32)


def render_arrays(model, inputs: Sequence[dict], *, sid=0, noise_scale: float = INFER_NOISE_SCALE,
                  eps=None, source_noise=None, frames: int | None = None) -> list[np.ndarray]:
    """The low-level entry point: render a batch with explicit noise arrays.

    ``eps`` ``[B, T, inter_channels]`` (standard normal, scaled by ``noise_scale``) and
    ``source_noise`` ``[B, T·hop, 1]`` (standard normal, NSF models only) are for the
    zero-padded batch (T = the longest input); ``None`` means no noise. One jit-compiled
    call; returns each input's audio cut to its own ``T·hop`` samples (float32).
    ``frames``: pad the batch to this T instead (a bucket length, so inputs of nearby
    lengths share one compiled program; the decoder's masking makes it exact)."""
    _check(model, inputs)
    if frames is not None and frames < max(int(x["length"]) for x in inputs):
        raise ValueError(f"frames={frames} is shorter than the longest input")
    b = collate(inputs, frames)
    B, T = b["phone"].shape[:2]
    hop = int(model.config.hop_length)
    if eps is not None:
        eps = jnp.asarray(eps, jnp.float32)
        want = (B, T, int(model.config.inter_channels))
        if tuple(eps.shape) != want:
            raise ValueError(f"eps has shape {tuple(eps.shape)}, expected {want}")
    if source_noise is not None and model.f0:
        source_noise = jnp.asarray(source_noise, jnp.float32)
        if tuple(source_noise.shape) != (B, T * hop, 1):
            raise ValueError(f"source_noise has shape {tuple(source_noise.shape)}, expected {(B, T * hop, 1)}")
    else:
        source_noise = None
    graphdef, state = nnx.split(model)
    pitch, pitchf = (jnp.asarray(b["pitch"]), jnp.asarray(b["pitchf"])) if model.f0 else (None, None)
    o = _infer(graphdef, state, jnp.asarray(b["phone"]), jnp.asarray(b["phone_lengths"]), pitch, pitchf,
               jnp.asarray(_sids(model, sid, B)), eps, source_noise, jnp.float32(noise_scale))
    o = np.asarray(jax.device_get(o), np.float32)
    return [o[i, : int(n) * hop].copy() for i, n in enumerate(b["phone_lengths"])]


def render(model, inputs_list: Sequence[dict] | dict, *, sid=0, noise_scale: float = INFER_NOISE_SCALE,
           seed: int = 0) -> list[np.ndarray]:
    """Render one or several :func:`prepare_inputs` dicts in one batch.

    The prior noise is ``jax.random.normal(seed)`` × ``noise_scale`` and the NSF noise a
    second standard-normal draw from the same seed; ``noise_scale=0`` turns both off (fully
    deterministic, see the module docstring). ``sid`` is an int or one per input."""
    if isinstance(inputs_list, dict):
        inputs_list = [inputs_list]
    _check(model, inputs_list)
    if float(noise_scale) == 0.0:
        return render_arrays(model, inputs_list, sid=sid, noise_scale=0.0)
    B = len(inputs_list)
    T = max(int(x["length"]) for x in inputs_list)
    k_eps, k_src = jax.random.split(jax.random.key(int(seed)))
    eps = jax.random.normal(k_eps, (B, T, int(model.config.inter_channels)))
    src = jax.random.normal(k_src, (B, T * int(model.config.hop_length), 1)) if model.f0 else None
    return render_arrays(model, inputs_list, sid=sid, noise_scale=noise_scale, eps=eps, source_noise=src)


# --------------------------------------------------------------------------- files


def write_wav(path: str, audio, sr: int) -> str:
    """16-bit PCM mono WAV (clipped to [-1, 1]), written to a temporary file and renamed."""
    a = np.asarray(audio, np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{path}: audio contains NaN or inf")
    pcm = np.rint(np.clip(a, -1.0, 1.0) * 32767.0).astype("<i2")

    def write(tmp):
        with wave.open(tmp, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(sr))
            w.writeframes(pcm.tobytes())

    return atomic_write(path, write, suffix=".wav")


def _f0_file(f0_dir: str, name: str) -> str:
    p = pitch_file(f0_dir, name)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{f0_dir}: no f0 file for {name} (looked for {name}.wav.npy and {name}.npy)")
    return p


def collect_inputs(model, features: str, f0: str | None, *, f0_up_key: float = 0.0) -> list[dict]:
    """A feature file (+ f0 file) or a folder of them (+ a folder of f0 files matched by
    name, ``<name>.npy`` or ``<name>.wav.npy``) → prepared inputs named by ``<name>``."""
    if model.f0 and f0 is None:
        raise ValueError("the model has pitch (f0) input: pass --f0 F0.npy|DIR (f0 in Hz, RVC's 2b-f0nsf)")
    if not model.f0 and f0 is not None:
        raise ValueError("the model has no pitch input (a nono model): omit --f0")
    if not os.path.exists(features):
        raise FileNotFoundError(f"{features}: no such feature file or folder")
    if os.path.isdir(features):
        files = sorted(f for f in os.listdir(features) if f.endswith(".npy") and not f.startswith("."))
        if not files:
            raise ValueError(f"{features}: no .npy feature files")
        if f0 is not None and not os.path.isdir(f0):
            raise ValueError(f"--features is a folder, so --f0 must be a folder too ({f0} is not)")
        out = []
        for fn in files:
            name = stem(fn)
            fpath = os.path.join(features, fn)
            f0_arr = load_f0(_f0_file(f0, name)) if f0 is not None else None
            out.append(prepare_inputs(load_features(fpath), f0_arr, f0_up_key=f0_up_key, model=model, name=name))
        names = [x["name"] for x in out]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"{features}: several feature files map to the name {sorted(dup)[0]}")
        return out
    if f0 is not None and os.path.isdir(f0):
        f0 = _f0_file(f0, stem(features))
    if f0 is not None and not os.path.exists(f0):
        raise FileNotFoundError(f"{f0}: no such f0 file")
    return [prepare_inputs(load_features(features), load_f0(f0) if f0 is not None else None,
                           f0_up_key=f0_up_key, model=model, name=stem(features))]


__all__ = ["coarse_pitch", "prepare_inputs", "render", "render_arrays", "write_wav", "collect_inputs",
           "F0_MIN", "F0_MAX", "MAX_LENGTH_MISMATCH"]
