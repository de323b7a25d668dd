"""``rvclora train``: read the base (once), train a LoRA adapter, export the merged model.

The training run itself is :func:`rvclora_jax.run.run` (no torch, no converter code):
this handler only resolves the ``.pth`` files through ``rvclora_convert``, maps the
command-line options onto :class:`~rvclora_jax.lora.LoRAConfig`,
:class:`~rvclora_jax.train.TrainConfig` and :class:`~rvclora_jax.run.RunConfig`, and merges
the trained adapter into the same loaded base to write ``RUN_DIR/model.pth``.
"""

from __future__ import annotations

import os
import shutil

from . import _args as A
from ._outputs import add_overwrite, guard
from .convert import describe_source
from .prepare import add_model_flags, is_recordings_folder, run_prepare

# What a run writes into RUN_DIR (the adapter directory it becomes).
RUN_FILES = ("adapter.safetensors", "adapter_config.json", "model.pth", "metrics.jsonl", "loss.png")
RUN_DIRS = ("checkpoints", "samples")
EXAMPLE_BASE = "example_base_G.pth"
# The example's random-weight stand-ins for the content and pitch models (real layouts,
# float16 files) and the clip it converts at the end.
EXAMPLE_HUBERT, EXAMPLE_RMVPE = "example_hubert", "example_rmvpe.pt"
EXAMPLE_CLIP = "0_0.wav"


def _has_checkpoint(run_dir: str) -> bool:
    # Orbax names each step's directory by its step number.
    d = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _guard_run(args):
    """Before any work: RUN_DIR's outputs never replace an input, and a previous run's
    outputs are replaced only with --resume (which continues it) or --overwrite."""
    run = args.out
    base = args.base or (os.path.join(run, EXAMPLE_BASE) if args.example else None)
    inputs = [base, args.base_d, args.data, getattr(args, "hubert", None), getattr(args, "f0_model", None)]
    for p in inputs:
        if p and os.path.lexists(p) and os.path.realpath(p) == os.path.realpath(run):
            raise ValueError(f"{run}: is also an input of this command; write the run elsewhere")
    if args.resume and not _has_checkpoint(run):
        raise FileNotFoundError(f"{run}: nothing to resume (no checkpoint in {os.path.join(run, 'checkpoints')}); "
                                f"start a new run without --resume (with --overwrite to replace its files)")
    return guard(inputs, files=[os.path.join(run, f) for f in RUN_FILES],
                 dirs=[os.path.join(run, d) for d in RUN_DIRS], overwrite=args.resume or args.overwrite)


def write_example_base(path: str, seed: int) -> None:
    """A randomly initialised v2 40k f0 base (RVC's real architecture) as ``{"model": sd}``."""
    from flax import nnx
    from rvclora_convert.export import write_base_file

    from ..families.rvc import RVC
    from ..models import synthesizer as S

    write_base_file(S.Synthesizer(RVC.preset("v2", 40000), "v2", True, rngs=nnx.Rngs(seed)), path)


def write_example_frontend(run: str, seed: int) -> tuple[str, str]:
    """Random-weight HuBERT (a Hugging Face folder) and RMVPE (``rmvpe.pt``) in their real
    layouts, for the example's conversion step: no weights can be downloaded here, and
    this way the step runs ``rvclora infer`` exactly as a user would with real ones."""
    import warnings

    from flax import nnx
    from rvclora_convert.hubert import save_hf_folder
    from rvclora_convert.rmvpe import save_rmvpe

    from ..frontend.hubert import Hubert, HubertConfig
    from ..frontend.rmvpe import RMVPE, RMVPEConfig

    hub, rm = os.path.join(run, EXAMPLE_HUBERT), os.path.join(run, EXAMPLE_RMVPE)
    if not os.path.isfile(os.path.join(hub, "model.safetensors")):
        save_hf_folder(Hubert(HubertConfig(), rngs=nnx.Rngs(seed + 1)), hub, dtype="float16")
    if not os.path.isfile(rm):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "non-writable array" (it is copied)
            save_rmvpe(RMVPE(RMVPEConfig(), rngs=nnx.Rngs(seed + 2)), rm, dtype="float16")
    return hub, rm


