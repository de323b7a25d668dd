"""``rvclora render`` and training-time samples: parity with RVC's own ``infer``, inputs,
errors, folder batches, and the samples/val_mel written by a short training run."""

import json
import os
import wave

import numpy as np
import pytest
import torch
from flax import nnx
from rvc.lib.infer_pack import models as rvc_models

from rvclora_jax import render as R
from rvclora_jax.cli.render import load_model
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S
from tests.torch_ref import assert_close, randomize_

# RVC's exact v2 48k structure, narrow channels (as tests/test_export.py NARROW)
NARROW = RVC.preset("v2", 48000).replace(inter_channels=16, hidden_channels=32, filter_channels=64,
                                       upsample_initial_channel=64, gin_channels=8, spk_embed_dim=4)
HOP = NARROW.hop_length


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_inference_pth(path, f0: bool, seed=0, cfg=NARROW):
    """A randomized RVC synthesizer saved as an RVC inference .pth (fp32 weights)."""
    cls = rvc_models.SynthesizerTrnMs768NSFsid if f0 else rvc_models.SynthesizerTrnMs768NSFsid_nono
    torch.manual_seed(seed)
    net = randomize_(cls(*cfg.to_list(), is_half=False).eval(), seed)
    w = {k: v.clone() for k, v in net.state_dict().items() if "enc_q" not in k}
    torch.save({"weight": w, "config": cfg.to_list(), "info": "test", "sr": f"{cfg.sr // 1000}k", "f0": int(f0),
                "version": "v2"}, path)
    return net


def _rvc_coarse(f0):
    """RVC ``pipeline.get_f0``'s quantisation, verbatim (numpy)."""
    f0_mel_min = 1127 * np.log(1 + 50 / 700)
    f0_mel_max = 1127 * np.log(1 + 1100 / 700)
    f0_mel = 1127 * np.log(1 + np.asarray(f0, np.float64) / 700)
    f0_mel[f0_mel > 0] = (f0_mel[f0_mel > 0] - f0_mel_min) * 254 / (f0_mel_max - f0_mel_min) + 1
    f0_mel[f0_mel <= 1] = 1
    f0_mel[f0_mel > 255] = 255
    return np.rint(f0_mel).astype(int)


def _f0_contour(n, rng):
    f0 = 150 + 80 * np.sin(np.linspace(0, 6, n)) + rng.normal(0, 5, n)
    f0[n // 3: n // 3 + 6] = 0.0  # an unvoiced stretch
    return f0


def _read_wav(path):
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767.0, w.getframerate()


def _model_file(tmp_path_factory, name, *, f0, seed):
    path = str(tmp_path_factory.mktemp(name) / f"{name}.pth")
    net = _write_inference_pth(path, f0=f0, seed=seed)
    model, _ = load_model(path, None, 1.0)
    return path, net, model


@pytest.fixture(scope="module")
def nono(tmp_path_factory):
    return _model_file(tmp_path_factory, "nono", f0=False, seed=3)


@pytest.fixture(scope="module")
def withf0(tmp_path_factory):
    return _model_file(tmp_path_factory, "f0", f0=True, seed=5)


def _cli(argv):
    """``rvclora render ...`` through the real CLI entry point."""
    from rvclora_jax import cli

    return cli.main(argv)


# ------------------------------------------------------------------------ (a), (b) parity


def test_nono_render_equals_rvc_infer_noise_off(nono, tmp_path):
    path, net, model = nono
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(23, 768)).astype(np.float32)
    inp = R.prepare_inputs(feats, None, model=model, name="x")
    got = R.render(model, [inp], sid=2, noise_scale=0.0)[0]
    phone = torch.from_numpy(np.repeat(feats, 2, 0))[None]  # RVC infer takes 100 fps features
    orig = torch.randn_like
    torch.randn_like = lambda x, *a, **k: torch.zeros_like(x)
    try:
        with torch.no_grad():
            want = net.infer(phone, torch.tensor([46]), torch.tensor([2]))[0][0, 0].numpy()
    finally:
        torch.randn_like = orig
    assert got.shape == (46 * HOP,)
    assert_close(got, want, atol=1e-4, name="render nono vs RVC infer (noise off)")

    # the CLI writes the same audio as 16-bit PCM at the model's rate
    np.save(tmp_path / "x.npy", feats)
    assert _cli(["render", path, "--features", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o.wav"),
                 "--sid", "2", "--noise-scale", "0"]) == 0
    y, sr = _read_wav(tmp_path / "o.wav")
    assert sr == 48000 and y.shape == want.shape
    assert np.abs(y - np.clip(want, -1, 1)).max() <= 1.0 / 32767 + 1e-6


