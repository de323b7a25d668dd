"""The whole front end into an experiment folder: RVC's own loaders
(``rvc.lib.train.data_utils.TextAudioLoaderMultiNSFsid`` and the nono ``TextAudioLoader``)
and ours read it; pitch is WORLD harvest (checked against pyworld called directly) and its
coarse values RVC's formula; re-running skips finished work by content hash, continues an
interrupted run and follows changed recordings; bad recordings are one-line skips.

Content features come from a stand-in (a deterministic function of the 16 kHz audio with
RVC's frame count), so these tests do not depend on the HuBERT port."""

import json
import os
import shutil
import types

import numpy as np
import pytest
import soundfile as sf
from scipy.io import wavfile

from rvclora_jax.data import load_items, scan_experiment
from rvclora_jax.frontend.pitch import harvest
from rvclora_jax.frontend.prepare import MANIFEST, prepare

from tests.speech import speech_file  # noqa: E402


def stand_in_features(dim):
    """[F(N), dim] with F(N) = (N − 400) // 320 + 1 (RVC's HuBERT frames); each frame a
    function of its 400-sample window."""
    proj = np.random.default_rng(7).standard_normal((400, dim)).astype(np.float32) / 20

    def features(wav16k):
        n = (len(wav16k) - 400) // 320 + 1
        frames = np.lib.stride_tricks.sliding_window_view(np.asarray(wav16k, np.float32), 400)[::320][:n]
        return frames @ proj

    features.__name__ = f"stand_in_{dim}"
    return features


class Counting:
    def __init__(self, fn, fail_after=None):
        self.fn, self.calls, self.fail_after = fn, 0, fail_after

    def __call__(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # an interrupted run
        self.calls += 1
        return self.fn(x)


class Batched:
    """A stand-in with the JAX extractors' ``batch(list)`` method."""

    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, x):
        return self.fn(x)

    def batch(self, wavs):
        self.sizes.append(len(wavs))
        return [self.fn(w) for w in wavs]


