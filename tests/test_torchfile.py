"""rvclora_convert.torchfile: PyTorch's file format read and written with numpy alone.

The reference is torch itself: files written by ``torch.save`` (zip and the legacy
format) must read back to torch's own values, and files we write must load in
``torch.load`` (``weights_only=True``, and ``mmap=True``, which needs torch's record
alignment) to the values we wrote. Hostile files must be refused before anything from
them is called or allocated.
"""

import collections
import os
import pickle
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from rvclora_convert import torchfile as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.complex64]


def _np(t: torch.Tensor) -> np.ndarray:
    """torch's values as numpy (bfloat16 through float32: numpy has none)."""
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _same(got, want: torch.Tensor):
    assert isinstance(got, np.ndarray), type(got)
    assert got.shape == tuple(want.shape)
    if want.dtype == torch.bfloat16:
        assert got.dtype.name == "bfloat16"
    else:
        assert got.dtype == _np(want).dtype
    np.testing.assert_array_equal(np.asarray(got, _np(want).dtype), _np(want))


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = collections.OrderedDict()
    for dt in DTYPES:
        base = torch.randn(4, 6, generator=g) * 50
        out[str(dt).replace("torch.", "")] = base.to(dt)
    whole = torch.arange(24.0).reshape(4, 6)
    out["transposed"] = whole.t()                      # strides (1, 6)
    out["sliced"] = whole[1:3, 2:5]                    # offset 8, strides (6, 1)
    out["row_of_shared"] = whole[2]                    # shares whole's storage
    out["whole"] = whole
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 3)
    out["expanded"] = torch.ones(3, 1).expand(3, 4)    # stride 0
    out["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return out


@pytest.fixture(scope="module")
def tensors():
    return _tensors()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_save_writes(tmp_path, tensors, zipped):
    meta = {"config": [1, 2.5, "x", None, True, (1, 2)], "sr": "40k", "f0": 1, "raw": b"\x00ab\xff",
            "big": 2**40, "neg": -7, "nested": {"a": [torch.arange(3)], "b": (torch.ones(2),)}}
    p = tmp_path / "t.pth"
    torch.save({"weight": tensors, **meta}, p, _use_new_zipfile_serialization=zipped)
    assert zipfile.is_zipfile(p) == zipped
    got = tf.load(p)
    assert isinstance(got["weight"], collections.OrderedDict) and list(got["weight"]) == list(tensors)
    for k, t in tensors.items():
        _same(got["weight"][k], t.detach())
    for k in ("config", "sr", "f0", "raw", "big", "neg"):
        assert got[k] == meta[k], k
    _same(got["nested"]["a"][0], torch.arange(3))
    _same(got["nested"]["b"][0], torch.ones(2))
    # contiguous tensors are views of their storage: tensors sharing one share memory
    if zipped:
        assert np.shares_memory(got["weight"]["row_of_shared"], got["weight"]["whole"])


def test_reads_module_and_optimizer_state(tmp_path):
    """A weight-normed conv in torch's newer parametrization layout and an AdamW state dict
    with moments: what Applio's and RVC's training checkpoints hold."""
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(4, 3, 5))
    opt = torch.optim.AdamW(conv.parameters(), betas=(0.8, 0.99), eps=1e-9)
    conv(torch.randn(1, 4, 9)).sum().backward()
    opt.step()
    p = tmp_path / "ckpt.pth"
    torch.save({"model": conv.state_dict(), "optimizer": opt.state_dict(), "iteration": 3, "learning_rate": 1e-4},
               p)
    got, want = tf.load(p), torch.load(p, weights_only=True)
    for k, t in want["model"].items():
        _same(got["model"][k], t)
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    for i, st in want["optimizer"]["state"].items():
        for k, t in st.items():
            _same(got["optimizer"]["state"][i][k], t)