def test_f0_render_matches_rvc_with_torch_noise(withf0):
    _, net, model = withf0
    rng = np.random.default_rng(1)
    T50 = 20
    feats = rng.normal(size=(T50, 768)).astype(np.float32)
    f0 = _f0_contour(2 * T50, rng)
    inp = R.prepare_inputs(feats, f0, model=model, name="x")
    T = 2 * T50
    phone = torch.from_numpy(np.repeat(feats, 2, 0))[None]
    pitch = torch.from_numpy(_rvc_coarse(f0))[None].long()
    nsff0 = torch.from_numpy(f0.astype(np.float32))[None]
    torch.manual_seed(123)
    with torch.no_grad():
        want = net.infer(phone, torch.tensor([T]), pitch, nsff0, torch.tensor([1]))[0][0, 0].numpy()
    torch.manual_seed(123)  # re-draw RVC's random numbers in order
    eps = torch.randn(1, NARROW.inter_channels, T).numpy().transpose(0, 2, 1)
    torch.rand(1, 1)  # SineGen rand_ini (zeroed for the fundamental)
    src = torch.randn(1, T * HOP, 1).numpy()
    got = R.render_arrays(model, [inp], sid=1, noise_scale=0.66666, eps=eps, source_noise=src)[0]
    # tolerance 1e-4 (measured ~1e-7 here): RVC's SineGen phase is a float32 cumsum with wrap
    # corrections, ours the closed form mod 1; they drift apart only on long inputs.
    assert_close(got, want, atol=1e-4, name="render f0 vs RVC infer (torch noise)")
    # and the same with the noise off on both sides (zero arrays: same compiled call)
    got0 = R.render_arrays(model, [inp], sid=1, eps=np.zeros_like(eps), source_noise=np.zeros_like(src))[0]
    orig = torch.randn_like
    torch.randn_like = lambda x, *a, **k: torch.zeros_like(x)
    try:
        with torch.no_grad():
            want0 = net.infer(phone, torch.tensor([T]), pitch, nsff0, torch.tensor([1]))[0][0, 0].numpy()
    finally:
        torch.randn_like = orig
    assert_close(got0, want0, atol=1e-4, name="render f0 vs RVC infer (noise off)")
    # seeded noise: deterministic per seed, different across seeds
    a = R.render(model, [inp], seed=7)[0]
    assert np.array_equal(a, R.render(model, [inp], seed=7)[0])
    assert not np.array_equal(a, R.render(model, [inp], seed=8)[0])


# ------------------------------------------------------------------------ (c) pitch


def test_coarse_pitch_matches_rvc_formula():
    f0 = np.array([0.0, 49.0, 50.0, 1100.0, 2000.0, 51.0, 100.0, 440.0, 1099.0, 0.001])
    assert np.array_equal(R.coarse_pitch(f0), _rvc_coarse(f0))
    assert R.coarse_pitch(f0).dtype == np.int32
    assert list(R.coarse_pitch([0, 49, 50, 1100, 2000])) == [1, 1, 1, 255, 255]
    f = np.linspace(0, 1500, 3001)
    assert np.array_equal(R.coarse_pitch(f), _rvc_coarse(f))


def test_f0_up_key_shifts_before_quantising():
    feats = np.zeros((5, 768), np.float32)
    f0 = np.array([0, 100, 200, 300, 400, 500, 600, 700, 800, 900.0])
    x = R.prepare_inputs(feats, f0, f0_up_key=12)
    assert np.allclose(x["pitchf"], 2 * f0)
    assert np.array_equal(x["pitch"], _rvc_coarse(2 * f0))
    x = R.prepare_inputs(feats, f0, f0_up_key=-5)
    assert np.allclose(x["pitchf"], f0 * 2 ** (-5 / 12), rtol=1e-6)


