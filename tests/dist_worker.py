"""Subprocess worker for tests/test_distributed.py: one process of a multi-host run, or the
one-process reference.

``python -m tests.dist_worker OUT_DIR RUN_DIR`` trains a TINY generator (RVC's v2 40k
structure with one attention layer and one resblock kernel, narrow channels) on the
example data with a global batch of GLOBAL_BATCH:

* with ``RVCLORA_COORDINATOR``/``RVCLORA_NUM_PROCESSES``/``RVCLORA_PROCESS_ID`` in the
  environment it joins that multi-process run (rvclora_jax.distributed) and trains
  ``STOP_AT`` steps (a checkpoint at ``SAVE_EVERY``), stops, then RESUMES the same run
  directory to ``TOTAL`` steps: the checkpoint is saved and restored by every process;
* without them it trains ``TOTAL`` steps uninterrupted on all local devices (the reference).

Writes ``OUT_DIR/p<process index>.npz`` (the final state's leaves; the reference also
``floor.npz``: the same run on one device, the float32 noise floor of data parallelism)
and prints ``INFO {json}``
(devices, the rows this process fed, the logged losses of each call).
``XLA_FLAGS=--xla_force_host_platform_device_count=K`` sets the local device count.
"""

from __future__ import annotations

import json
import os
import sys

GLOBAL_BATCH = 4
TOTAL = 4
SAVE_EVERY = 2
STOP_AT = 3


def tiny_models(seed: int = 0):
    from flax import nnx

    from rvclora_jax import lora
    from rvclora_jax.models import synthesizer as S
    from rvclora_jax.models.discriminators import MultiPeriodDiscriminator

    from .train_worker import LORA_RANK, narrow_config

    cfg = narrow_config().replace(n_layers=1, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3, 5),))
    g = S.Synthesizer(cfg, "v2", True, rngs=nnx.Rngs(seed))
    d = MultiPeriodDiscriminator(periods=(2,), rngs=nnx.Rngs(seed + 1))
    narrow_discriminator(d, nnx.Rngs(seed + 3))
    lora.inject(g, lora.LoRAConfig.from_preset("generator", rank=LORA_RANK), rngs=nnx.Rngs(seed + 2))
    return g, d


_PHASES = {}


def _phase(name: str) -> None:
    """CPU seconds and peak RSS (GB) when ``name`` was reached (for the test's report)."""
    import resource
    import time

    _PHASES[name] = (round(time.process_time(), 2), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2))


def narrow_discriminator(d, rngs) -> None:
    """Swap RVC's wide discriminator layers (up to 1024 channels, ~14M parameters that every
    device holds with their Adam moments) for narrow ones in place; the sub-discriminators'
    own forward passes (RVC's structure: strided grouped Conv1d, period folding) are kept."""
    from flax import nnx

    from rvclora_jax.layers import Conv1d

    dt = dict(weight_norm=True, rngs=rngs)
    s, p = d.discriminators[0], d.discriminators[1]
    s.convs = nnx.List([Conv1d(1, 4, 15, padding=7, **dt), Conv1d(4, 8, 41, stride=4, groups=4, padding=20, **dt),
                        Conv1d(8, 16, 41, stride=4, groups=4, padding=20, **dt), Conv1d(16, 16, 5, padding=2, **dt)])
    s.conv_post = Conv1d(16, 1, 3, padding=1, **dt)
    ch = (1, 4, 8, 16, 16)
    p.convs = nnx.List([Conv1d(ch[i], ch[i + 1], 5, stride=3 if i < 2 else 1, padding=2, torch_kx1=True, **dt)
                        for i in range(4)])
    p.conv_post = Conv1d(16, 1, 3, padding=1, torch_kx1=True, **dt)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir, run_dir = argv[0], argv[1]
    from rvclora_jax import distributed

    _phase("import")

    multi = distributed.initialize(distributed.resolve())
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from rvclora_jax.train import TrainConfig, Trainer, train_loop

    from .train_worker import LR, SEG, example_batches, save_leaves

    batches = example_batches(batch_size=GLOBAL_BATCH, seg=SEG)
    _phase("data")
    g, d = tiny_models()
    trainer = Trainer(g, d, TrainConfig(batch_size=GLOBAL_BATCH, segment_frames=SEG, lr=LR),
                      steps_per_epoch=len(batches))
    feed = distributed.shard_batches(batches, trainer)
    _phase("build")
    info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
            "mesh_devices": int(trainer.mesh.devices.size)}
    first = next(feed.iterate(0))
    placed = trainer.put_batch(first)
    info["local_rows"] = int(first["phone"].shape[0])
    info["global_shape"] = list(placed["phone"].shape)
    info["shard_rows"] = sorted({s.data.shape[0] for s in placed["phone"].addressable_shards})
    # the rows this process fed, as (spec length) so the test can check the split
    info["local_spec_lengths"] = [int(x) for x in first["spec_lengths"]]
    kw = dict(total_steps=TOTAL, run_dir=run_dir, save_every=SAVE_EVERY, keep=5, log_every=1, progress=False)
    _phase("put")
    if multi:
        r1 = train_loop(trainer, feed, stop_at=STOP_AT, **kw)
        r2 = train_loop(trainer, feed, resume=True, **kw)
        info["calls"] = [{"start": r.start, "step": r.step, "metrics": r.metrics} for r in (r1, r2)]
        final = r2.state
    else:
        r = train_loop(trainer, feed, **kw)
        info["calls"] = [{"start": r.start, "step": r.step, "metrics": r.metrics}]
        final = r.state
        # the float32 noise floor of data parallelism: the same run on ONE of the devices
        # (what tests/test_train.py's 8-vs-1 device test compares) differs from the 4-device
        # run by reduction order only
        g1, d1 = tiny_models()
        one = Trainer(g1, d1, trainer.config, steps_per_epoch=len(batches),
                      mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
        r1 = train_loop(one, batches, **dict(kw, run_dir=run_dir + "_1dev"))
        save_leaves(os.path.join(out_dir, "floor.npz"), r1.state)
        info["floor_metrics"] = r1.metrics
    _phase("trained")
    info["phases"] = _PHASES
    info["metrics_file"] = os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
    save_leaves(os.path.join(out_dir, f"p{jax.process_index()}.npz"), final)
    info["n_leaves"] = len(jax.tree.leaves(final))
    print("INFO " + json.dumps(info, default=lambda x: np.asarray(x).tolist()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
