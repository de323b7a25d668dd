"""RMVPE port (``rvclora_jax.frontend.rmvpe``) against RVC's own ``rvc.lib.rmvpe`` (rvc==0.3.5).

The reference networks have random weights in RVC's layout (``torch.manual_seed``), with
random batch-norm affine parameters *and* running statistics, so the folding of batch
norm into the convs is exercised. Their state dicts are saved as fake ``rmvpe.pt`` files
and loaded through our loader. Random weights give arbitrary salience, so the network is
compared on salience, and the decoding separately: on identical salience against RVC's
``to_local_average_cents``/``decode``, and on synthetic salience against the closed form.

The default tests use a reduced U-Net (3 levels, 2 blocks, 1 intermediate block, 4
channels; same mel front end, same BiGRU and head); the shipped layout ``E2E(4, 1, (2, 2))``
is checked for its keys and shapes by default and numerically under ``-m slow``.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
R = pytest.importorskip("rvc.lib.rmvpe")
sf = pytest.importorskip("soundfile")

from rvclora_jax import families  # noqa: E402
from rvclora_jax.frontend import rmvpe as J  # noqa: E402
from rvclora_convert import rmvpe as loader  # noqa: E402
from rvclora_convert.pth import RVCFileError  # noqa: E402
from tests.torch_ref import randomize_batch_norms_  # noqa: E402

TINY = dict(n_blocks=2, en_de_layers=3, inter_layers=1, en_out_channels=4)
HERE = os.path.dirname(__file__)


def _speech() -> np.ndarray:
    for d in (os.path.join(HERE, "data"),):
        p = os.path.join(d, "arctic_a0007.wav")
        if os.path.exists(p):
            x, sr = sf.read(p, dtype="float32")
            assert sr == 16000
            return x
    pytest.fail("arctic_a0007.wav not found in tests/data (CMU ARCTIC clip, see tests/data/COPYING)")


def _sweep(seconds=1.5, f_lo=90.0, f_hi=420.0, sr=16000) -> np.ndarray:
    """Five harmonics (1/k amplitudes) on an exponential f0 sweep, plus a little noise."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = f_lo * (f_hi / f_lo) ** (t / seconds)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 6))
    return (0.3 * x / np.abs(x).max() + 1e-3 * np.random.default_rng(1).standard_normal(t.size)).astype(np.float32)


def _reference_e2e(seed: int, **cfg) -> "torch.nn.Module":
    torch.manual_seed(seed)
    m = R.E2E(cfg.get("n_blocks", 4), 1, (2, 2), cfg.get("en_de_layers", 5), cfg.get("inter_layers", 4), 1,
              cfg.get("en_out_channels", 16))
    return randomize_batch_norms_(m).eval()