# ------------------------------------------------------------------------ (d) errors


def test_input_errors(withf0, nono, tmp_path):
    _, _, model = withf0
    feats = np.zeros((10, 768), np.float32)
    with pytest.raises(ValueError, match=r"a\.npy.*256"):
        R.prepare_inputs(np.zeros((10, 256)), np.full(20, 100.0), model=model, name="a.npy")
    with pytest.raises(ValueError, match=r"20 feature frames.*24 f0 frames"):
        R.prepare_inputs(feats, np.full(24, 100.0), model=model, name="a")
    with pytest.raises(ValueError, match=r"20 feature frames.*16 f0 frames"):
        R.prepare_inputs(feats, np.full(16, 100.0), model=model, name="a")
    x = R.prepare_inputs(feats, np.full(23, 100.0), model=model)  # ≤ 3 frames apart (RVC's own files): cut
    assert x["length"] == 20 and x["pitchf"].shape == (20,)
    x = R.prepare_inputs(feats, np.full(17, 100.0), model=model)
    assert x["length"] == 17 and x["phone"].shape == (17, 768)
    bad = np.full(20, 100.0)
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"clip7.*NaN"):
        R.prepare_inputs(feats, bad, model=model, name="clip7")
    with pytest.raises(ValueError, match=r"clip8.*f0"):
        R.prepare_inputs(feats, None, model=model, name="clip8")
    with pytest.raises(ValueError, match=r"no pitch"):
        R.prepare_inputs(feats, np.full(20, 100.0), model=nono[2])
    with pytest.raises(ValueError, match=r"speaker id 9"):
        R.render(model, [R.prepare_inputs(feats, np.full(20, 100.0))], sid=9, noise_scale=0)
    # through the file layer: the file's name is in the message
    np.save(tmp_path / "short.npy", feats)
    np.save(tmp_path / "short.wav.npy", np.full(30, 100.0))
    with pytest.raises(ValueError, match=r"short.*20 feature frames.*30 f0 frames"):
        R.collect_inputs(model, str(tmp_path / "short.npy"), str(tmp_path / "short.wav.npy"))
    with pytest.raises(ValueError, match=r"--f0"):
        R.collect_inputs(model, str(tmp_path / "short.npy"), None)


# ------------------------------------------------------------------------ (e) folders


@pytest.mark.slow  # ~20 s; single-file renders are checked against RVC by default
def test_folder_renders_in_one_batch_with_own_lengths(withf0, tmp_path, monkeypatch):
    path, _, model = withf0
    rng = np.random.default_rng(2)
    fdir, pdir, out = tmp_path / "feats", tmp_path / "f0", tmp_path / "out"
    fdir.mkdir(), pdir.mkdir()
    lens = {"a": 12, "b": 20, "c": 7}
    for i, (n, t) in enumerate(lens.items()):
        np.save(fdir / f"{n}.npy", rng.normal(size=(t, 768)).astype(np.float32))
        f0name = f"{n}.wav.npy" if i % 2 == 0 else f"{n}.npy"  # both RVC namings
        np.save(pdir / f0name, _f0_contour(2 * t - (1 if n == "b" else 0), rng))
    calls = []
    orig = R.render_arrays
    monkeypatch.setattr(R, "render_arrays", lambda m, inputs, **k: calls.append(len(inputs)) or orig(m, inputs, **k))
    assert _cli(["render", path, "--features", str(fdir), "--f0", str(pdir), "--out", str(out),
                 "--noise-scale", "0"]) == 0
    assert calls == [3]  # one batch
    for n, t in lens.items():
        y, sr = _read_wav(out / f"{n}.wav")
        frames = 2 * t - (1 if n == "b" else 0)
        assert sr == 48000 and y.shape == (frames * HOP,), n
    # every row of the padded batch equals rendering it alone (the decoder is masked per row),
    # including the shorter, padded rows; 16-bit WAV rounding is ~3e-5
    for i, n in enumerate(lens):
        f0file = pdir / (f"{n}.wav.npy" if i % 2 == 0 else f"{n}.npy")
        x = R.prepare_inputs(np.load(fdir / f"{n}.npy"), np.load(f0file), model=model)
        alone = orig(model, [x], noise_scale=0.0)[0]
        y, _ = _read_wav(out / f"{n}.wav")
        assert y.shape == alone.shape and np.abs(y - alone).max() < 1e-4, (n, np.abs(y - alone).max())


