"""Shared narrow training setup for tests/test_train.py, and a subprocess worker.

The generator has RVC's exact v2 40k structure (spec_channels 1025, hop 400, every
layer type and the full LoRA target set) but narrow channels, so a GAN step runs in
about a second on a laptop CPU.

Worker modes (``python -m tests.train_worker MODE ...``; prints one line per event):

* ``train RUN_DIR TOTAL SAVE_EVERY [--resume] [--out FILE.npz]``: ``train_loop`` on the
  example data; prints ``SAVED <step>`` after each finished checkpoint and ``DONE <step>
  <interrupted>`` at the end; ``--out`` writes the final state's leaves (np.savez).
* ``shard OUT.npz``: needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in the
  environment (set before jax is imported); trains 2 steps on one global batch of 8 with
  an 8-device mesh and with a 1-device mesh and saves both states.
"""

from __future__ import annotations

import json
import sys

SEG = 8  # segment frames
BATCH = 2
# The example clips have 64..118 frames: one padded shape, one compile. 150, not 120: it is
# the shape rvclora_jax.run.auto_buckets(max_shapes=1) picks for them, so tests/test_render.py's
# run() of this same narrow configuration compiles the very program this module's trainers
# use, and the later module reads it from the session's compilation cache (conftest).
BUCKETS = (150,)
DATA_SEED = 0
LORA_RANK = 4
LR = 1e-3  # 10x RVC's default so that a few dozen test steps move the loss clearly


def narrow_config():
    from rvclora_jax.families.rvc import RVC
    from rvclora_jax.models import synthesizer as S

    return RVC.preset("v2", 40000).replace(inter_channels=16, hidden_channels=32, filter_channels=64,
                                         upsample_initial_channel=32, gin_channels=8, spk_embed_dim=2)


def build_models(seed: int = 0):
    """(generator with a fresh LoRA adapter, small discriminator, LoRA config); same seed, same weights."""
    from flax import nnx

    from rvclora_jax import lora
    from rvclora_jax.models import synthesizer as S
    from rvclora_jax.models.discriminators import MultiPeriodDiscriminator

    g = S.Synthesizer(narrow_config(), "v2", True, rngs=nnx.Rngs(seed))
    # RVC's discriminator structure at 1/8 of its widths: full width, its state alone is
    # 264 MB, replicated on every device of the 8-device sharding test.
    d = MultiPeriodDiscriminator(periods=(2, 3), channel_divisor=8, rngs=nnx.Rngs(seed + 1))
    lcfg = lora.LoRAConfig.from_preset("generator", rank=LORA_RANK)
    lora.inject(g, lcfg, rngs=nnx.Rngs(seed + 2))
    return g, d, lcfg


_LOADED = {}


def example_batches(batch_size: int = BATCH, seg: int = SEG):
    from rvclora_jax import data as D

    if "items" not in _LOADED:
        items = D.scan_experiment(D.example_dir(), version="v2", f0=True, sr=40000)
        _LOADED["items"] = items
        _LOADED["data"] = D.load_items(items, 40000)
    return D.Batches(_LOADED["items"], batch_size, seg, seed=DATA_SEED, buckets=BUCKETS, data=_LOADED["data"])


def build_trainer(batches, mesh=None, seed: int = 0, lr: float = LR):
    from rvclora_jax.train import TrainConfig, Trainer

    g, d, lcfg = build_models(seed)
    cfg = TrainConfig(batch_size=batches.batch_size, segment_frames=batches.segment_frames, lr=lr)
    return Trainer(g, d, cfg, steps_per_epoch=len(batches), mesh=mesh), lcfg


def state_leaves(state) -> list:
    import jax
    import numpy as np

    return [np.array(x, copy=True) for x in jax.tree.leaves(jax.device_get(state))]


def save_leaves(path: str, state) -> None:
    import numpy as np

    np.savez(path, **{f"{i:05d}": x for i, x in enumerate(state_leaves(state))})


def load_leaves(path: str) -> list:
    import numpy as np

    with np.load(path) as z:
        return [z[k] for k in sorted(z.files)]


def _train(argv):
    from rvclora_jax.train import Hooks, train_loop

    run_dir, total, save_every = argv[0], int(argv[1]), int(argv[2])
    resume = "--resume" in argv
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    batches = example_batches()
    trainer, _ = build_trainer(batches)
    print("READY", flush=True)

    def on_save(state, step):
        print(f"SAVED {step}", flush=True)

    res = train_loop(trainer, batches, total_steps=total, run_dir=run_dir, save_every=save_every, keep=10,
                     log_every=1, resume=resume, progress=False, hooks=Hooks(on_save=on_save))
    if out:
        save_leaves(out, res.state)
    print(f"DONE {res.step} {res.interrupted}", flush=True)
    return 130 if res.interrupted else 0


def _shard(argv):
    import jax
    import numpy as np
    from jax.sharding import Mesh

    out = argv[0]
    assert jax.device_count() == 8, jax.devices()
    batches = example_batches(batch_size=8)
    assert len(batches) == 1
    batch = next(batches.iterate(0))
    info = {}
    results = {}
    for name, devs in (("mesh8", jax.devices()), ("mesh1", jax.devices()[:1])):
        trainer, _ = build_trainer(batches, mesh=Mesh(np.array(devs), ("data",)))
        placed = trainer.put_batch(batch)
        info[name] = {k: len(v.sharding.device_set) for k, v in placed.items()}
        info[name + "_shard_rows"] = sorted({s.data.shape[0] for s in placed["phone"].addressable_shards})
        state = trainer.init_state()
        for _ in range(2):
            state, m = trainer.step(state, batch)
        info[name + "_metrics"] = {k: float(v) for k, v in jax.device_get(m).items()}
        results[name] = state_leaves(state)
    np.savez(out, **{f"{n}_{i:05d}": x for n, leaves in results.items() for i, x in enumerate(leaves)})
    print("INFO " + json.dumps(info), flush=True)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    mode, rest = argv[0], argv[1:]
    return {"train": _train, "shard": _shard}[mode](rest)


if __name__ == "__main__":
    sys.exit(main())
