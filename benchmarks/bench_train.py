"""Training step time: rvclora-jax (LoRA) vs RVC's own PyTorch step (full fine-tune).

    python benchmarks/bench_train.py [--batch 2] [--frames 120] [--steps 5]

Runs each framework in its own subprocess (so peak memory is measured separately) on
the same config (v2 40k, f0), batch size, utterance length and segment (32 frames),
with random weights and inputs. The PyTorch side replicates RVC's
``train_and_evaluate`` step with RVC's own modules and losses: G forward, D step on
the detached output, D forward again, G step on mel×45 + KL + adversarial + feature
matching, AdamW(0.8, 0.99, 1e-9). Prints step times (wall and
this process's CPU time, medians), compile time, peak RSS and the optimizer-state sizes.
``--which torch|jax`` runs one side only and prints its ``RESULT`` json line (what
repeated, alternating measurements call).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _batch(B, T, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    hop = 400
    wave = (0.3 * rng.standard_normal((B, T * hop))).astype(np.float32)
    return {
        "phone": rng.standard_normal((B, T, 768)).astype(np.float32),
        "phone_lengths": np.full((B,), T, np.int32),
        "pitch": rng.integers(1, 256, (B, T)).astype(np.int32),
        "pitchf": (100 + 150 * rng.random((B, T))).astype(np.float32),
        "wave": wave,
        "wave_lengths": np.full((B,), T * hop, np.int32),
        "sid": np.zeros((B,), np.int32),
    }


def rvc_step(g, d, og, od, b, spec, spec_len, seg, *, fp16=False):
    """RVC's ``train_and_evaluate`` body for one batch ``b`` (torch tensors, on the models'
    device) as ``step() -> loss``: G forward, D step on the detached output, D again, G
    step on mel×45 + KL + adversarial + feature matching. ``fp16``: RVC's ``fp16_run``
    (autocast float16 + GradScaler; disabled, both are no-ops)."""
    import torch
    from rvc.lib.infer_pack import commons
    from rvc.lib.train.losses import discriminator_loss, feature_loss, generator_loss, kl_loss
    from rvc.lib.train.mel_processing import mel_spectrogram_torch, spec_to_mel_torch

    hop = 400
    kind = spec.device.type
    amp = dict(device_type=kind, dtype=torch.float16, enabled=fp16)
    scaler = torch.amp.GradScaler(kind, enabled=fp16)

    def step():
        with torch.autocast(**amp):
            y_hat, ids, x_mask, z_mask, (z, z_p, m_p, logs_p, m_q, logs_q) = g(
                b["phone"], b["phone_lengths"], b["pitch"], b["pitchf"], spec, spec_len, b["sid"])
            mel = spec_to_mel_torch(spec, 2048, 125, 40000, 0, None)
            y_mel = commons.slice_segments(mel, ids, seg)
            with torch.autocast(device_type=kind, enabled=False):
                y_hat_mel = mel_spectrogram_torch(y_hat.float().squeeze(1), 2048, 125, 40000, 400, 2048, 0, None)
            wave = commons.slice_segments(b["wave"].unsqueeze(1), ids * hop, seg * hop)
            y_d_hat_r, y_d_hat_g, _, _ = d(wave, y_hat.detach())
            with torch.autocast(device_type=kind, enabled=False):
                loss_disc, _, _ = discriminator_loss(y_d_hat_r, y_d_hat_g)
        od.zero_grad()
        scaler.scale(loss_disc).backward()
        scaler.unscale_(od)
        scaler.step(od)
        with torch.autocast(**amp):
            y_d_hat_r, y_d_hat_g, fmap_r, fmap_g = d(wave, y_hat)
            with torch.autocast(device_type=kind, enabled=False):
                loss_mel = torch.nn.functional.l1_loss(y_mel, y_hat_mel) * 45
                loss_kl = kl_loss(z_p, logs_q, m_p, logs_p, z_mask) * 1.0
                loss_fm = feature_loss(fmap_r, fmap_g)
                loss_gen, _ = generator_loss(y_d_hat_g)
                loss = loss_gen + loss_fm + loss_mel + loss_kl
        og.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(og)
        scaler.step(og)
        scaler.update()
        return loss

    return step


def build_torch(B, T):
    """RVC's own training step (:func:`rvc_step`) on a random batch: returns ``step()`` and
    the two networks with their optimizers."""
    import torch
    from rvc.lib.infer_pack.models import MultiPeriodDiscriminatorV2, SynthesizerTrnMs768NSFsid
    from rvc.lib.train.mel_processing import spectrogram_torch

    from rvclora_jax.families.rvc import RVC

    cfg = RVC.preset("v2", 40000).replace(segment_size=32)
    torch.manual_seed(0)
    g = SynthesizerTrnMs768NSFsid(*cfg.to_list(), is_half=False).train()
    d = MultiPeriodDiscriminatorV2(False).train()
    og = torch.optim.AdamW(g.parameters(), 1e-4, betas=(0.8, 0.99), eps=1e-9)
    od = torch.optim.AdamW(d.parameters(), 1e-4, betas=(0.8, 0.99), eps=1e-9)
    b = {k: torch.from_numpy(v) for k, v in _batch(B, T).items()}
    b["pitch"] = b["pitch"].long()
    b["sid"] = b["sid"].long()
    spec = spectrogram_torch(b["wave"], 2048, 40000, 400, 2048)
    spec_len = torch.full((B,), spec.shape[-1])
    run = rvc_step(g, d, og, od, b, spec, spec_len, 32)

    def step():
        return float(run())

    step.nets = (g, d, og, od)
    return step


def _timed(step, steps, sync=lambda r: r):
    """First-call time, then per-step medians of wall and of this process's CPU time
    (all threads: on a shared machine CPU time is the less noisy of the two)."""
    t = time.perf_counter()
    sync(step())
    first = time.perf_counter() - t
    walls, cpus = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        sync(step())
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return first, sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def run_torch(B, T, steps):
    import torch

    step = build_torch(B, T)
    g, d, og, od = step.nets
    first, wall, cpu = _timed(step, steps)
    n_g = sum(p.numel() for p in g.parameters())
    n_d = sum(p.numel() for p in d.parameters())
    opt_floats = sum(v.numel() for s in list(og.state.values()) + list(od.state.values())
                     for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"first_step_s": first, "step_s": wall, "step_cpu_s": cpu, "trainable_params": n_g + n_d,
            "opt_state_floats": opt_floats, "threads": torch.get_num_threads()}


def build_jax(B, T, rank):
    """The rvclora-jax trainer (LoRA ``generator`` preset) with its fresh state and a
    random batch of the same sizes as :func:`build_torch`'s."""
    import numpy as np
    from flax import nnx

    from rvclora_jax import lora
    from rvclora_jax.audio import MelConfig
    from rvclora_jax.families.rvc import RVC
    from rvclora_jax.models import synthesizer as S
    from rvclora_jax.train import TrainConfig, Trainer

    g = S.Synthesizer(RVC.preset("v2", 40000), "v2", True, rngs=nnx.Rngs(0))
    lora.inject(g, lora.LoRAConfig.from_preset("generator", rank=rank), rngs=nnx.Rngs(1))
    d = RVC.discriminator("v2", nnx.Rngs(2))
    tr = Trainer(g, d, TrainConfig(batch_size=B, segment_frames=32), steps_per_epoch=100)
    b = _batch(B, T)
    b["spec"] = np.asarray(MelConfig.for_rate(40000).spectrogram(b["wave"]))
    b["spec_lengths"] = np.full((B,), b["spec"].shape[1], np.int32)
    b["phone_lengths"] = b["spec_lengths"]
    return tr, tr.init_state(), b