def test_written_files_load_in_torch(tmp_path, tensors):
    arrays = collections.OrderedDict(
        (k, np.asarray(_np(t.detach()), tf._np_dtype("bfloat16")) if t.dtype == torch.bfloat16 else _np(t.detach()))
        for k, t in tensors.items())
    obj = {"weight": arrays, "config": [1, 2.5, "x", None, True, (1, 2)], "sr": "40k", "raw": b"\x00ab\xff",
           "big": 2**40, "neg": -2**40, "text": "ünï", "empty": {}, "none": None,
           "optimizer": {"state": {}, "param_groups": [{"betas": (0.8, 0.99), "foreach": None, "params": [0, 1]}]}}
    p = tmp_path / "ours.pth"
    tf.save(obj, p)
    for kwargs in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
        back = torch.load(p, **kwargs)
        assert type(back["weight"]) is collections.OrderedDict and list(back["weight"]) == list(tensors)
        for k, t in tensors.items():
            assert back["weight"][k].dtype == t.dtype and torch.equal(back["weight"][k], t.detach()), k
        for k in ("config", "sr", "raw", "big", "neg", "text", "empty", "none", "optimizer"):
            assert back[k] == obj[k], k
    # torch's records, in torch's order (one storage per array here: torch shares views'),
    # each one's bytes 64-byte aligned as torch aligns them
    ref = tmp_path / "theirs.pth"
    torch.save({"weight": tensors}, ref)
    names = lambda f: [n.split("/", 1)[1] for n in zipfile.ZipFile(f).namelist()]  # noqa: E731
    assert [n for n in names(p) if not n.startswith("data/")] == [n for n in names(ref) if not n.startswith("data/")]
    assert names(p).index("data/0") == names(ref).index("data/0")
    with open(p, "rb") as fh:
        raw = fh.read()
    for info in zipfile.ZipFile(p).infolist():
        start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28],
                                                         "little") \
            + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
        assert start % 64 == 0, info.filename
        assert info.compress_type == zipfile.ZIP_STORED
    # the same content gives the same bytes (torch's serialization id is random; ours is a digest)
    tf.save(obj, tmp_path / "again.pth")
    assert open(tmp_path / "again.pth", "rb").read() == raw


def test_round_trip_through_our_reader(tmp_path, tensors):
    arrays = {k: _np(t.detach()) for k, t in tensors.items() if t.dtype != torch.bfloat16}
    p = tmp_path / "rt.pth"
    tf.save({"model": arrays, "n": 3}, p)
    got = tf.load(p)
    assert got["n"] == 3
    for k, a in arrays.items():
        assert got["model"][k].dtype == a.dtype and np.array_equal(got["model"][k], a), k


def test_cannot_write_what_torch_files_do_not_hold(tmp_path):
    for bad in ({"x": object()}, {"x": np.array(["a"])}, {(1, 2): 3}):
        with pytest.raises(TypeError):
            tf.save(bad, tmp_path / "bad.pth")


# ---------------------------------------------------------------------------- hostile files


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, ("touch " + _Evil.marker,))


class _Custom:
    pass


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_globals_outside_the_allowlist_are_refused_and_never_called(tmp_path, zipped):
    _Evil.marker = str(tmp_path / "PWNED")
    for name, obj, needle in (("evil", {"model": _Evil()}, "system"),
                              ("custom", {"model": {"w": torch.zeros(2)}, "x": _Custom()}, "_Custom"),
                              ("eval", {"x": (eval, ("1+1",))}, "eval")):
        p = tmp_path / f"{name}.pth"
        torch.save(obj, p, _use_new_zipfile_serialization=zipped)
        with pytest.raises(tf.UnsafeGlobal) as ei:
            tf.load(p)
        assert needle in ei.value.name and "\n" not in str(ei.value)
    plain = tmp_path / "evil.pkl"  # a bare pickle: refused on its first global too
    plain.write_bytes(pickle.dumps({"model": _Evil()}, protocol=2))
    with pytest.raises(tf.UnsafeGlobal):
        tf.load(plain)
    assert not os.path.exists(_Evil.marker)


def test_inert_stand_ins_only_where_the_caller_allows(tmp_path):
    import argparse

    p = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(a=1), "model": {"w": torch.ones(2)}}, p)
    with pytest.raises(tf.UnsafeGlobal, match="argparse.Namespace"):
        tf.load(p)

    class Rec:
        def __setstate__(self, state):
            self.state = state
    got = tf.load(p, inert=lambda name: Rec if name.startswith("argparse.") else None)
    assert got["args"].state == {"a": 1} and np.array_equal(got["model"]["w"], np.ones(2, np.float32))


def _rewrite_pickle(src, dst, fn):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, fn(data) if info.filename.endswith("data.pkl") else data)


