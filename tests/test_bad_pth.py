"""Bad RVC ``.pth`` files and converted directories through the real ``rvclora`` CLI
(issue 11): every one gives exit 2, one stderr line naming the file (and key), no
traceback, nothing written, inputs byte-identical. Built from one narrow model (RVC's
v2 48k structure, small widths) so the module stays fast."""

import errno
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from rvclora_jax.cli import main
from rvclora_jax.models.synthesizer import SynthConfig
from tests.test_export import NARROW, _torch_g, _write

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net():
    return _torch_g("v2", True, NARROW)


@pytest.fixture(scope="module")
def good(net, tmp_path_factory):
    """A good inference file, its checkpoint dict, and a converted directory."""
    tmp = tmp_path_factory.mktemp("good")
    p = str(tmp / "voice.pth")
    ckpt = _write(p, "inference", net, NARROW, "v2", True)
    conv = str(tmp / "conv")
    assert main(["convert", p, conv]) == 0
    return {"path": p, "ckpt": ckpt, "conv": conv, "tmp": tmp}


def _hashes(paths):
    out = {}
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                for f in files:
                    q = os.path.join(root, f)
                    out[q] = hashlib.sha256(open(q, "rb").read()).hexdigest()
        elif os.path.isfile(p):
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def refused(capsys, args, *needles, inputs=(), out=None):
    """Run ``rvclora args``; assert the issue-11 error contract; return the message."""
    before = _hashes(inputs)
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert rc == 2, (rc, cap.out, err)
    assert len(err.splitlines()) == 1 and err.startswith("rvclora: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    if out is not None:
        assert not os.path.exists(out), out
        d = os.path.dirname(os.path.abspath(out))
        assert not [f for f in os.listdir(d) if f.startswith(".tmp-rvclora-")], os.listdir(d)
    assert _hashes(inputs) == before
    return err


def _variant(good, tmp_path, name, mutate=None, top=None):
    ck = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
          for k, v in good["ckpt"].items()}
    if mutate:
        mutate(ck["weight"])
    if top:
        top(ck)
    p = str(tmp_path / name)
    torch.save(ck, p)
    return p


def _export_refused(capsys, tmp_path, p, *needles):
    out = str(tmp_path / "out.pth")
    refused(capsys, ["export", p, out], p, *needles, inputs=[p], out=out)
    return refused(capsys, ["inspect", p], p, *needles, inputs=[p])


# ----------------------------------------------------------------- tensor values (class 2/3)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.int64])
def test_non_float_tensor_refused(good, tmp_path, capsys, dtype):
    def m(w):
        w["dec.conv_pre.bias"] = torch.ones(w["dec.conv_pre.bias"].shape, dtype=dtype)
    _export_refused(capsys, tmp_path, _variant(good, tmp_path, "int.pth", m), "dec.conv_pre.bias", "float")


def test_zero_d_tensor_refused(good, tmp_path, capsys):
    def m(w):
        w["dec.ups.0.weight_v"] = torch.tensor(1.0).half()
    _export_refused(capsys, tmp_path, _variant(good, tmp_path, "0d.pth", m), "dec.ups.0.weight_v", "0-d")


def test_zero_speakers_refused(good, tmp_path, capsys):
    def m(w):
        w["emb_g.weight"] = torch.zeros(0, NARROW.gin_channels).half()
    _export_refused(capsys, tmp_path, _variant(good, tmp_path, "spk0.pth", m), "emb_g.weight", "speaker")


def _huge_view(src, dst):
    """``src`` (holding one [4] float tensor) rewritten so the tensor declares 250 Gi
    elements with stride 0 over its 16 stored bytes: tiny on disk."""
    big = b"\x8a\x05" + (250 * 2**30).to_bytes(5, "little")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert data.count(b"K\x04\x85") == 1 and data.count(b"K\x01\x85") == 1
                data = data.replace(b"K\x04\x85", big + b"\x85").replace(b"K\x01\x85", b"K\x00\x85")
            zout.writestr(info, data)


