"""rvclora_jax.retrieval against faiss-cpu (the reference): files faiss writes with RVC's
recipe (``index_factory(d, "IVF{n},Flat")``, nprobe 1, rows added in batches) read back to
faiss's own ``reconstruct_n``; our JAX search returns faiss's ids and distances; RVC's
retrieval blend recomputed from faiss's search as ``Pipeline.vc`` does; files we write read
by faiss; our k-means index against faiss's on recall."""

import os

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from rvclora_jax import retrieval as R  # noqa: E402

# One faiss thread: its OpenMP workers spin-wait, which on a shared 2-core machine costs
# more than the tiny indexes here gain.
faiss.omp_set_num_threads(1)


def _rvc_index(x, nlist, *, batches=1000, nprobe=1, train=None, metric=None):
    """RVC's train_index, with faiss: factory, nprobe on the IVF, train, add in batches."""
    ix = (faiss.index_factory(x.shape[1], f"IVF{nlist},Flat") if metric is None else
          faiss.index_factory(x.shape[1], f"IVF{nlist},Flat", metric))
    faiss.extract_index_ivf(ix).nprobe = nprobe
    ix.train(x if train is None else train)
    for s in range(0, x.shape[0], batches):
        ix.add(x[s:s + batches])
    return ix


def _mixture(rng, n, d, k=64, spread=0.3):
    """Clustered data (speech features are far from isotropic)."""
    centres = rng.standard_normal((k, d)).astype(np.float32)
    return (centres[rng.integers(0, k, n)] + spread * rng.standard_normal((n, d))).astype(np.float32), centres


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("idx")
    out = {}
    x, centres = _mixture(rng, 3000, 16)
    out["small"] = (_rvc_index(x, 40), x, centres)
    x7, c7 = _mixture(rng, 2000, 768, k=32)
    out["v2"] = (_rvc_index(x7, R.n_ivf(2000)), x7, c7)
    # Lists shorter than k=8 and a sparse size encoding: 40 lists, 12 vectors.
    out["sparse"] = (_rvc_index(x[:12], 40, train=x), x[:12], centres)
    out["nprobe3"] = (_rvc_index(x, 40, nprobe=3), x, centres)
    paths = {}
    for name, (ix, *_rest) in out.items():
        paths[name] = str(tmp / f"{name}.index")
        faiss.write_index(ix, paths[name])
    return {name: (paths[name],) + v for name, v in out.items()}