def _example_infer(args) -> None:
    """The example's last step: ``rvclora infer`` on one of its clips with the run just made."""
    import warnings

    from ..data import example_dir
    from . import build_parser

    print("example: converting a clip with the trained adapter (random-weight HuBERT and RMVPE stand-ins)")
    hub, rm = write_example_frontend(args.out, args.seed)
    clip = os.path.join(example_dir(), "0_gt_wavs", EXAMPLE_CLIP)
    out = os.path.join(args.out, "infer", EXAMPLE_CLIP)
    argv = ["infer", clip, "--model", args.out, "--hubert", hub, "--f0-method", "rmvpe", "--f0-model", rm,
            "--out", out, "--no-progress", "--overwrite"]
    print("  rvclora " + " ".join(argv))
    iargs = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SHA-256.*")  # the stand-in is not the official rmvpe.pt
        iargs.func(iargs)
    print(f"  listen: {os.path.abspath(out)}")


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
    import time

    from .. import distributed

    # multi-host: join jax.distributed before any JAX work (no flags/env: one process)
    distributed.initialize(distributed.resolve(args.coordinator, args.num_processes, args.process_id))

    t0 = time.time()
    _compile_cache(args)
    if not args.example and (not args.base or not args.data):
        raise ValueError("train needs --base G.pth and --data EXP_DIR (or --example)")
    g = _guard_run(args)
    # A failed run leaves nothing it created behind, except a directory holding checkpoints
    # (the last good state of a long run, to --resume from).
    with g.cleanup_on_failure(keep=lambda d: _has_checkpoint(args.out)):
        return _train(args, t0)


def _compile_cache(args) -> None:
    """The persistent XLA cache: on (``RVCLORA_COMPILE_CACHE`` or the user's cache
    directory) unless ``--no-compile-cache``; set before anything is compiled."""
    from .. import compilation

    # before XLA's threads start: few malloc arenas keep the host heap compact
    compilation.limit_malloc_arenas(2)
    if args.no_compile_cache:
        compilation.disable_persistent_cache()
        return
    d = compilation.enable_persistent_cache()
    if d:
        print(f"compile cache: {d} (a rerun of this configuration skips compiling; --no-compile-cache to turn off)")


def _prepare_into_run(args, src) -> str:
    """``--data RAW_DIR`` (a folder of recordings): prepare it into ``RUN_DIR/data`` for the
    base's version, rate and f0, as ``rvclora prepare`` would; a rerun or ``--resume``
    continues that folder instead of redoing it."""
    from .. import distributed

    if not args.hubert:
        raise ValueError(f"{args.data}: a folder of recordings; training on it prepares it first, which needs "
                         f"--hubert (hubert_base.pt or a ContentVec folder)")
    exp = os.path.join(args.out, "data")
    if distributed.is_primary():
        print(f"{args.data}: recordings; preparing them into {exp} ({src.version}, {src.config.sr // 1000}k, "
              f"{'f0 ' + args.f0_method if src.f0 else 'no f0'})")
        run_prepare(args.data, exp, hubert=args.hubert, sr=f"{src.config.sr // 1000}k", version=src.version, f0=src.f0,
                    f0_method=args.f0_method, f0_model=args.f0_model, hubert_output=args.hubert_output,
                    progress=not args.no_progress)
    distributed.barrier("rvclora-prepare")  # the other processes read what process 0 prepared
    return exp


def _train(args, t0) -> int:
    import time

    from rvclora_convert.export import export

    from .. import lora
    from ..data import example_dir
    from ..run import RunConfig, default_segment_frames, run
    from ..train import TrainConfig

    os.makedirs(args.out, exist_ok=True)
    if args.example:
        args.data = args.data or example_dir()
        if not args.base:
            args.base = os.path.join(args.out, EXAMPLE_BASE)
            if not os.path.exists(args.base):
                print(f"example: writing a random-weight v2 40k base (real RVC architecture) to {args.base}")
                write_example_base(args.base, args.seed)
    if not args.base or not args.data:
        raise ValueError("train needs --base G.pth and --data EXP_DIR (or --example)")
    # The base is read once: trained on here, and merged with the trained adapter below.
    src = _load(args.base, "generator", "--base", "f0G40k.pth, G_*.pth")
    if is_recordings_folder(args.data):
        args.data = _prepare_into_run(args, src)
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
                       precision=args.precision, remat=args.remat,
                       **{k: v for k, v in (("lr", args.lr), ("lr_d", args.lr_d)) if v is not None})
    rcfg = RunConfig(data_dir=args.data, run_dir=args.out, lora=lcfg, train=tcfg, steps=args.steps,
                     epochs=args.epochs, save_every=args.save_every, keep=args.keep, log_every=args.log_every,
                     resume=args.resume, progress=not args.no_progress, sid=args.sid,
                     sample_every=args.sample_every, val_fraction=args.val_fraction)
    from .. import distributed

    if args.overwrite and not args.resume and distributed.is_primary():
        # A fresh run: the previous run's checkpoints, samples and log go (its adapter, model
        # and plot are replaced when this run writes its own).
        for name in RUN_DIRS:
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
        if os.path.exists(os.path.join(args.out, "metrics.jsonl")):
            os.unlink(os.path.join(args.out, "metrics.jsonl"))
    distributed.barrier("rvclora-train-start")  # multi-host: every process checked RUN_DIR before writes
    res = run(src.model, rcfg, discriminator=d, metadata={"base": os.path.abspath(args.base)})
    if not distributed.is_primary():
        return 130 if res.interrupted else 0  # process 0 exports and reports
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
    if args.example and not args.no_example_infer:
        _example_infer(args)
    return 0