def test_tiny_file_declaring_an_enormous_tensor(tmp_path, capsys):
    small = str(tmp_path / "small.pth")
    torch.save({"model": {"enc_p.emb_phone.weight": torch.zeros(4)}}, small)
    p = str(tmp_path / "huge.pth")
    _huge_view(small, p)
    assert os.path.getsize(p) < 4096
    refused(capsys, ["inspect", p], p, "enc_p.emb_phone.weight", "declares", inputs=[p])
    out = str(tmp_path / "conv")
    refused(capsys, ["convert", p, out], p, inputs=[p], out=out)


def _legacy_file(path, numel):
    """A legacy (pre-1.6, non-zip) torch file whose state dict names one float storage of
    ``numel`` elements, followed by only 16 bytes of data."""
    import io
    import pickle
    import sys

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj == "<storage>" else None

    buf = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, dict(protocol_version=1001, little_endian=sys.byteorder == "little",
                                                   type_sizes=dict(short=2, int=4, long=4))):
        pickle.dump(head, buf, protocol=2)
    P(buf, protocol=2).dump({"model": {"enc_p.emb_phone.weight": "<storage>"}})
    pickle.dump(["0"], buf, protocol=2)
    buf.write((numel).to_bytes(8, "little") + b"\0" * 16)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())