def _rvc_rmvpe(path: str, cfg: dict, monkeypatch_ctx) -> "R.RMVPE":
    """RVC's own ``RMVPE`` (its constructor: mel extractor, strict load, cents table), with
    ``E2E(4, 1, (2, 2))`` swapped for the reduced layout so it loads the tiny file."""
    real = R.E2E

    def tiny_e2e(*_):
        monkeypatch_ctx.setattr(R, "E2E", real)  # E2E.__init__ names its own class (super(E2E, self))
        return real(cfg["n_blocks"], 1, (2, 2), cfg["en_de_layers"], cfg["inter_layers"], 1,
                    cfg["en_out_channels"])

    monkeypatch_ctx.setattr(R, "E2E", tiny_e2e)
    return R.RMVPE(path, is_half=False, device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rmvpe") / "rmvpe.pt")
    ref = _reference_e2e(0, **TINY)
    torch.save(ref.state_dict(), path)
    with pytest.MonkeyPatch.context() as mp:
        rvc = _rvc_rmvpe(path, TINY, mp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", loader.RMVPEHashWarning)
        model = loader.load_rmvpe(path)
    return dict(path=path, ref=ref, rvc=rvc, model=model, pitch=J.RMVPEPitch(model))


# ------------------------------------------------------------------ mel front end


def test_mel_filterbank_is_librosas_htk_bank():
    librosa = pytest.importorskip("librosa")
    want = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=30, fmax=8000, htk=True)
    np.testing.assert_allclose(J.mel_filterbank(), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n", [513, 1600, 16037])
def test_log_mel_matches_rvc(n):
    rng = np.random.default_rng(n)
    x = np.concatenate([_sweep(1.1)[:n // 2], 0.5 * rng.standard_normal(n - n // 2)]).astype(np.float32)
    ext = R.MelSpectrogram(False, 128, 16000, 1024, 160, None, 30, 8000)
    with torch.no_grad():
        want = ext(torch.from_numpy(x)[None], center=True).numpy()[0].T          # [T, 128]
    frames = J.n_frames(n)
    got = np.asarray(jax.jit(J.log_mel, static_argnums=1)(J.center_pad(x)[None], frames,
                                                           jnp.asarray(J.mel_filterbank()),
                                                           jnp.asarray(J.hann_window())))[0]
    assert got.shape == want.shape == (1 + n // 160, 128)
    # log domain: an absolute error is a relative error of the mel energy
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


# ------------------------------------------------------------------ network


def test_salience_matches_e2e(tiny):
    mel = (np.random.default_rng(2).standard_normal((2, 64, 128)) - 4).astype(np.float32)
    with torch.no_grad():
        want = tiny["ref"](torch.from_numpy(mel).transpose(1, 2)).numpy()
    # jitted (eager op-by-op dispatch of the whole U-Net costs ~20 s here and is not a
    # code path of RMVPEPitch, which always compiles)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(tiny["model"], jnp.asarray(mel)))
    assert got.shape == want.shape == (2, 64, 360)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def _rvc_salience(rvc, wav):
    with torch.no_grad():
        mel = rvc.mel_extractor(torch.from_numpy(wav).float().unsqueeze(0), center=True)
        return rvc.mel2hidden(mel).squeeze(0).numpy()


@pytest.mark.parametrize("signal", ["sweep", "speech"])
def test_pitch_matches_infer_from_audio(tiny, signal):
    wav = _sweep() if signal == "sweep" else _speech()
    rvc, pitch = tiny["rvc"], tiny["pitch"]
    want_sal = _rvc_salience(rvc, wav)
    got_sal = pitch.salience(wav)
    assert got_sal.shape == want_sal.shape == (1 + len(wav) // 160, 360)
    np.testing.assert_allclose(got_sal, want_sal, atol=2e-5, rtol=0)
    want = rvc.infer_from_audio(wav, thred=0.03)
    got = pitch(wav)
    assert got.dtype == np.float32 and got.shape == want.shape == (1 + len(wav) // 160,)
    # identical salience decodes identically; near-identical salience may only move a
    # frame whose two best bins are within the salience error of each other
    top2 = np.sort(want_sal, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    assert clear.mean() > 0.9
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-5)
    np.testing.assert_allclose(pitch.decode(want_sal), want, rtol=1e-6)


def test_batch_matches_rvc_per_clip(tiny):
    """Clips of different lengths in one batch, all padded to the longest one's bucket (far
    past their own multiple of 32 frames), give RVC's per-clip result: the per-clip masks,
    the backward GRU's start and the mel padding. Shapes are chosen to reuse the programs
    compiled above (bucket 448 at batch 1); the first batch of 3 has a filler row (batch
    axis bucketed to 4) that must not disturb the others."""
    speech = _speech()
    lengths = [64000, 800, 46100, 5000]  # 401, 6, 289, 32 frames: own multiples of 32 are 416, 32, 320, 32
    wavs = [speech[:n] for n in lengths]
    pitch, rvc = tiny["pitch"], tiny["rvc"]
    seen = []
    sal = pitch.batch_salience(wavs, batch_size=3, progress=seen.append)
    assert seen == [3, 1]
    for w, s in zip(wavs, sal):
        want = _rvc_salience(rvc, w)
        assert s.shape == want.shape == (1 + len(w) // 160, 360)
        np.testing.assert_allclose(s, want, atol=2e-5, rtol=0)
    f0 = pitch.batch(wavs[:1])[0]
    np.testing.assert_allclose(f0, pitch.decode(sal[0]), rtol=1e-6)
    # a clip of exactly 32 frames alone: its bucket is its own length (no spare frame)
    assert J.bucket_frames(J.n_frames(5119)) == J.n_frames(5119) == 32
    np.testing.assert_allclose(pitch.salience(speech[:5119]), _rvc_salience(rvc, speech[:5119]), atol=2e-5, rtol=0)


# ------------------------------------------------------------------ decoding


def _closed_form_cents(sal_row, thred):
    c = int(np.argmax(sal_row))
    ks = [k for k in range(c - 4, c + 5) if 0 <= k < 360]
    w = np.array([sal_row[k] for k in ks], np.float64)
    cents = np.array([20 * k + 1997.3794084376191 for k in ks])
    return 0.0 if sal_row.max() <= thred else float((w * cents).sum() / w.sum())


def test_decoding_closed_form_and_rvc():
    sal = np.zeros((7, 360), np.float32)
    sal[0, 100] = 0.9                                   # one bin: exactly its cents
    sal[1, 200], sal[1, 199], sal[1, 201] = 0.8, 0.4, 0.4  # symmetric: still bin 200
    sal[2, 50], sal[2, 51], sal[2, 47] = 0.6, 0.3, 0.1   # asymmetric window
    sal[3, 0], sal[3, 1], sal[3, 2] = 0.7, 0.5, 0.2      # left edge: only real bins count
    sal[4, 359], sal[4, 355], sal[4, 300] = 0.5, 0.25, 0.45  # right edge; 300 is outside the window
    sal[5, 120] = 0.03                                   # at the threshold: unvoiced (<=)
    sal[6, 120], sal[6, 10] = 0.031, 0.02                # just above: voiced, 10 is far away
    cents = J.to_local_average_cents(sal, 0.03)
    want = np.array([_closed_form_cents(r, 0.03) for r in sal])
    np.testing.assert_allclose(cents, want, rtol=1e-7)  # RVC sums the float32 weights in float32
    assert cents[0] == pytest.approx(20 * 100 + 1997.3794084376191)
    assert cents[1] == pytest.approx(20 * 200 + 1997.3794084376191)
    assert cents[5] == 0.0
    f0 = J.cents_to_hz(cents)
    np.testing.assert_allclose(f0[cents > 0], 10 * 2 ** (cents[cents > 0] / 1200))
    assert f0[5] == 0.0
    # RVC's own decoder on the same salience
    rvc = R.RMVPE.__new__(R.RMVPE)
    rvc.cents_mapping = np.pad(20 * np.arange(360) + 1997.3794084376191, (4, 4))
    np.testing.assert_allclose(cents, rvc.to_local_average_cents(sal, thred=0.03), rtol=1e-12)
    np.testing.assert_allclose(f0, rvc.decode(sal, thred=0.03), rtol=1e-12)
    # random salience (every frame voiced at 0.03, peaks anywhere)
    rnd = np.random.default_rng(3).random((500, 360)).astype(np.float32) ** 8
    np.testing.assert_allclose(J.to_local_average_cents(rnd, 0.03), rvc.to_local_average_cents(rnd, 0.03),
                               rtol=1e-12)


@pytest.mark.parametrize("n", [513, 1000, 16000, 16159, 16160, 33333])
def test_frame_count_is_rvcs(n):
    assert J.n_frames(n) == 1 + n // 160
    assert J.padded_frames(J.n_frames(n)) % 32 == 0
    b = J.bucket_frames(J.n_frames(n))
    assert b % 32 == 0 and J.padded_frames(J.n_frames(n)) <= b <= 1.25 * J.padded_frames(J.n_frames(n))


# ------------------------------------------------------------------ loader and family


def test_loader_hash_warning(tiny, monkeypatch):
    with pytest.warns(loader.RMVPEHashWarning, match="not the official rmvpe.pt"):
        loader.load_rmvpe_state_dict(tiny["path"])
    monkeypatch.setattr(loader, "OFFICIAL_SHA256", loader.sha256_of(tiny["path"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.load_rmvpe_state_dict(tiny["path"])


def test_family_detects_config_and_paths_are_torch_keys(tiny):
    sd = {k: v.numpy() for k, v in tiny["ref"].state_dict().items() if not k.endswith("num_batches_tracked")}
    spec = families.detect(sd)
    assert spec.family == "rmvpe" and spec.config == J.RMVPEConfig(**TINY)
    layout = J.torch_layout(families.get("rmvpe").abstract(spec))
    assert sorted(tk for tk, _, _ in layout.values()) == sorted(sd)
    for fp, (tk, _, _) in layout.items():  # paths read as the torch keys
        assert fp.rsplit("/", 1)[0] == tk.rsplit(".", 1)[0].replace(".", "/")


def test_real_layout_keys_and_shapes():
    """The shipped ``E2E(4, 1, (2, 2))``: 741 tensors; every one maps onto the port's
    structure (traced with nnx.eval_shape, nothing initialised)."""
    sd = R.E2E(4, 1, (2, 2)).state_dict()
    assert len(sd) == 741
    sd = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    spec = families.detect(sd)
    assert spec.config == J.RMVPEConfig()
    abstract = families.get("rmvpe").abstract(spec)
    from rvclora_jax.tree import flatten
    shapes = {p: v.shape for p, v in flatten(nnx.to_pure_dict(nnx.state(abstract))).items()}
    layout = J.torch_layout(abstract)
    assert len(layout) == len(sd) == len(shapes)
    for fp, (tk, to_flax, to_torch) in layout.items():
        assert to_flax(sd[tk]).shape == shapes[fp], tk
        assert to_torch(np.zeros(shapes[fp])).shape == sd[tk].shape, tk


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


def test_loader_errors_name_the_file(tiny, tmp_path):
    sd = tiny["ref"].state_dict()
    gen = {"weight": {"enc_p.emb_phone.weight": torch.zeros(192, 768)}, "config": [1] * 18, "version": "v2"}
    cases = {
        "voice.pth": (gen, "RVC voice model"),
        "list.pt": ([torch.zeros(3)], "top level is a list"),
        "hubert.pt": ({"model": {"encoder.layers.0.fc1.weight": torch.zeros(2, 2)}, "cfg": {}}, "fairseq"),
        "other.pt": ({"foo.weight": torch.zeros(3, 3)}, "not RMVPE's rmvpe.pt"),
        "missing.pt": ({k: v for k, v in sd.items() if k != "cnn.bias"}, "cnn.bias"),
        "shape.pt": ({**sd, "fc.1.bias": torch.zeros(7)}, "fc.1.bias"),
    }
    for name, (obj, needle) in cases.items():
        p = _save(tmp_path / name, obj)
        with pytest.raises(RVCFileError) as e:
            loader.load_rmvpe(p, check_hash=False)
        msg = str(e.value)
        assert msg.startswith(p) and needle in msg and "\n" not in msg, (name, msg)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RVCFileError, match="garbage.pt"):
        loader.load_rmvpe(str(garbage))


def test_wrapped_state_dict_and_dtype(tiny, tmp_path):
    """``{"model": state_dict}`` loads too; a bfloat16 compute dtype stays close."""
    p = _save(tmp_path / "wrapped.pt", {"model": tiny["ref"].state_dict()})
    m = loader.load_rmvpe(p, check_hash=False, dtype=jnp.bfloat16)
    mel = (np.random.default_rng(2).standard_normal((2, 64, 128)) - 4).astype(np.float32)
    with torch.no_grad():
        want = tiny["ref"](torch.from_numpy(mel).transpose(1, 2)).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(m, jnp.asarray(mel)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.05)


# ------------------------------------------------------------------ shipped layout (slow)


@pytest.mark.slow
def test_real_layout_parity(tmp_path):
    path = str(tmp_path / "rmvpe.pt")
    ref = _reference_e2e(1)
    torch.save(ref.state_dict(), path)
    del ref
    rvc = R.RMVPE(path, is_half=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", loader.RMVPEHashWarning)
        pitch = J.RMVPEPitch(loader.load_rmvpe(path))
    for wav in (_sweep(1.0), _speech()[:24000]):
        want_sal = _rvc_salience(rvc, wav)
        got_sal = pitch.salience(wav)
        np.testing.assert_allclose(got_sal, want_sal, atol=5e-5, rtol=0)
        want, got = rvc.infer_from_audio(wav, thred=0.03), pitch(wav)
        top2 = np.sort(want_sal, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2e-4
        np.testing.assert_allclose(got[clear], want[clear], rtol=1e-5)
