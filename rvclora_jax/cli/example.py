"""``rvclora example`` (the built-in end-to-end check) and ``rvclora presets``."""

from __future__ import annotations

import os

from . import _args as A
from ._outputs import add_overwrite, guard


def _cmd_example(args) -> int:
    g = guard([], dirs=[os.path.join(args.out, "adapter")], overwrite=args.overwrite)
    with g.cleanup_on_failure():
        return _example(args)


def _example(args) -> int:
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
        from ..families.rvc import RVC
        from ..models import synthesizer as S

        model = S.Synthesizer(RVC.preset(args.version, args.sr), args.version, True, rngs=nnx.Rngs(0),
                              with_enc_q=False)
        print()
        for name in PRESETS:
            cfg = lora.LoRAConfig.from_preset(name, rank=args.rank)
            n = sum(1 for p, _ in lora.iter_lora_layers(model) if cfg.matches(p))
            print(f"{name:<16} adapts {n} layers of the {args.version} {args.sr} synthesizer")
    return 0


def register(subparsers) -> None:
    ex = subparsers.add_parser("example",
                               help="adapt a built-in random-weight RVC model end to end and verify the merge")
    ex.add_argument("--out", default="example_out", help="output directory (default: example_out)")
    ex.add_argument("--model-version", dest="version", default="v2", choices=["v1", "v2"])
    ex.add_argument("--sr", default="40k", help="32k, 40k or 48k (default 40k)")
    ex.add_argument("--preset", default="generator", help="LoRA target preset (see `rvclora presets`)")
    ex.add_argument("--rank", type=A.positive_int, default=8)
    ex.add_argument("--alpha", type=A.positive_float, default=None, help="default: equal to rank")
    ex.add_argument("--frames", type=A.positive_int, default=32, help="probe length in 10 ms frames")
    ex.add_argument("--seed", type=A.seed, default=0)
    add_overwrite(ex)
    ex.set_defaults(func=_cmd_example)

    pr = subparsers.add_parser("presets", help="list LoRA target presets")
    pr.add_argument("--model-version", dest="version", choices=["v1", "v2"], default=None,
                    help="also count the layers each preset adapts in this RVC model")
    pr.add_argument("--sr", default="40k")
    pr.add_argument("--rank", type=A.positive_int, default=8)
    pr.set_defaults(func=_cmd_presets)