def test_legacy_format_file_declaring_an_enormous_tensor(tmp_path, capsys):
    """Issue 11: the size check also covers legacy-format files, before torch.load
    allocates their storages (a legitimate legacy file still gets past the check)."""
    p = str(tmp_path / "legacy_huge.pth")
    _legacy_file(p, 100 * 2**30)
    assert os.path.getsize(p) < 1024
    refused(capsys, ["inspect", p], p, "legacy-format", "declare", inputs=[p])
    ok = str(tmp_path / "legacy_ok.pth")
    torch.save({"model": {"x": torch.zeros(4)}}, ok, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(ok)
    msg = refused(capsys, ["inspect", ok], ok, inputs=[ok])  # not RVC keys, but past the size check
    assert "legacy-format" not in msg and "no registered model family" in msg, msg


def test_fifo_and_device_as_pth(tmp_path, capsys):
    fifo = str(tmp_path / "fifo.pth")
    os.mkfifo(fifo)
    refused(capsys, ["inspect", fifo], fifo, "FIFO")
    refused(capsys, ["inspect", "/dev/zero"], "/dev/zero", "not a regular file")


# ----------------------------------------------------------------- sample rate


@pytest.mark.parametrize("sr, cfg_sr, needle", [
    (12345, 12345, "'sr'"), (0, 0, "'sr'"), (-48000, -48000, "'sr'"), ("48k", 12345, "config[17]"),
    ("40k", 40000, "config[17] sr = 40000"),  # a 48k model (hop 480) claiming 40k
    ("48k", 40000, "config[17] sr = 40000"),
])
def test_sample_rate_must_fit_the_model(good, tmp_path, capsys, sr, cfg_sr, needle):
    def top(ck):
        ck["sr"] = sr
        ck["config"][17] = cfg_sr
    _export_refused(capsys, tmp_path, _variant(good, tmp_path, "sr.pth", top=top), needle)


# ----------------------------------------------------------------- the config list


@pytest.mark.parametrize("i, value, field", [
    (3, "32", "hidden_channels"), (0, 0, "spec_channels"), (5, 0, "n_heads"), (5, 3, "n_heads"),
    (8, float("nan"), "p_dropout"), (8, 1.0, "p_dropout"), (9, "3", "resblock"), (7, -3, "kernel_size"),
    (10, [3, "7", 11], "resblock_kernel_sizes"), (11, [[1, 3, 5]], "resblock_dilation_sizes"),
    (12, [], "upsample_rates"), (14, [24, 20, 4], "upsample_kernel_sizes"), (6, None, "n_layers"),
    (13, True, "upsample_initial_channel"), (16, 8.5, "gin_channels"),
    # well-typed but not what the weights hold (caught before any model is built)
    (6, 10**9, "n_layers"), (5, 4, "n_heads"), (7, 5, "kernel_size"), (10, [3, 7], "resblock_dilation_sizes"),  # 3 dilation lists for 2 kernel sizes
    (10, [3, 7, 13], "resblock_kernel_sizes"), (11, [[1, 3], [1, 3], [1, 3]], "resblock_dilation_sizes"),
    (9, "2", "resblock"),
])
def test_config_entries_are_validated(good, tmp_path, capsys, i, value, field):
    def top(ck):
        ck["config"][i] = value
    _export_refused(capsys, tmp_path, _variant(good, tmp_path, "cfg.pth", top=top),
                    f"config[{SynthConfig.FIELDS.index(field)}] {field}")


# ----------------------------------------------------------------- ambiguous keys


def test_weight_norm_in_both_key_styles_refused(good, tmp_path, capsys):
    def m(w):
        w["dec.ups.0.parametrizations.weight.original0"] = w["dec.ups.0.weight_g"] * 2
        w["dec.ups.0.parametrizations.weight.original1"] = w["dec.ups.0.weight_v"]
    err = _export_refused(capsys, tmp_path, _variant(good, tmp_path, "both.pth", m), "dec.ups.0.weight_g",
                          "dec.ups.0.parametrizations.weight.original0")
    assert "two key styles" in err


def test_one_pair_in_two_key_styles_refused(good, tmp_path, capsys):
    def m(w):
        w["dec.ups.2.parametrizations.weight.original1"] = w.pop("dec.ups.2.weight_v")
    _export_refused(capsys, tmp_path, _variant(good, tmp_path, "mix.pth", m), "dec.ups.2.weight_g",
                    "dec.ups.2.parametrizations.weight.original1")


def test_plain_weight_and_pair_refused(good, tmp_path, capsys):
    def m(w):
        w["dec.ups.1.weight"] = w["dec.ups.1.weight_v"].clone()
    _export_refused(capsys, tmp_path, _variant(good, tmp_path, "plain.pth", m), "dec.ups.1.weight ",
                    "dec.ups.1.weight_g")


# ----------------------------------------------------------------- training checkpoints


@pytest.mark.parametrize("key, value", [("learning_rate", None), ("learning_rate", [1e-4]),
                                        ("learning_rate", float("nan")), ("iteration", "7"),
                                        ("iteration", 1.5)])
def test_train_checkpoint_fields(net, tmp_path, capsys, key, value):
    p = str(tmp_path / "G_7.pth")
    ckpt = {"model": net.state_dict(), "iteration": 7, "optimizer": {"state": {}, "param_groups": []},
            "learning_rate": 1e-4}
    ckpt[key] = value
    torch.save(ckpt, p)
    out = str(tmp_path / "out.pth")
    refused(capsys, ["export", p, out, "--layout", "train-checkpoint"], p, f"'{key}'", inputs=[p], out=out)


# ----------------------------------------------------------------- writers


def test_fp16_overflow_refused_before_writing(good, tmp_path, capsys):
    def m(w):
        w["dec.conv_pre.bias"] = torch.full(w["dec.conv_pre.bias"].shape, 1e6)  # fp32: fine; fp16: inf
    p = _variant(good, tmp_path, "big.pth", m)
    out = str(tmp_path / "out.pth")
    refused(capsys, ["export", p, out], out, "dec.conv_pre.bias", "float16", inputs=[p], out=out)
    assert main(["export", p, out, "--fp32"]) == 0  # representable in fp32


@pytest.mark.slow  # ~10 s (an adapter is made); the writer's check itself: test_fp16_overflow_refused_before_writing
def test_export_scale_overflowing_fp16_refused(good, tmp_path, capsys):
    from rvclora_convert import export as E
    from tests.test_export import _adapter_for
    _adapter_for(E.load_source(good["path"]), tmp_path / "adapter", preset="ups")
    out = str(tmp_path / "out.pth")
    inputs = [good["path"], str(tmp_path / "adapter")]
    refused(capsys, ["export", good["path"], out, "--adapter", str(tmp_path / "adapter"), "--scale", "1e9"],
            out, "dec.ups.", "float16", inputs=inputs, out=out)


def test_disk_full_during_export_and_convert(good, tmp_path, capsys, monkeypatch):
    import safetensors.numpy

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    from rvclora_convert import torchfile

    monkeypatch.setattr(torchfile, "save", full)  # the .pth writer
    out = str(tmp_path / "out.pth")
    refused(capsys, ["export", good["path"], out], out, "No space left", inputs=[good["path"]], out=out)
    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    out = str(tmp_path / "conv")
    refused(capsys, ["convert", good["path"], out], out, "No space left", inputs=[good["path"]], out=out)
    monkeypatch.undo()
    import orbax.checkpoint as ocp

    def full_orbax(*a, **k):  # tensorstore reports a full disk as its own error type
        raise RuntimeError("RESOURCE_EXHAUSTED: No space left on device")
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full_orbax)
    refused(capsys, ["convert", good["path"], out], out, "No space left", inputs=[good["path"]], out=out)


