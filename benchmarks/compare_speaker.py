"""Should the speaker row (emb_g) train along with the adapter? A measured comparison.

    python benchmarks/compare_speaker.py [--steps 50] [--seeds 2]

Trains the narrow RVC-structured model of the tests (tests/train_worker.py) on 6 of the
8 built-in example clips, as speaker row 1, with and without ``train_embeddings=("emb_g",)``,
and reports the held-out mel L1 (×45) on the other 2 clips:

* ``posterior``: RVC's training-style reconstruction (enc_q → decoder, fixed noise);
* ``infer``: rendering through ``infer`` (prior path, noise off) vs the target audio's mel,
  which is what a user hears.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rvclora_jax import data as D
    from rvclora_jax import lora
    from rvclora_jax.audio import MelConfig
    from rvclora_jax.losses import C_MEL, mel_l1
    from rvclora_jax.models import synthesizer as S
    from rvclora_jax.models.discriminators import MultiPeriodDiscriminator
    from rvclora_jax.train import TrainConfig, Trainer
    from tests.train_worker import narrow_config

    items = sorted(D.scan_experiment(D.example_dir(), version="v2", f0=True, sr=40000), key=lambda i: i.name)
    items = [dataclasses.replace(it, sid=1) for it in items]
    train_items, val_items = items[:6], items[6:]
    mel = MelConfig.for_rate(40000)
    seg = 8
    train_b = D.Batches(train_items, 2, seg, seed=0, buckets=(120,))
    val = D.load_items(val_items, 40000)

    def evaluate(g):
        post, inf = [], []
        for i, d in enumerate(val):
            T = d["spec"].shape[0]
            x = (jnp.asarray(d["phone"][None]), jnp.asarray([T]), jnp.asarray(d["pitch"][None]),
                 jnp.asarray(d["pitchf"][None]))
            sid = jnp.asarray([1])
            y_mel = mel.spec_to_mel(jnp.asarray(d["spec"][None]))
            o = g.infer(*x, sid)[0]
            inf.append(float(mel_l1(y_mel, mel.mel(o[..., 0])[:, :T]) * C_MEL))
            key = jax.random.key(100 + i)
            eps = jax.random.normal(key, (1, T, g.config.inter_channels))
            o2 = g(*x, jnp.asarray(d["spec"][None]), jnp.asarray([T]), sid, ids_slice=jnp.asarray([0]),
                   segment_size=T, eps_q=eps)[0]
            post.append(float(mel_l1(y_mel, mel.mel(o2[..., 0])[:, :T]) * C_MEL))
        return float(np.mean(post)), float(np.mean(inf))

    rows = []
    for seed in range(args.seeds):
        for speaker in (False, True):
            g = S.Synthesizer(narrow_config(), "v2", True, rngs=nnx.Rngs(seed))
            d = MultiPeriodDiscriminator(periods=(2, 3), rngs=nnx.Rngs(seed + 1))
            cfg = lora.LoRAConfig.from_preset("generator", rank=4,
                                              train_embeddings=("emb_g",) if speaker else ())
            lora.inject(g, cfg, rngs=nnx.Rngs(seed + 2))
            before = evaluate(g)
            tr = Trainer(g, d, TrainConfig(batch_size=2, segment_frames=seg, lr=args.lr, seed=seed),
                         steps_per_epoch=len(train_b))
            st = tr.init_state()
            t0 = time.time()
            step = 0
            while step < args.steps:
                for batch in train_b.iterate(step // len(train_b)):
                    st, _ = tr.step(st, batch)
                    step += 1
                    if step >= args.steps:
                        break
            tr.load_into_models(st)
            after = evaluate(g)
            rows.append((seed, speaker, before, after, time.time() - t0))
            print(f"seed {seed} speaker={'trained' if speaker else 'frozen '}: held-out mel posterior "
                  f"{before[0]:.2f} -> {after[0]:.2f}, infer {before[1]:.2f} -> {after[1]:.2f} "
                  f"({args.steps} steps, {time.time() - t0:.0f} s)", flush=True)
    for speaker in (False, True):
        r = [x for x in rows if x[1] == speaker]
        print(f"mean over seeds, speaker {'trained' if speaker else 'frozen'}: posterior "
              f"{np.mean([x[3][0] for x in r]):.2f}, infer {np.mean([x[3][1] for x in r]):.2f}")


if __name__ == "__main__":
    main()
