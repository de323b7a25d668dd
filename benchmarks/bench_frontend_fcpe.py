"""Time the JAX FCPE port against torchfcpe 0.0.4 (bundled weights, real speech).

    python benchmarks/bench_frontend_fcpe.py [--batch 1 8] [--rounds 3] [--repeats 5]

The input is CMU ARCTIC ``tests/data/arctic_a0007.wav`` (4.0 s at 16 kHz), ``--batch``
copies of it. Each framework runs in its own process (so neither's thread pools or
allocator disturb the other), and the processes alternate, ``--rounds`` times per batch
size. Each process loads its model, warms up once (JAX compiles then), and times
``--repeats`` calls of the whole pitch path (wav → mel → network → f0, RVC's settings:
``local_argmax``, threshold 0.006). Reported: medians over rounds of the per-process
median CPU time (user + sys of the process, all threads) and wall time per call.
torchfcpe needs ``torchaudio`` at import; the tests' stand-in is used.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CLIP = os.path.join(ROOT, "tests", "data", "arctic_a0007.wav")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(framework: str, batch: int, repeats: int) -> dict:
    import soundfile as sf

    x, sr = sf.read(CLIP, dtype="float32")
    assert sr == 16000
    xs = [x] * batch
    if framework == "jax":
        from rvclora_convert.fcpe import bundled_checkpoint, load_fcpe
        from rvclora_jax.frontend.fcpe import FCPEPitch

        pitch = FCPEPitch(load_fcpe(bundled_checkpoint()), max_batch=max(8, batch))

        def call():
            return pitch.batch(xs)
    else:
        from tests.torchaudio_stub import install

        install()
        import torch
        import torchfcpe

        torch.set_grad_enabled(False)
        ref = torchfcpe.spawn_bundled_infer_model(device="cpu")
        wav = torch.from_numpy(np.stack(xs))

        def call():
            return ref.infer(wav, sr=16000, decoder_mode="local_argmax", threshold=0.006)

    t0 = _cpu()
    w0 = time.perf_counter()
    call()  # warm-up (JAX: compile)
    first = {"cpu": _cpu() - t0, "wall": time.perf_counter() - w0}
    cpu, wall = [], []
    for _ in range(repeats):
        t0, w0 = _cpu(), time.perf_counter()
        call()
        cpu.append(_cpu() - t0)
        wall.append(time.perf_counter() - w0)
    return {"framework": framework, "batch": batch, "cpu": float(np.median(cpu)), "wall": float(np.median(wall)),
            "first_cpu": first["cpu"], "first_wall": first["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch[0], args.repeats)))
        return
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, ".pyshim"), env.get("PYTHONPATH", "")])
    print(f"FCPE pitch path on {CLIP} (4.0 s), {os.cpu_count()} CPUs; each framework in its own process, "
          f"alternating; medians of {args.rounds} rounds × {args.repeats} calls")
    for b in args.batch:
        res = {"jax": [], "torch": []}
        for r in range(args.rounds):
            for fw in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
                out = subprocess.run([sys.executable, __file__, "--worker", fw, "--batch", str(b),
                                      "--repeats", str(args.repeats)], env=env, capture_output=True, text=True,
                                     check=True)
                res[fw].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {fw: {k: float(np.median([d[k] for d in v])) for k in ("cpu", "wall", "first_cpu", "first_wall")}
               for fw, v in res.items()}
        audio_s = 4.0 * b
        for fw in ("torch", "jax"):
            m = med[fw]
            print(f"batch {b}: {fw:5s} cpu {m['cpu'] * 1e3:7.1f} ms  wall {m['wall'] * 1e3:7.1f} ms per call "
                  f"({audio_s / m['wall']:.0f}x real time; first call cpu {m['first_cpu']:.2f} s)")
        print(f"batch {b}: jax/torch speed-up: cpu {med['torch']['cpu'] / med['jax']['cpu']:.2f}x, "
              f"wall {med['torch']['wall'] / med['jax']['wall']:.2f}x")


if __name__ == "__main__":
    main()
