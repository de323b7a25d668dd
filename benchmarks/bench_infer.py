"""Time jitted JAX ``infer`` against PyTorch RVC ``infer`` (same config, weights, input).

    python benchmarks/bench_infer.py [--version v2] [--sr 40k] [--frames 200] [--repeats 5]

Both run in this process on the same CPU (or the JAX default device), with the same
random weights (converted from the torch model) and the same inputs; the script also
reports the max difference of the two outputs with noise switched off.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="v2", choices=["v1", "v2"])
    ap.add_argument("--sr", default="40k")
    ap.add_argument("--frames", type=int, default=200, help="10 ms frames (200 = 2 s of audio)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from rvc.lib.infer_pack import models as rvc_models

    from rvclora_convert.state_dict import torch_to_flax
    from rvclora_jax.families.rvc import RVC
    from rvclora_jax.models import synthesizer as S
    from rvclora_jax.params import load_params

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cfg = RVC.preset(args.version, args.sr)
    cls = rvc_models.SynthesizerTrnMs256NSFsid if args.version == "v1" else rvc_models.SynthesizerTrnMs768NSFsid
    torch.manual_seed(0)
    ref = cls(*cfg.to_list(), is_half=False).eval()
    del ref.enc_q
    sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
    model = S.Synthesizer(cfg, args.version, True, rngs=nnx.Rngs(0), with_enc_q=False)
    load_params(model, torch_to_flax(model, sd))

    B, T, dim = args.batch, args.frames, model.feature_dim
    rng = np.random.default_rng(0)
    phone = rng.standard_normal((B, T, dim)).astype(np.float32)
    pitchf = (120 + 80 * rng.random((B, T))).astype(np.float32)
    pitch = rng.integers(1, 256, (B, T))
    lengths, sid = np.full((B,), T), np.zeros((B,), np.int64)

    tt = [torch.from_numpy(a) for a in (phone, lengths, pitch, pitchf, sid)]

    def torch_run():
        return ref.infer(*tt)[0]

    graphdef, state = nnx.split(model)

    @jax.jit
    def jax_infer(state, phone, lengths, pitch, pitchf, sid, eps, noise):
        m = nnx.merge(graphdef, state)
        return m.infer(phone, lengths, pitch, pitchf, sid, eps=eps, source_noise=noise)[0]

    key = jax.random.key(0)
    ja = [jnp.asarray(a) for a in (phone, lengths, pitch, pitchf, sid)]
    eps = jax.random.normal(key, (B, T, cfg.inter_channels))
    noise = jax.random.normal(key, (B, T * cfg.hop_length, 1))

    t0 = time.perf_counter()
    out = jax_infer(state, *ja, eps, noise)
    out.block_until_ready()
    compile_s = time.perf_counter() - t0

    def jax_run():
        jax_infer(state, *ja, eps, noise).block_until_ready()

    def best(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times), float(np.median(times))

    tj, tj_med = best(jax_run)
    tt_, tt_med = best(torch_run)

    # parity with noise off
    orig = torch.randn_like
    torch.randn_like = lambda x, *a, **k: torch.zeros_like(x)
    try:
        want = ref.infer(*tt)[0].numpy().transpose(0, 2, 1)
    finally:
        torch.randn_like = orig
    got = np.asarray(model.infer(*ja)[0])
    audio_s = B * T * cfg.hop_length / cfg.sr
    print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); torch threads {torch.get_num_threads()}")
    print(f"model: {args.version} {cfg.sr // 1000}k f0, batch {B}, {T} frames = {audio_s:.2f} s of audio")
    print(f"jax compile (first call): {compile_s:.2f} s")
    print(f"jax   infer: best {tj * 1e3:8.1f} ms  median {tj_med * 1e3:8.1f} ms  ({audio_s / tj:.1f}x real time)")
    print(f"torch infer: best {tt_ * 1e3:8.1f} ms  median {tt_med * 1e3:8.1f} ms  ({audio_s / tt_:.1f}x real time)")
    print(f"speed ratio torch/jax: {tt_ / tj:.2f}")
    print(f"max |jax - torch| with noise off: {np.abs(got - want).max():.2e}")


if __name__ == "__main__":
    main()
