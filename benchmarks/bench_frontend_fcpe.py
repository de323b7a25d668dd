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


def import_torchfcpe():
    """``import torchfcpe``; when no torchaudio is installed (torchfcpe imports its
    ``Resample`` at import time), with the tests' stand-in for it, removed again after."""
    import importlib.util

    if importlib.util.find_spec("torchaudio") is not None:
        import torchfcpe
        return torchfcpe
    from tests.torchaudio_stub import install, remove

    install()
    try:
        import torchfcpe
    finally:
        remove()
    return torchfcpe


def torch_reference(device: str = "cpu"):
    """torchfcpe's own factory, as RVC (rtrvc.py) and Applio call it: the bundled
    ``fcpe_c_v001.pt`` on ``device``."""
    return import_torchfcpe().spawn_bundled_infer_model(device=device)


def torch_f0(ref, wav):
    """RVC's call on a ``[B, N]`` float32 tensor: f0 ``[B, N//160 + 1]`` (on the model's device)."""
    return ref.infer(wav, sr=16000, decoder_mode="local_argmax", threshold=0.006)[..., 0]


def torch_salience(ref, wavs) -> list:
    """torchfcpe's salience (sigmoid of ``output_proj``, caught with a hook) of equal-length
    clips run as one batch by :func:`torch_f0`, per clip ``[T, 360]`` float32 numpy."""
    import torch

    seen = {}
    hook = ref.model.output_proj.register_forward_hook(lambda mod, args, out: seen.__setitem__("logits", out))
    try:
        with torch.no_grad():
            torch_f0(ref, torch.from_numpy(np.stack(wavs)))
    finally:
        hook.remove()
    return list(torch.sigmoid(seen["logits"]).float().cpu().numpy())


def jax_pitch(checkpoint: str | None = None, config=None, max_batch: int = 8):
    """The port's ``FCPEPitch`` (RVC's settings): on ``checkpoint``'s weights, or, without
    one, a random-weight ``FCPE(config)`` (default: the bundled model's architecture)."""
    from rvclora_jax.frontend.fcpe import FCPEPitch

    if checkpoint:
        from rvclora_convert.fcpe import load_fcpe

        return FCPEPitch(load_fcpe(checkpoint), max_batch=max_batch)
    from flax import nnx

    from rvclora_jax.frontend.fcpe import FCPE, FCPEConfig

    return FCPEPitch(FCPE(config or FCPEConfig(), rngs=nnx.Rngs(0)), max_batch=max_batch)


def worker(framework: str, batch: int, repeats: int) -> dict:
    import soundfile as sf

    x, sr = sf.read(CLIP, dtype="float32")
    assert sr == 16000
    xs = [x] * batch
    if framework == "jax":
        from rvclora_convert.fcpe import bundled_checkpoint

        pitch = jax_pitch(bundled_checkpoint(), max_batch=max(8, batch))

        def call():
            return pitch.batch(xs)
    else:
        import torch

        torch.set_grad_enabled(False)
        ref = torch_reference("cpu")
        wav = torch.from_numpy(np.stack(xs))

        def call():
            return torch_f0(ref, wav)

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