# ------------------------------------------------------------------------ (f) training samples


def test_training_run_writes_samples_and_val_mel(tmp_path):
    from rvclora_jax import adapters, lora
    from rvclora_jax.data import example_dir
    from rvclora_jax.models.discriminators import MultiPeriodDiscriminator
    from rvclora_jax.run import RunConfig, plot_losses, run, split_validation
    from rvclora_jax.train import TrainConfig
    from tests import train_worker as W

    from tests.torch_ref import load_torch_into

    cfg = W.narrow_config()  # v2 40k structure, narrow
    base = str(tmp_path / "small_G.pth")  # the base's inference file (what `render RUN_DIR` loads)
    net = _write_inference_pth(base, f0=True, seed=0, cfg=cfg)
    g = load_torch_into(S.Synthesizer(cfg, "v2", True, rngs=nnx.Rngs(0)), net)  # + random enc_q: trainable
    d = MultiPeriodDiscriminator(periods=(2, 3), channel_divisor=8, rngs=nnx.Rngs(1))
    rd = str(tmp_path / "run")
    rcfg = RunConfig(data_dir=example_dir(), run_dir=rd, lora=lora.LoRAConfig.from_preset("generator", rank=4),
                     train=TrainConfig(batch_size=2, segment_frames=8, lr=1e-3), steps=4, save_every=100,
                     log_every=1, progress=False, sample_every=2, max_shapes=1)  # one compile
    res = run(g, rcfg, discriminator=d, metadata={"base": base}, log=lambda s: None)
    assert res.step == 4 and len(res.val_items) == 1
    assert len(res.batches.items) == 7  # 8 example clips, 1 held out, not trained on
    held = res.val_items[0].wav
    assert all(it.wav != held for it in res.batches.items)
    # the trained adapter comes back in memory, equal to the one written to the run dir
    disk = adapters.load_adapter(rd)
    mem, saved = lora.flatten(res.adapter.params), lora.flatten(disk.params)
    assert mem.keys() == saved.keys() and all(np.array_equal(mem[k], saved[k]) for k in mem)
    assert (res.adapter.config, res.adapter.base_fingerprint, res.adapter.directory) == (
        disk.config, disk.base_fingerprint, rd)
    for s in (2, 4):
        for ext in ("wav", "png"):
            assert os.path.getsize(os.path.join(rd, "samples", f"step_{s:06d}.{ext}")) > 0
    y, sr = _read_wav(os.path.join(rd, "samples", "step_000004.wav"))
    assert sr == 40000 and len(y) > 0 and np.abs(y).max() > 0
    recs = [json.loads(line) for line in open(os.path.join(rd, "metrics.jsonl"))]
    vals = [r for r in recs if "val_mel" in r]
    assert [r["step"] for r in vals] == [2, 4] and all(np.isfinite(r["val_mel"]) and r["val_mel"] > 0 for r in vals)
    assert sum("mel" in r for r in recs) == 4
    plot_losses(os.path.join(rd, "metrics.jsonl"), str(tmp_path / "loss.png"))  # val records don't break it
    # the deterministic split: ≥4 clips → ≥1 held out, fewer → none
    assert split_validation(res.batches.items[:3], 0.1)[1] == []
    assert split_validation(res.batches.items, 0.1) == split_validation(res.batches.items, 0.1)

    # `render RUN_DIR`: its base (metadata["base"]) + its adapter, merged; equals the final sample
    # (rendered by the live LoRA model during training) up to 16-bit rounding
    held_item = res.val_items[0]
    out = tmp_path / "held.wav"
    assert _cli(["render", rd, "--features", held_item.feature, "--f0", held_item.pitchf, "--out", str(out),
                 "--noise-scale", "0"]) == 0
    merged, _ = _read_wav(out)
    assert merged.shape == y.shape and np.abs(merged - y).max() < 2e-4
