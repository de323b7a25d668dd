"""``rvclora`` command line: a thin layer over the importable functions."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__


def _cmd_example(args) -> int:
    from ..example import run_example

    res = run_example(args.out, version=args.version, sr=args.sr, preset=args.preset, rank=args.rank,
                      alpha=args.alpha, frames=args.frames, seed=args.seed)
    ok = res.max_abs_diff <= 1e-4
    print(f"\n{'OK' if ok else 'FAILED'}: merged model reproduces the adapted model "
          f"(max |Δ| {res.max_abs_diff:.2e}) in {res.seconds:.1f} s")
    print(f"outputs: {res.adapter_dir}/adapter.safetensors, {res.adapter_dir}/adapter_config.json")
    return 0 if ok else 1


def _cmd_presets(args) -> int:
    from ..lora import PRESETS

    for name, (pats, desc) in PRESETS.items():
        print(f"{name}\n    {desc}")
        for p in pats:
            print(f"    pattern: {p}")
    if args.version:
        from flax import nnx

        from .. import lora
        from ..models import synthesizer as S

        model = S.Synthesizer(S.preset(args.version, args.sr), args.version, True, rngs=nnx.Rngs(0),
                              with_enc_q=False)
        print()
        for name in PRESETS:
            cfg = lora.LoRAConfig.from_preset(name, rank=args.rank)
            n = sum(1 for p, _ in lora.iter_lora_layers(model) if cfg.matches(p))
            print(f"{name:<16} adapts {n} layers of the {args.version} {args.sr} synthesizer")
    return 0


def _torch_needed():
    from ..fileio import require_torch

    require_torch()


def _cmd_inspect(args) -> int:
    _torch_needed()
    import json

    from rvclora_convert.pth import load_rvc_file

    f = load_rvc_file(args.file)
    info = {
        "path": f.path, "layout": f.layout, "kind": f.kind, "version": f.version, "f0": f.f0, "sr": f.sr,
        "params": f.num_params, "tensors": len(f.state_dict), "dtype": f.dtype,
        "weight_norm": f.weight_norm_style, "enc_q": f.has_enc_q, "optimizer": f.has_optimizer,
        "speakers": f.n_speakers, "config": f.config.to_list() if f.config else None,
        "metadata": f.metadata,
    }
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    w = max(len(k) for k in info)
    for k, v in info.items():
        if k == "metadata":
            for mk, mv in v.items():
                print(f"{'  ' + mk:<{w + 2}}  {mv}")
        else:
            print(f"{k:<{w}}    {v}")
    return 0


def _cmd_convert(args) -> int:
    _torch_needed()
    from rvclora_convert.export import MODEL_JSON, PARAMS_DIR, convert_file

    src = convert_file(args.file, args.out_dir)
    print(f"{args.file}: {src.layout} {src.kind} {src.version}"
          + (f" {src.config.sr // 1000}k {'f0' if src.f0 else 'nof0'}" if src.config else ""))
    print(f"wrote {args.out_dir}/{PARAMS_DIR} (Orbax, fp32) and {args.out_dir}/{MODEL_JSON}")
    return 0


def _cmd_export(args) -> int:
    _torch_needed()
    from rvclora_convert.export import export, load_source

    src = load_source(args.source)
    rep = export(src, args.out, adapter=args.adapter, scale=args.scale, layout=args.layout, fp32=args.fp32,
                 info=args.info)
    what = f"merged with {rep['adapter']} (scale {rep['scale']:g})" if rep["adapter"] else "no adapter"
    print(f"wrote {rep['path']}: {rep['layout']}, {rep['keys']} tensors, {rep['dtype']}, "
          f"{rep['bytes'] / 1e6:.1f} MB; {what}")
    return 0


def _write_example_base(path: str, seed: int) -> None:
    """A randomly initialised v2 40k f0 base (RVC's real architecture) as ``{"model": sd}``."""
    from flax import nnx

    from rvclora_convert.export import write_base_file

    from ..models import synthesizer as S

    write_base_file(S.Synthesizer(S.preset("v2", 40000), "v2", True, rngs=nnx.Rngs(seed)), path)


def _cmd_train(args) -> int:
    _torch_needed()
    import time

    from flax import nnx

    from rvclora_convert.export import export, load_source
    from rvclora_convert.pth import load_rvc_file, to_flax

    from .. import lora
    from ..data import example_dir
    from ..models.discriminators import multi_period_discriminator
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
                _write_example_base(args.base, args.seed)
    if not args.base or not args.data:
        raise ValueError("train needs --base G.pth and --data EXP_DIR (or --example)")
    gfile = load_rvc_file(args.base)
    if gfile.kind != "generator":
        raise ValueError(f"{args.base}: is a {gfile.kind}; --base takes a generator (f0G40k.pth, G_*.pth)")
    print(gfile.summary())
    g, g_params = to_flax(gfile, seed=args.seed)
    if args.base_d:
        dfile = load_rvc_file(args.base_d)
        if dfile.kind != "discriminator":
            raise ValueError(f"{args.base_d}: is a {dfile.kind}; --base-d takes a discriminator (f0D40k.pth, D_*.pth)")
        if dfile.version != gfile.version:
            raise ValueError(f"{args.base_d}: a {dfile.version} discriminator for a {gfile.version} generator")
        d, _ = to_flax(dfile, seed=args.seed)
        print(dfile.summary())
    else:
        d = multi_period_discriminator(gfile.version, nnx.Rngs(args.seed + 1))
        print(f"no --base-d: the {gfile.version} discriminator starts from random weights (trained fully)")
    lcfg = lora.LoRAConfig.from_preset(args.targets, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                       train_embeddings=("emb_g",) if args.train_speaker else ())
    tcfg = TrainConfig(batch_size=args.batch_size, segment_frames=args.segment_frames or default_segment_frames(g),
                       lr=args.lr, lr_d=args.lr_d, seed=args.seed)
    rcfg = RunConfig(data_dir=args.data, run_dir=args.out, lora=lcfg, train=tcfg, steps=args.steps,
                     epochs=args.epochs, save_every=args.save_every, keep=args.keep, log_every=args.log_every,
                     resume=args.resume, progress=not args.no_progress, sid=args.sid,
                     sample_every=args.sample_every, val_fraction=args.val_fraction)
    base_fp = lora.fingerprint(lora.partition(g_params)[1])
    res = run(g, d, rcfg, base_fingerprint=base_fp, metadata={"base": os.path.abspath(args.base)})
    recs = res["metrics"]
    if recs:
        k = max(1, min(5, len(recs) // 3))
        first = sum(r["mel"] for r in recs[:k]) / k
        last = sum(r["mel"] for r in recs[-k:]) / k
        print(f"step {recs[-1]['step']}: mel L1 x45 (mean of the first / last {k} logged steps) "
              f"{first:.2f} -> {last:.2f}; kl {recs[-1]['kl']:.2f}, loss_d {recs[-1]['loss_d']:.2f}")
    if res["interrupted"]:
        print(f"interrupted at step {res['step']}: checkpoint saved; continue with --resume")
        return 130
    out_pth = os.path.join(args.out, "model.pth")
    rep = export(load_source(args.base), out_pth, adapter=args.out, layout="inference",
                 info=f"rvclora-jax LoRA r{args.rank} {args.targets}, {res['step']} steps")
    print(f"done in {time.time() - t0:.0f} s. outputs in {os.path.abspath(args.out)}:")
    print(f"  adapter.safetensors + adapter_config.json   the adapter ({res['summary'].trainable_params:,} params)")
    print(f"  model.pth                                   merged RVC inference model ({rep['bytes'] / 1e6:.1f} MB, "
          f"loads in RVC WebUI / Applio)")
    print("  metrics.jsonl, loss.png, samples/ (held-out renders + mel PNGs), checkpoints/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rvclora", description="Exact LoRA fine-tuning of RVC voice models in JAX.")
    p.add_argument("--version", action="version", version=f"rvclora-jax {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    from .adapters import register

    register(sub)
    from ..render import add_render_parser

    add_render_parser(sub)

    ex = sub.add_parser("example", help="adapt a built-in random-weight RVC model end to end and verify the merge")
    ex.add_argument("--out", default="example_out", help="output directory (default: example_out)")
    ex.add_argument("--model-version", dest="version", default="v2", choices=["v1", "v2"])
    ex.add_argument("--sr", default="40k", help="32k, 40k or 48k (default 40k)")
    ex.add_argument("--preset", default="generator", help="LoRA target preset (see `rvclora presets`)")
    ex.add_argument("--rank", type=int, default=8)
    ex.add_argument("--alpha", type=float, default=None, help="default: equal to rank")
    ex.add_argument("--frames", type=int, default=32, help="probe length in 10 ms frames")
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_cmd_example)

    ins = sub.add_parser("inspect", help="identify an RVC .pth file (layout, version, f0, rate, ...)")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=_cmd_inspect)

    cv = sub.add_parser("convert", help="RVC .pth -> Flax params (Orbax) + model.json")
    cv.add_argument("file")
    cv.add_argument("out_dir")
    cv.set_defaults(func=_cmd_convert)

    exp = sub.add_parser("export", help="write an RVC .pth (optionally merged with an adapter)")
    exp.add_argument("source", help="an RVC .pth file or a directory from `rvclora convert`")
    exp.add_argument("out", help="output .pth")
    exp.add_argument("--adapter", help="adapter directory (adapter.safetensors + adapter_config.json) or the .safetensors")
    exp.add_argument("--scale", type=float, default=1.0, help="adapter strength (default 1)")
    exp.add_argument("--layout", default="inference", choices=["inference", "train-checkpoint", "base"])
    exp.add_argument("--fp32", action="store_true", help="inference model in fp32 (default fp16, as RVC)")
    exp.add_argument("--info", default=None, help="text for the inference model's 'info' field")
    exp.set_defaults(func=_cmd_export)

    tr = sub.add_parser("train", help="train a LoRA adapter with RVC's GAN objective")
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
    tr.add_argument("--segment-frames", type=int, default=None, help="default: RVC's segment for the rate (32 at 40k)")
    tr.add_argument("--lr", type=float, default=1e-4)
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

    pr = sub.add_parser("presets", help="list LoRA target presets")
    pr.add_argument("--model-version", dest="version", choices=["v1", "v2"], default=None,
                    help="also count the layers each preset adapts in this RVC model")
    pr.add_argument("--sr", default="40k")
    pr.add_argument("--rank", type=int, default=8)
    pr.set_defaults(func=_cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # always one line
        print(f"rvclora: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
