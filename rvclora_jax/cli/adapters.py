"""``rvclora adapters {mix,extract,info}``: adapter arithmetic on files.

The handlers read and write files and print; the arithmetic itself is
:mod:`rvclora_jax.adapters`. ``.pth`` files are read through ``rvclora_convert`` inside
the handler that needs them (the CLI is the only place the core meets the converters).
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from . import _args as A
from ._outputs import add_overwrite, guard


def _parse_weighted(spec: str) -> tuple[str, float]:
    """``DIR:W`` (or ``DIR`` for weight 1). The last ``:`` splits, so paths may contain one."""
    if ":" in spec:
        path, w = spec.rsplit(":", 1)
        try:
            x = float(w)
        except ValueError:
            if os.path.exists(spec):
                return spec, 1.0
            raise ValueError(f"{spec}: expected ADAPTER:WEIGHT with a numeric weight") from None
        if not math.isfinite(x):
            raise ValueError(f"{spec}: the weight must be a finite number, got {w!r}")
        return path, x
    return spec, 1.0


def _adapter_inputs(path: str) -> list[str]:
    """An adapter argument (a directory or its .safetensors) as the paths it reads."""
    from ..adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return [os.path.join(d, ADAPTER_WEIGHTS), os.path.join(d, ADAPTER_CONFIG)]


def _save(out: str, ad) -> None:
    from ..adapters import save_adapter

    save_adapter(out, ad.params, ad.config, kinds=ad.kinds, base_fingerprint=ad.base_fingerprint,
                 metadata=ad.metadata)


def _cmd_mix(args) -> int:
    specs = [_parse_weighted(s) for s in args.adapters]
    g = guard([q for p, _ in specs for q in _adapter_inputs(p)], dirs=[args.out], overwrite=args.overwrite)
    with g.cleanup_on_failure():
        return _mix(args, specs)


def _mix(args, specs) -> int:
    from .. import lora
    from ..adapters import compress, load_adapter, mix
    from ..layers import layer_kind

    ads = [load_adapter(p) for p, _ in specs]
    mixed = mix(ads, [w for _, w in specs])
    report = None
    if args.rank is not None:
        mixed, report = compress(mixed, args.rank)
    _save(args.out, mixed)
    layers = lora.adapter_layers(mixed.params)
    max_rank = max((layer_kind(mixed.kinds[p]).rank_of(np.shape(a)) for p, (a, _) in layers.items()), default=0)
    print(f"mixed {len(ads)} adapters: " + ", ".join(mixed.metadata["mixed_from"]))
    print(f"layers: {len(layers)}   max rank: {max_rank}   embedding deltas: {list(mixed.config.train_embeddings)}")
    if report is not None:
        print(report.format(max_rows=args.max_rows))
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


def _cmd_extract(args) -> int:
    g = guard([args.base, args.voice], dirs=[args.out], overwrite=args.overwrite)
    with g.cleanup_on_failure():
        return _extract(args)


def _extract(args) -> int:
    from rvclora_convert.export import load_source

    from ..adapters import extract, fingerprint
    from ..lora import LoRAConfig
    from ..tree import flatten

    base, voice = load_source(args.base), load_source(args.voice)
    for s in (base, voice):
        if s.kind != "generator":
            raise ValueError(f"{s.path}: extract needs generators, this is a {s.kind}")
    fb, fv = fingerprint(base.params, with_weights=False), fingerprint(voice.params, with_weights=False)
    if fb["structure"] != fv["structure"]:
        raise ValueError(f"{args.voice} and {args.base} are different model architectures "
                         f"(structure {fv['structure']} != {fb['structure']})")
    cfg = LoRAConfig.from_preset(args.targets)
    ad, report = extract(base.params, voice.params, rank=args.rank, config_targets=cfg, model=base.model,
                         keep_full=args.keep_full, probe=not args.no_probe)
    if not flatten(ad.params):
        raise ValueError(f"{args.voice}: no targeted layer differs from {args.base}; nothing to extract")
    ad.metadata = {"extracted_from": os.path.abspath(args.voice), "base": os.path.abspath(args.base),
                   "rank": args.rank, "targets": args.targets, "energy_kept": report.energy.kept}
    if report.probe:
        ad.metadata["probe_max_abs_err"] = report.probe["max_abs_err"]
    ad.base_fingerprint = fingerprint(base.params)
    _save(args.out, ad)
    print(report.format(max_rows=args.max_rows))
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


def _cmd_info(args) -> int:
    from ..adapters import info, load_adapter

    print(info(load_adapter(args.adapter)))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Register ``adapters {mix,extract,info}`` on a CLI's subparsers object."""
    from ..lora import PRESETS

    p = subparsers.add_parser("adapters", help="mix, extract (from a fine-tuned voice) and inspect adapters")
    sub = p.add_subparsers(dest="adapters_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    mx = sub.add_parser("mix", help="exact weighted sum of adapters (ranks concatenated); optional SVD re-compression")
    mx.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]",
                    help="adapter directories with weights, e.g. a:0.7 b:-0.3 (default weight 1)")
    mx.add_argument("--out", required=True, help="output adapter directory")
    mx.add_argument("--rank", type=A.positive_int, default=None,
                    help="re-compress each layer to at most this rank by SVD (reports the discarded energy)")
    mx.add_argument("--max-rows", type=A.non_negative_int, default=20, help="rows of the energy table to print")
    add_overwrite(mx)
    mx.set_defaults(func=_cmd_mix)

    ex = sub.add_parser("extract", help="LoRA adapter approximating VOICE - BASE (truncated SVD per layer)")
    ex.add_argument("--base", required=True, help="base model (.pth or converted directory)")
    ex.add_argument("--voice", required=True, help="fine-tuned voice model of the same architecture")
    ex.add_argument("--rank", type=A.positive_int, required=True, help="rank per layer (use a large value for exact)")
    ex.add_argument("--targets", default="generator+prior", choices=list(PRESETS),
                    help="layers to extract (preset; default generator+prior = everything used at inference)")
    ex.add_argument("--keep-full", action="store_true",
                    help="store a changed speaker embedding (emb_g) as a full delta in the adapter")
    ex.add_argument("--no-probe", action="store_true", help="skip the probe render")
    ex.add_argument("--max-rows", type=A.non_negative_int, default=20, help="rows of the energy table to print")
    ex.add_argument("--out", required=True, help="output adapter directory")
    add_overwrite(ex)
    ex.set_defaults(func=_cmd_extract)

    inf = sub.add_parser("info", help="show an adapter's config, fingerprint, ranks and delta norms")
    inf.add_argument("adapter", help="adapter directory (or its adapter.safetensors)")
    inf.set_defaults(func=_cmd_info)
    return p


__all__ = ["register"]
