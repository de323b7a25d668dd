"""A training run: data folder + base generator → trained adapter, metrics and plots in RUN_DIR.

:func:`run` is ``rvclora train`` without files of models: the caller (the CLI, through
``rvclora_convert``) loads the base generator once, hands its model over, gets the trained
adapter back in memory (:attr:`RunResult.adapter`) and merges it into that same base.
RUN_DIR is itself an adapter directory (``adapter.safetensors`` + ``adapter_config.json``),
so ``rvclora render RUN_DIR`` and ``rvclora export --adapter RUN_DIR`` work on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from . import data as data_mod
from . import adapters, distributed, lora
from .audio import MelConfig
from .compilation import describe_memory, peak_memory
from .families.rvc import RVC
from .losses import C_MEL
from .models.synthesizer import Synthesizer
from .render import render_arrays, write_wav
from .train import Hooks, TrainConfig, Trainer, train_loop


@dataclasses.dataclass
class RunConfig:
    """Everything :func:`run` needs besides the models: the data, the run directory, the
    adapter to train (:class:`~rvclora_jax.lora.LoRAConfig`), the optimisation
    (:class:`~rvclora_jax.train.TrainConfig`) and the loop's length, checkpoints and logging."""

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
    sample_every: int | None = None  # render the held-out clip + log val_mel every N steps (default save_every)
    val_fraction: float = 0.1  # held out from training when the data has >= 4 clips (at least 1 clip)
    max_shapes: int = 3  # padded batch lengths (one compile each); 1 pads every batch to the longest


def auto_buckets(lengths: list[int], step: int = 50, max_shapes: int = 3) -> tuple[int, ...]:
    """A few padded lengths covering the data (each compiled once): quantiles rounded up."""
    qs = np.quantile(np.asarray(lengths), np.linspace(0, 1, max_shapes + 1)[1:])
    return tuple(sorted({min(int(math.ceil(q / step) * step), data_mod.MAX_FRAMES) for q in qs}))


def default_segment_frames(g: Synthesizer) -> int:
    """RVC's training segment for the generator's version and rate (32 frames at 40k)."""
    return RVC.segment_frames(g.version, g.config.sr, g.config.hop_length)