def run_jax(B, T, steps, rank):
    import jax
    import numpy as np

    tr, state, b = build_jax(B, T, rank)
    box = {"state": state}

    def step():
        box["state"], _ = tr.step(box["state"], b)
        return box["state"]

    first, wall, cpu = _timed(step, steps, jax.block_until_ready)
    state = box["state"]
    n_ad = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["g"]))
    n_d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["d"]))
    opt_floats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((state["opt_g"], state["opt_d"]))
                     if np.ndim(x) > 0)
    opt_g_floats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["opt_g"]) if np.ndim(x) > 0)
    return {"first_step_s": first, "step_s": wall, "step_cpu_s": cpu, "trainable_params": n_ad + n_d,
            "adapter_params": n_ad, "opt_state_floats": opt_floats, "opt_state_floats_g": opt_g_floats,
            "device": f"{jax.devices()[0].platform} x{jax.device_count()}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--which", choices=["both", "torch", "jax"], default="both")
    args = ap.parse_args()
    if args.which != "both":
        res = run_torch(args.batch, args.frames, args.steps) if args.which == "torch" else \
            run_jax(args.batch, args.frames, args.steps, args.rank)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res))
        return
    out = {}
    for which in ("torch", "jax"):
        p = subprocess.run([sys.executable, __file__, "--which", which, "--batch", str(args.batch), "--frames",
                            str(args.frames), "--steps", str(args.steps), "--rank", str(args.rank)],
                           capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(p.stdout[-3000:], p.stderr[-3000:])
            raise SystemExit(f"{which} run failed")
        out[which] = json.loads(line[0][7:])
    t, j = out["torch"], out["jax"]
    print(f"v2 40k f0, batch {args.batch}, {args.frames} frames, segment 32 frames; JAX on {j['device']}, "
          f"torch {t['threads']} threads")
    print(f"{'':24}{'PyTorch RVC (full FT)':>24}{'rvclora-jax (LoRA r' + str(args.rank) + ')':>26}")
    print(f"{'step time (median)':24}{t['step_s']:>22.2f} s{j['step_s']:>24.2f} s")
    print(f"{'step CPU time (median)':24}{t['step_cpu_s']:>22.2f} s{j['step_cpu_s']:>24.2f} s")
    print(f"{'first step (compile)':24}{t['first_step_s']:>22.2f} s{j['first_step_s']:>24.2f} s")
    print(f"{'peak RSS':24}{t['peak_rss_mb']:>21.0f} MB{j['peak_rss_mb']:>23.0f} MB")
    print(f"{'trainable params':24}{t['trainable_params']:>24,}{j['trainable_params']:>26,}")
    print(f"{'optimizer state floats':24}{t['opt_state_floats']:>24,}{j['opt_state_floats']:>26,}")
    print(f"  of which generator: torch {t['opt_state_floats'] - 2 * 71_410_594:,} vs adapter "
          f"{j['opt_state_floats_g']:,} ({j['adapter_params']:,} adapter params)")
    print(f"speed ratio (torch / jax): {t['step_s'] / j['step_s']:.2f}x wall, "
          f"{t['step_cpu_s'] / j['step_cpu_s']:.2f}x CPU time")


if __name__ == "__main__":
    main()
