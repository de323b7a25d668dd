"""The built-in example: adapt a real-architecture RVC synthesizer end to end.

No weights can be downloaded, so the base is randomly initialised with the exact
architecture (and parameter paths) of an RVC pretrained model. The example injects
LoRA adapters by preset, perturbs them as a training step would, merges them with the
pure :func:`rvclora_jax.lora.merge`, verifies that the merged model renders the same
audio as the adapted one, and saves the adapter.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import adapters, lora
from .families.rvc import RVC
from .models import synthesizer as S


@dataclass
class ExampleResult:
    summary: lora.Summary
    adapter_dir: str
    max_abs_diff: float
    max_abs_audio: float
    seconds: float


def _render(model: S.Synthesizer, feats, lengths, pitch, f0, sid):
    @nnx.jit
    def run(m, feats, lengths, pitch, f0, sid):
        return m.infer(feats, lengths, pitch, f0, sid)[0]
    return run(model, feats, lengths, pitch, f0, sid)


def run_example(out_dir: str, *, version: str = "v2", sr: int | str = 40000, preset: str = "generator",
                rank: int = 8, alpha: float | None = None, frames: int = 32, seed: int = 0,
                log=print) -> ExampleResult:
    t0 = time.time()
    cfg = RVC.preset(version, sr)
    log(f"building RVC {version} {cfg.sr // 1000}k synthesizer with f0 (random weights, real architecture)")
    model = S.Synthesizer(cfg, version, True, rngs=nnx.Rngs(seed), with_enc_q=False)
    base = lora.partition(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[1]
    config = lora.LoRAConfig.from_preset(preset, rank=rank, alpha=alpha)
    lora.inject(model, config, rngs=nnx.Rngs(seed + 1))
    summary = lora.summarize(model)
    log(summary.format(max_rows=12))

    # Stand-in for training: give every B factor small random values.
    key = jax.random.key(seed + 2)
    for path, layer in lora.iter_lora_layers(model):
        if layer.has_lora:
            key, sub = jax.random.split(key)
            layer.lora_b[...] = 0.02 * jax.random.normal(sub, layer.lora_b.shape)

    rng = np.random.default_rng(seed)
    feats = jnp.asarray(rng.standard_normal((1, frames, model.feature_dim)), jnp.float32)
    f0 = jnp.asarray(np.full((1, frames), 180.0, np.float32))
    pitch = jnp.asarray(np.full((1, frames), 100, np.int32))
    lengths, sid = jnp.asarray([frames]), jnp.asarray([0])
    log(f"rendering {frames} frames ({frames * cfg.hop_length} samples) with the adapter (jit)...")
    adapted = np.asarray(_render(model, feats, lengths, pitch, f0, sid))

    adapter = nnx.to_pure_dict(nnx.state(model, lora.LoRAParam))
    scalings = {p: layer.lora_scaling for p, layer in lora.iter_lora_layers(model) if layer.has_lora}
    kinds = {p: k for p, k in lora.layer_kinds(model).items() if p in scalings}
    merged = lora.merge(base, adapter, scalings, kinds=kinds)
    plain = S.Synthesizer(cfg, version, True, rngs=nnx.Rngs(seed), with_enc_q=False)
    from .params import load_params
    load_params(plain, merged)
    log("rendering with the merged plain model...")
    mer = np.asarray(_render(plain, feats, lengths, pitch, f0, sid))
    diff = float(np.abs(adapted - mer).max())
    log(f"merged vs adapted audio: max |Δ| = {diff:.2e} (audio peak {np.abs(adapted).max():.3f})")

    os.makedirs(out_dir, exist_ok=True)
    adir = os.path.join(out_dir, "adapter")
    adapters.save_adapter(adir, adapter, config, kinds=kinds, base_fingerprint=adapters.fingerprint(base),
                          metadata={"version": version, "sr": cfg.sr, "f0": True, "example": True})
    size = sum(os.path.getsize(os.path.join(adir, f)) for f in os.listdir(adir))
    log(f"adapter written to {adir} ({size / 1e6:.2f} MB)")
    return ExampleResult(summary, adir, diff, float(np.abs(adapted).max()), time.time() - t0)
