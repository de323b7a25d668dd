"""Bad adapters, adapter mixes, path patterns and feature/training files through the real
``rvclora`` entry point (issue 11, classes 2-4): exit code 2, one ``rvclora: error:`` line
naming the file (and key), no traceback, nothing written, inputs byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from rvclora_jax import adapters, lora
from rvclora_jax import data as D
from rvclora_jax.cli import main
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S

# RVC's exact v2 48k structure, narrow channels (as tests/test_export.py NARROW)
NARROW = RVC.preset("v2", 48000).replace(inter_channels=16, hidden_channels=32, filter_channels=64,
                                       upsample_initial_channel=64, gin_channels=8, spk_embed_dim=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tree_hash(root) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _refused(capsys, argv, root, *, names, out=None):
    """Run ``rvclora argv``; assert exit 2, one error line naming every string of
    ``names``, no traceback, ``out`` not written, nothing under ``root`` changed."""
    before = _tree_hash(root)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    errors = [ln for ln in lines if ln.startswith("rvclora: error: ")]
    assert len(errors) == 1, err
    for n in names:
        assert n in errors[0], (n, errors[0])
    if out is not None:
        assert not os.path.exists(out), out
    assert _tree_hash(root) == before  # inputs byte-identical, no .tmp-rvclora-* left behind
    return errors[0]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    """A narrow RVC inference .pth (f0) and a good adapter for it (generator preset, rank 2)."""
    import torch
    from rvc.lib.infer_pack import models as rvc_models
    from rvclora_convert import export as E

    from tests.torch_ref import randomize_

    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    net = randomize_(rvc_models.SynthesizerTrnMs768NSFsid(*NARROW.to_list(), is_half=False).eval(), 0)
    pth = str(root / "voice.pth")
    torch.save({"weight": {k: v for k, v in net.state_dict().items() if "enc_q" not in k},
                "config": NARROW.to_list(), "info": "t", "sr": "48k", "f0": 1, "version": "v2"}, pth)
    src = E.load_source(pth)
    model = src.model
    cfg = lora.LoRAConfig.from_preset("ups", rank=2, alpha=4)
    lora.inject(model, cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    for _, layer in lora.iter_lora_layers(model):
        if layer.has_lora:
            layer.lora_b[...] = 0.05 * rng.standard_normal(layer.lora_b.shape).astype(np.float32)
    good = str(root / "good")
    adapters.save_adapter(good, nnx.to_pure_dict(nnx.state(model, lora.LoRAParam)), cfg,
                          kinds=lora.layer_kinds(model), base_fingerprint=adapters.fingerprint(src.params))
    lora.remove_adapters(model, [p for p, layer in lora.iter_lora_layers(model) if layer.has_lora])
    return {"root": root, "pth": pth, "good": good}


def _copy_adapter(voice, tmp_path, name="ad"):
    d = str(tmp_path / name)
    shutil.copytree(voice["good"], d)
    return d


def _edit_config(d, fn):
    p = os.path.join(d, "adapter_config.json")
    cfg = json.load(open(p))
    cfg = fn(cfg)
    with open(p, "w") as f:
        f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))


def _edit_tensors(d, fn, kinds_fn=None):
    p = os.path.join(d, "adapter.safetensors")
    save_file(fn(dict(load_file(p))), p)
    if kinds_fn is not None:
        _edit_config(d, lambda c: {**c, "layer_kinds": kinds_fn(c["layer_kinds"])})


def _set_lora(key, value):
    def fn(cfg):
        cfg["lora"][key] = value
        return cfg
    return fn


# ----------------------------------------------------------- adapter_config.json schema

CONFIG_CASES = {
    "config is a list": (lambda c: [c], []),
    "config is null": (lambda c: "null", []),
    "lora is a list": (lambda c: {**c, "lora": []}, ["lora"]),
    "lora missing": (lambda c: {k: v for k, v in c.items() if k != "lora"}, ["lora"]),
    "use_rslora a string": (_set_lora("use_rslora", "no"), ["lora", "use_rslora"]),
    "rank a bool": (_set_lora("rank", True), ["rank"]),
    "rank a string": (_set_lora("rank", "2"), ["rank"]),
    "rank zero": (_set_lora("rank", 0), ["rank"]),
    "alpha NaN": (lambda c: json.dumps(_set_lora("alpha", float("nan"))(c)), ["alpha"]),
    "alpha a list": (_set_lora("alpha", [4]), ["alpha"]),
    "dropout 1": (_set_lora("dropout", 1.0), ["dropout"]),
    "init unknown": (_set_lora("init", "zeros"), ["init"]),
    "targets a string": (_set_lora("targets", "dec/ups/0"), ["targets"]),
    "exclude of ints": (_set_lora("exclude", [1]), ["exclude"]),
    "rank_pattern a list": (_set_lora("rank_pattern", [["dec/ups/0", 2]]), ["rank_pattern"]),
    "rank_pattern value": (_set_lora("rank_pattern", {"dec/ups/0": 2.5}), ["rank_pattern"]),
    "alpha_pattern value": (_set_lora("alpha_pattern", {"dec/ups/0": "x"}), ["alpha_pattern"]),
    "train_embeddings a string": (_set_lora("train_embeddings", "emb_g"), ["train_embeddings"]),
    "preset an int": (_set_lora("preset", 3), ["preset"]),
    "unknown lora key": (_set_lora("ranks", 3), ["ranks"]),
    "format_version a string": (lambda c: {**c, "format_version": "2"}, ["format_version"]),
    "format wrong": (lambda c: {**c, "format": "peft"}, ["format"]),
    "layer_kinds a list": (lambda c: {**c, "layer_kinds": []}, ["layer_kinds"]),
    "metadata a list": (lambda c: {**c, "metadata": [1]}, ["metadata"]),
    "base_fingerprint a string": (lambda c: {**c, "base_fingerprint": "x"}, ["base_fingerprint"]),
    # class 4: catastrophic backtracking would hang `adapters info` / `export`
    "rank_pattern nested quantifier": (_set_lora("rank_pattern", {"(d|e|c|/|u|p|s|0)+x": 2}), ["rank_pattern"]),
    "alpha_pattern nested quantifier": (_set_lora("alpha_pattern", {"(a+)+$": 2.0}), ["alpha_pattern"]),
    "targets backreference": (_set_lora("targets", [r"(dec)/\1"]), ["targets", "backreference"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_adapter_config_is_refused_naming_file_and_key(voice, tmp_path, capsys, case):
    edit, keys = CONFIG_CASES[case]
    d = _copy_adapter(voice, tmp_path)
    _edit_config(d, edit)
    _refused(capsys, ["adapters", "info", d], tmp_path, names=["adapter_config.json", *keys])


def test_bad_adapter_config_refused_by_export_and_mix(voice, tmp_path, capsys):
    d = _copy_adapter(voice, tmp_path)
    _edit_config(d, _set_lora("use_rslora", "no"))
    out = str(tmp_path / "merged.pth")
    _refused(capsys, ["export", voice["pth"], out, "--adapter", d], tmp_path,
             names=["adapter_config.json", "use_rslora"], out=out)
    _refused(capsys, ["adapters", "mix", f"{d}:0.5", f"{voice['good']}:0.5", "--out", str(tmp_path / "m")],
             tmp_path, names=["adapter_config.json", "use_rslora"], out=str(tmp_path / "m"))


def test_pattern_check_accepts_presets_and_bounds_matching():
    from rvclora_jax.families.rvc import RVC

    for targets, *_ in RVC.lora_presets.values():
        for p in targets:
            lora.check_path_pattern(p)
    for ok in (r"dec/ups/\d+", "dec/resblocks/.*", r"(dec|flow)/.*", r"dec/(ups/\d+)?", r"dec/ups/[0-9]{1,2}"):
        lora.check_path_pattern(ok)
    for bad in ("(a+)+$", "(a|aa)*b", "(?:a*)*", ".*.*.*.*x", "(a{1,5}){2,}", r"(a)\1", "(?P<n>a)(?P=n)",
                "x" * 300):
        with pytest.raises(ValueError):
            lora.check_path_pattern(bad)
    cfg = lora.LoRAConfig(targets=(".*x",), preset=None)
    with pytest.raises(ValueError, match="longer than"):
        cfg.matches("a" * 1000)


def test_adapter_config_fifo_is_refused_without_blocking(voice, tmp_path, capsys):
    d = _copy_adapter(voice, tmp_path)
    cpath = os.path.join(d, "adapter_config.json")
    os.remove(cpath)
    os.mkfifo(cpath)
    _refused(capsys, ["adapters", "info", d], tmp_path, names=["adapter_config.json", "FIFO"])
    os.remove(cpath)
    os.symlink("/dev/zero", cpath)
    _refused(capsys, ["adapters", "info", d], tmp_path, names=["adapter_config.json"])


# ----------------------------------------------------------------- adapter.safetensors


def _first_a(t):
    return sorted(k for k in t if k.endswith(".lora_a"))[0]


TENSOR_CASES = {
    "int32 factor": (lambda t: {**t, _first_a(t): (t[_first_a(t)] * 100).astype(np.int32)}, ["lora_a", "floating"]),
    "bool factor": (lambda t: {**t, _first_a(t): t[_first_a(t)] > 0}, ["lora_a"]),
    "complex factor": (lambda t: {**t, _first_a(t): t[_first_a(t)].astype(np.complex64)}, ["lora_a"]),
    "0-d factor": (lambda t: {**t, _first_a(t): np.array(1.0, np.float32)}, ["lora_a"]),
    "NaN factor": (lambda t: {**t, _first_a(t): np.full_like(t[_first_a(t)], np.nan)}, ["lora_a", "NaN"]),
    "inf factor": (lambda t: {**t, _first_a(t): np.full_like(t[_first_a(t)], np.inf)}, ["lora_a"]),
    "index spelled twice": (lambda t: {**t, _first_a(t).replace(".0.", ".00."): t[_first_a(t)]}, ["00"]),
    "oddly nested": (lambda t: {**t, _first_a(t) + ".x": t[_first_a(t)]}, ["adapter.safetensors"]),
    "empty adapter": (lambda t: {}, ["no tensors"]),
    "factor ndim wrong": (lambda t: {**t, _first_a(t): t[_first_a(t)][..., None]}, ["dec.ups.0", "factor pair"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_bad_adapter_tensors_are_refused_naming_the_tensor(voice, tmp_path, capsys, case):
    edit, names = TENSOR_CASES[case]
    d = _copy_adapter(voice, tmp_path)
    kinds = (lambda k: {}) if case == "empty adapter" else None
    _edit_tensors(d, edit, kinds)
    _refused(capsys, ["adapters", "info", d], tmp_path, names=["adapter.safetensors", *names])


def test_truncated_safetensors_and_huge_declared_size_are_refused(voice, tmp_path, capsys):
    d = _copy_adapter(voice, tmp_path)
    w = os.path.join(d, "adapter.safetensors")
    blob = open(w, "rb").read()
    open(w, "wb").write(blob[: len(blob) // 2])
    _refused(capsys, ["adapters", "info", d], tmp_path, names=["adapter.safetensors"])
    # a tiny file whose header declares an enormous tensor
    header = json.dumps({"dec.ups.0.lora_a": {"dtype": "F32", "shape": [1 << 20, 1 << 18],
                                               "data_offsets": [0, 1 << 40]}}).encode()
    open(w, "wb").write(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    _refused(capsys, ["adapters", "info", d], tmp_path, names=["adapter.safetensors"])


def test_adapter_lacking_a_targeted_layer_is_refused_by_export(voice, tmp_path, capsys):
    d = _copy_adapter(voice, tmp_path)
    layer = "dec.ups.1"
    _edit_tensors(d, lambda t: {k: v for k, v in t.items() if not k.startswith(layer + ".")},
                  lambda k: {p: v for p, v in k.items() if p != layer.replace(".", "/")})
    out = str(tmp_path / "merged.pth")
    _refused(capsys, ["export", voice["pth"], out, "--adapter", d], tmp_path,
             names=[os.path.basename(d), layer, "lacks"], out=out)


def test_adapter_with_an_untargeted_layer_is_refused_by_export(voice, tmp_path, capsys):
    d = _copy_adapter(voice, tmp_path)
    _edit_config(d, _set_lora("exclude", [r"dec/ups/1"]))
    out = str(tmp_path / "merged.pth")
    _refused(capsys, ["export", voice["pth"], out, "--adapter", d], tmp_path,
             names=[os.path.basename(d), "dec.ups.1"], out=out)


# ------------------------------------------------------------------------- adapters mix


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e309", "1e40"])
def test_mix_with_a_non_finite_weight_or_result_is_refused(voice, tmp_path, capsys, weight):
    out = str(tmp_path / "mixed")
    _refused(capsys, ["adapters", "mix", f"{voice['good']}:{weight}", f"{voice['good']}:0.5", "--out", out],
             voice["root"], names=[voice["good"]], out=out)


def test_mix_function_checks_weights_and_result(voice):
    from rvclora_jax.adapters import arithmetic

    ad = adapters.load_adapter(voice["good"])
    for w in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="good"):
            arithmetic.mix([ad], [w])
    mixed = arithmetic.mix([ad, ad], [0.25, 0.75])  # the good path still works
    assert all(np.all(np.isfinite(v)) for v in lora.flatten(mixed.params).values())


# --------------------------------------------------------------- render feature files


def _npy_cases(tmp_path):
    d = tmp_path / "feat"
    d.mkdir()
    rng = np.random.default_rng(0)
    good = rng.standard_normal((10, 768)).astype(np.float32)
    cases = {}

    def put(name, arr=None, raw=None):
        p = str(d / f"{name}.npy")
        if raw is not None:
            open(p, "wb").write(raw)
        else:
            np.save(p, arr)
        cases[name] = p

    put("structured", np.zeros(10, dtype=[("a", "f4"), ("b", "f4")]))
    put("strings", np.array([["x"] * 768] * 10))
    put("empty", raw=b"")
    put("truncated", raw=open(_save_tmp(d, good), "rb").read()[:200])
    put("nan", np.where(np.arange(768) == 3, np.nan, good).astype(np.float32))
    put("int", (good * 10).astype(np.int32))
    put("zero_d", np.array(1.0, np.float32))
    put("complex", good.astype(np.complex64))
    return cases, good


def _save_tmp(d, arr):
    p = str(d / "_good.tmp.npy")
    np.save(p, arr)
    return p


def test_render_refuses_bad_feature_and_f0_files(voice, tmp_path, capsys):
    cases, good = _npy_cases(tmp_path)
    f0 = str(tmp_path / "f0.npy")
    np.save(f0, np.full(20, 150.0, np.float32))
    out = str(tmp_path / "o.wav")
    for name, path in cases.items():
        _refused(capsys, ["render", voice["pth"], "--features", path, "--f0", f0, "--out", out], tmp_path,
                 names=[path], out=out)
    feats = str(tmp_path / "good.npy")
    np.save(feats, good)
    for name, arr in {"f0nan": np.full(20, np.nan, np.float32), "f0neg": np.full(20, -5.0, np.float32),
                      "f0int": np.full(20, 150, np.int64), "f0_2d": np.ones((20, 3), np.float32)}.items():
        p = str(tmp_path / f"{name}.npy")
        np.save(p, arr)
        _refused(capsys, ["render", voice["pth"], "--features", feats, "--f0", p, "--out", out], tmp_path,
                 names=[p], out=out)


# ------------------------------------------------------------------------ training data

SR = 40000




def _first(exp, folder):
    return str(sorted((exp / folder).glob("*.npy"))[0])


def _load_all(exp):
    return D.load_items(D.scan_experiment(str(exp), version="v2", f0=True, sr=SR), SR)


BAD_CLIPS = {
    "coarse 0": ("2a_f0", lambda a: np.where(np.arange(len(a)) == 2, 0, a).astype(a.dtype), "1..255"),
    "coarse 300": ("2a_f0", lambda a: np.where(np.arange(len(a)) == 2, 300, a).astype(a.dtype), "1..255"),
    "coarse fractional": ("2a_f0", lambda a: a.astype(np.float32) + 0.5, "integer"),
    "f0 NaN": ("2b-f0nsf", lambda a: np.where(np.arange(len(a)) == 2, np.nan, a), "NaN"),
    "f0 inf": ("2b-f0nsf", lambda a: np.where(np.arange(len(a)) == 2, np.inf, a), "inf"),
    "f0 negative": ("2b-f0nsf", lambda a: a - 1000.0, "negative"),
    "f0 integer": ("2b-f0nsf", lambda a: a.astype(np.int64), "dtype"),
    "features NaN": ("3_feature768", lambda a: np.where(np.arange(a.shape[1]) == 5, np.nan, a).astype(a.dtype), "NaN"),
    "features int": ("3_feature768", lambda a: a.astype(np.int32), "dtype"),
    "features structured": ("3_feature768", lambda a: np.zeros(len(a), [("x", "f4")]), "dtype"),
    "features strings": ("3_feature768", lambda a: a.astype(str), "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLIPS))
def test_bad_training_clip_is_refused_naming_the_file(exp, case):
    folder, edit, what = BAD_CLIPS[case]
    path = _first(exp, folder)
    np.save(path, edit(np.load(path)))
    with pytest.raises(ValueError) as e:
        _load_all(exp)
    assert path in str(e.value) and what in str(e.value), str(e.value)


def test_empty_or_fifo_training_file_is_refused(exp):
    path = _first(exp, "3_feature768")
    open(path, "wb").close()
    with pytest.raises(ValueError, match=path):
        _load_all(exp)
    os.remove(path)
    os.mkfifo(path)
    with pytest.raises(ValueError, match="FIFO"):
        _load_all(exp)


def test_too_short_wav_and_bad_filelist_name_their_file(tmp_path):
    dst = tmp_path / "exp"
    shutil.copytree(D.example_dir(), dst)
    with pytest.raises(ValueError, match="short.wav"):
        D.spectrograms([np.zeros(100, np.float32)], SR, names=["short.wav"])
    fl = dst / "filelist.txt"
    fl.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="filelist.txt"):
        D.scan_experiment(str(dst), version="v2", f0=True, sr=SR)


def test_train_cli_refuses_bad_training_data_before_training(exp, tmp_path, capsys):
    """Through the real CLI: a clip with NaN f0 (and one with coarse pitch 300) stops
    ``rvclora train`` with one line naming the file, before any step runs; the run
    directory is not left behind and the experiment folder is byte-identical."""
    from rvclora_jax.cli.train import write_example_base

    base = str(tmp_path / "base_G.pth")
    write_example_base(base, 0)  # RVC's real v2 40k architecture, random weights
    out = str(tmp_path / "run")
    for folder, edit in (("2b-f0nsf", BAD_CLIPS["f0 NaN"][1]), ("2a_f0", BAD_CLIPS["coarse 300"][1])):
        path = _first(exp, folder)
        good = np.load(path)
        np.save(path, edit(good))
        _refused(capsys, ["train", "--base", base, "--data", str(exp), "--out", out, "--steps", "1",
                          "--batch-size", "2", "--no-progress"], str(exp), names=[path], out=out)
        np.save(path, good)
