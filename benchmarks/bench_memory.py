"""Peak host memory of one training step: rvclora-jax (LoRA) vs RVC's PyTorch full fine-tune.

    python benchmarks/bench_memory.py [--batch 2] [--frames 120] [--steps 3] [--remat none|...]
                                      [--precision fp32|bf16] [--which both|torch|jax] [--repeat 1]
                                      [--arenas 2] [--trim]
    python benchmarks/bench_memory.py --padding 100,200,300,400 --batch 4   # bucket shapes vs padding

Same settings as ``benchmarks/bench_train.py`` (v2 40k with f0, random weights, RVC's
32-frame segment; its PyTorch step is reused as is). Each side runs in its own process,
and the JAX side prints where its memory goes: resident set (RSS) after building the
models, the trainer, the initial state, the compile and the steps, and XLA's own account
of the compiled step (arguments, outputs, donated/aliased and temporary buffers). The peak
is the kernel's high-water mark (``ru_maxrss``) of that process.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jax(B, T, steps, rank, precision, remat, trim=False):
    import jax
    import numpy as np
    from flax import nnx

    from bench_train import _batch
    from rvclora_jax import lora
    from rvclora_jax.audio import MelConfig
    from rvclora_jax.families.rvc import RVC
    from rvclora_jax.models import synthesizer as S
    from rvclora_jax.train import TrainConfig, Trainer

    phases = {"import": _rss_mb()}
    g = S.Synthesizer(RVC.preset("v2", 40000), "v2", True, rngs=nnx.Rngs(0))
    lora.inject(g, lora.LoRAConfig.from_preset("generator", rank=rank), rngs=nnx.Rngs(1))
    d = RVC.discriminator("v2", nnx.Rngs(2))
    phases["models"] = _rss_mb()
    tr = Trainer(g, d, TrainConfig(batch_size=B, segment_frames=32, precision=precision, remat=remat),
                 steps_per_epoch=100)
    phases["trainer"] = _rss_mb()
    b = _batch(B, T)
    b["spec"] = np.asarray(MelConfig.for_rate(40000).spectrogram(b["wave"]))
    b["spec_lengths"] = np.full((B,), b["spec"].shape[1], np.int32)
    b["phone_lengths"] = b["spec_lengths"]
    t = time.perf_counter()
    tr.compile(b)
    compile_s = time.perf_counter() - t
    phases["compiled"] = _rss_mb()
    phases["peak_after_compile"] = _peak_mb()
    if trim:
        from rvclora_jax.compilation import trim_host_memory

        trim_host_memory()
        phases["trimmed"] = _rss_mb()
    state = tr.init_state()
    phases["state"] = _rss_mb()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = tr.step(state, b)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    phases["steps"] = _rss_mb()
    n_g = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tr.frozen))
    n_d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["d"]))
    return {"compile_s": compile_s, "first_step_s": times[0], "step_s": sorted(times)[len(times) // 2],
            "phases_mb": {k: round(v) for k, v in phases.items()},
            "xla_mb": {k: round(v / 2**20) for k, v in (tr.compiled_memory() or {}).items()},
            "base_params": n_g, "d_params": n_d, "loss_g": float(m["loss_g"]),
            "device": f"{jax.devices()[0].platform} x{jax.device_count()}"}


def run_padding(B, lengths, steps, rank):
    """Bucket shapes vs one padded shape: per padded length T, the compile's time and a
    step's time (CPU seconds of this process, and wall), one process, same trainer."""
    import jax
    import numpy as np
    from flax import nnx

    from bench_train import _batch
    from rvclora_jax import lora
    from rvclora_jax.audio import MelConfig
    from rvclora_jax.families.rvc import RVC
    from rvclora_jax.models import synthesizer as S
    from rvclora_jax.train import TrainConfig, Trainer

    g = S.Synthesizer(RVC.preset("v2", 40000), "v2", True, rngs=nnx.Rngs(0))
    lora.inject(g, lora.LoRAConfig.from_preset("generator", rank=rank), rngs=nnx.Rngs(1))
    d = RVC.discriminator("v2", nnx.Rngs(2))
    tr = Trainer(g, d, TrainConfig(batch_size=B, segment_frames=32), steps_per_epoch=100)
    state = tr.init_state()
    out = {}
    for T in lengths:
        b = _batch(B, T)
        b["spec"] = np.asarray(MelConfig.for_rate(40000).spectrogram(b["wave"]))
        b["spec_lengths"] = np.full((B,), b["spec"].shape[1], np.int32)
        b["phone_lengths"] = b["spec_lengths"]
        c0, w0 = time.process_time(), time.perf_counter()
        tr.compile(b)
        rec = {"compile_cpu_s": time.process_time() - c0, "compile_wall_s": time.perf_counter() - w0}
        cpu, wall = [], []
        for _ in range(steps):
            c0, w0 = time.process_time(), time.perf_counter()
            state, m = tr.step(state, b)
            jax.block_until_ready(state)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        rec["step_cpu_s"], rec["step_wall_s"] = sorted(cpu)[len(cpu) // 2], sorted(wall)[len(wall) // 2]
        out[T] = rec
        print(T, json.dumps(rec), flush=True)
    return {"padding": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--repeat", type=int, default=1, help="alternate torch/jax this many times")
    ap.add_argument("--arenas", type=int, default=0, help="glibc M_ARENA_MAX for the JAX process (0: glibc's)")
    ap.add_argument("--trim", action="store_true", help="return freed heap to the OS after the compile")
    ap.add_argument("--which", choices=["both", "torch", "jax"], default="both")
    ap.add_argument("--padding", default=None,
                    help="comma-separated padded lengths T: compile and step time per shape (JAX only)")
    args = ap.parse_args()
    if args.padding:
        res = run_padding(args.batch, [int(x) for x in args.padding.split(",")], args.steps, args.rank)
        print("RESULT " + json.dumps(res))
        return
    if args.which != "both":
        if args.which == "torch":
            from bench_train import run_torch

            t = time.process_time()
            res = run_torch(args.batch, args.frames, args.steps)
            res["cpu_s"] = time.process_time() - t
        else:
            if args.arenas:
                from rvclora_jax.compilation import limit_malloc_arenas

                limit_malloc_arenas(args.arenas)
            t = time.process_time()
            res = run_jax(args.batch, args.frames, args.steps, args.rank, args.precision, args.remat, args.trim)
            res["cpu_s"] = time.process_time() - t
        res["peak_rss_mb"] = _peak_mb()
        print("RESULT " + json.dumps(res))
        return
    rows = {"torch": [], "jax": []}
    for _ in range(args.repeat):
        for which in ("torch", "jax"):
            cmd = [sys.executable, __file__, "--which", which] + [
                f"--{k}={v}" for k, v in (("batch", args.batch), ("frames", args.frames), ("steps", args.steps),
                                          ("rank", args.rank), ("precision", args.precision),
                                          ("remat", args.remat), ("arenas", args.arenas))] + (
                ["--trim"] if args.trim else [])
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(p.stdout[-3000:], p.stderr[-3000:])
                raise SystemExit(f"{which} run failed")
            rows[which].append(json.loads(line[0][7:]))
            print(which, json.dumps(rows[which][-1]), flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    t = med([r["peak_rss_mb"] for r in rows["torch"]])
    j = med([r["peak_rss_mb"] for r in rows["jax"]])
    print(f"v2 40k f0, batch {args.batch}, {args.frames} frames, segment 32; JAX {args.precision}, "
          f"remat {args.remat}; median of {args.repeat}")
    print(f"peak RSS: PyTorch full fine-tune {t:.0f} MB, rvclora-jax LoRA {j:.0f} MB ({j / t:.2f}x)")


if __name__ == "__main__":
    main()
