"""``rvclora index EXP_DIR|RUN_DIR``: a training folder's content features -> RVC's retrieval index.

The features are every ``.npy`` in the experiment's feature folder (RVC: ``3_feature768/`` or
``3_feature256/``; Applio: ``extracted/``), in sorted order, as RVC's ``train_index`` reads
them. A training run folder (``rvclora train --out RUN_DIR``) is followed to its experiment:
``RUN_DIR/data`` (recordings prepared by ``train --data RAW_DIR``) or the ``data`` folder its
``adapter_config.json`` names. :func:`rvclora_jax.retrieval.build_index` builds the index;
it is written in faiss's file format as RVC names it,
``added_IVF{n}_Flat_nprobe_1_{name}_{v1|v2}.index``, into the folder given (or ``--out``).
"""

from __future__ import annotations

import json
import os

FEATURE_DIRS = (("3_feature768", "v2"), ("3_feature256", "v1"), ("extracted", None))


def _feature_dirs(exp: str) -> list[tuple[str, str | None]]:
    return [(os.path.join(exp, d), v) for d, v in FEATURE_DIRS if os.path.isdir(os.path.join(exp, d))]


def find_features(folder: str, version: str | None = None) -> tuple[str, str]:
    """(feature folder, experiment folder) for an experiment or a training run folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found (an experiment folder or a training run folder)")
    exp = folder
    if not _feature_dirs(exp):
        cfg = os.path.join(folder, "adapter_config.json")
        if _feature_dirs(os.path.join(folder, "data")):
            exp = os.path.join(folder, "data")
        elif os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as fh:
                    data = json.load(fh).get("metadata", {}).get("data")
            except (OSError, ValueError, AttributeError) as e:
                raise ValueError(f"{cfg}: cannot read the run's adapter config ({e})") from None
            if not data:
                raise ValueError(f"{cfg}: names no training data folder (metadata.data)")
            if not _feature_dirs(data):
                raise FileNotFoundError(f"{folder}: the run's data folder {data} holds no feature folder "
                                        f"({', '.join(d for d, _ in FEATURE_DIRS)})")
            exp = data
        else:
            raise ValueError(f"{folder}: neither an experiment folder (no {', '.join(d for d, _ in FEATURE_DIRS)}) "
                             f"nor a training run folder (no data/ or adapter_config.json)")
    found = _feature_dirs(exp)
    if version:
        pick = [fd for fd in found if fd[1] in (version, None)]
        if not pick:
            raise FileNotFoundError(f"{exp}: no {version} feature folder "
                                    f"({'3_feature768' if version == 'v2' else '3_feature256'})")
        found = pick
    elif len([fd for fd in found if fd[1]]) > 1:
        raise ValueError(f"{exp}: holds both 3_feature768 and 3_feature256; choose one with --version v2|v1")
    return found[0][0], exp


def scan_features(feature_dir: str) -> tuple[list[str], int, int]:
    """(the ``*.npy`` files of ``feature_dir``, sorted; total frames; width), from their
    headers only (memory-mapped), so a bad file or output is refused before any work."""
    import numpy as np

    names = sorted(f for f in os.listdir(feature_dir) if f.endswith(".npy"))
    if not names:
        raise FileNotFoundError(f"{feature_dir}: no feature files (*.npy)")
    paths, total, width = [os.path.join(feature_dir, n) for n in names], 0, None
    for path in paths:
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read feature file ({' '.join(str(e).split()) or type(e).__name__})") \
                from None
        if a.ndim != 2 or a.shape[1] not in (256, 768) or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{path}: features of shape {a.shape} and dtype {a.dtype}, expected [T, 768] or "
                             f"[T, 256] float")
        if width is not None and a.shape[1] != width:
            raise ValueError(f"{path}: {a.shape[1]}-d features among {width}-d ones")
        width = a.shape[1]
        total += a.shape[0]
    return paths, total, width


def load_features(paths: list[str]):
    """The files' features concatenated in order (RVC's ``np.concatenate``): [N, d] float32."""
    import numpy as np

    out = []
    for path in paths:
        a = np.load(path, allow_pickle=False).astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: non-finite features")
        out.append(a)
    return np.concatenate(out)


def _cmd_index(args) -> int:
    import time

    from ._outputs import guard

    t0 = time.time()
    folder = os.path.normpath(args.folder)
    feature_dir, _exp = find_features(folder, args.version)
    name = args.name or os.path.basename(os.path.abspath(folder))
    paths, frames, width = scan_features(feature_dir)
    version = {256: "v1", 768: "v2"}[width]
    from .. import retrieval

    n = retrieval.n_ivf(retrieval.KMEANS_CENTRES if frames > retrieval.KMEANS_THRESHOLD else frames)
    if n < 1:
        raise ValueError(f"{feature_dir}: {frames} feature frames; an index needs at least 39 (RVC's n_ivf = "
                         f"min(int(16 sqrt(N)), N // 39))")
    out = args.out or os.path.join(folder, f"added_IVF{n}_Flat_nprobe_1_{name}_{version}.index")
    total = os.path.join(os.path.dirname(os.path.abspath(out)), "total_fea.npy") if args.total_fea else None
    # Before any work: the index never replaces a feature file or an existing output.
    g = guard([feature_dir], files=[out, total], overwrite=args.overwrite)
    progress = None if args.no_progress else (lambda msg: print(f"  {msg}", flush=True))
    print(f"{feature_dir}: {frames} frames of {width}-d features from {len(paths)} files")
    with g.cleanup_on_failure():
        index = retrieval.build_index(load_features(paths), seed=args.seed, progress=progress)
        if total:
            import numpy as np

            from ..fileio import atomic_write

            atomic_write(total, lambda t: np.save(t, index.vectors), suffix=".npy")
        retrieval.write_index(index, out)  # last: the index exists only when everything is written
    sizes = index.list_sizes
    print(f"{out}: IVF{index.nlist},Flat nprobe 1, {index.ntotal} vectors ({version}; lists of "
          f"{int(sizes.min())}..{int(sizes.max())}) in {time.time() - t0:.1f} s")
    if total:
        print(f"{total}: the index's rows (RVC's total_fea.npy)")
    print(f"  use with: rvclora infer ... --index {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("index", help="build RVC's retrieval index (.index) from a training folder's features",
                       description="Build the faiss IVF-Flat index RVC's train_index builds (k-means above 2e5 "
                                   "frames, IVF size min(16 sqrt(N), N/39), nprobe 1) from an experiment's "
                                   "content features, in a file RVC and Applio read.")
    p.add_argument("folder", metavar="EXP_DIR|RUN_DIR",
                   help="experiment folder (3_feature768/, 3_feature256/ or extracted/) or training run folder")
    p.add_argument("--out", help="index file (default: FOLDER/added_IVF{n}_Flat_nprobe_1_{name}_{v1|v2}.index)")
    p.add_argument("--name", help="the experiment name in the file name (default: the folder's name)")
    p.add_argument("--version", choices=["v1", "v2"], help="which features, when the folder has both")
    p.add_argument("--total-fea", action="store_true", help="also write RVC's total_fea.npy beside the index")
    p.add_argument("--seed", type=int, default=0, help="shuffle and k-means seed (RVC's shuffle is unseeded)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_index)


__all__ = ["register", "find_features", "scan_features", "load_features"]
