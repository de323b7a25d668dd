"""``rvclora`` command line: a thin layer over the importable functions."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_example(args) -> int:
    from .example import run_example

    res = run_example(args.out, version=args.version, sr=args.sr, preset=args.preset, rank=args.rank,
                      alpha=args.alpha, frames=args.frames, seed=args.seed)
    ok = res.max_abs_diff <= 1e-4
    print(f"\n{'OK' if ok else 'FAILED'}: merged model reproduces the adapted model "
          f"(max |Δ| {res.max_abs_diff:.2e}) in {res.seconds:.1f} s")
    print(f"outputs: {res.adapter_dir}/adapter.safetensors, {res.adapter_dir}/adapter_config.json")
    return 0 if ok else 1


def _cmd_presets(args) -> int:
    from .lora import PRESETS

    for name, (pats, desc) in PRESETS.items():
        print(f"{name}\n    {desc}")
        for p in pats:
            print(f"    pattern: {p}")
    if args.version:
        from flax import nnx

        from . import lora
        from .models import synthesizer as S

        model = S.Synthesizer(S.preset(args.version, args.sr), args.version, True, rngs=nnx.Rngs(0),
                              with_enc_q=False)
        print()
        for name in PRESETS:
            cfg = lora.LoRAConfig.from_preset(name, rank=args.rank)
            n = sum(1 for p, _ in lora.iter_lora_layers(model) if cfg.matches(p))
            print(f"{name:<16} adapts {n} layers of the {args.version} {args.sr} synthesizer")
    return 0


def _torch_needed():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError("reading and writing .pth files needs PyTorch: pip install 'rvclora-jax[torch]'") from None


def _cmd_inspect(args) -> int:
    _torch_needed()
    import json

    from convert.pth import load_rvc_file

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
    from convert.export import MODEL_JSON, PARAMS_DIR, convert_file

    src = convert_file(args.file, args.out_dir)
    print(f"{args.file}: {src.layout} {src.kind} {src.version}"
          + (f" {src.config.sr // 1000}k {'f0' if src.f0 else 'nof0'}" if src.config else ""))
    print(f"wrote {args.out_dir}/{PARAMS_DIR} (Orbax, fp32) and {args.out_dir}/{MODEL_JSON}")
    return 0


def _cmd_export(args) -> int:
    _torch_needed()
    from convert.export import export, load_source

    src = load_source(args.source)
    rep = export(src, args.out, adapter=args.adapter, scale=args.scale, layout=args.layout, fp32=args.fp32,
                 info=args.info)
    what = f"merged with {rep['adapter']} (scale {rep['scale']:g})" if rep["adapter"] else "no adapter"
    print(f"wrote {rep['path']}: {rep['layout']}, {rep['keys']} tensors, {rep['dtype']}, "
          f"{rep['bytes'] / 1e6:.1f} MB; {what}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rvclora", description="Exact LoRA fine-tuning of RVC voice models in JAX.")
    p.add_argument("--version", action="version", version=f"rvclora-jax {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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
