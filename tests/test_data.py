"""Training data: scanning, RVC loader parity, fixed-shape batching, errors."""

from __future__ import annotations

import os
import shutil
import types
import warnings

import numpy as np
import pytest
from scipy.io import wavfile

from rvclora_jax import data as D

SR = 40000
HOP = 400


@pytest.fixture(scope="module")
def items():
    return D.scan_experiment(D.example_dir(), version="v2", f0=True, sr=SR)


@pytest.fixture(scope="module")
def loaded(items):
    return D.load_items(items, SR)




def test_example_folder_is_small_and_complete(items):
    ex = D.example_dir()
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ex) for f in fs)
    assert total < 3_000_000
    assert D.detect_layout(ex) == "rvc"
    assert 8 <= len(items) <= 12
    assert all(it.sid == 0 and it.sr == SR and it.pitch and it.pitchf for it in items)
    # filelist (relative paths) and folder scan agree
    names = sorted(it.name for it in items)
    assert names == sorted(it.name for it in D.scan_experiment(ex, use_filelist=False))


def test_loader_alignment_rules(items, loaded):
    for it, d in zip(items, loaded):
        feat = np.load(it.feature)
        sr, wav = wavfile.read(it.wav)
        frames = len(wav) // HOP
        m = min(2 * len(feat), frames, 900)
        assert d["phone"].shape == (m, 768) and d["phone"].dtype == np.float32
        np.testing.assert_array_equal(d["phone"], np.repeat(feat, 2, axis=0)[:m])
        np.testing.assert_array_equal(d["pitch"], np.load(it.pitch)[:m])
        np.testing.assert_array_equal(d["pitchf"], np.load(it.pitchf)[:m].astype(np.float32))
        assert d["spec"].shape == (m, 1025)
        if m != frames:  # cut to the shorter: wave to m·hop
            assert d["wave"].shape == (m * HOP,)
        np.testing.assert_array_equal(d["wave"], wav[: len(d["wave"])])
        # the batched spectrogram equals the per-file one
        np.testing.assert_allclose(D.load_item(it, SR)["spec"], d["spec"], atol=1e-5)


