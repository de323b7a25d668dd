"""HuBERT content features: JAX ``ContentFeatures`` against ``transformers.HubertModel`` on this CPU.

    python benchmarks/bench_frontend_hubert.py [--batches 1 8] [--seconds 3.7] [--rounds 3] [--reps 3]

hubert-base's real config (94M parameters, random weights: speed does not depend on
them), RVC v2 output (layer 12), clips of ``--seconds`` (3.7 s: RVC's training segment).
Each framework runs in its own process (``--worker``), one warm-up call (JAX: the
compile) and ``--reps`` timed calls; the two are alternated for ``--rounds`` rounds.
Reported: medians over every timed call of wall time and process CPU time (user+sys,
all threads) per batch, and the speed-ups. On a shared machine wall time is noisy; CPU
time is the steadier figure. torch gets as many intra-op threads as there are cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def clips(batch: int, seconds: float, seed: int = 0):
    """``batch`` clips of ``seconds`` at 16 kHz: white noise at 0.1 (speed and parity do
    not depend on the content), float32 ``[batch, N]``."""
    import numpy as np

    n = int(round(seconds * 16000))
    return (np.random.default_rng(seed).standard_normal((batch, n)) * 0.1).astype(np.float32)


def tiny_hf_config():
    """A small HuBERT with hubert-base's conv geometry (so frame counts are the real ones)
    and two layers: for CPU dry runs (tests/test_hubert.py uses the same widths)."""
    from transformers import HubertConfig

    return HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def same_weight_pair(config=None, *, seed: int = 0):
    """``(transformers.HubertModel, rvclora_jax Hubert)`` holding the same random weights
    (default: hubert-base's real config). The HF model's LayerNorm/GroupNorm gains and the
    biases are randomised too (HF initialises them to 1 and 0, which would not test their
    mapping); the weights move as tests/test_hubert.py moves them: the positional conv's
    weight norm folded, then the hubert family's key map."""
    import torch
    from transformers import HubertConfig, HubertModel

    from rvclora_convert.hubert import fold_pos_conv
    from rvclora_convert.state_dict import torch_to_flax
    from rvclora_jax import families
    from tests.torch_ref import randomize_norms_

    config = config or HubertConfig()
    torch.manual_seed(seed)
    hf = randomize_norms_(HubertModel(config).eval(), seed + 1)
    fam = families.get("hubert")
    sd = fold_pos_conv({k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()
                        if k != "masked_spec_embed"})
    spec = fam.detect(sd, {"num_heads": config.num_attention_heads, "layer_norm_eps": config.layer_norm_eps},
                      layout="hf")
    return hf, fam.materialize(spec, torch_to_flax(fam.abstract(spec), sd))


def torch_features(model, wavs, device=None):
    """HF's features of a ``[B, N]`` batch of equal-length clips (the input moved to the
    model's device and the result back to the host, as the JAX extractor does):
    ``last_hidden_state``, RVC v2's layer 12 for hubert-base, as float32 ``[B, T, C]``."""
    import torch

    x = torch.from_numpy(wavs)
    if device is not None:
        x = x.to(device)
    with torch.inference_mode():
        return model(x).last_hidden_state.float().cpu().numpy()


def worker(framework: str, batch: int, seconds: float, reps: int) -> dict:
    wavs = clips(batch, seconds)
    if framework == "torch":
        import torch
        from transformers import HubertConfig, HubertModel

        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(0)
        model = HubertModel(HubertConfig()).eval()

        def call():
            return torch_features(model, wavs)
    else:
        from flax import nnx

        from rvclora_jax.frontend.hubert import ContentFeatures, Hubert, HubertConfig

        feats = ContentFeatures(Hubert(HubertConfig(), rngs=nnx.Rngs(0)), "v2", batch_size=batch)
        clip_list = list(wavs)

        def call():
            return feats.batch(clip_list)

    t0, c0 = time.perf_counter(), _cpu()
    call()
    first = (time.perf_counter() - t0, _cpu() - c0)
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), _cpu()
        call()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu() - c0)
    return {"framework": framework, "batch": batch, "first_wall": first[0], "first_cpu": first[1],
            "wall": walls, "cpu": cpus}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=3.7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the raw timings here")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.batch, args.seconds, args.reps)), flush=True)
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    runs: list[dict] = []
    for batch in args.batches:
        for rnd in range(args.rounds):
            order = ("jax", "torch") if rnd % 2 == 0 else ("torch", "jax")
            for fw in order:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", fw, "--batch", str(batch),
                                      "--seconds", str(args.seconds), "--reps", str(args.reps)],
                                     env=env, capture_output=True, text=True, check=True)
                res = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
                runs.append(res)
                print(f"batch {batch} round {rnd} {fw:5s}: wall {statistics.median(res['wall']):.3f} s, "
                      f"cpu {statistics.median(res['cpu']):.3f} s (first call {res['first_wall']:.1f} s)", flush=True)
    print(f"\nhubert-base, v2 (layer 12), {args.seconds} s clips, {os.cpu_count()} CPU cores; medians per batch")
    print("batch | torch wall | jax wall | wall speed-up | torch cpu | jax cpu | cpu speed-up")
    for batch in args.batches:
        med = {}
        for fw in ("torch", "jax"):
            rs = [r for r in runs if r["framework"] == fw and r["batch"] == batch]
            med[fw] = (statistics.median(w for r in rs for w in r["wall"]),
                       statistics.median(c for r in rs for c in r["cpu"]))
        (tw, tc), (jw, jc) = med["torch"], med["jax"]
        print(f"{batch:5d} | {tw:9.3f}s | {jw:7.3f}s | {tw / jw:12.2f}x | {tc:8.3f}s | {jc:6.3f}s | {tc / jc:11.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=1)


if __name__ == "__main__":
    main()