def split_validation(items, fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic hold-out: ``round(n·fraction)`` clips (at least 1) when there are ≥ 4
    clips and ``fraction > 0``, evenly spread over the clips sorted by file path (so the
    choice does not depend on the seed or the scan order). Returns (train, val) indices."""
    n = len(items)
    if n < 4 or not fraction or fraction <= 0:
        return list(range(n)), []
    if fraction >= 1:
        raise ValueError(f"val_fraction must be < 1, got {fraction}")
    k = min(max(1, int(round(n * fraction))), n - 1)
    order = sorted(range(n), key=lambda i: os.path.abspath(items[i].wav))
    picks = sorted({order[int(j)] for j in np.linspace(0, n - 1, k + 2)[1:-1].round()})
    val = set(picks)
    return [i for i in range(n) if i not in val], picks


def prepare_data(g: Synthesizer, data_dir: str, batch_size: int, segment_frames: int, seed: int,
                 sid: int | None = None, val_fraction: float = 0.0, max_shapes: int = 3):
    """(training batches, held-out items, their loaded data); see :func:`split_validation`."""
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
    train_idx, val_idx = split_validation(items, val_fraction)
    val_items, val_data = [items[i] for i in val_idx], [loaded[i] for i in val_idx]
    items, loaded = [items[i] for i in train_idx], [loaded[i] for i in train_idx]
    lengths = [d["spec"].shape[0] for d in loaded]
    buckets = auto_buckets([n for n in lengths if n >= segment_frames] or lengths, max_shapes=max_shapes)
    batches = data_mod.Batches(items, batch_size, segment_frames, seed=seed, buckets=buckets, data=loaded)
    return batches, val_items, val_data


class Validator:
    """Held-out clips rendered with the live generator (noise 0): a sample WAV + mel PNG of
    the first clip and ``val_mel`` (mel L1 ×C_MEL vs the clips' own spectrogram, the mean over
    clips) for all. One jit-compiled render and one jit-compiled mel are reused."""

    def __init__(self, g: Synthesizer, items, data: list[dict], run_dir: str):
        self.g, self.items, self.run_dir = g, list(items), run_dir
        self.mel = MelConfig.for_rate(g.config.sr)
        self.hop = g.config.hop_length
        self.inputs = [{"phone": d["phone"], "pitch": d["pitch"], "pitchf": d["pitchf"],
                        "length": int(d["phone"].shape[0]), "name": it.name} for it, d in zip(items, data)]
        self.sids = np.array([d["sid"] for d in data], np.int32)
        T = max(x["length"] for x in self.inputs)
        spec = np.zeros((len(data), T, self.mel.n_freq), np.float32)
        for i, d in enumerate(data):
            spec[i, : d["spec"].shape[0]] = d["spec"]
        self.lengths = np.array([x["length"] for x in self.inputs], np.int32)
        self.target = np.asarray(jax.jit(self.mel.spec_to_mel)(spec))  # [B, T, n_mels]
        self._mel_fn = jax.jit(self.mel.mel)

    def __call__(self, step: int) -> dict:
        outs = render_arrays(self.g, self.inputs, sid=self.sids, noise_scale=0.0)
        B, T = self.target.shape[:2]
        y = np.zeros((B, T * self.hop), np.float32)
        for i, o in enumerate(outs):
            y[i, : len(o)] = o
        gen = np.asarray(self._mel_fn(jax.numpy.asarray(y)))[:, :T]
        losses = []
        for i, n in enumerate(self.lengths):
            losses.append(float(np.mean(np.abs(gen[i, :n] - self.target[i, :n]))) * C_MEL)
        val_mel = float(np.mean(losses))
        d = os.path.join(self.run_dir, "samples")
        os.makedirs(d, exist_ok=True)
        stem = os.path.join(d, f"step_{step:06d}")
        write_wav(stem + ".wav", outs[0], self.g.config.sr)
        n0 = int(self.lengths[0])
        _plot_mels(self.target[0, :n0], gen[0, :n0], stem + ".png",
                   f"{self.items[0].name}, step {step}: val mel L1 ×45 {losses[0]:.2f}", self.hop / self.g.config.sr)
        return {"step": int(step), "val_mel": val_mel}


def _plot_mels(target: np.ndarray, gen: np.ndarray, png_path: str, title: str, frame_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = float(min(target.min(), gen.min())), float(max(target.max(), gen.max()))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    ext = (0, target.shape[0] * frame_s, 0, target.shape[1])
    for ax, m, name in ((axes[0], target, "target (held-out clip)"), (axes[1], gen, "generated (noise 0)")):
        im = ax.imshow(m.T, origin="lower", aspect="auto", extent=ext, vmin=lo, vmax=hi, cmap="magma")
        ax.set_title(name)
        ax.set_xlabel("s")
    axes[0].set_ylabel("mel bin")
    fig.colorbar(im, ax=axes, label="log mel")
    fig.suptitle(title, fontsize=9)
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png_path)


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Loss curves (total G, mel, KL, D) from metrics.jsonl to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(metrics_path) if line.strip()]
    if not recs:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in ((axes[0], ("mel",), "mel L1 ×45"), (axes[1], ("loss_g", "kl"), "generator"),
                            (axes[2], ("loss_d", "adv", "fm"), "adversarial")):
        for k in keys:
            pts = [(r["step"], r[k]) for r in recs if k in r]
            if pts:
                ax.plot(*zip(*pts), label=k)
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


@dataclasses.dataclass
class RunResult:
    """What :func:`run` returns. ``adapter`` is the trained adapter in memory (numpy
    factors, the run's LoRA config and base fingerprint, ``directory`` = the run dir it was
    also saved to), ready to merge into the base it was trained on."""

    step: int
    interrupted: bool
    metrics: list[dict]
    summary: lora.Summary
    adapter: adapters.Adapter
    loss_png: str
    batches: data_mod.Batches
    trainer: Trainer
    val_items: list


def describe_metrics(recs: list[dict]) -> str:
    """One line: the mean mel loss of the first and of the last few logged steps, and the last KL/D."""
    k = max(1, min(5, len(recs) // 3))
    first = sum(r["mel"] for r in recs[:k]) / k
    last = sum(r["mel"] for r in recs[-k:]) / k
    return (f"step {recs[-1]['step']}: mel L1 x{C_MEL:g} (mean of the first / last {k} logged steps) "
            f"{first:.2f} -> {last:.2f}; kl {recs[-1]['kl']:.2f}, loss_d {recs[-1]['loss_d']:.2f}")


def run(g: Synthesizer, cfg: RunConfig, *, discriminator: nnx.Module | None = None,
        metadata: dict | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Train a LoRA adapter on ``g`` (the base generator, with ``enc_q``) and write RUN_DIR.

    The adapter ``cfg.lora`` is injected into ``g`` in place (unless ``g`` already has
    one) and holds the trained values afterwards; ``g``'s base weights never change.
    ``discriminator`` defaults to the model family's, randomly initialised
    (seed ``cfg.train.seed + 1``). ``metadata`` is stored in ``adapter_config.json``
    (the CLI records the base file there, which ``rvclora render RUN_DIR`` reads)."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    base = lora.partition(nnx.to_pure_dict(nnx.state(g, nnx.Param)))[1]
    fp = adapters.fingerprint(base)
    d = discriminator if discriminator is not None else RVC.discriminator(g.version, nnx.Rngs(cfg.train.seed + 1))
    if not any(layer.has_lora for _, layer in lora.iter_lora_layers(g)):
        lora.inject(g, cfg.lora, rngs=nnx.Rngs(cfg.train.seed))
    summary = lora.summarize(g)
    batches, val_items, val_data = prepare_data(g, cfg.data_dir, cfg.train.batch_size, cfg.train.segment_frames,
                                                cfg.train.seed, sid=cfg.sid, val_fraction=cfg.val_fraction,
                                                max_shapes=cfg.max_shapes)
    spe = len(batches)
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * spe
    log(f"data: {len(batches.items)} clips from {cfg.data_dir}, {spe} batches/epoch of {cfg.train.batch_size}, "
        f"padded lengths {batches.shapes}, segment {cfg.train.segment_frames} frames"
        + (f"; held out for validation: {', '.join(it.name for it in val_items)}" if val_items else ""))
    log(f"adapter: {len(summary.rows)} layers, {summary.trainable_params:,} params "
        f"({summary.trainable_percent:.2f}% of the generator); devices: {jax.device_count()} "
        f"{jax.devices()[0].platform}; precision {cfg.train.precision}"
        + (f", remat {cfg.train.remat}" if cfg.train.remat != "none" else ""))
    trainer = Trainer(g, d, cfg.train, steps_per_epoch=spe)
    metrics = os.path.join(cfg.run_dir, "metrics.jsonl")
    primary = distributed.is_primary()  # multi-host: process 0 writes samples, the adapter and plots
    validator = Validator(g, val_items, val_data, cfg.run_dir) if val_items and primary else None
    sample_every = cfg.sample_every or cfg.save_every
    validated = set()

    def validate(state, step):
        # the live generator gets the current adapter (run() does the same at the end)
        nnx.update(g, jax.device_get(state["g"]))
        rec = validator(step)
        with open(metrics, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        validated.add(step)
        log(f"step {step}: val_mel {rec['val_mel']:.3f} (sample in {os.path.join(cfg.run_dir, 'samples')})")

    def on_step(state, step):
        if validator is not None and step % sample_every == 0 and step < total:
            validate(state, step)

    feed = distributed.shard_batches(batches, trainer)  # multi-host: this process's rows of each batch
    res = train_loop(trainer, feed, total_steps=total, run_dir=cfg.run_dir, save_every=cfg.save_every,
                     keep=cfg.keep, log_every=cfg.log_every, resume=cfg.resume, progress=cfg.progress,
                     hooks=Hooks(on_step=on_step), log=log)
    trainer.load_into_models(res.state)
    # (a resumed run that had already finished trained no step: its final sample is logged already)
    if validator is not None and res.step not in validated and res.step > res.start:
        validate(res.state, res.step)
    params = lora.unflatten({p: np.asarray(v) for p, v in
                             lora.flatten(nnx.to_pure_dict(nnx.state(g, lora.LoRAParam))).items()})
    meta = {"version": g.version, "sr": g.config.sr, "f0": g.f0, "steps": res.step,
            "data": os.path.abspath(cfg.data_dir), "train": dataclasses.asdict(cfg.train)}
    meta.update(metadata or {})
    kinds = lora.layer_kinds(g)
    kinds = {p: kinds[p] for p in lora.adapter_layers(params)}
    if primary:
        adapters.save_adapter(cfg.run_dir, params, cfg.lora, kinds=kinds, base_fingerprint=fp, metadata=meta)
    adapter = adapters.Adapter(params, cfg.lora, fp, meta, cfg.run_dir, kinds=kinds)
    png = os.path.join(cfg.run_dir, "loss.png")
    if primary and os.path.exists(metrics):
        plot_losses(metrics, png)
    if res.metrics:
        log(describe_metrics(res.metrics))
    elif cfg.resume and not res.interrupted:
        log(f"{cfg.run_dir}: the run had already finished at step {res.step}; nothing to train, "
            f"its adapter and model are written again")
    log(f"memory: {describe_memory(peak_memory())}; precision {cfg.train.precision}, remat {cfg.train.remat}")
    return RunResult(step=res.step, interrupted=res.interrupted, metrics=res.metrics, summary=summary,
                     adapter=adapter, loss_png=png, batches=batches, trainer=trainer, val_items=val_items)