# ----------------------------------------------------------------- inspect --json


def test_inspect_json_is_strict_json(good, tmp_path, capsys):
    def top(ck):
        ck.update(epoch=float("nan"), loss=float("inf"), hist=[1.0, float("-inf")])
    p = _variant(good, tmp_path, "nanmeta.pth", top=top)
    capsys.readouterr()
    assert main(["inspect", p, "--json"]) == 0
    out = capsys.readouterr().out

    def no_constants(c):
        raise AssertionError(f"not JSON: {c}")
    info = json.loads(out, parse_constant=no_constants)
    assert info["metadata"]["epoch"] == "nan" and info["metadata"]["hist"] == [1.0, "-inf"]


# ----------------------------------------------------------------- converted directories


def _copy_dir(good, tmp_path):
    import shutil
    d = str(tmp_path / "conv")
    shutil.copytree(good["conv"], d)
    return d


def _model_json(d):
    return json.load(open(os.path.join(d, "model.json")))


def _put_model_json(d, meta_or_text):
    text = meta_or_text if isinstance(meta_or_text, str) else json.dumps(meta_or_text)
    open(os.path.join(d, "model.json"), "w").write(text)


@pytest.mark.parametrize("case, needle", [
    ("not-json", "not valid JSON"), ("list", "JSON object"), ("null", "JSON object"),
    ("kind", "'kind'"), ("key_order", "'key_order'"), ("metadata", "'metadata'"), ("f0", "'f0'"),
    ("config-str", "config[3] hidden_channels"), ("config-len", "18 entries"), ("sr", "'sr'"),
    ("missing-layout", "'layout' missing"), ("has_enc_q", "'has_enc_q'"), ("lr", "learning_rate"),
    ("version", "'version'"), ("nan", "NaN is not JSON"),
])
def test_malformed_model_json(good, tmp_path, capsys, case, needle):
    d = _copy_dir(good, tmp_path)
    meta = _model_json(d)
    if case == "not-json":
        meta = "{not json"
    elif case == "list":
        meta = "[1, 2]"
    elif case == "null":
        meta = "null"
    elif case == "kind":
        meta["kind"] = 3
    elif case == "key_order":
        meta["key_order"] = "abc"
    elif case == "metadata":
        meta["metadata"] = []
    elif case == "f0":
        meta["f0"] = "yes"
    elif case == "config-str":
        meta["config"][3] = "32"
    elif case == "config-len":
        meta["config"] = meta["config"][:5]
    elif case == "sr":
        meta["sr"] = 40000
    elif case == "missing-layout":
        del meta["layout"]
    elif case == "has_enc_q":
        meta["has_enc_q"] = "no"
    elif case == "lr":
        meta["metadata"]["learning_rate"] = None
    elif case == "version":
        meta["version"] = ["v2"]
    elif case == "nan":
        meta["metadata"]["epoch"] = float("nan")  # json.dumps writes NaN
    _put_model_json(d, meta)
    out = str(tmp_path / "out.pth")
    refused(capsys, ["export", d, out], "model.json", needle, inputs=[d], out=out)