def test_forged_sizes_allocate_nothing(tmp_path):
    small = tmp_path / "small.pth"
    torch.save({"model": {"w": torch.zeros(4)}}, small)
    # the tensor claims 250 Gi elements (stride 0 over its 16 bytes): a BadTensor, no allocation
    big = b"\x8a\x05" + (250 * 2**30).to_bytes(5, "little")
    p = tmp_path / "huge_view.pth"
    _rewrite_pickle(small, p, lambda d: d.replace(b"K\x04\x85", big + b"\x85").replace(b"K\x01\x85", b"K\x00\x85"))
    tracemalloc.start()
    got = tf.load(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(got["model"]["w"], tf.BadTensor) and "declares shape" in got["model"]["w"].reason
    assert peak < 10 * 2**20
    # the storage claims more elements than its record holds
    p2 = tmp_path / "huge_storage.pth"
    _rewrite_pickle(small, p2, lambda d: d.replace(b"K\x04t", big + b"t"))
    with pytest.raises(tf.TorchFileError, match="record holds"):
        tf.load(p2)
    # many strided views of one storage cannot multiply it past the file's size
    whole = torch.zeros(256, 256)
    views = {f"v{i}": whole.t() for i in range(400)}   # 400 x 256 KB copies of a 256 KB storage
    p3 = tmp_path / "views.pth"
    torch.save(views, p3)
    got = tf.load(p3)
    bad = [k for k, v in got.items() if isinstance(v, tf.BadTensor)]
    assert bad and "exceed the file's size" in got[bad[0]].reason
    assert sum(v.nbytes for v in got.values() if isinstance(v, np.ndarray)) <= os.path.getsize(p3)


def test_legacy_file_declaring_more_than_it_holds(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 100 * 2**30, None) if obj == "<s>" else None

    import io
    buf = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(head, buf, protocol=2)
    P(buf, protocol=2).dump({"model": {"w": "<s>"}})
    p = tmp_path / "legacy.pth"
    p.write_bytes(buf.getvalue())
    with pytest.raises(tf.TorchFileError, match="legacy-format.*declare"):
        tf.load(p)


def test_damaged_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, good)
    raw = good.read_bytes()
    for cut in (50, len(raw) // 2, len(raw) - 10):
        p = tmp_path / f"cut{cut}.pth"
        p.write_bytes(raw[:cut])
        with pytest.raises(tf.TorchFileError, match="truncated"):
            tf.load(p)
    for name, data in (("text", b"this is not a checkpoint"), ("noise", np.random.default_rng(0).bytes(4096))):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(tf.TorchFileError) as ei:
            tf.load(p)
        assert "\n" not in str(ei.value)
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(tf.TorchFileError, match="not a PyTorch checkpoint"):
        tf.load(z)
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with pytest.raises(tf.TorchFileError, match="compressed"):
        tf.load(deflated)


def test_export_without_torch(tmp_path):
    """The converters never import torch: with ``import torch`` made to fail, an RVC
    inference model (written here by torch) is read, converted to Flax and exported
    again, and torch reads the export to the same tensors."""
    from tests.test_export import NARROW, _torch_g, _write

    src = str(tmp_path / "voice.pth")
    _write(src, "inference", _torch_g("v2", True, NARROW), NARROW, "v2", True)
    out = str(tmp_path / "back.pth")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from rvclora_convert import export as E\n"
            f"r = E.export(E.load_source({src!r}), {out!r}, layout='inference')\n"
            "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
            "print(r['keys'])\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = torch.load(src, weights_only=True), torch.load(out, weights_only=True)
    assert list(a["weight"]) == list(b["weight"]) and int(res.stdout.split()[-1]) == len(a["weight"])
    for k, t in a["weight"].items():
        assert torch.equal(b["weight"][k], t), k
    assert {k: v for k, v in a.items() if k not in ("weight", "info")} == \
        {k: v for k, v in b.items() if k not in ("weight", "info")}


# ---------------------------------------------------------------------------- review findings


def test_protocol_2_builtins_and_shared_legacy_structure(tmp_path):
    """torch.save's protocol-2 pickles spell builtins as __builtin__.X; a legacy file whose
    memo shares one sub-object 2^25 ways loads in linear time; a legacy file whose bytes
    happen to hold a zip end-of-archive marker is still read as legacy."""
    import time

    p = tmp_path / "sets.pth"
    torch.save({"s": {1, 2}, "f": frozenset([3]), "c": complex(1, 2)}, p)
    assert tf.load(p) == {"s": {1, 2}, "f": frozenset([3]), "c": complex(1, 2)}
    nested = (torch.arange(3.0),)
    for _ in range(25):
        nested = (nested, nested)
    p2 = tmp_path / "dag.pth"
    torch.save({"t": nested}, p2, _use_new_zipfile_serialization=False)
    t0 = time.perf_counter()
    got = tf.load(p2)["t"]
    assert time.perf_counter() - t0 < 5
    for _ in range(25):
        got = got[1]
    _same(got[0], torch.arange(3.0))
    p3 = tmp_path / "pk_inside.pth"
    marker = torch.tensor(list(b"PK\x05\x06" + bytes(18)), dtype=torch.uint8)
    torch.save({"m": marker}, p3, _use_new_zipfile_serialization=False)
    _same(tf.load(p3)["m"], marker)


def test_build_only_on_records_and_state_dict_metadata(tmp_path):
    """BUILD (setting an object's state) on an allowlisted function is refused, so a file
    cannot change how later loads behave; a module's state dict keeps its _metadata."""
    defaults = tf._codecs_encode.__defaults__
    evil = (b"\x80\x02c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__X\x01\x00\x00\x00x\x85s\x86b.")
    p = tmp_path / "build.pkl"
    p.write_bytes(evil)
    with pytest.raises(tf.TorchFileError, match="set the state"):
        tf.load(p)
    assert tf._codecs_encode.__defaults__ == defaults
    sd = torch.nn.Linear(2, 3).state_dict()
    p2 = tmp_path / "sd.pth"
    torch.save(sd, p2)
    assert getattr(tf.load(p2), "_metadata", None) == sd._metadata


def test_repeated_and_overlapping_references_cannot_multiply_the_file(tmp_path):
    """A pickle calling an allowed function many times on one memoised 1 MB string, a
    data.pkl compressed 1000:1, and zip entries nested inside each other's bytes are all
    refused before they cost more memory than the file's size."""
    import struct
    import zlib

    big = "a" * (1 << 20)
    body = b"\x80\x02X" + struct.pack("<I", len(big)) + big.encode() + b"q\x00"
    body += b"c_codecs\nencode\nh\x00X\x06\x00\x00\x00latin1\x86R0" * 40 + b"N."
    p = tmp_path / "memo.pkl"
    p.write_bytes(body)
    with pytest.raises(tf.TorchFileError, match="exceed the file's size"):
        tf.load(p)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(4)}, good)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):  # the same tensor dict, padded to 50 MB
                data = data[:-1] + b"X" + struct.pack("<I", 50 << 20) + b"\0" * (50 << 20) + b"0."
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info, data)
    assert os.path.getsize(bomb) < 1 << 20
    with pytest.raises(tf.TorchFileError, match="compressed"):
        tf.load(bomb)
    # K storage records whose stored bytes nest: record i's data holds records i+1.. and 1 MB
    k, size = 40, 1 << 20
    pick = tf._Pickle()
    pick.dump({f"k{i}": np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (size // 4,), (0,))
               for i in range(k)})
    pkl = bytes(pick.out) + b"."

    def local(name, crc, n):
        return struct.pack("<4s5H3I2H", b"PK\3\4", 20, 0, 0, 0, 0x21, crc, n, n, len(name), 0) + name

    def central(name, crc, n, off):
        return struct.pack("<4s6H3I5HII", b"PK\1\2", 20, 20, 0, 0, 0, 0x21, crc, n, n, len(name), 0, 0, 0, 0, 0,
                           off) + name
    names = [f"archive/data/{i}".encode() for i in range(k)]
    out = bytearray(local(b"archive/data.pkl", zlib.crc32(pkl), len(pkl)) + pkl)
    cd = bytearray(central(b"archive/data.pkl", zlib.crc32(pkl), len(pkl), 0))
    tails, heads, tail = [None] * k, [None] * k, b"\0" * size
    for i in reversed(range(k)):
        tails[i], heads[i] = tail, local(names[i], zlib.crc32(tail), len(tail))
        tail = heads[i] + tail
    off = len(out)
    out += tail
    for i in range(k):
        cd += central(names[i], zlib.crc32(tails[i]), len(tails[i]), off)
        off += len(heads[i])
    out += cd + struct.pack("<4s4H2IH", b"PK\5\6", 0, 0, k + 1, k + 1, len(cd), len(out), 0)
    nest = tmp_path / "overlap.pth"
    nest.write_bytes(bytes(out))
    with pytest.raises(tf.TorchFileError, match="exceed the file's size"):
        tf.load(nest)


def test_writer_uses_c_order_strides(tmp_path):
    a = np.arange(1.0)[::-1]                      # a size-1 axis with stride -8
    b = np.ones((2, 1, 3), np.float32)[:, ::-1]   # likewise inside a larger array
    p = tmp_path / "strides.pth"
    tf.save({"a": a, "b": b}, p)
    got, back = tf.load(p), torch.load(p, weights_only=True)
    for k, v in (("a", a), ("b", b)):
        assert isinstance(got[k], np.ndarray) and np.array_equal(got[k], v)
        assert np.array_equal(back[k].numpy(), v)
