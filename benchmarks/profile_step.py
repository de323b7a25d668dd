"""Where the CPU time of the training step goes, on both sides.

    python benchmarks/profile_step.py --side jax   [--batch 4] [--frames 120] [--steps 2]
    python benchmarks/profile_step.py --side torch [--batch 4] [--frames 120] [--steps 2]

``--side jax`` traces ``--steps`` compiled train steps with XLA's profiler
(``jax.profiler.trace``), reads the trace back (``jax.profiler.ProfileData``) and sums
the time of every HLO instruction the CPU runtime executed. Instructions are classed
by what they are (convolution forward / input gradient / weight gradient with their
stride, dilation and groups; dot; FFT; fusion; copy/transpose ...) and attributed to
the innermost line of rvclora-jax that emitted them (from the HLO's stack frames), so
the table says both *which op types* and *which layers* take the time.

``--side torch`` runs RVC's own step (the one ``bench_train.py`` times) under
``torch.profiler`` and prints the same kind of table by aten op, forward and backward.

Both print percentages of the summed op time; on a shared machine the absolute
numbers are only indicative (the step's CPU time is printed too).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\((.*)$")


def _parse_hlo(text: str):
    """Instruction name -> (opcode, attrs text, op_name, stack_frame_id), fused
    computation name -> its opcodes, and the stack-frame tables."""
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    instrs, fused = {}, collections.defaultdict(list)
    comp = None
    for line in text.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        if section and s and s[0].isdigit():
            k, rest = s.split(" ", 1)
            k = int(k)
            if section == "FileNames":
                files[k] = rest.strip('"')
            elif section == "FunctionNames":
                funcs[k] = rest.strip('"')
            elif section == "FileLocations":
                d = dict(re.findall(r"(\w+)=(\d+)", rest))
                locs[k] = (int(d["file_name_id"]), int(d["function_name_id"]), int(d["line"]))
            else:
                d = dict(re.findall(r"(\w+)=(\d+)", rest))
                frames[k] = (int(d["file_location_id"]), int(d["parent_frame_id"]))
            continue
        if not s:
            continue
        section = None
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", s)
        if m:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            name, _shape, op, rest = m.groups()
            meta = re.search(r'op_name="([^"]*)"', rest)
            sf = re.search(r"stack_frame_id=(\d+)", rest)
            instrs[name] = (op, rest, meta.group(1) if meta else "", int(sf.group(1)) if sf else 0, m.group(2))
            if comp and "fused" in comp or (comp and comp.startswith("fusion")):
                fused[comp].append(op)
    return instrs, fused, (files, funcs, locs, frames)


def _source(frame_id, tables):
    """Innermost frame of rvclora_jax (relative path:line function), walking parents."""
    files, funcs, locs, frames = tables
    fid = frame_id
    seen = 0
    while fid in frames and seen < 64:
        loc, parent = frames[fid]
        f, fn, line = locs.get(loc, (0, 0, 0))
        path = files.get(f, "?")
        if "rvclora_jax" in path:
            return f"{path.split('rvclora_jax/')[-1]}:{line} {funcs.get(fn, '?')}"
        if parent == fid:
            break
        fid, seen = parent, seen + 1
    return "?"


def _conv_class(op_name: str, attrs: str, shape: str) -> str:
    win = re.search(r"window=\{([^}]*)\}", attrs)
    w = win.group(1) if win else ""
    groups = re.search(r"feature_group_count=(\d+)", attrs)
    bgroups = re.search(r"batch_group_count=(\d+)", attrs)
    parts = []
    size = re.search(r"size=([\dx]+)", w)
    parts.append(f"k{size.group(1)}" if size else "k?")
    for key in ("stride", "lhs_dilate", "rhs_dilate"):
        m = re.search(key + r"=([\dx]+)", w)
        if m and set(m.group(1).split("x")) != {"1"}:
            parts.append(f"{key}={m.group(1)}")
    if groups and groups.group(1) != "1":
        parts.append(f"groups={groups.group(1)}")
    if bgroups and bgroups.group(1) != "1":
        parts.append(f"batch_groups={bgroups.group(1)}")
    # which pass: jax names the transposed (backward) ops "transpose(jvp(...))"
    kind = "bwd" if "transpose(" in op_name else "fwd"
    return f"conv {kind} " + " ".join(parts)


def profile_jax(B, T, steps, rank, top, dump=None):
    import jax

    from bench_train import build_jax

    tr, state, batch = build_jax(B, T, rank)
    batch = tr.put_batch(batch)
    compiled = tr._step.lower(state, batch, tr.frozen).compile()  # the frozen base is an argument
    instrs, fused, tables = _parse_hlo(compiled.as_text())
    # the AOT-compiled executable itself: tr._step would compile a second time
    state, _ = compiled(state, batch, tr.frozen)
    jax.block_until_ready(state)
    tmp = tempfile.mkdtemp(prefix="rvclora-prof-")
    c0, w0 = time.process_time(), time.perf_counter()
    with jax.profiler.trace(tmp):
        for _ in range(steps):
            state, _ = compiled(state, batch, tr.frozen)
            jax.block_until_ready(state)
    cpu, wall = (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps
    path = sorted(glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True))[-1]
    pd = jax.profiler.ProfileData.from_file(path)
    per_instr = collections.Counter()
    for plane in pd.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if ev.name in instrs:
                    per_instr[ev.name] += ev.duration_ns / steps
    total = sum(per_instr.values())
    by_class, by_source = collections.Counter(), collections.Counter()
    for name, ns in per_instr.items():
        op, attrs, op_name, sf, shape = instrs[name]
        if op == "convolution":
            cls = _conv_class(op_name, attrs, shape)
        elif op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", attrs)
            inner = set(fused.get(called.group(1), [])) if called else set()
            kind = re.search(r"kind=(\w+)", attrs)
            if "convolution" in inner:
                cls = "fusion(conv)"
            elif "dot" in inner:
                cls = "fusion(dot)"
            elif "reduce" in inner or "reduce-window" in inner:
                cls = "fusion(reduce)"
            elif inner & {"pad", "slice", "concatenate", "dynamic-slice", "dynamic-update-slice", "gather",
                          "scatter", "transpose", "reverse"}:
                cls = "fusion(data movement)"
            else:
                cls = f"fusion(elementwise {kind.group(1) if kind else ''})".replace(" )", ")")
            if "transpose(" in op_name:
                cls += " bwd"
        else:
            cls = op + (" bwd" if "transpose(" in op_name else "")
        by_class[cls] += ns
        src = _source(sf, tables)
        by_source[(src, "bwd" if "transpose(" in op_name else "fwd", op)] += ns
    print(f"JAX step, batch {B}, {T} frames: {cpu:.2f} s CPU, {wall:.2f} s wall per step "
          f"(traced); summed op time {total / 1e9:.2f} s")
    print(f"{'op class':60} {'ms':>9} {'%':>6}")
    for cls, ns in by_class.most_common(top):
        print(f"{cls[:60]:60} {ns / 1e6:9.1f} {100 * ns / total:6.1f}")
    print(f"\n{'instruction':28} {'op class':34} {'shape':36} {'ms':>8}")
    for name, ns in per_instr.most_common(top):
        op, attrs, op_name, sf, shape = instrs[name]
        called = re.search(r"calls=%?([\w.\-]+)", attrs)
        inner = ",".join(sorted(set(fused.get(called.group(1), [])) - {"parameter"})) if called else ""
        print(f"{name[:28]:28} {(op + ' ' + inner)[:34]:34} {shape[:36]:36} {ns / 1e6:8.1f}  {op_name[-60:]}")
    if dump:
        with open(dump + ".hlo.txt", "w") as f:
            f.write(compiled.as_text())
        with open(dump + ".times.json", "w") as f:
            json.dump(dict(per_instr), f)
    print(f"\n{'source (innermost rvclora_jax frame)':60} {'pass':4} {'op':12} {'ms':>9} {'%':>6}")
    for (src, kind, op), ns in by_source.most_common(top):
        print(f"{src[:60]:60} {kind:4} {op[:12]:12} {ns / 1e6:9.1f} {100 * ns / total:6.1f}")
    return by_class


def profile_torch(B, T, steps, top):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_train import build_torch

    step = build_torch(B, T)
    step()
    c0, w0 = time.process_time(), time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    cpu, wall = (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps
    events = prof.key_averages()
    # self time per aten op: the leaves, so the shares add up to the step
    rows = [(e.key, e.self_cpu_time_total / steps) for e in events]
    total = sum(t for _, t in rows)
    print(f"torch step, batch {B}, {T} frames: {cpu:.2f} s CPU, {wall:.2f} s wall per step "
          f"(profiled, {torch.get_num_threads()} threads); summed self time {total / 1e6:.2f} s")
    print(f"{'aten op (self time)':60} {'ms':>9} {'%':>6}")
    for key, t in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"{key[:60]:60} {t / 1e3:9.1f} {100 * t / total:6.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["jax", "torch"], required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--dump", help="jax: write PREFIX.hlo.txt and PREFIX.times.json (ns per instruction)")
    a = ap.parse_args()
    if a.side == "jax":
        profile_jax(a.batch, a.frames, a.steps, a.rank, a.top, a.dump)
    else:
        profile_torch(a.batch, a.frames, a.steps, a.top)


if __name__ == "__main__":
    main()