def test_model_json_fifo(good, tmp_path, capsys):
    d = _copy_dir(good, tmp_path)
    os.unlink(os.path.join(d, "model.json"))
    os.mkfifo(os.path.join(d, "model.json"))
    out = str(tmp_path / "out.pth")
    refused(capsys, ["export", d, out], "model.json", "FIFO", out=out)


@pytest.mark.parametrize("case", ["garbage", "unpaired", "int"])
def test_malformed_weight_norm_file(good, tmp_path, capsys, case):
    from safetensors.numpy import load_file, save_file
    d = _copy_dir(good, tmp_path)
    wpath = os.path.join(d, "weight_norm_source.safetensors")
    if case == "garbage":
        open(wpath, "wb").write(b"\xff" * 64)
    else:
        wn = load_file(wpath)
        if case == "unpaired":
            wn.pop("dec.ups.0.weight_v")
        else:
            wn["dec.ups.0.weight_g"] = wn["dec.ups.0.weight_g"].astype(np.int32)
        save_file(wn, wpath)
    out = str(tmp_path / "out.pth")
    refused(capsys, ["export", d, out], "weight_norm_source.safetensors", inputs=[d], out=out)


def test_corrupted_orbax_params(good, tmp_path, capsys):
    d = _copy_dir(good, tmp_path)
    for root, _, files in os.walk(os.path.join(d, "params")):
        for f in files:
            if f != "_CHECKPOINT_METADATA":
                open(os.path.join(root, f), "wb").write(b"garbage")
    out = str(tmp_path / "out.pth")
    refused(capsys, ["export", d, out], "params", "Orbax", inputs=[d], out=out)


@pytest.mark.slow  # ~15 s (a fresh process); the error itself: test_corrupted_orbax_params
def test_corrupted_orbax_params_no_noise_at_exit(good, tmp_path):
    """In a fresh process: Orbax's failed reads leave no asyncio reports ("Event loop is
    closed", "Task exception was never retrieved") after the one-line error."""
    import subprocess
    import sys
    d = _copy_dir(good, tmp_path)
    for root, _, files in os.walk(os.path.join(d, "params")):
        for f in files:
            if "ocdbt" in root or f.startswith("manifest"):
                open(os.path.join(root, f), "wb").write(b"x")
    out = str(tmp_path / "out.pth")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "rvclora_jax.cli", "export", d, out], capture_output=True,
                       text=True, env=env, timeout=300)
    err = r.stderr.splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("rvclora: error: "), r.stderr[-2000:]
    assert "params" in err[0] and not os.path.exists(out)


def test_describe_is_what_inspect_prints(good, tmp_path, capsys):
    from rvclora_convert.pth import load_rvc_file
    capsys.readouterr()
    assert main(["inspect", good["path"], "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(json.dumps(load_rvc_file(good["path"]).describe(), allow_nan=False)) == printed


def test_converted_directory_has_the_modes_of_plain_files(good, tmp_path):
    """`rvclora convert` builds its directory in a private temporary folder (0700, files
    0600) and renames it into place: the result must have the modes the user's umask
    gives any new directory and file, not the temporary ones."""
    import stat

    out = str(tmp_path / "conv")
    old = os.umask(0o022)
    try:
        assert main(["convert", good["path"], out]) == 0
    finally:
        os.umask(old)
    modes = {os.path.relpath(os.path.join(r, n), out): stat.S_IMODE(os.stat(os.path.join(r, n)).st_mode)
             for r, dirs, files in os.walk(out) for n in dirs + files}
    modes["."] = stat.S_IMODE(os.stat(out).st_mode)
    assert len(modes) > 2
    for rel, mode in modes.items():
        want = 0o755 if os.path.isdir(os.path.join(out, rel)) else 0o644
        assert mode == want, (rel, oct(mode))
