"""Time rvclora_jax.retrieval against faiss-cpu: the retrieval search, and building the index.

    python benchmarks/bench_index.py [--rows 30000] [--frames 1500] [--rounds 3] [--repeats 5] [--no-build]

The data stand in for RVC v2 features: ``--rows`` 768-d frames (30 000: ten minutes of
training audio at 50 frames/s) drawn from a 200-component Gaussian mixture, and
``--frames`` queries (1 500: a 30 s input, the frames ``Pipeline.vc`` searches). The index
is RVC's ``IVF{n_ivf},Flat`` at nprobe 1, built once by faiss and read by both sides.

Each measurement runs in its own process (neither framework's thread pools disturb the
other), the processes alternate, ``--rounds`` times. A search process loads the index,
warms up once (JAX compiles then) and times ``--repeats`` searches of k=8; a build process
times one whole build (RVC's ``train_index``: faiss ``train`` + ``add``; ours
``build_index``, k-means in JAX) and reports its recall@8 at nprobe 1 against exact search.
Reported: medians over rounds of CPU time (user + sys, all threads) and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _data(rows: int, frames: int):
    rng = np.random.default_rng(0)
    c = rng.standard_normal((200, 768)).astype(np.float32)
    x = (c[rng.integers(0, 200, rows)] + 0.5 * rng.standard_normal((rows, 768))).astype(np.float32)
    q = (c[rng.integers(0, 200, frames)] + 0.5 * rng.standard_normal((frames, 768))).astype(np.float32)
    return x, q


def _recall(ids, truth) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth)]))


def worker(task: str, path: str, rows: int, frames: int, repeats: int) -> dict:
    x, q = _data(rows, frames)
    if task.endswith("search"):
        if task == "faiss-search":
            import faiss

            ix = faiss.read_index(path)
            search = ix.search
        else:
            from rvclora_jax.retrieval import read_index

            search = read_index(path).search
        search(q, 8)  # warm-up (JAX compiles)
        cpu, wall = [], []
        for _ in range(repeats):
            c0, w0 = _cpu(), time.perf_counter()
            search(q, 8)
            cpu.append(_cpu() - c0)
            wall.append(time.perf_counter() - w0)
        return {"cpu": float(np.median(cpu)), "wall": float(np.median(wall))}
    import faiss

    from rvclora_jax.retrieval import build_index, n_ivf

    c0, w0 = _cpu(), time.perf_counter()
    if task == "faiss-build":
        ix = faiss.index_factory(768, f"IVF{n_ivf(rows)},Flat")
        faiss.extract_index_ivf(ix).nprobe = 1
        ix.train(x)
        for s in range(0, rows, 8192):
            ix.add(x[s:s + 8192])
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        _, ids = ix.search(q, 8)
        rows = x
    else:
        index = build_index(x, seed=0)
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        _, ids = index.search(q, 8)
        rows = index.vectors  # shuffled, as RVC's: ids refer to these rows
    exact = faiss.IndexFlatL2(768)
    exact.add(rows)
    _, truth = exact.search(q, 8)
    return {"cpu": cpu, "wall": wall, "recall": _recall(ids, truth)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=30000)
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", nargs=2, metavar=("TASK", "INDEX"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.rows, a.frames, a.repeats)))
        return
    import faiss

    from rvclora_jax.retrieval import n_ivf

    x, _ = _data(a.rows, a.frames)
    tmp = tempfile.mkdtemp(prefix="bench-index-")
    path = os.path.join(tmp, "bench.index")
    ix = faiss.index_factory(768, f"IVF{n_ivf(a.rows)},Flat")
    faiss.extract_index_ivf(ix).nprobe = 1
    ix.train(x)
    ix.add(x)
    faiss.write_index(ix, path)
    tasks = ["faiss-search", "ours-search"] + ([] if a.no_build else ["faiss-build", "ours-build"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res: dict[str, list[dict]] = {t: [] for t in tasks}
    for r in range(a.rounds):
        for t in tasks:
            out = subprocess.run([sys.executable, __file__, "--worker", t, path, "--rows", str(a.rows),
                                  "--frames", str(a.frames), "--repeats", str(a.repeats)],
                                 capture_output=True, text=True, env=env, check=True)
            res[t].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {t}: {res[t][-1]}", flush=True)
    med = {t: {k: float(np.median([v[k] for v in vs])) for k in vs[0]} for t, vs in res.items()}
    print(f"\nIVF{n_ivf(a.rows)},Flat nprobe 1 over {a.rows} x 768, {a.frames} queries, k=8; medians of "
          f"{a.rounds} rounds, {os.cpu_count()} CPUs (shared machine)")
    for t, m in med.items():
        print(f"  {t:13s} cpu {m['cpu']:8.3f} s  wall {m['wall']:8.3f} s" +
              (f"  recall@8 {m['recall']:.3f}" if "recall" in m else ""))
    for kind in ("search", "build"):
        if f"ours-{kind}" in med:
            o, f = med[f"ours-{kind}"], med[f"faiss-{kind}"]
            print(f"  {kind}: ours / faiss = {o['cpu'] / f['cpu']:.2f}x cpu, {o['wall'] / f['wall']:.2f}x wall")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"runs": res, "medians": med, "rows": a.rows, "frames": a.frames}, fh, indent=1)


if __name__ == "__main__":
    main()
