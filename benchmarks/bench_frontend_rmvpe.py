"""RMVPE pitch tracking: this port (JAX, jit) against RVC's own torch ``rvc.lib.rmvpe`` on this CPU.

Usage::

    python benchmarks/bench_frontend_rmvpe.py [--model rmvpe.pt] [--seconds 2] [--rounds 3] [--reps 2]

Without ``--model`` a full-size ``E2E(4, 1, (2, 2))`` with random weights (RVC's layout,
90 M parameters, random batch-norm statistics) is written to a temporary file; speed does
not depend on the values.

What is timed, per call, after one warm-up call (which includes jit compilation):

* batch 1: one clip of ``--seconds`` s at 16 kHz, wav → f0 (mel, network, decoding).
  torch: ``RMVPE.infer_from_audio(wav, thred=0.03)``; JAX: ``RMVPEPitch(model)(wav)``.
* batch 8: eight clips of that length. torch: RVC's mel extractor and ``mel2hidden`` on the
  stacked batch (the torch model batched, a stronger baseline than RVC's own one clip at
  a time) and its decoder per clip; JAX: ``RMVPEPitch.batch(wavs, batch_size=8)``.
* ``--threads 1``: both single-threaded (torch ``set_num_threads(1)``, XLA without its Eigen
  thread pool), for CPU time free of idle threads' spin-waiting on a loaded machine.

Each framework runs in its own process (``--worker``), the two alternate, and every
round is repeated ``--rounds`` times. Reported: medians of CPU time (user + sys of the
process, all threads: what the work costs when the machine is shared) and of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def clips(batch: int, seconds: float):
    """``batch`` clips of ``seconds`` at 16 kHz: five harmonics on an exponential f0 sweep
    (a different start per clip) plus a little noise, float32."""
    import numpy as np
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(0)
    out = []
    for i in range(batch):
        f0 = (110 + 15 * i) * 2 ** (t / seconds)
        ph = 2 * np.pi * np.cumsum(f0) / sr
        x = sum(np.sin(k * ph) / k for k in range(1, 6))
        out.append((0.3 * x / np.abs(x).max() + 1e-3 * rng.standard_normal(t.size)).astype(np.float32))
    return out


# A reduced U-Net (3 levels, 2 blocks, 1 intermediate block, 4 channels; the same mel front
# end, BiGRU and head) for CPU dry runs: tests/test_rmvpe.py's TINY.
TINY = dict(n_blocks=2, en_de_layers=3, inter_layers=1, en_out_channels=4)


def _cpu() -> float:
    r = os.times()
    return r.user + r.system


def _e2e(config: dict | None):
    from rvc.lib.rmvpe import E2E
    if not config:
        return E2E(4, 1, (2, 2))  # what RVC's RMVPE builds for rmvpe.pt
    return E2E(config["n_blocks"], 1, (2, 2), config["en_de_layers"], config["inter_layers"], 1,
               config["en_out_channels"])


def write_fake(path: str, config: dict | None = None, seed: int = 0) -> None:
    """An ``rmvpe.pt`` in RVC's layout with random weights (``config``: None for the shipped
    ``E2E(4, 1, (2, 2))``, or :data:`TINY`). The batch norms get random affine parameters
    and running statistics, so a parity check also covers their folding."""
    import torch

    from tests.torch_ref import randomize_batch_norms_
    torch.manual_seed(seed)
    torch.save(randomize_batch_norms_(_e2e(config)).eval().state_dict(), path)



def rvc_reference(path: str, device: str = "cpu", config: dict | None = None):
    """RVC's own ``RMVPE(path, is_half=False, device=device)`` (its mel extractor, strict
    load, cents table); with ``config`` its ``E2E(4, 1, (2, 2))`` is swapped for that
    layout while the constructor runs (as tests/test_rmvpe.py does)."""
    from rvc.lib import rmvpe as R
    if not config:
        return R.RMVPE(path, is_half=False, device=device)
    real = R.E2E

    def reduced(*_):
        R.E2E = real  # E2E.__init__ names its own class (super(E2E, self))
        return _e2e(config)

    R.E2E = reduced
    try:
        return R.RMVPE(path, is_half=False, device=device)
    finally:
        R.E2E = real


def torch_pitch(ref, wavs, thred: float = 0.03):
    """``(salience list, f0 list)`` of equal-length clips with RVC's ``RMVPE``: its mel
    extractor and ``mel2hidden`` on the stacked batch, its decoder per clip. For one clip
    this is ``infer_from_audio(wav, thred)`` step by step (salience kept); for more, the
    torch model batched (a stronger baseline than RVC's one clip at a time)."""
    import numpy as np
    import torch
    with torch.no_grad():
        mel = ref.mel_extractor(torch.from_numpy(np.stack(wavs)).float().to(ref.device), center=True)
        hidden = ref.mel2hidden(mel).float().cpu().numpy()
    return list(hidden), [ref.decode(h, thred=thred) for h in hidden]


def jax_pitch(pitch, wavs):
    """``(salience list, f0 list)`` with the port: ``RMVPEPitch.batch`` (one batch of all
    the clips) with the salience kept."""
    sal = pitch.batch_salience(wavs, batch_size=len(wavs))
    return sal, [pitch.decode(s) for s in sal]


def worker(framework: str, model: str, batch: int, seconds: float, reps: int, threads: int | None = None) -> dict:
    warnings.simplefilter("ignore")
    if threads and framework == "jax":  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   f" intra_op_parallelism_threads={threads}").strip()
    wavs = clips(batch, seconds)
    if framework == "torch":
        import torch
        if threads:
            torch.set_num_threads(threads)
        ref = rvc_reference(model)

        def run():
            if batch == 1:
                return [ref.infer_from_audio(wavs[0], thred=0.03)]
            return torch_pitch(ref, wavs)[1]
        threads = torch.get_num_threads()
    else:
        from rvclora_convert.rmvpe import load_rmvpe
        from rvclora_jax.frontend.rmvpe import RMVPEPitch
        pitch = RMVPEPitch(load_rmvpe(model, check_hash=False))

        def run():
            return [pitch(wavs[0])] if batch == 1 else jax_pitch(pitch, wavs)[1]
        threads = threads or os.cpu_count()
    w0, c0 = time.perf_counter(), _cpu()
    run()
    first = (time.perf_counter() - w0, _cpu() - c0)
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), _cpu()
        run()
        walls.append(time.perf_counter() - w0)
        cpus.append(_cpu() - c0)
    return dict(framework=framework, batch=batch, wall=statistics.median(walls), cpu=statistics.median(cpus),
                first_wall=first[0], first_cpu=first[1], threads=threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an rmvpe.pt (default: a random full-size one in a temp dir)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="timed calls per process (median)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--threads", type=int, help="limit both frameworks to this many threads (1: CPU time "
                                                "without the spin-waiting of idle threads on a loaded machine)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.batch, a.seconds, a.reps, a.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or os.path.join(tmp, "rmvpe.pt")
        if not a.model:
            write_fake(model)
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, ".pyshim"), env.get("PYTHONPATH", "")])
        results: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(a.rounds):
            for batch in (int(b) for b in a.batches.split(",")):
                order = ("torch", "jax") if rnd % 2 == 0 else ("jax", "torch")
                for fw in order:
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--model", model,
                           "--batch", str(batch), "--seconds", str(a.seconds), "--reps", str(a.reps)]
                    if a.threads:
                        cmd += ["--threads", str(a.threads)]
                    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    results.setdefault((fw, batch), []).append(r)
                    print(f"round {rnd} batch {batch} {fw:5s}: cpu {r['cpu']:.2f} s wall {r['wall']:.2f} s "
                          f"(first call cpu {r['first_cpu']:.1f} s wall {r['first_wall']:.1f} s)", flush=True)
    print(f"\nRMVPE, {a.seconds:g} s clips at 16 kHz, medians over {a.rounds} rounds x {a.reps} calls "
          f"({os.cpu_count()} CPUs, threads {a.threads or 'default'}, load average at end {os.getloadavg()[0]:.1f}):")
    print(f"{'batch':>5} {'torch cpu':>10} {'jax cpu':>8} {'cpu x':>6} {'torch wall':>11} {'jax wall':>9} {'wall x':>7}")
    summary = []
    for batch in (int(b) for b in a.batches.split(",")):
        t = {k: statistics.median(r[k] for r in results[("torch", batch)]) for k in ("cpu", "wall")}
        j = {k: statistics.median(r[k] for r in results[("jax", batch)]) for k in ("cpu", "wall")}
        print(f"{batch:>5} {t['cpu']:>9.2f}s {j['cpu']:>7.2f}s {t['cpu'] / j['cpu']:>5.2f}x "
              f"{t['wall']:>10.2f}s {j['wall']:>8.2f}s {t['wall'] / j['wall']:>6.2f}x")
        summary.append(dict(batch=batch, torch=t, jax=j, cpu_speedup=t["cpu"] / j["cpu"],
                            wall_speedup=t["wall"] / j["wall"]))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(seconds=a.seconds, rounds=a.rounds, reps=a.reps, threads=a.threads, summary=summary,
                           raw={f"{k[0]}/{k[1]}": v for k, v in results.items()}), fh, indent=1)


if __name__ == "__main__":
    main()
