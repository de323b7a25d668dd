"""RVC's feature index: faiss IVF-Flat files read and written in numpy, searched in JAX.

Life cycle. ``rvclora index`` (or :func:`build_index`) turns a training folder's content
features into an :class:`IVFFlatIndex` as RVC's ``train_index`` does, and :func:`write_index`
stores it in faiss's own file format, so RVC and Applio load it with ``faiss.read_index``. At
inference :func:`read_index` loads such a file (ours, RVC's or Applio's ``added_*.index``),
:func:`check_features` refuses features from another embedder, and :func:`blend` pulls each
content frame towards its 8 nearest training frames (RVC's ``Pipeline.vc`` retrieval step),
with the neighbours found by :meth:`IVFFlatIndex.search`: faiss's ``IndexIVFFlat.search`` at
the file's ``nprobe`` (RVC writes 1), computed in JAX so it runs on the accelerator.

faiss is not needed at run time: the file layout (faiss ``index_write.cpp``: an ``IwFl``
header, an ``IxF2`` flat L2 quantizer holding the centroids, an empty direct map, then
``ilar`` array inverted lists, "full" or "sprs" list sizes, each list's vectors then its
int64 ids) is parsed with numpy. Anything else (another index type, inner-product metric,
on-disk lists, a short or inconsistent file) is an :class:`IndexFileError` naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import Callable

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)  # faiss's distance for a missing neighbour (label -1)

# RVC's train_index: above this many rows, k-means to KMEANS_CENTRES centres first.
KMEANS_THRESHOLD = 200_000
KMEANS_CENTRES = 10_000

# check_features: the median squared distance of a frame to its nearest index vector, over
# twice the index's total variance (the expected squared distance between two index rows).
# Frames from the embedder that built the index lie near some training frame (well below 1);
# frames from another embedder lie, on the median, farther from every index row than two
# index rows lie from each other. 1.5 leaves room for unusual inputs (noise, music). On the
# tests' 768-d mixture data: new frames of the index's distribution 0.08, all-zero frames
# 0.46, frames of another mean and scale 6.4; frames of the same mean and variance but no
# shared structure give 0.91 and pass (a statistic cannot see every mismatch; the width can).
MISMATCH_RATIO = 1.5
CHECK_FRAMES = 2048  # frames sampled for the statistic

SEARCH_BLOCK_BYTES = 64 << 20  # bound on the gathered candidate vectors of one block of the list scan
CHUNK = 16  # list positions per scanned chunk: small, so little is scanned beyond a list's end
SCAN_MODE = None  # the list scan: "loop" (CPU default) or "gather" (accelerator default)

_VERSION_OF_DIM = {256: "v1", 768: "v2"}


class IndexFileError(ValueError):
    """A feature index that cannot be used: the message is one line starting with the file."""


def _fail(path, msg: str):
    raise IndexFileError(f"{path or '<index>'}: {msg}")


@dataclasses.dataclass
class IVFFlatIndex:
    """An IVF-Flat L2 index: ``nlist`` k-means ``centroids`` and every stored vector with the
    list it belongs to. Rows are ordered by id (``vectors`` = faiss ``reconstruct_n(0,
    ntotal)`` for RVC's files, whose ids are 0..ntotal-1); ``ids[i]`` is row i's faiss label."""

    centroids: np.ndarray  # [nlist, d] f32
    vectors: np.ndarray  # [ntotal, d] f32
    assign: np.ndarray  # [ntotal] int32
    ids: np.ndarray  # [ntotal] int64, ascending
    nprobe: int = 1
    path: str | None = None
    _device: dict | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _variance: float | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.centroids = np.ascontiguousarray(self.centroids, np.float32)
        self.vectors = np.ascontiguousarray(self.vectors, np.float32)
        self.assign = np.ascontiguousarray(self.assign, np.int32)
        self.ids = np.ascontiguousarray(self.ids, np.int64)
        c, v = self.centroids, self.vectors
        if c.ndim != 2 or v.ndim != 2 or c.shape[1] != v.shape[1] or c.shape[0] < 1:
            _fail(self.path, f"centroids {c.shape} and vectors {v.shape} are not [nlist, d] and [ntotal, d]")
        if self.assign.shape != (v.shape[0],) or self.ids.shape != (v.shape[0],):
            _fail(self.path, f"assign {self.assign.shape} / ids {self.ids.shape} do not match {v.shape[0]} vectors")
        if v.shape[0] and (self.assign.min() < 0 or self.assign.max() >= c.shape[0]):
            _fail(self.path, f"a vector's list is outside 0..{c.shape[0] - 1}")
        if self.nprobe < 1:
            _fail(self.path, f"nprobe {self.nprobe} < 1")

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def ntotal(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def list_sizes(self) -> np.ndarray:
        return np.bincount(self.assign, minlength=self.nlist).astype(np.int64)

    def search(self, queries, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """faiss ``IndexIVFFlat.search(queries, k)`` at this index's ``nprobe``: the ``nprobe``
        lists whose centroids are nearest, scanned exhaustively. Returns (distances [T, k] f32
        squared L2, ascending; ids [T, k] int64), with (FLT_MAX, -1) in the slots the probed
        lists cannot fill, as faiss does."""
        d, rows = self._search_rows(queries, k)
        if self.ntotal == 0:
            return d, np.full(rows.shape, -1, np.int64)
        return d, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)

    def _search_rows(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows of ``vectors``; -1 where none)."""
        q = np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            _fail(self.path, f"queries of shape {q.shape}, the index holds {self.dim}-d vectors")
        if int(k) < 1:
            _fail(self.path, f"search for k={k} neighbours")
        d, pos = _search_device(self, q, int(k))
        pos = np.asarray(pos).astype(np.int64)
        rows = self.device_arrays()["row_of"][np.maximum(pos, 0)]
        return np.asarray(d), np.where(pos >= 0, rows, -1).astype(np.int64)

    def device_arrays(self) -> dict:
        """The index laid out for the JAX search (built once, kept on the default device):
        centroids and their squared norms, the vectors in list order (the order faiss keeps
        them in), cut into chunks of CHUNK positions (each list's first chunk and chunk
        count on the host), and the row (id order) of each list position (host). Made on the
        first search and kept: the index's arrays are not to be changed after that."""
        if self._device is None:
            import jax.numpy as jnp

            order = np.argsort(self.assign, kind="stable")
            sizes = self.list_sizes
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            chunk = min(CHUNK, _pow2_ceil(max(int(sizes.max()) if self.ntotal else 1, 1)))
            nch = -(-sizes // chunk)  # ceil
            first = np.concatenate([[0], np.cumsum(nch)[:-1]]).astype(np.int64)
            owner = np.repeat(np.arange(self.nlist), nch)
            within = np.arange(int(nch.sum())) - first[owner]
            start = offsets[owner] + within * chunk
            length = np.minimum(chunk, sizes[owner] - within * chunk)
            if start.size == 0:  # an empty index: one empty chunk keeps the shapes valid
                start, length = np.zeros(1, np.int64), np.zeros(1, np.int64)
            self._device = dict(
                centroids=jnp.asarray(self.centroids),
                c_norm=jnp.asarray(np.einsum("ij,ij->i", self.centroids.astype(np.float64),
                                             self.centroids.astype(np.float64)).astype(np.float32)),
                # CHUNK zero rows after the last list: a chunk read whole never runs off the end.
                listed=jnp.asarray(np.concatenate([self.vectors[order], np.zeros((chunk, self.dim), np.float32)])),
                row_of=order.astype(np.int64) if self.ntotal else np.zeros(1, np.int64),
                chunk_start=jnp.asarray(start.astype(np.int32)), chunk_len=jnp.asarray(length.astype(np.int32)),
                first_chunk=first, n_chunks=nch.astype(np.int64), chunk=chunk,
                max_chunks=int(nch.max()) if self.ntotal else 0)
        return self._device


# ----------------------------------------------------------------------------- search (JAX)
#
# Two jitted steps with the host in between, so the work is what faiss does (each query
# against the vectors of its probed lists only, not padded to the longest list):
#   1. the quantizer: each query's nprobe nearest centroids;
#   2. the list scan over (query, chunk) pairs (CHUNK list positions each; the pairs of all
#      queries listed on the host, their count bucketed to a power of two): squared L2 by
#      differences, scattered into each query's candidate slots, then top-k per query.
# Queries are padded to a power of two (at least 64), so few programs are compiled.

def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


_SEARCH_CACHE: dict = {}


def _probe_fn(nprobe: int):
    key = ("probe", nprobe)
    if key not in _SEARCH_CACHE:
        import jax
        import jax.numpy as jnp

        def run(q, centroids, c_norm):
            # argmin ||q - c||^2 = argmin ||c||^2 - 2 q.c (faiss's BLAS path for batches; ties
            # go to the lower list number, as faiss's top-1 keeps the first).
            cd = c_norm[None, :] - 2.0 * jnp.matmul(q, centroids.T, precision=jax.lax.Precision.HIGHEST)
            if nprobe == 1:
                return jnp.argmin(cd, axis=1)[:, None].astype(jnp.int32)
            return jax.lax.top_k(-cd, nprobe)[1].astype(jnp.int32)

        _SEARCH_CACHE[key] = jax.jit(run)
    return _SEARCH_CACHE[key]


def _scan_fn(chunk: int, slots: int, k: int, pair_block: int, sequential: bool):
    key = ("scan", chunk, slots, k, pair_block, sequential)
    if key not in _SEARCH_CACHE:
        import jax
        import jax.numpy as jnp

        def run(q, pair_q, pair_chunk, pair_slot, listed, chunk_start, chunk_len):
            T = q.shape[0]
            pos = jnp.arange(chunk, dtype=jnp.int32)

            def block(args):
                pq, pc = args
                at = chunk_start[pc][:, None] + pos[None, :]  # [Pb, C] list positions
                ok = (pos[None, :] < chunk_len[pc][:, None]) & (pq < T)[:, None]
                cand = listed[jnp.where(ok, at, 0)]  # [Pb, C, d]
                # faiss's fvec_L2sqr: the sum of squared differences (not the expanded form,
                # which loses precision for near duplicates, where the blend weights peak).
                dist = jnp.sum(jnp.square(cand - q[jnp.minimum(pq, T - 1)][:, None, :]), axis=-1)
                return jnp.where(ok, dist, jnp.inf), jnp.where(ok, at, -1)

            def one(args):  # one pair: its chunk as a slice of the list-ordered vectors
                pq, pc = args
                start = chunk_start[pc]
                v = jax.lax.dynamic_slice(listed, (start, 0), (chunk, listed.shape[1]))
                qq = jax.lax.dynamic_index_in_dim(q, jnp.minimum(pq, T - 1), keepdims=False)
                ok = (pos < chunk_len[pc]) & (pq < T)
                dist = jnp.sum(jnp.square(v - qq[None, :]), axis=-1)
                return jnp.where(ok, dist, jnp.inf), jnp.where(ok, start + pos, -1)

            if sequential:  # CPU: a loop of contiguous slices is ~5x faster than XLA's gather
                dist, at = jax.lax.map(one, (pair_q, pair_chunk))
            else:  # accelerators: blocks of gathered chunks
                nb = pair_q.shape[0] // pair_block
                dist, at = jax.lax.map(block, (pair_q.reshape(nb, pair_block), pair_chunk.reshape(nb, pair_block)))
                dist, at = dist.reshape(-1, chunk), at.reshape(-1, chunk)
            col = pair_slot[:, None] + pos[None, :]
            d_all = jnp.full((T, slots), jnp.inf, jnp.float32).at[pair_q[:, None], col].set(dist, mode="drop")
            p_all = jnp.full((T, slots), -1, jnp.int32).at[pair_q[:, None], col].set(at, mode="drop")
            neg, top = jax.lax.top_k(-d_all, k)
            p = jnp.take_along_axis(p_all, top, axis=1)
            return jnp.where(p >= 0, -neg, FLT_MAX).astype(jnp.float32), p

        _SEARCH_CACHE[key] = jax.jit(run)
    return _SEARCH_CACHE[key]


def _search_device(index: IVFFlatIndex, q, k: int, *, padded: bool = False):
    """(distances, list positions) as JAX arrays for ``q`` [T, d]: positions index the
    vectors in list order (``device_arrays()["listed"]``; -1: none). ``padded``: all the
    padded queries' rows (a power of two, at least 64; the padding rows find nothing)."""
    import jax.numpy as jnp

    dev = index.device_arrays()
    T = int(q.shape[0])
    nprobe = min(index.nprobe, index.nlist)
    chunk = dev["chunk"]
    slots = max(nprobe * dev["max_chunks"] * chunk, 1)
    kk = min(k, slots)
    Tp = _pow2_ceil(max(T, 64))
    qp = jnp.pad(jnp.asarray(q, jnp.float32), ((0, Tp - T), (0, 0)))
    probe = _probe_fn(nprobe)
    qb = min(Tp, 1024)
    lists = np.concatenate([np.asarray(probe(qp[s:s + qb], dev["centroids"], dev["c_norm"]))
                            for s in range(0, Tp, qb)])[:T]  # [T, nprobe]
    # The (query, chunk) pairs: query t's probe j scans its list's chunks into the slots
    # j * max_chunks * chunk + c * chunk + (0..chunk-1).
    nch = dev["n_chunks"][lists]  # [T, nprobe]
    flat = nch.reshape(-1)
    P = int(flat.sum())
    group = np.repeat(np.arange(flat.size), flat)
    c_in = np.arange(P) - np.repeat(np.cumsum(flat) - flat, flat)
    pair_q = (group // nprobe).astype(np.int32)
    pair_chunk = (dev["first_chunk"][lists.reshape(-1)][group] + c_in).astype(np.int32)
    pair_slot = ((group % nprobe) * dev["max_chunks"] * chunk + c_in * chunk).astype(np.int32)
    per_pair = chunk * index.dim * 4 * 3  # candidates, differences, squares
    pair_block = max(8, min(4096, _pow2_floor(SEARCH_BLOCK_BYTES // per_pair)))
    Pp = max(_pow2_ceil(max(P, 1)), pair_block)
    pad = Pp - P
    pair_q = np.concatenate([pair_q, np.full(pad, Tp, np.int32)])  # padding pairs: dropped
    pair_chunk = np.concatenate([pair_chunk, np.zeros(pad, np.int32)])
    pair_slot = np.concatenate([pair_slot, np.zeros(pad, np.int32)])
    import jax

    sequential = SCAN_MODE == "loop" or (SCAN_MODE is None and jax.default_backend() == "cpu")
    d, r = _scan_fn(chunk, slots, kk, pair_block, sequential)(
        qp, jnp.asarray(pair_q), jnp.asarray(pair_chunk), jnp.asarray(pair_slot), dev["listed"],
        dev["chunk_start"], dev["chunk_len"])
    if not padded:
        d, r = d[:T], r[:T]
    if kk < k:  # fewer candidate slots than k, whatever the query: faiss pads
        d = jnp.pad(d, ((0, 0), (0, k - kk)), constant_values=FLT_MAX)
        r = jnp.pad(r, ((0, 0), (0, k - kk)), constant_values=-1)
    return d, r


# ----------------------------------------------------------------------------- blend

def _blend_fn():
    if "blend" not in _SEARCH_CACHE:
        import jax
        import jax.numpy as jnp

        def run(feats, dist, pos, listed, rate):
            valid = pos >= 0
            exact = valid & (dist == 0)
            # RVC: w = (1/D)^2 normalised per frame. Two guards where RVC produces garbage:
            # an exact duplicate (D = 0: inf weights, NaN frame) takes the duplicate(s) alone,
            # the formula's limit; a missing neighbour (-1, RVC reads the last row with weight
            # ~0) gets weight 0; a frame with no neighbour at all keeps its own features.
            w = jnp.where(valid, jnp.square(1.0 / jnp.where(valid & ~exact, dist, 1.0)), 0.0)
            w = jnp.where(jnp.any(exact, axis=1, keepdims=True), exact.astype(jnp.float32), w)
            total = jnp.sum(w, axis=1, keepdims=True)
            w = w / jnp.where(total > 0, total, 1.0)
            retrieved = jnp.sum(listed[jnp.maximum(pos, 0)] * w[:, :, None], axis=1)
            retrieved = jnp.where(total > 0, retrieved, feats)
            return (rate * retrieved + (1.0 - rate) * feats).astype(jnp.float32)

        _SEARCH_CACHE["blend"] = jax.jit(run)
    return _SEARCH_CACHE["blend"]


def blend(feats, index: IVFFlatIndex, rate: float) -> np.ndarray:
    """RVC's retrieval step (``Pipeline.vc``): each frame's 8 nearest index vectors (by
    :meth:`IVFFlatIndex.search`), weighted by (1/D)^2 with D the squared L2 distance and
    normalised, give ``retrieved``; returns ``rate * retrieved + (1 - rate) * feats`` [T, d] f32.
    ``rate`` 0 returns ``feats`` unchanged (RVC skips the search then)."""
    f = np.asarray(feats, np.float32)
    if f.ndim != 2 or f.shape[1] != index.dim:
        _fail(index.path, f"features of shape {f.shape}, the index holds {index.dim}-d vectors")
    if rate == 0 or f.shape[0] == 0:
        return f.copy()
    import jax.numpy as jnp

    d, pos = _search_device(index, f, 8, padded=True)  # padded rows: one program per size bucket
    fp = jnp.pad(jnp.asarray(f), ((0, d.shape[0] - f.shape[0]), (0, 0)))
    out = _blend_fn()(fp, d, pos, index.device_arrays()["listed"], jnp.float32(rate))
    return np.asarray(out)[:f.shape[0]]


# ----------------------------------------------------------------------------- compatibility

def _version(dim: int) -> str:
    v = _VERSION_OF_DIM.get(int(dim))
    return f" (a {v} index)" if v else ""


def check_features(index: IVFFlatIndex, feats, *, what: str = "the model") -> None:
    """Refuse features the index cannot serve, with a one-line :class:`IndexFileError`:

    * ``feats`` of another width (an int: just the width, as a model declares it), e.g. a
      256-d v1 index for a 768-d v2 model;
    * features whose statistics say another embedder made them: the median over (up to
      CHECK_FRAMES) frames of the squared distance to the nearest index vector, divided by
      twice the index's total variance, above MISMATCH_RATIO (see its comment)."""
    width = int(feats) if isinstance(feats, (int, np.integer)) else int(np.shape(feats)[-1])
    if width != index.dim:
        _fail(index.path, f"the index holds {index.dim}-d features{_version(index.dim)} but {what} takes "
                          f"{width}-d{_version(width).replace('index', 'model')}")
    if isinstance(feats, (int, np.integer)) or index.ntotal < 2:
        return
    f = np.asarray(feats, np.float32).reshape(-1, width)
    if f.shape[0] == 0:
        return
    if not np.isfinite(f).all():
        _fail(index.path, f"{what} gave non-finite features")
    if f.shape[0] > CHECK_FRAMES:  # evenly spaced frames: deterministic, covers the whole input
        f = f[np.linspace(0, f.shape[0] - 1, CHECK_FRAMES).astype(np.int64)]
    d, _ = index._search_rows(f, 1)
    tv = _total_variance(index)
    ratio = float(np.median(d[:, 0])) / max(2.0 * tv, 1e-30)
    if ratio > MISMATCH_RATIO:
        _fail(index.path, f"the features from {what} do not match the index (median squared distance to the "
                          f"nearest index vector is {ratio:.2f}x twice the index's variance, above "
                          f"{MISMATCH_RATIO}): the index was built from another embedder's features")


def _total_variance(index: IVFFlatIndex) -> float:
    """Mean squared distance of the index vectors from their mean (float64); computed once
    per index (a pass over every vector: ~1 s for 30 000 × 768, on every conversion else)."""
    if index._variance is None:
        v = index.vectors.astype(np.float64)
        index._variance = float(np.mean(np.sum(np.square(v - v.mean(axis=0)), axis=1)))
    return index._variance


# ----------------------------------------------------------------------------- file format

_METRIC_L2 = 1
_DUMMY = 1 << 20


class _Reader:
    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            _fail(self.path, f"the file ends inside {what} (at byte {self.pos} of {len(self.data)}, "
                             f"{n} more needed): truncated or damaged")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def fmt(self, f: str, what: str):
        return struct.unpack("<" + f, self.take(struct.calcsize("<" + f), what))

    def fourcc(self, what: str) -> str:
        return self.take(4, what).decode("latin-1")

    def array(self, dtype, count: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        if count < 0 or count > len(self.data):
            _fail(self.path, f"{what} claims {count} entries: damaged")
        return np.frombuffer(self.take(count * dt.itemsize, what), dt).astype(dtype)

    def vector(self, dtype, what: str, *, bytes_count: bool = False) -> np.ndarray:
        (n,) = self.fmt("Q", what + " size")
        if bytes_count:  # faiss WRITEXBVECTOR: the byte count over 4, then the bytes
            n *= 4
            return self.array(np.uint8, n, what)
        return self.array(dtype, n, what)


def _index_header(r: _Reader, what: str) -> tuple[int, int]:
    d, ntotal, _, _, trained, metric = r.fmt("iqqq?i", what + " header")
    if metric > 1:
        r.fmt("f", what + " metric_arg")
    if metric != _METRIC_L2:
        _fail(r.path, f"{what} uses faiss metric {metric} ({'inner product' if metric == 0 else 'not L2'}); "
                      f"RVC's indexes are L2")
    if d <= 0 or ntotal < 0:
        _fail(r.path, f"{what} header says d={d}, ntotal={ntotal}: damaged")
    if not trained:
        _fail(r.path, f"{what} is not trained (RVC's trained_*.index before training?): nothing to search")
    return d, ntotal


_KNOWN_TYPES = {"IxF2": "IndexFlatL2", "IxFI": "IndexFlatIP", "IxFl": "IndexFlat", "IwPQ": "IndexIVFPQ",
                "IvPQ": "IndexIVFPQ (old)", "IwSq": "IndexIVFScalarQuantizer", "IHNf": "IndexHNSWFlat",
                "IxPq": "IndexPQ", "IxSQ": "IndexScalarQuantizer", "IvFl": "IndexIVFFlat (pre-2018 layout)",
                "IwFd": "IndexIVFFlatDedup", "IxMp": "IndexIDMap", "IxM2": "IndexIDMap2", "IxPT": "IndexPreTransform",
                "IwRQ": "IndexIVFResidualQuantizer", "IwXF": "IndexIVFFastScan", "IBxF": "IndexBinaryFlat",
                "IBwF": "IndexBinaryIVF"}


def _describe(h: str) -> str:
    name = _KNOWN_TYPES.get(h)
    return f"a faiss {name} ({h!r})" if name else f"{h!r}, not a faiss index"


def read_index(path: str) -> IVFFlatIndex:
    """Read a faiss IVF-Flat L2 file (RVC's and Applio's ``added_*.index``, or ours)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        _fail(path, "index file not found")
    except IsADirectoryError:
        _fail(path, "is a directory, not an index file")
    except OSError as e:
        _fail(path, f"cannot read the index file ({e.strerror or e})")
    r = _Reader(path, data)
    if len(data) < 4:
        _fail(path, f"{len(data)} bytes: not a faiss index (empty or truncated)")
    h = r.fourcc("the index type")
    if h != "IwFl":
        _fail(path, f"is {_describe(h)}; RVC's retrieval needs an IndexIVFFlat ('IVF<n>,Flat')")
    d, ntotal = _index_header(r, "the IVF index")
    nlist, nprobe = r.fmt("QQ", "nlist/nprobe")
    if nlist < 1 or nlist > len(data):
        _fail(path, f"nlist {nlist}: damaged")
    qh = r.fourcc("the quantizer type")
    if qh not in ("IxF2", "IxFl"):
        _fail(path, f"the IVF quantizer is {_describe(qh)}; only a flat L2 quantizer is read")
    qd, qn = _index_header(r, "the quantizer")
    centroids = r.vector(np.uint8, "the centroids", bytes_count=True).view(np.float32)
    if qd != d or qn != nlist or centroids.size != nlist * d:
        _fail(path, f"the quantizer holds {qn} x {qd} ({centroids.size} floats) for nlist {nlist}, d {d}: damaged")
    centroids = centroids.reshape(nlist, d)
    (dm_type,) = r.fmt("b", "the direct map type")
    r.vector(np.int64, "the direct map")
    if dm_type == 2:  # a hashtable direct map: its (id, list offset) pairs follow; not needed to search
        (pairs,) = r.fmt("Q", "the direct map hashtable size")
        r.array(np.int64, 2 * pairs if pairs <= len(data) else -1, "the direct map hashtable")
    elif dm_type not in (0, 1):
        _fail(path, f"direct map type {dm_type}: damaged")
    lh = r.fourcc("the inverted lists type")
    if lh != "ilar":
        what = {"il00": "no inverted lists (il00)", "ilod": "on-disk inverted lists (ilod)"}.get(lh, repr(lh))
        _fail(path, f"holds {what}; only in-file array lists ('ilar') are read")
    lnlist, code_size = r.fmt("QQ", "the inverted lists header")
    if lnlist != nlist or code_size != 4 * d:
        _fail(path, f"inverted lists for {lnlist} lists of {code_size}-byte codes, expected {nlist} of {4 * d}")
    kind = r.fourcc("the list sizes type")
    sizes = np.zeros(nlist, np.int64)
    raw = r.vector(np.uint64, "the list sizes")
    if kind == "full":
        if raw.size != nlist:
            _fail(path, f"{raw.size} list sizes for {nlist} lists: damaged")
        sizes[:] = raw
    elif kind == "sprs":
        if raw.size % 2 or (raw.size and raw[0::2].max() >= nlist):
            _fail(path, "sparse list sizes out of range: damaged")
        sizes[raw[0::2].astype(np.int64)] = raw[1::2]
    else:
        _fail(path, f"list sizes of type {kind!r}: damaged")
    if (sizes < 0).any() or int(sizes.sum()) != ntotal:
        _fail(path, f"the lists hold {int(sizes.sum())} vectors, the header says {ntotal}: damaged")
    if ntotal * (4 * d + 8) > len(data) - r.pos:  # before allocating what a damaged header claims
        _fail(path, f"the file ends before its {ntotal} vectors (truncated or damaged)")
    vectors = np.empty((ntotal, d), np.float32)
    ids = np.empty(ntotal, np.int64)
    assign = np.empty(ntotal, np.int32)
    at = 0
    for li in np.flatnonzero(sizes):
        n = int(sizes[li])
        vectors[at:at + n] = r.array(np.float32, n * d, f"list {li}'s vectors").reshape(n, d)
        ids[at:at + n] = r.array(np.int64, n, f"list {li}'s ids")
        assign[at:at + n] = li
        at += n
    if r.pos != len(data):
        _fail(path, f"{len(data) - r.pos} bytes after the index end: damaged or not an IVF-Flat file")
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if ntotal and (ids[0] < 0 or np.any(ids[1:] == ids[:-1])):
        _fail(path, "negative or repeated vector ids: damaged")
    if not np.isfinite(vectors).all() or not np.isfinite(centroids).all():
        _fail(path, "non-finite vectors or centroids: damaged")
    return IVFFlatIndex(centroids=centroids, vectors=vectors[order], assign=assign[order], ids=ids,
                        nprobe=int(nprobe), path=path)


def index_bytes(index: IVFFlatIndex) -> bytes:
    """The faiss file of ``index`` (what ``faiss.write_index`` writes for an IndexIVFFlat)."""
    d, n, nlist = index.dim, index.ntotal, index.nlist
    header = lambda ntot: struct.pack("<iqqq?i", d, ntot, _DUMMY, _DUMMY, True, _METRIC_L2)  # noqa: E731
    parts = [b"IwFl", header(n), struct.pack("<QQ", nlist, index.nprobe),
             b"IxF2", header(nlist), struct.pack("<Q", nlist * d), index.centroids.astype("<f4").tobytes(),
             struct.pack("<bQ", 0, 0),  # no direct map
             b"ilar", struct.pack("<QQ", nlist, 4 * d)]
    sizes = index.list_sizes
    nonzero = np.flatnonzero(sizes)
    if len(nonzero) > nlist // 2:  # faiss's own choice between the two encodings
        parts += [b"full", struct.pack("<Q", nlist), sizes.astype("<u8").tobytes()]
    else:
        pairs = np.stack([nonzero, sizes[nonzero]], axis=1).astype("<u8")
        parts += [b"sprs", struct.pack("<Q", pairs.size), pairs.tobytes()]
    order = np.argsort(index.assign, kind="stable")
    at = 0
    for li in nonzero:
        rows = order[at:at + sizes[li]]
        at += sizes[li]
        parts += [index.vectors[rows].astype("<f4").tobytes(), index.ids[rows].astype("<i8").tobytes()]
    return b"".join(parts)


def write_index(index: IVFFlatIndex, path: str) -> str:
    """Write ``index`` as a faiss IVF-Flat file (atomically: temp file, then rename)."""
    from .fileio import atomic_write

    data = index_bytes(index)

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(os.fspath(path), write)


# ----------------------------------------------------------------------------- building (k-means)

def n_ivf(n: int) -> int:
    """RVC's inverted-list count for ``n`` rows: min(int(16 sqrt(n)), n // 39)."""
    return min(int(16 * math.sqrt(n)), n // 39)


def _assign_fn():
    if "assign" not in _SEARCH_CACHE:
        import jax
        import jax.numpy as jnp

        def run(x, c, n_valid):
            # Nearest centre by ||c||^2 - 2 x.c (faiss's BLAS assignment; ties: the lower centre),
            # and the block's per-centre sums and counts for the k-means update (padding rows
            # beyond n_valid count for nothing).
            cn = jnp.sum(jnp.square(c), axis=1)
            cd = cn[None, :] - 2.0 * jnp.matmul(x, c.T, precision=jax.lax.Precision.HIGHEST)
            a = jnp.argmin(cd, axis=1).astype(jnp.int32)
            live = jnp.arange(x.shape[0]) < n_valid
            seg = jnp.where(live, a, c.shape[0])  # padding goes to an extra, dropped segment
            sums = jax.ops.segment_sum(x, seg, num_segments=c.shape[0] + 1)[:-1]
            counts = jax.ops.segment_sum(live.astype(jnp.int32), seg, num_segments=c.shape[0] + 1)[:-1]
            return a, sums, counts

        _SEARCH_CACHE["assign"] = jax.jit(run)
    return _SEARCH_CACHE["assign"]


def _assign(x: np.ndarray, c, block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nearest centre of each row of ``x``, per-centre sums [k, d] f64, counts [k]), in
    blocks of a fixed size (the last one padded, so one program serves every block)."""
    import jax.numpy as jnp

    fn = _assign_fn()
    n = x.shape[0]
    block = min(block, _pow2_ceil(max(n, 64)))
    c = jnp.asarray(c, jnp.float32)
    k, d = c.shape
    out_a, sums, counts = [], np.zeros((k, d), np.float64), np.zeros(k, np.int64)
    for s in range(0, n, block):
        xb = x[s:s + block]
        m = xb.shape[0]
        if m < block:
            xb = np.pad(xb, ((0, block - m), (0, 0)))
        a, sb, cb = fn(jnp.asarray(xb), c, m)
        out_a.append(np.asarray(a)[:m])
        sums += np.asarray(sb, np.float64)
        counts += np.asarray(cb)
    return (np.concatenate(out_a) if out_a else np.zeros(0, np.int32)), sums, counts


def kmeans(x: np.ndarray, k: int, *, niter: int = 10, seed: int = 0, max_points_per_centroid: int = 256,
           progress: Callable[[str], None] | None = None) -> np.ndarray:
    """Lloyd's k-means as faiss's ``Clustering`` trains an IVF quantizer: at most
    ``max_points_per_centroid * k`` rows (a random sample), ``k`` random rows as the start,
    ``niter`` iterations (faiss's IVF default is 10), an empty centre re-seeded by splitting
    a cluster drawn by size, with faiss's small symmetric perturbation. Assignment and the
    per-centre sums run in JAX."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means: {k} centres for {n} rows")
    if n > max_points_per_centroid * k:
        x = x[np.sort(rng.choice(n, max_points_per_centroid * k, replace=False))]
        n = x.shape[0]
    c = x[rng.choice(n, k, replace=False)].copy()
    sign = np.where(np.arange(x.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    eps = np.float32(1.0 / 1024.0)
    for it in range(niter):
        _, sums, counts = _assign(x, c)
        counts = counts.astype(np.float64)
        nz = counts > 0
        c[nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
        for e in np.flatnonzero(~nz):
            # faiss's split_clusters: a cluster drawn with probability ~ (size - 1) gives half
            # of itself to the empty centre. (Always splitting the largest cluster reaches the
            # same inertia but a lower recall: measured 0.56 vs faiss's 0.59-0.61 at d=768.)
            w = np.maximum(counts - 1, 0)
            big = int(rng.choice(k, p=w / w.sum())) if w.sum() > 0 else int(np.argmax(counts))
            c[e] = c[big] * (1 + eps * sign)
            c[big] = c[big] * (1 - eps * sign)
            counts[e] = counts[big] / 2
            counts[big] -= counts[e]
        if progress:
            progress(f"k-means {k}: iteration {it + 1}/{niter}")
    return c


def minibatch_kmeans(x: np.ndarray, k: int, *, seed: int = 0, batch: int | None = None, epochs: float = 1.0,
                     progress: Callable[[str], None] | None = None) -> np.ndarray:
    """RVC's reduction (``MiniBatchKMeans(init="random")``): ``k`` random rows as the start,
    then Sculley's mini-batch updates (each centre moves towards its batch members with step
    1/count) over ``epochs`` passes in batches of ``batch`` (RVC: 256 x CPU count)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    batch = batch or max(256 * (os.cpu_count() or 1), 1024)
    c = x[rng.choice(n, k, replace=False)].astype(np.float64)
    counts = np.zeros(k, np.float64)
    steps = max(1, int(math.ceil(epochs * n / batch)))
    per_epoch = max(1, n // batch)  # batches drawn without replacement, a new order each epoch
    for s in range(steps):
        if s % per_epoch == 0:
            order = rng.permutation(n)
        at = (s % per_epoch) * batch
        xb = x[np.sort(order[at:at + batch])]
        _, sums, bc = _assign(xb, c.astype(np.float32), block=_pow2_ceil(min(batch, n)))
        bc = bc.astype(np.float64)
        counts += bc
        nz = bc > 0
        # c <- c + (sum_b - |b| c) / count: the running mean of every row it has been given.
        c[nz] += (sums[nz] - bc[nz, None] * c[nz]) / counts[nz, None]
        if progress and (s + 1) % 50 == 0:
            progress(f"k-means reduction to {k}: step {s + 1}/{steps}")
    return c.astype(np.float32)


def build_index(features, *, seed: int = 0, progress: Callable[[str], None] | None = None) -> IVFFlatIndex:
    """RVC's ``train_index`` on ``features`` [N, d] (every training frame, in folder order):
    shuffle the rows (seeded; RVC's shuffle is not); above KMEANS_THRESHOLD rows, replace them
    by KMEANS_CENTRES mini-batch k-means centres; ``nlist = n_ivf(N)``; train the IVF
    quantizer with k-means; add every row in order (ids 0..N-1); ``nprobe`` 1."""
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"build_index: features of shape {x.shape}, expected [N, d] with N > 0")
    if not np.isfinite(x).all():
        raise ValueError("build_index: non-finite features")
    rng = np.random.default_rng(seed)
    x = x[rng.permutation(x.shape[0])]
    if x.shape[0] > KMEANS_THRESHOLD:
        if progress:
            progress(f"{x.shape[0]} rows > {KMEANS_THRESHOLD}: k-means to {KMEANS_CENTRES} centres (as RVC)")
        x = minibatch_kmeans(x, KMEANS_CENTRES, seed=seed, progress=progress)
    nlist = n_ivf(x.shape[0])
    if nlist < 1:
        raise ValueError(f"build_index: {x.shape[0]} rows give RVC's n_ivf = min(int(16 sqrt(n)), n // 39) = "
                         f"{nlist}; an index needs at least 39 feature frames")
    if progress:
        progress(f"training IVF{nlist},Flat on {x.shape[0]} x {x.shape[1]}")
    centroids = kmeans(x, nlist, seed=seed + 1, progress=progress)
    assign = _assign(x, centroids)[0]
    return IVFFlatIndex(centroids=centroids, vectors=x, assign=assign, ids=np.arange(x.shape[0], dtype=np.int64),
                        nprobe=1)


def index_filename(index: IVFFlatIndex, name: str) -> str:
    """RVC's name for an added index: ``added_IVF{nlist}_Flat_nprobe_{nprobe}_{name}_{v1|v2}.index``."""
    ver = _VERSION_OF_DIM.get(index.dim, f"{index.dim}d")
    return f"added_IVF{index.nlist}_Flat_nprobe_{index.nprobe}_{name}_{ver}.index"


__all__ = ["IndexFileError", "IVFFlatIndex", "read_index", "write_index", "build_index", "blend",
           "check_features", "n_ivf", "kmeans", "minibatch_kmeans", "index_filename", "index_bytes", "FLT_MAX"]
