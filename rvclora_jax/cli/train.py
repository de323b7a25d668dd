"""``rvclora train``: read the base (once), train a LoRA adapter, export the merged model.

The training run itself is :func:`rvclora_jax.run.run` (no torch, no converter code):
this handler only resolves the ``.pth`` files through ``rvclora_convert``, maps the
command-line options onto :class:`~rvclora_jax.lora.LoRAConfig`,
:class:`~rvclora_jax.train.TrainConfig` and :class:`~rvclora_jax.run.RunConfig`, and merges
the trained adapter into the same loaded base to write ``RUN_DIR/model.pth``.
"""

from __future__ import annotations

import os

from ..fileio import require_torch
from .convert import describe_source


def write_example_base(path: str, seed: int) -> None:
    """A randomly initialised v2 40k f0 base (RVC's real architecture) as ``{"model": sd}``."""
    from flax import nnx
    from rvclora_convert.export import write_base_file

    from ..models import synthesizer as S

    write_base_file(S.Synthesizer(S.preset("v2", 40000), "v2", True, rngs=nnx.Rngs(seed)), path)


def _load(path: str, kind: str, flag: str, example: str):
    """``rvclora_convert.export.load_source(path)``, checked to be a ``kind``, and described."""
    import jax
    from rvclora_convert.export import load_source

    src = load_source(path)
    if src.kind != kind:
        raise ValueError(f"{path}: is a {src.kind}; {flag} takes a {kind} ({example})")
    print(f"{describe_source(src)}, {sum(x.size for x in jax.tree.leaves(src.params)):,} params")
    return src


def _cmd_train(args) -> int:
    require_torch()
    import time

    from rvclora_convert.export import export

    from .. import lora
    from ..data import example_dir
    from ..run import RunConfig, default_segment_frames, run
    from ..train import TrainConfig

    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    if args.example:
        args.data = args.data or example_dir()
        if not args.base:
            args.base = os.path.join(args.out, "example_base_G.pth")
            if not os.path.exists(args.base):
                print(f"example: writing a random-weight v2 40k base (real RVC architecture) to {args.base}")
                write_example_base(args.base, args.seed)
    if not args.base or not args.data:
        raise ValueError("train needs --base G.pth and --data EXP_DIR (or --example)")
    # The base is read once: trained on here, and merged with the trained adapter below.
    src = _load(args.base, "generator", "--base", "f0G40k.pth, G_*.pth")
    d = None
    if args.base_d:
        dsrc = _load(args.base_d, "discriminator", "--base-d", "f0D40k.pth, D_*.pth")
        if dsrc.version != src.version:
            raise ValueError(f"{args.base_d}: a {dsrc.version} discriminator for a {src.version} generator")
        d = dsrc.model
    else:
        print(f"no --base-d: the {src.version} discriminator starts from random weights (trained fully)")
    lcfg = lora.LoRAConfig.from_preset(args.targets, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                       train_embeddings=("emb_g",) if args.train_speaker else ())
    tcfg = TrainConfig(batch_size=args.batch_size, seed=args.seed,
                       segment_frames=args.segment_frames or default_segment_frames(src.model),
                       **{k: v for k, v in (("lr", args.lr), ("lr_d", args.lr_d)) if v is not None})
    rcfg = RunConfig(data_dir=args.data, run_dir=args.out, lora=lcfg, train=tcfg, steps=args.steps,
                     epochs=args.epochs, save_every=args.save_every, keep=args.keep, log_every=args.log_every,
                     resume=args.resume, progress=not args.no_progress, sid=args.sid,
                     sample_every=args.sample_every, val_fraction=args.val_fraction)
    res = run(src.model, rcfg, discriminator=d, metadata={"base": os.path.abspath(args.base)})
    if res.interrupted:
        print(f"interrupted at step {res.step}: checkpoint saved; continue with --resume")
        return 130
    out_pth = os.path.join(args.out, "model.pth")
    # The trained adapter is merged in memory into the base read once above.
    rep = export(src, out_pth, adapter=res.adapter, layout="inference",
                 info=f"rvclora-jax LoRA r{args.rank} {args.targets}, {res.step} steps")
    print(f"done in {time.time() - t0:.0f} s. outputs in {os.path.abspath(args.out)}:")
    print(f"  adapter.safetensors + adapter_config.json   the adapter ({res.summary.trainable_params:,} params)")
    print(f"  model.pth                                   merged RVC inference model ({rep['bytes'] / 1e6:.1f} MB, "
          f"loads in RVC WebUI / Applio)")
    print("  metrics.jsonl, loss.png, samples/ (held-out renders + mel PNGs), checkpoints/")
    return 0


def register(subparsers) -> None:
    tr = subparsers.add_parser("train", help="train a LoRA adapter with RVC's GAN objective")
    tr.add_argument("--base", help="pretrained generator (f0G40k.pth, G_*.pth)")
    tr.add_argument("--base-d", help="pretrained discriminator (f0D40k.pth, D_*.pth); default: random init")
    tr.add_argument("--data", help="RVC or Applio experiment folder")
    tr.add_argument("--out", required=True, help="run directory (becomes an adapter directory)")
    tr.add_argument("--example", action="store_true",
                    help="use the built-in example data (and a random-weight base unless --base is given)")
    tr.add_argument("--rank", type=int, default=8)
    tr.add_argument("--alpha", type=float, default=None, help="default: equal to rank")
    tr.add_argument("--dropout", type=float, default=0.0)
    tr.add_argument("--targets", default="generator", help="LoRA preset (see `rvclora presets`)")
    g = tr.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--epochs", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=4)
    tr.add_argument("--segment-frames", type=int, default=None,
                    help="default: RVC's segment for the rate (32 at 40k)")
    tr.add_argument("--lr", type=float, default=None, help="learning rate (default: RVC's, 1e-4)")
    tr.add_argument("--lr-d", type=float, default=None, help="discriminator lr (default: --lr)")
    tr.add_argument("--seed", type=int, default=1234)
    tr.add_argument("--save-every", type=int, default=500)
    tr.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--sid", type=int, default=None,
                    help="speaker row of the base to train as (default: the ids in the data, usually 0)")
    tr.add_argument("--train-speaker", action="store_true",
                    help="also train the speaker embedding (a full-size delta of emb_g stored with the adapter)")
    tr.add_argument("--sample-every", type=int, default=None,
                    help="render a held-out sample + mel PNG and log val_mel every N steps (default: --save-every)")
    tr.add_argument("--val-fraction", type=float, default=0.1,
                    help="fraction of clips held out for validation (at least 1 when there are >= 4 clips)")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_cmd_train)