def _queries(rng, x, centres, n=300):
    near = x[rng.integers(0, len(x), n // 2)] + 0.05 * rng.standard_normal((n // 2, x.shape[1]))
    far = centres[rng.integers(0, len(centres), n - n // 2)] + rng.standard_normal((n - n // 2, x.shape[1]))
    return np.concatenate([near, far]).astype(np.float32)


@pytest.mark.parametrize("name", ["small", "v2", "sparse", "nprobe3"])
def test_read_and_search_match_faiss(files, name):
    path, ix, x, centres = files[name]
    ours = R.read_index(path)
    assert (ours.dim, ours.ntotal, ours.nlist, ours.nprobe) == (ix.d, ix.ntotal, ix.nlist, ix.nprobe)
    np.testing.assert_array_equal(ours.vectors, ix.reconstruct_n(0, ix.ntotal))
    np.testing.assert_array_equal(ours.centroids, ix.quantizer.reconstruct_n(0, ix.nlist))
    np.testing.assert_array_equal(ours.ids, np.arange(ix.ntotal))
    rng = np.random.default_rng(1)
    q = _queries(rng, x, centres)
    D, I = ix.search(q, 8)
    d, i = ours.search(q, 8)
    assert d.dtype == np.float32 and i.dtype == np.int64 and i.shape == (len(q), 8)
    np.testing.assert_array_equal(i, I)
    np.testing.assert_allclose(d, D, rtol=2e-6 if x.shape[1] <= 16 else 1e-5, atol=1e-5)
    if name == "sparse":  # lists shorter than k: faiss's -1 / FLT_MAX slots, reproduced
        assert (I == -1).any() and (d[i == -1] == R.FLT_MAX).all()
    # The two faiss encodings of the list sizes are both covered.
    data = open(path, "rb").read()
    assert (b"sprs" in data) == (name == "sparse") and (b"full" in data) == (name != "sparse")


def test_gather_scan(files, monkeypatch):
    """The accelerators' list scan (blocks of gathered chunks) returns faiss's result too (the
    other tests run the CPU's loop of slices)."""
    monkeypatch.setattr(R, "SCAN_MODE", "gather")
    for name in ("small", "nprobe3"):
        path, ix, x, centres = files[name]
        q = _queries(np.random.default_rng(8), x, centres, 100)
        D, I = ix.search(q, 8)
        d, i = R.read_index(path).search(q, 8)
        np.testing.assert_array_equal(i, I)
        np.testing.assert_allclose(d, D, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("direct_map", ["array", "hashtable", "own ids"])
def test_direct_maps(tmp_path, direct_map):
    """Files of indexes with a direct map (make_direct_map / a hashtable), or added with
    their own ids (add_with_ids), read and search the same."""
    x = _mixture(np.random.default_rng(9), 500, 8, k=10)[0]
    if direct_map == "own ids":
        ix = faiss.index_factory(8, "IVF8,Flat")
        ix.train(x)
        ix.add_with_ids(x, (np.arange(500) * 3 + 7)[::-1].copy())
        faiss.write_index(ix, str(tmp_path / "dm.index"))
        ours = R.read_index(tmp_path / "dm.index")
        D, I = ix.search(x[:50], 8)
        d, i = ours.search(x[:50], 8)
        np.testing.assert_array_equal(i, I)
        np.testing.assert_array_equal(ours.ids, np.arange(500) * 3 + 7)
        np.testing.assert_array_equal(ours.vectors, x[::-1])  # ordered by id
        return
    ix = _rvc_index(x, 8, batches=200)
    if direct_map == "array":
        ix.make_direct_map()
    else:
        ix.set_direct_map_type(faiss.DirectMap.Hashtable)
    faiss.write_index(ix, str(tmp_path / "dm.index"))
    ours = R.read_index(tmp_path / "dm.index")
    np.testing.assert_array_equal(ours.vectors, ix.reconstruct_n(0, ix.ntotal))
    np.testing.assert_array_equal(ours.search(x[:50], 8)[1], ix.search(x[:50], 8)[1])


def test_search_one_query_and_k(files):
    path, ix, x, centres = files["small"]
    ours = R.read_index(path)
    q = x[5:6] + 0.01
    for k in (1, 20):
        D, I = ix.search(q, k)
        d, i = ours.search(q, k)
        np.testing.assert_array_equal(i, I)
        np.testing.assert_allclose(d, D, rtol=2e-6, atol=1e-6)


def _assert_one_line_error(path, match):
    with pytest.raises(R.IndexFileError) as e:
        R.read_index(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg and match in msg, msg


def test_bad_files(files, tmp_path):
    path = files["small"][0]
    data = open(path, "rb").read()
    # Truncations at many points (inside every part of the layout) and trailing junk.
    for cut in sorted({0, 3, 4, 20, 45, 60, 100, 200, len(data) // 2, len(data) - 9, len(data) - 1}):
        p = tmp_path / f"cut{cut}.index"
        p.write_bytes(data[:cut])
        with pytest.raises(R.IndexFileError) as e:
            R.read_index(p)
        assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)
    p = tmp_path / "junk.index"
    p.write_bytes(data + b"\0" * 8)
    _assert_one_line_error(p, "bytes after")
    # A damaged list-size count: the header's ntotal no longer matches.
    i = data.index(b"full") + 12
    bad = bytearray(data)
    bad[i] ^= 1
    p = tmp_path / "sizes.index"
    p.write_bytes(bytes(bad))
    with pytest.raises(R.IndexFileError):
        R.read_index(p)
    # Any single damaged byte of the headers (index, quantizer, lists, sizes) is either
    # harmless (a centroid value, a dummy field) or a one-line IndexFileError, never a crash.
    sizes_end = data.index(b"full") + 12 + 8 * 40
    for at in list(range(0, 120)) + list(range(data.index(b"ilar"), sizes_end)):
        bad = bytearray(data)
        bad[at] ^= 0xFF
        p = tmp_path / "flip.index"
        p.write_bytes(bytes(bad))
        try:
            R.read_index(p)
        except R.IndexFileError as e:
            assert str(e).startswith(str(p)) and "\n" not in str(e)
    # Other faiss types.
    x = files["small"][2]
    flat = faiss.IndexFlatL2(16)
    flat.add(x[:50])
    faiss.write_index(flat, str(tmp_path / "flat.index"))
    _assert_one_line_error(tmp_path / "flat.index", "IndexFlatL2")
    pq = faiss.index_factory(16, "IVF8,PQ4x4")
    pq.train(x)
    pq.add(x[:100])
    faiss.write_index(pq, str(tmp_path / "pq.index"))
    _assert_one_line_error(tmp_path / "pq.index", "IndexIVFPQ")
    ip = _rvc_index(x[:500], 8, metric=faiss.METRIC_INNER_PRODUCT)
    faiss.write_index(ip, str(tmp_path / "ip.index"))
    _assert_one_line_error(tmp_path / "ip.index", "inner product")
    untrained = faiss.index_factory(16, "IVF8,Flat")
    faiss.write_index(untrained, str(tmp_path / "trained_only.index"))
    _assert_one_line_error(tmp_path / "trained_only.index", "not trained")
    _assert_one_line_error(tmp_path / "missing.index", "not found")
    (tmp_path / "text.index").write_text("hello, not an index")
    _assert_one_line_error(tmp_path / "text.index", "not a faiss index")


@pytest.mark.parametrize("name", ["small", "sparse", "nprobe3"])
def test_write_is_faiss_readable(files, tmp_path, name):
    path, ix, x, centres = files[name]
    ours = R.read_index(path)
    out = tmp_path / "ours.index"
    R.write_index(ours, out)
    assert out.read_bytes() == open(path, "rb").read()  # byte for byte what faiss writes
    back = faiss.read_index(str(out))
    q = _queries(np.random.default_rng(2), x, centres, 100)
    D, I = back.search(q, 8)
    d, i = ours.search(q, 8)
    np.testing.assert_array_equal(i, I)
    np.testing.assert_allclose(d, D, rtol=2e-6, atol=1e-6)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def _rvc_blend(ix, big_npy, feats, rate):
    """RVC 0.3.5 Pipeline.vc's retrieval step, with faiss (numpy, float32)."""
    score, idx = ix.search(feats, k=8)
    weight = np.square(1 / score)
    weight /= weight.sum(axis=1, keepdims=True)
    npy = np.sum(big_npy[idx] * np.expand_dims(weight, axis=2), axis=1)
    return npy * rate + (1 - rate) * feats


@pytest.mark.parametrize("name", ["small", "v2", "sparse"])
def test_blend_matches_rvc(files, name):
    path, ix, x, centres = files[name]
    ours = R.read_index(path)
    big_npy = ix.reconstruct_n(0, ix.ntotal)
    q = _queries(np.random.default_rng(3), x, centres, 200)
    for rate in (0.75, 1.0):
        with np.errstate(divide="ignore", invalid="ignore"):
            want = _rvc_blend(ix, big_npy, q, rate)
        got = R.blend(q, ours, rate)
        ok = np.isfinite(want).all(axis=1)  # RVC's NaN rows (no neighbour at all) are checked below
        assert got.dtype == np.float32 and got.shape == q.shape
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(R.blend(q, ours, 0.0), q)


def test_blend_guards(files):
    """Where RVC's formula breaks: an exact duplicate (D = 0: NaN in RVC) takes the duplicate;
    an empty probed list (all -1: NaN in RVC) keeps the frame's own features."""
    path, ix, x, centres = files["sparse"]
    ours = R.read_index(path)
    big_npy = ix.reconstruct_n(0, ix.ntotal)
    dup = big_npy[:3].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        assert np.isnan(_rvc_blend(ix, big_npy, dup, 0.75)).all()
    np.testing.assert_allclose(R.blend(dup, ours, 0.75), dup, rtol=1e-6, atol=1e-6)
    sizes = ours.list_sizes
    empty = int(np.flatnonzero(sizes == 0)[0])
    q = ours.centroids[empty:empty + 1]  # nearest list is the (empty) one it is the centroid of
    assert (ix.search(q, 8)[1] == -1).all()
    np.testing.assert_array_equal(R.blend(q, ours, 0.75), q)


def test_check_features(files):
    path, ix, x, centres = files["v2"]
    ours = R.read_index(path)
    rng = np.random.default_rng(4)
    # New frames from the index data's own distribution (its mixture centres): accepted.
    same = (centres[rng.integers(0, len(centres), 300)] + 0.3 * rng.standard_normal((300, 768))).astype(np.float32)
    R.check_features(ours, same, what="the model")
    R.check_features(ours, 768, what="the model")
    with pytest.raises(R.IndexFileError) as e:
        R.check_features(ours, np.zeros((10, 256), np.float32), what="the model")
    msg = str(e.value)
    assert msg.startswith(path) and "768-d" in msg and "v2 index" in msg and "256-d" in msg and "\n" not in msg
    # Another embedder: other structure and scale in the same width.
    other = (3.0 * rng.standard_normal((400, 768)) + 2.0).astype(np.float32)
    with pytest.raises(R.IndexFileError) as e:
        R.check_features(ours, other, what="hubert_base.pt")
    assert "another embedder" in str(e.value) and str(e.value).startswith(path)
    with pytest.raises(R.IndexFileError):  # a v1 index for a v2 model
        small = R.IVFFlatIndex(ours.centroids[:, :256], ours.vectors[:, :256], ours.assign, ours.ids, path="v1.index")
        R.check_features(small, 768, what="the model")


def test_n_ivf():
    assert [R.n_ivf(n) for n in (2000, 10000, 200000)] == [51, 256, 5128]  # frontend-facts 7.5


def _recall(index_search, q, exact_ids):
    _, got = index_search(q, 8)
    return np.mean([len(set(a) & set(b)) / 8 for a, b in zip(got, exact_ids)])


def test_build_index_vs_faiss(tmp_path):
    rng = np.random.default_rng(5)
    x, centres = _mixture(rng, 4000, 32, k=48, spread=0.5)
    ours = R.build_index(x, seed=0)
    assert ours.nlist == R.n_ivf(4000) and ours.nprobe == 1 and ours.ntotal == 4000
    # The rows are the input, shuffled; ids are 0..N-1 in the shuffled order.
    np.testing.assert_array_equal(np.sort(ours.vectors, axis=0), np.sort(x, axis=0))
    # Every row sits in the list of its nearest centroid (faiss's add).
    cd = ((ours.vectors[:, None, :] - ours.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ours.assign, cd.argmin(1))
    out = tmp_path / R.index_filename(ours, "exp")
    assert out.name == f"added_IVF{ours.nlist}_Flat_nprobe_1_exp_32d.index"
    R.write_index(ours, out)
    back = faiss.read_index(str(out))
    assert faiss.extract_index_ivf(back).nprobe == 1
    q = _queries(rng, x, centres, 200)
    D, I = back.search(q, 8)
    d, i = ours.search(q, 8)
    np.testing.assert_array_equal(i, I)
    # Quality: nprobe-1 recall@8 against exact search, ours vs faiss's k-means on the same rows.
    exact = faiss.IndexFlatL2(32)
    exact.add(ours.vectors)
    _, truth = exact.search(q, 8)
    theirs = _rvc_index(ours.vectors, ours.nlist, batches=8192)
    r_ours, r_faiss = _recall(ours.search, q, truth), _recall(theirs.search, q, truth)
    print(f"recall@8 nprobe 1: ours {r_ours:.3f}, faiss {r_faiss:.3f}")
    assert r_ours >= r_faiss - 0.05


def test_build_index_reduction(monkeypatch):
    """Above the threshold RVC first reduces the rows to k-means centres (threshold patched
    down from 2e5 so the branch runs on a small set)."""
    monkeypatch.setattr(R, "KMEANS_THRESHOLD", 1000)
    monkeypatch.setattr(R, "KMEANS_CENTRES", 400)
    rng = np.random.default_rng(6)
    x, centres = _mixture(rng, 1200, 8, k=20, spread=0.2)
    ours = R.build_index(x, seed=0)
    assert ours.ntotal == 400 and ours.nlist == R.n_ivf(400) == 10
    # The centres summarise the data: every one lies near the data, and the data near them.
    d_c = ((ours.vectors[:, None] - x[None]) ** 2).sum(-1).min(1)
    d_x = ((x[:, None] - ours.vectors[None]) ** 2).sum(-1).min(1)
    var = ((x - x.mean(0)) ** 2).sum(1).mean()
    assert np.median(d_c) < 0.05 * var and np.median(d_x) < 0.05 * var
    monkeypatch.setattr(R, "KMEANS_THRESHOLD", 2000)
    assert R.build_index(x, seed=0).ntotal == 1200  # below the threshold: the rows themselves


def test_build_index_too_small():
    with pytest.raises(ValueError, match="39"):
        R.build_index(np.zeros((20, 4), np.float32))


# ----------------------------------------------------------------------------- rvclora index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rvclora(*args):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "rvclora_jax.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """An RVC experiment folder with 256-d (v1) features in three files."""
    exp = tmp_path_factory.mktemp("cli") / "myvoice"
    (exp / "0_gt_wavs").mkdir(parents=True)
    (exp / "3_feature256").mkdir()
    x, _ = _mixture(np.random.default_rng(7), 1000, 256, k=16)
    for i, (a, b) in enumerate([(0, 300), (300, 650), (650, 1000)]):
        np.save(exp / "3_feature256" / f"0_{i}.npy", x[a:b])
    return exp, x


def test_cli_index(experiment):
    exp, x = experiment
    r = _rvclora("index", str(exp), "--no-progress", "--total-fea")
    assert r.returncode == 0, r.stderr
    name = f"added_IVF{R.n_ivf(1000)}_Flat_nprobe_1_myvoice_v1.index"
    out = exp / name
    assert out.is_file() and str(out) in r.stdout
    ix = faiss.read_index(str(out))  # what RVC's pipeline does with it
    assert (ix.d, ix.ntotal, ix.nlist, faiss.extract_index_ivf(ix).nprobe) == (256, 1000, 25, 1)
    rows = ix.reconstruct_n(0, ix.ntotal)
    np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(x, axis=0))
    np.testing.assert_array_equal(np.load(exp / "total_fea.npy"), rows)


def test_cli_index_refuses_existing(experiment, capsys):
    from rvclora_jax.cli import main

    exp, x = experiment
    out = exp / f"added_IVF{R.n_ivf(1000)}_Flat_nprobe_1_myvoice_v1.index"
    if not out.exists():
        assert main(["index", str(exp), "--no-progress"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    # A second run refuses to replace it (one line, exit 2); --overwrite replaces it.
    assert main(["index", str(exp), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and "--overwrite" in err
    assert out.read_bytes() == before
    assert main(["index", str(exp), "--no-progress", "--overwrite", "--seed", "3"]) == 0
    assert out.read_bytes() != before and faiss.read_index(str(out)).ntotal == 1000


def test_cli_index_run_dir_and_errors(experiment, tmp_path, capsys):
    import json

    from rvclora_jax.cli import main

    exp, x = experiment
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"metadata": {"data": str(exp)}}))
    assert main(["index", str(run), "--no-progress", "--seed", "1"]) == 0
    out = run / f"added_IVF25_Flat_nprobe_1_run_v1.index"
    assert R.read_index(out).ntotal == 1000
    capsys.readouterr()

    def error(*args):
        assert main(["index", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rvclora: error:") and "\n" not in err
        return err

    assert "neither an experiment folder" in error(str(tmp_path / "run" / ".."))
    assert "not found" in error(str(tmp_path / "nope"))
    assert "no v2 feature folder" in error(str(exp), "--out", str(tmp_path / "a.index"), "--version", "v2")
    # The output may not replace a feature file, even with --overwrite.
    feat = exp / "3_feature256" / "0_0.npy"
    assert "part of the input" in error(str(exp), "--out", str(feat), "--overwrite")
    bad = tmp_path / "bad"
    (bad / "3_feature768").mkdir(parents=True)
    np.save(bad / "3_feature768" / "a.npy", np.zeros((100, 768), np.float32))
    (bad / "3_feature768" / "b.npy").write_bytes(b"garbage")
    err = error(str(bad))
    assert str(bad / "3_feature768" / "b.npy") in err
    assert not [f for f in os.listdir(bad) if f.endswith(".index")]


@pytest.mark.slow
def test_build_index_768_vs_faiss(tmp_path):
    """At RVC v2's width and a realistic size (20 000 frames: under seven minutes of audio):
    faiss reads our index and searches it as we do, and our k-means lists serve nprobe-1
    search about as well as faiss's own (recall@8 against exact search)."""
    rng = np.random.default_rng(10)
    x, centres = _mixture(rng, 20000, 768, k=150, spread=0.5)
    ours = R.build_index(x, seed=0)
    assert ours.nlist == R.n_ivf(20000) == 512
    R.write_index(ours, tmp_path / "v2.index")
    back = faiss.read_index(str(tmp_path / "v2.index"))
    q = (centres[rng.integers(0, 150, 1000)] + 0.5 * rng.standard_normal((1000, 768))).astype(np.float32)
    D, I = back.search(q, 8)
    d, i = ours.search(q, 8)
    np.testing.assert_array_equal(i, I)
    np.testing.assert_allclose(d, D, rtol=1e-5)
    exact = faiss.IndexFlatL2(768)
    exact.add(ours.vectors)
    _, truth = exact.search(q, 8)
    theirs = _rvc_index(ours.vectors, ours.nlist, batches=8192)
    r_ours, r_faiss = _recall(ours.search, q, truth), _recall(theirs.search, q, truth)
    print(f"d=768 recall@8 nprobe 1: ours {r_ours:.3f}, faiss {r_faiss:.3f}")
    assert r_ours >= r_faiss - 0.03
