"""A training run: data folder + base models → adapter, metrics and plots in RUN_DIR.

This is the JAX side of ``rvclora train``; reading the ``.pth`` bases and writing the
merged ``model.pth`` happen in the CLI through ``convert/`` (the only torch code).
RUN_DIR is itself an adapter directory (``adapter.safetensors`` + ``adapter_config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from . import data as data_mod
from . import lora
from .models.synthesizer import TRAIN_SEGMENT_SAMPLES, Synthesizer
from .train import TrainConfig, Trainer, train_loop


@dataclasses.dataclass
class RunConfig:
    data_dir: str
    run_dir: str
    lora: lora.LoRAConfig
    train: TrainConfig
    steps: int | None = None
    epochs: int | None = None
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    resume: bool = False
    progress: bool = True
    sid: int | None = None  # train every clip as this speaker row of the base (emb_g)


def auto_buckets(lengths: list[int], step: int = 50, max_shapes: int = 3) -> tuple[int, ...]:
    """A few padded lengths covering the data (each compiled once): quantiles rounded up."""
    qs = np.quantile(np.asarray(lengths), np.linspace(0, 1, max_shapes + 1)[1:])
    return tuple(sorted({min(int(math.ceil(q / step) * step), data_mod.MAX_FRAMES) for q in qs}))


def default_segment_frames(g: Synthesizer) -> int:
    key = (g.version, g.config.sr)
    return TRAIN_SEGMENT_SAMPLES.get(key, 12800) // g.config.hop_length


def prepare_batches(g: Synthesizer, data_dir: str, batch_size: int, segment_frames: int, seed: int,
                    sid: int | None = None):
    items = data_mod.scan_experiment(data_dir, version=g.version, f0=g.f0, sr=g.config.sr)
    n_spk = g.config.spk_embed_dim
    if sid is not None:
        if not 0 <= sid < n_spk:
            raise ValueError(f"--sid {sid}: the base has speaker rows 0..{n_spk - 1} (emb_g)")
        items = [dataclasses.replace(it, sid=sid) for it in items]
    for it in items:
        if not 0 <= it.sid < n_spk:
            raise ValueError(f"{it.wav}: speaker id {it.sid} is outside the base's {n_spk} speaker rows; "
                             f"pass --sid to pick one")
    # Spectrogram cache beside the data (as RVC's .spec.pt), never inside the installed package.
    inside_pkg = os.path.abspath(data_dir).startswith(os.path.dirname(os.path.abspath(data_mod.__file__)))
    cache = (os.path.join(data_dir, ".rvclora_cache")
             if os.access(data_dir, os.W_OK) and not inside_pkg else None)
    loaded = data_mod.load_items(items, g.config.sr, cache_dir=cache)
    lengths = [d["spec"].shape[0] for d in loaded]
    buckets = auto_buckets([n for n in lengths if n >= segment_frames] or lengths)
    return data_mod.Batches(items, batch_size, segment_frames, seed=seed, buckets=buckets, data=loaded)


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Loss curves (total G, mel, KL, D) from metrics.jsonl to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(metrics_path) if line.strip()]
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in ((axes[0], ("mel",), "mel L1 ×45"), (axes[1], ("loss_g", "kl"), "generator"),
                            (axes[2], ("loss_d", "adv", "fm"), "adversarial")):
        for k in keys:
            ax.plot(steps, [r[k] for r in recs], label=k)
            if any("val_" + k in r for r in recs):
                vs = [(r["step"], r["val_" + k]) for r in recs if "val_" + k in r]
                ax.plot(*zip(*vs), "o-", label="val " + k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)


def run(g: Synthesizer, d: nnx.Module, cfg: RunConfig, *, base_fingerprint: dict | None = None,
        log: Callable[[str], None] = print, metadata: dict | None = None) -> dict[str, Any]:
    """Inject (or keep) adapters, train, and write the adapter, metrics and plot."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    base = lora.partition(nnx.to_pure_dict(nnx.state(g, nnx.Param)))[1]
    fp = base_fingerprint or lora.fingerprint(base)
    if not any(layer.has_lora for _, layer in lora.iter_lora_layers(g)):
        lora.inject(g, cfg.lora, rngs=nnx.Rngs(cfg.train.seed))
    summary = lora.summarize(g)
    batches = prepare_batches(g, cfg.data_dir, cfg.train.batch_size, cfg.train.segment_frames, cfg.train.seed,
                              sid=cfg.sid)
    spe = len(batches)
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * spe
    log(f"data: {len(batches.items)} clips from {cfg.data_dir}, {spe} batches/epoch of {cfg.train.batch_size}, "
        f"padded lengths {batches.shapes}, segment {cfg.train.segment_frames} frames")
    log(f"adapter: {len(summary.rows)} layers, {summary.trainable_params:,} params "
        f"({summary.trainable_percent:.2f}% of the generator); devices: {jax.device_count()} "
        f"{jax.devices()[0].platform}")
    trainer = Trainer(g, d, cfg.train, steps_per_epoch=spe)
    res = train_loop(trainer, batches, total_steps=total, run_dir=cfg.run_dir, save_every=cfg.save_every,
                     keep=cfg.keep, log_every=cfg.log_every, resume=cfg.resume, progress=cfg.progress)
    trainer.load_into_models(res.state)
    adapter = nnx.to_pure_dict(nnx.state(g, lora.LoRAParam))
    meta = {"version": g.version, "sr": g.config.sr, "f0": g.f0, "steps": res.step,
            "data": os.path.abspath(cfg.data_dir), "train": dataclasses.asdict(cfg.train)}
    meta.update(metadata or {})
    lora.save_adapter(cfg.run_dir, adapter, cfg.lora, base_fingerprint=fp, metadata=meta)
    metrics = os.path.join(cfg.run_dir, "metrics.jsonl")
    png = os.path.join(cfg.run_dir, "loss.png")
    if os.path.exists(metrics):
        plot_losses(metrics, png)
    return {"step": res.step, "interrupted": res.interrupted, "metrics": res.metrics, "summary": summary,
            "adapter_dir": cfg.run_dir, "loss_png": png, "batches": batches, "trainer": trainer}