# Kept in sync with rvclora_jax.train (not imported here: the parser is built without jax).
PRECISIONS = ("bf16", "fp32")
REMAT_CHOICES = ("none", "discriminator", "decoder", "all")


def register(subparsers) -> None:
    tr = subparsers.add_parser("train", help="train a LoRA adapter with RVC's GAN objective")
    tr.add_argument("--base", help="pretrained generator (f0G40k.pth, G_*.pth)")
    tr.add_argument("--base-d", help="pretrained discriminator (f0D40k.pth, D_*.pth); default: random init")
    tr.add_argument("--data", help="RVC or Applio experiment folder, or a folder of recordings (prepared into "
                                   "RUN_DIR/data first, as `rvclora prepare` does: needs --hubert)")
    tr.add_argument("--out", required=True, help="run directory (becomes an adapter directory)")
    tr.add_argument("--no-example-infer", action="store_true",
                    help="with --example: skip the final conversion step (rvclora infer on an example clip)")
    tr.add_argument("--example", action="store_true",
                    help="use the built-in example data (and a random-weight base unless --base is given)")
    tr.add_argument("--rank", type=A.positive_int, default=8)
    tr.add_argument("--alpha", type=A.positive_float, default=None, help="default: equal to rank")
    tr.add_argument("--dropout", type=A.fraction, default=0.0, help="LoRA dropout in [0, 1) (default 0)")
    tr.add_argument("--targets", default="generator", help="LoRA preset (see `rvclora presets`)")
    g = tr.add_mutually_exclusive_group()
    g.add_argument("--steps", type=A.positive_int, default=None)
    g.add_argument("--epochs", type=A.positive_int, default=None)
    tr.add_argument("--batch-size", type=A.positive_int, default=4)
    tr.add_argument("--segment-frames", type=A.positive_int, default=None,
                    help="default: RVC's segment for the rate (32 at 40k)")
    tr.add_argument("--lr", type=A.positive_float, default=None, help="learning rate (default: RVC's, 1e-4)")
    tr.add_argument("--lr-d", type=A.positive_float, default=None, help="discriminator lr (default: --lr)")
    tr.add_argument("--seed", type=A.seed, default=1234)
    tr.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                    help="compute dtype of activations and conv/matmul inputs; parameters, optimizer state, "
                         "STFT/mel and losses stay fp32 (bf16: for GPU/TPU; default fp32)")
    tr.add_argument("--remat", nargs="?", const="all", choices=REMAT_CHOICES, default="none",
                    help="recompute these activations in the backward pass instead of keeping them "
                         "(less memory, slower step); --remat alone means all")
    tr.add_argument("--no-compile-cache", action="store_true",
                    help="do not read or write the persistent XLA compilation cache "
                         "(default: on, in $RVCLORA_COMPILE_CACHE or ~/.cache/rvclora-jax/xla)")
    tr.add_argument("--save-every", type=A.positive_int, default=500)
    tr.add_argument("--keep", type=A.positive_int, default=3, help="checkpoints to keep")
    tr.add_argument("--log-every", type=A.positive_int, default=10)
    tr.add_argument("--sid", type=A.non_negative_int, default=None,
                    help="speaker row of the base to train as (default: the ids in the data, usually 0)")
    tr.add_argument("--train-speaker", action="store_true",
                    help="also train the speaker embedding (a full-size delta of emb_g stored with the adapter)")
    tr.add_argument("--sample-every", type=A.positive_int, default=None,
                    help="render a held-out sample + mel PNG and log val_mel every N steps (default: --save-every)")
    tr.add_argument("--val-fraction", type=A.fraction, default=0.1,
                    help="fraction of clips held out for validation (at least 1 when there are >= 4 clips)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint (a finished run is re-exported)")
    add_overwrite(tr)
    tr.add_argument("--no-progress", action="store_true")
    add_model_flags(tr)  # --hubert, --f0-method, --f0-model, --hubert-output: for --data RAW_DIR
    mh = tr.add_argument_group("multi-host (jax.distributed; default: the RVCLORA_* environment, else one process)")
    mh.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="process 0's address, the same on every process; 'auto': JAX's detection (SLURM, MPI, TPU)")
    mh.add_argument("--num-processes", type=A.positive_int, default=None, help="processes in the run")
    mh.add_argument("--process-id", type=A.non_negative_int, default=None, help="this process, 0..N-1")
    tr.set_defaults(func=_cmd_train)