def cheap_pitch(wav16k):  # for the runs that test layout, not pitch
    return np.full(1 + len(wav16k) // 160, 150.0)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    a, sr = sf.read(speech_file("arctic_a0007.wav"), dtype="float32")
    b, _ = sf.read(speech_file("arctic_a0009.wav"), dtype="float32")
    shutil.copy(speech_file("arctic_a0007.wav"), d / "a.wav")  # 16 kHz int16 mono
    from scipy.signal import resample_poly

    b44 = resample_poly(b, 441, 160)
    st = np.stack([b44, 0.6 * b44], 1)
    sf.write(d / "b.flac", st, 44100, subtype="PCM_24")  # stereo 24-bit at 44.1 kHz
    (d / "c_notes.txt").write_text("not a recording\n")
    (d / "d_empty.wav").write_bytes(b"")
    sf.write(d / "e_silent.wav", np.zeros(2 * sr, np.float32), sr)
    return d


@pytest.fixture(scope="module")
def exp(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "exp"
    msgs = []
    pitch = Counting(harvest)
    res = prepare(str(raw), str(out), sr="40k", version="v2", f0_method="harvest", pitch_fn=pitch,
                  features_fn=stand_in_features(768), mute=True, progress=False, report=msgs.append)
    return types.SimpleNamespace(out=str(out), res=res, msgs=msgs, pitch=pitch)


def test_layout_and_values(exp):
    out, res = exp.out, exp.res
    names = res.items
    assert names and all(n.split("_")[0] in ("0", "1") for n in names)  # a.wav -> 0_*, b.flac -> 1_*
    for k, n in enumerate(names):
        rate, w = wavfile.read(f"{out}/0_gt_wavs/{n}.wav")
        r16, w16 = wavfile.read(f"{out}/1_16k_wavs/{n}.wav")
        assert (rate, r16, w.dtype, w16.dtype) == (40000, 16000, np.float32, np.float32)
        assert abs(len(w16) - len(w) * 0.4) <= 1
        hz = np.load(f"{out}/2b-f0nsf/{n}.wav.npy")
        if k == 0:  # pitch: pyworld's harvest + stonemask with RVC's training settings, called here directly
            import importlib

            pw = importlib.import_module("rvclora_jax.frontend.pitch")._pyworld()
            x = w16.astype(np.float64)
            f0, t = pw.harvest(x, fs=16000, f0_ceil=1100.0, f0_floor=50.0, frame_period=10.0)
            np.testing.assert_array_equal(hz, pw.stonemask(x, f0, t, 16000))
        assert hz.dtype == np.float64 and len(hz) == 1 + len(w16) // 160
        mel = 1127 * np.log(1 + hz / 700)
        lo, hi = 1127 * np.log(1 + 50 / 700), 1127 * np.log(1 + 1100 / 700)
        q = np.where(mel > 0, (mel - lo) * 254 / (hi - lo) + 1, mel)
        q[q <= 1] = 1
        q[q > 255] = 255
        np.testing.assert_array_equal(np.load(f"{out}/2a_f0/{n}.wav.npy"), np.rint(q).astype(int))
        feat = np.load(f"{out}/3_feature768/{n}.npy")
        assert feat.shape == ((len(w16) - 400) // 320 + 1, 768) and feat.dtype == np.float32
    lines = open(f"{out}/filelist.txt").read().split("\n")
    assert len(lines) == len(names) + 2 and sum("/mute/" in ln for ln in lines) == 2
    assert all(ln.count("|") == 4 and ln.endswith("|0") and os.path.isabs(ln.split("|")[0]) for ln in lines)
    mute_wav = wavfile.read(f"{out}/mute/0_gt_wavs/mute40k.wav")[1]
    assert mute_wav.dtype == np.int16 and len(mute_wav) == 120000 and not mute_wav.any()
    assert np.load(f"{out}/mute/3_feature768/mute.npy").shape == (149, 768)
    assert np.load(f"{out}/mute/2a_f0/mute.wav.npy").tolist() == [1] * 301


def test_bad_recordings_are_named(exp, raw):
    skipped = exp.res.skipped
    for name, why in [("c_notes.txt", "not a readable audio file"), ("d_empty.wav", "empty file"),
                      ("e_silent.wav", "silent")]:
        hit = [m for m in skipped if m.startswith(str(raw / name))]
        assert len(hit) == 1 and why in hit[0] and "\n" not in hit[0], skipped
    assert len(exp.msgs) == len(skipped) == 3


def rvc_hparams(sr):
    import rvc

    cfg = json.load(open(os.path.join(os.path.dirname(rvc.__file__), "configs", "v1", f"{sr // 1000}k.json")))
    return types.SimpleNamespace(**cfg["data"])


def test_rvc_loader_reads_it(exp, tmp_path):
    torch = pytest.importorskip("torch")
    from rvc.lib.train.data_utils import TextAudioCollateMultiNSFsid, TextAudioLoaderMultiNSFsid

    out = str(tmp_path / "copy")
    shutil.copytree(exp.out, out)  # RVC writes .spec.pt files beside the wavs
    filelist = os.path.join(out, "filelist.txt")
    text = open(filelist).read().replace(exp.out, out)
    open(filelist, "w").write(text)
    ds = TextAudioLoaderMultiNSFsid(filelist, rvc_hparams(40000))
    assert len(ds) == len(exp.res.items) + 2
    items = [ds[i] for i in range(len(ds))]
    for spec, wav, phone, pitch, pitchf, sid in items:
        assert phone.shape[1] == 768 and phone.shape[0] == spec.shape[1] == pitch.shape[0] == pitchf.shape[0]
        assert wav.shape[1] >= spec.shape[1] * 400 and int(sid) == 0
        assert pitch.min() >= 1 and pitch.max() <= 255 and torch.isfinite(pitchf).all()
    batch = TextAudioCollateMultiNSFsid()(items)
    assert batch[0].shape[0] == len(items)

    # ours: the same items, with the same frame counts
    ours = scan_experiment(out, version="v2", f0=True, sr=40000)
    assert len(ours) == len(ds)
    for it, ref in zip(load_items(ours[:2]), items):  # (each wav length compiles a spectrogram)
        assert it["phone"].shape == tuple(ref[2].shape)
        np.testing.assert_array_equal(it["pitch"], ref[3].numpy())


def test_rerun_skips_everything(exp, raw):
    pitch = Counting(harvest)
    feats = Counting(stand_in_features(768))
    before = {f: os.path.getmtime(os.path.join(exp.out, "0_gt_wavs", f)) for f in os.listdir(f"{exp.out}/0_gt_wavs")}
    res = prepare(str(raw), exp.out, sr=40000, f0_method="harvest", pitch_fn=pitch, features_fn=feats,
                  features_key="stand_in_768", mute=True, progress=False, report=lambda m: None)
    assert pitch.calls == 0 and feats.calls == 0
    assert res.done == {"preprocess": 0, "f0": 0, "features": 0}
    assert res.reused["f0"] == len(exp.res.items) and res.items == exp.res.items
    assert len(res.skipped) == 3  # still reported on every run, never silently dropped
    assert before == {f: os.path.getmtime(os.path.join(exp.out, "0_gt_wavs", f)) for f in before}


def test_interrupted_run_continues_and_follows_changes(raw, tmp_path, monkeypatch):
    import rvclora_jax.frontend.prepare as prep

    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    out = str(tmp_path / "exp")
    kw = dict(sr=40000, version="v1", f0_method="cheap", features_fn=stand_in_features(256), progress=False,
              report=lambda m: None)
    # Ctrl-C between the two wavs of a piece: the next run removes the half-written piece
    writes, real_write = [], prep.write_wav

    def interrupted_write(path, x, rate):
        if len(writes) == 3:
            raise KeyboardInterrupt
        writes.append(path)
        return real_write(path, x, rate)

    monkeypatch.setattr(prep, "write_wav", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), out, pitch_fn=cheap_pitch, **kw)
    monkeypatch.setattr(prep, "write_wav", real_write)
    assert len(os.listdir(f"{out}/0_gt_wavs")) == 2 and len(os.listdir(f"{out}/1_16k_wavs")) == 1
    res0 = prepare(str(src), out, pitch_fn=cheap_pitch, **kw)
    assert sorted(f[:-4] for f in os.listdir(f"{out}/0_gt_wavs")) == sorted(res0.items)
    assert sorted(f[:-4] for f in os.listdir(f"{out}/1_16k_wavs")) == sorted(res0.items)
    shutil.rmtree(out)
    first = Counting(cheap_pitch, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), out, pitch_fn=first, **kw)
    again = Counting(cheap_pitch)
    res = prepare(str(src), out, pitch_fn=again, **kw)
    n = len(res.items)
    assert n >= 2 and res.reused["preprocess"] == n and res.reused["f0"] == 1 and again.calls == n - 1
    # a recording changes: only its pieces are redone; one leaves: its pieces go
    a, sr = sf.read(src / "a.wav", dtype="float32")
    sf.write(src / "a.wav", 0.5 * a, sr)
    again = Counting(cheap_pitch)
    res2 = prepare(str(src), out, pitch_fn=again, **kw)
    n_a = sum(1 for x in res2.items if x.startswith("0_"))
    assert again.calls == n_a == res2.done["preprocess"]
    os.unlink(src / "b.flac")
    res3 = prepare(str(src), out, pitch_fn=cheap_pitch, **kw)
    assert all(x.startswith("0_") for x in res3.items)
    assert not [f for f in os.listdir(f"{out}/0_gt_wavs") if f.startswith("1_")]
    assert not [f for f in os.listdir(f"{out}/3_feature256") if f.startswith("1_")]
    # a recording sorted before the others shifts every idx0: names follow RVC's numbering
    shutil.copy(src / "a.wav", src / "0_first.wav")
    res5 = prepare(str(src), out, pitch_fn=cheap_pitch, **kw)
    assert {x.split("_")[0] for x in res5.items} == {"0", "1"} and res5.done["preprocess"] == len(res5.items)
    assert sorted(f[:-4] for f in os.listdir(f"{out}/0_gt_wavs")) == sorted(res5.items)
    # another setting (piece length) redoes everything
    res4 = prepare(str(src), out, pitch_fn=cheap_pitch, per=3.0, **kw)
    assert res4.reused["preprocess"] == 0
    man = json.load(open(os.path.join(out, MANIFEST)))
    assert man["settings"]["per"] == 3.0


def test_nono_and_applio(raw, tmp_path):
    from rvc.lib.train.data_utils import TextAudioLoader

    out = str(tmp_path / "nono")
    feats = Batched(stand_in_features(256))
    res = prepare(str(raw), out, sr="48k", version="v1", f0=False, features_fn=feats, batch_size=2,
                  mute=True, progress=False, report=lambda m: None)
    assert feats.sizes and max(feats.sizes) == 2 and sum(feats.sizes) == len(res.items)
    for n in res.items:  # batched = one at a time
        w16 = wavfile.read(f"{out}/1_16k_wavs/{n}.wav")[1]
        np.testing.assert_array_equal(np.load(f"{out}/3_feature256/{n}.npy"), feats.fn(w16))
    assert not os.path.exists(f"{out}/2a_f0")
    ds = TextAudioLoader(os.path.join(out, "filelist.txt"), rvc_hparams(48000))
    assert len(ds) == len(res.items) + 2
    for spec, wav, phone, sid in (ds[i] for i in range(len(ds))):
        assert phone.shape == (spec.shape[1], 256)
    assert len(scan_experiment(out, version="v1", f0=False, sr=48000)) == len(ds)

    out = str(tmp_path / "applio")
    res = prepare(str(raw), out, sr=40000, layout="applio", speaker_id=3, pitch_fn=Batched(cheap_pitch),
                  features_fn=stand_in_features(768), progress=False, report=lambda m: None)
    for d in ("sliced_audios", "sliced_audios_16k", "f0", "f0_voiced", "extracted"):
        assert sorted(os.listdir(f"{out}/{d}")) and all(f.startswith("3_") for f in os.listdir(f"{out}/{d}"))
    os.unlink(f"{out}/filelist.txt")  # Applio's trainer reads folders; so can ours
    items = scan_experiment(out, version="v2", f0=True, sr=40000)
    assert len(items) == len(res.items) and {it.sid for it in items} == {3}
    assert json.load(open(f"{out}/model_info.json"))["total_dataset_duration"] > 3


def test_refuses_foreign_experiment(raw, tmp_path):
    out = tmp_path / "rvc_made"
    (out / "0_gt_wavs").mkdir(parents=True)
    (out / "0_gt_wavs" / "0_0.wav").write_bytes(b"x")
    with pytest.raises(ValueError, match="did not make"):
        prepare(str(raw), str(out), pitch_fn=cheap_pitch, features_fn=stand_in_features(768), progress=False)
    with pytest.raises(ValueError, match="no usable recordings"):
        empty = tmp_path / "empty_raw"
        empty.mkdir()
        (empty / "x.txt").write_text("x")
        prepare(str(empty), str(tmp_path / "o"), pitch_fn=cheap_pitch, features_fn=stand_in_features(768),
                progress=False, report=lambda m: None)


def test_cli(raw, tmp_path, monkeypatch, capsys):
    from rvclora_jax.cli import main
    from rvclora_jax.cli import prepare as cli_prepare

    hubert = tmp_path / "hubert_base.pt"
    hubert.write_bytes(b"stand-in")
    from rvclora_jax.frontend import pitch as pitch_mod

    monkeypatch.setattr(cli_prepare, "content_features", lambda path, output: stand_in_features(768))
    monkeypatch.setitem(pitch_mod.PITCH_METHODS, "harvest", lambda path: cheap_pitch)  # harvest is tested above
    out = str(tmp_path / "exp")
    rc = main(["prepare", str(raw), "--out", out, "--sr", "40k", "--f0-method", "harvest", "--hubert", str(hubert),
               "--no-progress", "--per", "3.0"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "pieces ready" in cap.out and "d_empty.wav: empty file" in cap.err
    assert len(scan_experiment(out, version="v2", f0=True, sr=40000)) >= 2
    # bad invocations: one line naming the file or flag, exit 2, nothing computed
    for argv, want in [([], "--hubert"), (["--hubert", str(tmp_path / "missing.pt")], "missing.pt"),
                       (["--hubert", str(hubert), "--f0-method", "rmvpe"], "--f0-model"),
                       (["--hubert", str(hubert), "--f0-method", "rmvpe", "--f0-model", str(tmp_path / "no.pt")],
                        "no.pt")]:
        rc = main(["prepare", str(raw), "--out", str(tmp_path / "bad"), "--no-progress"] + argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and want in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "bad")
    # `rvclora train --data` can tell recordings from an experiment
    assert cli_prepare.is_recordings_folder(str(raw)) and not cli_prepare.is_recordings_folder(out)


def test_coarse_and_methods():
    from rvclora_jax.frontend.pitch import coarse, pitch_method

    f0 = np.concatenate([[0.0, 49.9, 50.0, 100.0, 220.0, 440.0, 1000.0, 1100.0, 5000.0],
                         np.linspace(0, 1500, 20001)])
    mel = 1127 * np.log(1 + f0 / 700)
    lo, hi = 1127 * np.log(1 + 50 / 700), 1127 * np.log(1 + 1100 / 700)
    q = mel.copy()
    q[q > 0] = (q[q > 0] - lo) * 254 / (hi - lo) + 1
    q[q <= 1] = 1
    q[q > 255] = 255
    got = coarse(f0)
    np.testing.assert_array_equal(got, np.rint(q).astype(int))
    assert got[:9].tolist() == [1, 1, 1, 20, 60, 122, 238, 255, 255]
    with pytest.raises(ValueError, match="unknown f0 method"):
        pitch_method("crepe")
    with pytest.raises(ValueError, match="no model file"):
        pitch_method("harvest", "rmvpe.pt")


def test_cli_output_never_an_input_nor_a_foreign_folder(raw, tmp_path, capsys):
    """`rvclora prepare --out` equal to the --hubert folder, inside it, or an existing
    non-empty folder that no prepare run made: one line, before any work, nothing written
    (an earlier prepare run is continued instead: test_rerun_skips_everything)."""
    import hashlib

    from rvclora_jax.cli import main

    hub = tmp_path / "hubert"
    hub.mkdir()
    (hub / "config.json").write_text("{}")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep\n")

    def snapshot():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                for d in (raw, hub, foreign) for p in sorted(d.rglob("*")) if p.is_file()}

    before = snapshot()
    for out, needle in [(hub, "is also an input"), (hub / "config.json", "is part of the input"),
                        (foreign, "exists and is not empty")]:
        rc = main(["prepare", str(raw), "--out", str(out), "--f0-method", "harvest", "--hubert", str(hub),
                   "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, (out, err)
    assert snapshot() == before