def test_parity_with_rvc_loader(tmp_path, items, loaded):
    import torch  # the reference must be there: never skip
    import rvc.lib.train.data_utils as du
    root = tmp_path / "rvc"
    shutil.copytree(D.example_dir(), root)
    lines = []
    for it in items:
        rel = [os.path.relpath(p, D.example_dir()) for p in (it.wav, it.feature, it.pitch, it.pitchf)]
        lines.append("|".join(str(root / r) for r in rel) + "|0")
    # an extra item whose phone length equals the spec frame count (RVC's no-cut branch)
    it0 = items[1]
    frames = it0.num_samples // HOP
    feat = np.load(it0.feature)
    feat = np.concatenate([feat, feat[-1:].repeat(frames, 0)])[: (frames + 1) // 2]
    np.save(root / "3_feature768" / "nocut.npy", feat)
    lines.append("|".join([str(root / "0_gt_wavs/1_0.wav"), str(root / "3_feature768/nocut.npy"),
                           str(root / "2a_f0/1_0.wav.npy"), str(root / "2b-f0nsf/1_0.wav.npy"), "0"]))
    (root / "filelist.txt").write_text("\n".join(lines) + "\n")
    hp = types.SimpleNamespace(max_wav_value=32768.0, sampling_rate=SR, filter_length=2048, hop_length=HOP,
                               win_length=2048, training_files=str(root / "filelist.txt"))
    ref = du.TextAudioLoaderMultiNSFsid(hp.training_files, hp)
    ours = D.scan_experiment(root, sr=SR)
    assert len(ref) == len(ours) == len(items) + 1
    mine = D.load_items(ours, SR)
    for k in range(len(ref)):
        spec, wav, phone, pitch, pitchf, sid = ref[k]
        d = mine[k]
        np.testing.assert_array_equal(d["phone"], phone.numpy())
        np.testing.assert_array_equal(d["pitch"], pitch.numpy())
        np.testing.assert_array_equal(d["pitchf"], pitchf.numpy())
        np.testing.assert_array_equal(d["wave"], wav.numpy()[0])
        np.testing.assert_allclose(d["spec"], spec.numpy().T, atol=1e-4, rtol=0)
        assert d["sid"] == int(sid[0])
    assert mine[-1]["wave"].shape == (it0.num_samples,)  # no cut: the whole wav, like RVC
    assert isinstance(spec, torch.Tensor)


def test_batches_fixed_shapes_deterministic_resumable(items, loaded):
    b = D.make_batches(items, 3, 32, seed=7, data=loaded)
    assert set(b.shapes) <= set(D.DEFAULT_BUCKETS) and len(b.shapes) <= 2
    epoch = list(b.iterate(0))
    assert len(epoch) == len(b)
    seen = set()
    for x in epoch:
        B, T = x["pitch"].shape
        assert B == 3 and T in b.shapes
        assert x["phone"].shape == (B, T, 768) and x["phone"].dtype == np.float32
        assert x["spec"].shape == (B, T, 1025) and x["wave"].shape == (B, T * HOP)
        for k in ("phone_lengths", "spec_lengths", "wave_lengths", "sid", "pitch"):
            assert x[k].dtype == np.int32
        np.testing.assert_array_equal(x["phone_lengths"], x["spec_lengths"])
        np.testing.assert_array_equal(x["wave_lengths"], x["spec_lengths"] * HOP)
        assert (np.diff(x["spec_lengths"]) <= 0).all()  # longest first, like RVC's collate
        for r in range(B):  # zero padding past each length
            n = x["spec_lengths"][r]
            assert not x["spec"][r, n:].any() and not x["pitch"][r, n:].any()
            assert x["spec_lengths"][r] >= 32
            seen.add(int(n))
    assert len(seen) >= 4
    # determinism and resume
    again = list(b.iterate(0))
    for x, y in zip(epoch, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    tail = list(b.iterate(0, start=1))
    assert len(tail) == len(epoch) - 1
    for x, y in zip(epoch[1:], tail):
        np.testing.assert_array_equal(x["spec"], y["spec"])
    other = [p[1] for p in b.plan(1)]
    assert other != [p[1] for p in b.plan(0)] or other != [p[1] for p in b.plan(2)]
    # prefetch gives the same stream
    got = list(D.prefetch(b.iterate(0), size=2))
    assert len(got) == len(epoch)
    np.testing.assert_array_equal(got[-1]["phone"], epoch[-1]["phone"])


def test_batches_drop_short_and_drop_last(items, loaded):
    with pytest.warns(UserWarning, match="0_0.wav"):
        b = D.make_batches(items, 2, 100, seed=0, data=loaded, last="drop", buckets=50)
    assert all(i.name != "0_0" for i in b.items)
    assert len(b) == sum(len(v) // 2 for v in b.groups.values())
    assert all(T % 50 == 0 for T in b.shapes)


def test_prefetch_forwards_errors():
    def gen():
        yield 1
        raise RuntimeError("boom")
    it = D.prefetch(gen())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)


def test_applio_layout(tmp_path, items):
    root = tmp_path / "applio"
    for d in ("sliced_audios", "f0", "f0_voiced", "extracted"):
        (root / d).mkdir(parents=True)
    for k, it in enumerate(items[:4]):
        stem = f"{k % 2}_{k}_0"
        shutil.copy(it.wav, root / "sliced_audios" / f"{stem}.wav")
        shutil.copy(it.feature, root / "extracted" / f"{stem}.npy")
        shutil.copy(it.pitch, root / "f0" / f"{stem}.wav.npy")
        shutil.copy(it.pitchf, root / "f0_voiced" / f"{stem}.wav.npy")
    (root / "model_info.json").write_text('{"embedder_model": "contentvec", "speakers_id": 2}')
    assert D.detect_layout(root) == "applio"
    got = D.scan_experiment(root, version="v2", sr=SR)
    assert [(g.name, g.sid) for g in got] == [("0_0_0", 0), ("0_2_0", 0), ("1_1_0", 1), ("1_3_0", 1)]
    assert D.model_info(root)["speakers_id"] == 2
    d = D.load_item(got[2], SR)  # 1_1_0 is items[1]
    ref = D.load_item(items[1], SR)
    for k in ("phone", "pitch", "pitchf", "spec", "wave"):
        np.testing.assert_array_equal(d[k], ref[k])
    assert d["sid"] == 1


def test_filelist_moved_experiment_and_mute_lines(exp, items):
    lines = []
    for it in items[:3]:  # absolute paths of a folder that no longer exists
        rel = [os.path.relpath(p, D.example_dir()) for p in (it.wav, it.feature, it.pitch, it.pitchf)]
        lines.append("|".join("/gone/logs/x/" + r for r in rel) + "|0")
    lines.append("/gone/logs/mute/0_gt_wavs/mute40k.wav|/gone/logs/mute/3_feature768/mute.npy|"
                 "/gone/logs/mute/2a_f0/mute.wav.npy|/gone/logs/mute/2b-f0nsf/mute.wav.npy|0")
    (exp / "filelist.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="mute"):
        got = D.scan_experiment(exp, sr=SR)
    assert [g.name for g in got] == [it.name for it in items[:3]]
    assert all(g.wav.startswith(str(exp)) for g in got)


def test_int16_wav_is_scaled(tmp_path):
    x = (np.sin(np.arange(8000) / 10) * 16384).astype(np.int16)
    wavfile.write(tmp_path / "a.wav", SR, x)
    np.testing.assert_allclose(D.read_wav(str(tmp_path / "a.wav")), x / 32768.0)
    wavfile.write(tmp_path / "z.wav", SR, np.zeros(800, np.int16))  # RVC's mute: zeros either way
    assert not D.read_wav(str(tmp_path / "z.wav")).any()


# ------------------------------------------------------------------------------ errors


def test_error_empty_folder(tmp_path):
    for d in ("0_gt_wavs", "2a_f0", "2b-f0nsf", "3_feature768"):
        (tmp_path / d).mkdir()
    with pytest.raises(ValueError, match="0_gt_wavs"):
        D.scan_experiment(tmp_path, sr=SR)
    with pytest.raises((ValueError, FileNotFoundError), match="nothing_here"):
        D.scan_experiment(tmp_path / "nothing_here", sr=SR)


def test_error_wav_without_f0(exp):
    os.remove(exp / "2a_f0" / "3_0.wav.npy")
    with pytest.raises(FileNotFoundError, match=r"2a_f0.3_0\.wav\.npy"):
        D.scan_experiment(exp, sr=SR)
    with pytest.warns(UserWarning, match="3_0"):
        got = D.scan_experiment(exp, sr=SR, strict=False)
    assert "3_0" not in [g.name for g in got] and len(got) == 7


def test_error_wrong_feature_dim(exp):
    np.save(exp / "3_feature768" / "2_0.npy", np.zeros((50, 256), np.float32))
    with pytest.raises(ValueError, match=r"2_0\.npy"):
        D.scan_experiment(exp, version="v2", sr=SR)
    with pytest.raises(FileNotFoundError, match="3_feature256"):
        D.scan_experiment(exp, version="v1", sr=SR)


def test_error_wrong_sample_rate(exp):
    sr, x = wavfile.read(exp / "0_gt_wavs" / "5_0.wav")
    wavfile.write(exp / "0_gt_wavs" / "5_0.wav", 48000, x)
    with pytest.raises(ValueError, match=r"5_0\.wav"):
        D.scan_experiment(exp, sr=SR)
    with pytest.raises(ValueError, match=r"5_0\.wav"):
        D.read_wav(str(exp / "0_gt_wavs" / "5_0.wav"), SR)


def test_spec_disk_cache(tmp_path, items):
    cache = tmp_path / "cache"
    a = D.load_items(items[:2], SR, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = D.load_items(items[:2], SR, cache_dir=str(cache))
    np.testing.assert_array_equal(a[0]["spec"], b[0]["spec"])
