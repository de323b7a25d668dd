"""The JAX FCPE port against torchfcpe 0.0.4 itself, on its real bundled weights
(``torchfcpe/assets/fcpe_c_v001.pt``) and real speech (two CMU ARCTIC clips,
``tests/data/``): the mel front end, the network's raw output (salience), and f0 as
RVC's ``fcpe`` method computes it (``infer(x, sr=16000, decoder_mode="local_argmax",
threshold=0.006)``). The f0 agreement (cents over frames voiced on both sides) and the
voicing agreement are printed.

torchfcpe imports torchaudio, which cannot be installed with torch 2.13; the
stand-in from ``tests/torchaudio_stub.py`` is installed first (its Resample only allows
16 kHz → 16 kHz, so every clip is resampled with soxr beforehand, once, for both sides).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from tests import torchaudio_stub

torchaudio_stub.install()
torch = pytest.importorskip("torch")
try:
    torchfcpe = pytest.importorskip("torchfcpe")
finally:
    torchaudio_stub.remove()  # only while torchfcpe is imported (see the stub's docstring)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402
from flax import nnx  # noqa: E402

from rvclora_convert.fcpe import BUNDLED_SHA256, FCPEFileError, bundled_checkpoint, load_fcpe, read_fcpe  # noqa: E402
from rvclora_convert.pth import RVCFileError  # noqa: E402
from rvclora_jax import families  # noqa: E402
from rvclora_jax.families.fcpe import FCPE_FAMILY  # noqa: E402
from rvclora_jax.frontend.fcpe import (FCPEPitch, RVC_THRESHOLD, decode, mel_filterbank,  # noqa: E402
                                       nearest_resize)
from rvclora_jax.tree import flatten  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
CLIPS = ("arctic_a0007.wav", "arctic_a0009.wav")
ASSET = pathlib.Path(torchfcpe.__file__).parent / "assets" / "fcpe_c_v001.pt"


def load_16k(path: pathlib.Path) -> np.ndarray:
    """A clip as float32 mono at 16 kHz (soxr VHQ when the file has another rate)."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != 16000:
        x = soxr.resample(x, sr, 16000, quality="VHQ").astype(np.float32)
    return x


@pytest.fixture(scope="module")
def ref():
    # torchfcpe's own factory, as RVC (rtrvc.py) and Applio call it.
    return torchfcpe.spawn_bundled_infer_model(device="cpu")


@pytest.fixture(scope="module")
def model():
    return load_fcpe(ASSET)


@pytest.fixture(scope="module")
def pitch(model):
    return FCPEPitch(model)


@pytest.fixture(scope="module")
def pitch512(model):
    # Buckets of 512 frames: both clips (401 and 310 frames) share one batch.
    return FCPEPitch(model, bucket=512)


@pytest.fixture(scope="module")
def clips():
    return {name: load_16k(DATA / name) for name in CLIPS}


def _torch_side(ref, x: np.ndarray) -> dict[str, np.ndarray]:
    """RVC's call, plus the mel and salience it computed on the way (caught with hooks,
    so each clip runs through torchfcpe once)."""
    seen = {}
    hooks = [ref.model.input_stack.register_forward_pre_hook(
                 lambda mod, args: seen.__setitem__("mel", args[0].transpose(-1, -2).clone())),
             ref.model.output_proj.register_forward_hook(
                 lambda mod, args, out: seen.__setitem__("logits", out.clone()))]
    try:
        with torch.no_grad():
            f0 = ref.infer(torch.from_numpy(x)[None], sr=16000, decoder_mode="local_argmax", threshold=0.006)
    finally:
        for h in hooks:
            h.remove()
    return {"f0": f0[0, :, 0].numpy(), "mel": seen["mel"][0].numpy(),
            "salience": torch.sigmoid(seen["logits"])[0].numpy()}


@pytest.fixture(scope="module")
def torch_out(ref, clips):
    return {name: _torch_side(ref, x) for name, x in clips.items()}


@pytest.fixture(scope="module")
def jax_out(pitch, pitch512, clips):
    out = {}
    both = pitch512.analyse_batch(list(clips.values()))  # one program, the shorter clip padded
    for (name, x), (f0, mel, sal) in zip(clips.items(), both):
        out[name] = {"f0": f0, "mel": mel, "salience": sal, "f0_single": pitch(x)}  # alone, 64-frame buckets
    return out


def f0_agreement(f0: np.ndarray, f0_ref: np.ndarray) -> dict[str, float]:
    both = (f0 > 0) & (f0_ref > 0)
    cents = 1200.0 * np.abs(np.log2(f0[both].astype(np.float64) / f0_ref[both]))
    return {"voicing_pct": 100.0 * float(np.mean((f0 > 0) == (f0_ref > 0))),
            "voiced_frames": int(both.sum()), "frames": int(f0.size),
            "median": float(np.median(cents)), "p95": float(np.percentile(cents, 95)),
            "max": float(np.max(cents))}


# ----------------------------------------------------------------------------- mel


@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [(16000, 1024, 128, 0, 8000), (22050, 2048, 80, 30, 11025)])
def test_mel_filterbank_is_librosas(sr, n_fft, n_mels, fmin, fmax):
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(sr, n_fft, n_mels, float(fmin), float(fmax))
    theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)  # bit for bit


@pytest.mark.parametrize("name", CLIPS)
def test_mel_matches_torchfcpe(name, clips, torch_out, jax_out, capsys):
    ours, theirs = jax_out[name]["mel"], torch_out[name]["mel"]
    assert ours.shape == theirs.shape == (clips[name].size // 160 + 1, 128)
    err = np.abs(ours - theirs)
    with capsys.disabled():
        print(f"\n[fcpe] {name}: log-mel |Δ| max {err.max():.2e}, mean {err.mean():.2e} "
              f"(values {theirs.min():.1f}..{theirs.max():.1f})")
    assert err.max() < 1e-3 and err.mean() < 1e-5


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("name", CLIPS)
def test_salience_matches_torchfcpe(name, torch_out, jax_out, capsys):
    ours, theirs = jax_out[name]["salience"], torch_out[name]["salience"]
    assert ours.shape == theirs.shape and ours.shape[1] == 360
    err = np.abs(ours - theirs)
    with capsys.disabled():
        print(f"\n[fcpe] {name}: salience (end to end, each side its own mel) |Δ| max {err.max():.2e}, "
              f"mean {err.mean():.2e}")
    assert err.max() < 1e-4


def test_network_on_the_same_mel(model, ref, torch_out):
    # The network alone, on torchfcpe's own mel (0.4 s of it). Eager mode is checked on
    # the tiny layout below (it is slow at this size).
    mel = torch_out[CLIPS[1]]["mel"][100:140]
    with torch.no_grad():
        theirs = ref.model(torch.from_numpy(mel)[None])[0].numpy()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(mel)[None]))[0]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- f0


@pytest.mark.parametrize("name", CLIPS)
def test_f0_matches_torchfcpe_on_real_speech(name, clips, torch_out, jax_out, capsys):
    ours, theirs = jax_out[name]["f0"], torch_out[name]["f0"]
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (clips[name].size // 160 + 1,)
    stats = f0_agreement(ours, theirs)
    with capsys.disabled():
        print(f"\n[fcpe] {name}: voicing agreement {stats['voicing_pct']:.2f}% of {stats['frames']} frames; "
              f"f0 |Δ| over {stats['voiced_frames']} frames voiced on both sides: median "
              f"{stats['median']:.4f}, p95 {stats['p95']:.4f}, max {stats['max']:.4f} cents")
    assert stats["voiced_frames"] > 0.3 * stats["frames"]   # real speech: the test compares something
    assert stats["voicing_pct"] >= 99.5
    assert stats["p95"] < 0.05 and stats["max"] < 1.0      # 1 cent = 0.06 % of the frequency
    assert np.all(ours[ours <= 0] == 0) and np.all(theirs[theirs <= 0] == 0)  # unvoiced is exactly 0


@pytest.mark.parametrize("decoder", ["local_argmax", "argmax"])
@pytest.mark.parametrize("threshold", [0.006, 0.05])
def test_decoders_on_real_salience(decoder, threshold, ref, model, torch_out):
    # torchfcpe's two cents decoders on its own salience of real speech.
    sal = np.concatenate([torch_out[n]["salience"] for n in CLIPS])
    fn = ref.model.latent2cents_local_decoder if decoder == "local_argmax" else ref.model.latent2cents_decoder
    with torch.no_grad():
        theirs = ref.model.cent_to_f0(fn(torch.from_numpy(sal)[None], threshold=threshold))[0, :, 0].numpy()
    ours = np.asarray(decode(jnp.asarray(sal), model.cent_table[...], threshold=threshold, decoder=decoder))
    assert 0.1 < np.mean(theirs > 0) < 1.0  # both voiced and unvoiced frames
    np.testing.assert_array_equal(ours > 0, theirs > 0)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=0)


def test_batch_is_exact(jax_out):
    # A clip's f0 does not depend on what it is batched with or how far it is padded
    # (the input GroupNorm normalises over the whole clip: padding stays out of it).
    for name in CLIPS:
        np.testing.assert_allclose(jax_out[name]["f0"], jax_out[name]["f0_single"], rtol=1e-5, atol=0)


SHORT = (100, 160, 400, 433, 1000, 16077)


def test_short_and_odd_lengths_in_one_batch(ref, pitch, clips):
    # Short clips take torchfcpe's other branches: zero padding instead of reflect
    # (N <= 432) and the repeated last frame; all of them go through one batch here.
    xs = [clips[CLIPS[0]][12000:12000 + n].copy() for n in SHORT]
    for n, x, (f0, mel, sal) in zip(SHORT, xs, pitch.analyse_batch(xs)):
        theirs = _torch_side(ref, x)
        assert f0.shape == theirs["f0"].shape == (n // 160 + 1,), n
        np.testing.assert_allclose(mel, theirs["mel"], rtol=0, atol=1e-3, err_msg=f"N={n}")
        np.testing.assert_allclose(sal, theirs["salience"], rtol=0, atol=1e-4, err_msg=f"N={n}")
        both = (f0 > 0) & (theirs["f0"] > 0)
        assert np.mean((f0 > 0) == (theirs["f0"] > 0)) >= 0.9, n
        np.testing.assert_allclose(f0[both], theirs["f0"][both], rtol=1e-4, err_msg=f"N={n}")


def test_torchfcpe_infer_options(ref, model, clips):
    # The options other callers pass (f0_min/f0_max clipping, interp_uv, a target length:
    # e.g. Applio's F0Extractor), on the same real speech.
    x = clips[CLIPS[1]]
    target = x.size // 160 + 7
    with torch.no_grad():
        theirs = ref.infer(torch.from_numpy(x)[None], sr=16000, decoder_mode="local_argmax", threshold=0.006,
                           f0_min=50, f0_max=300, interp_uv=True,
                           output_interp_target_length=target)[0, :, 0].numpy()
    ours = FCPEPitch(model, f0_min=50, f0_max=300, interp_uv=True)(x, target_length=target)
    assert ours.shape == theirs.shape == (target,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
    assert ours.max() <= 300


@pytest.mark.parametrize("n_in,n_out", [(401, 408), (310, 300), (5, 17), (17, 5), (100, 100)])
def test_nearest_resize_is_torch_interpolate(n_in, n_out):
    x = np.arange(n_in, dtype=np.float32)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=n_out, mode="nearest")
    np.testing.assert_array_equal(nearest_resize(x, n_out), theirs[0, 0].numpy())


def test_rvc_settings(pitch):
    # RVC (rtrvc.py) and Applio (predictors/f0.py): local_argmax, threshold 0.006, and
    # no f0_min/f0_max post-processing (frames below 50 Hz are kept as FCPE gives them).
    assert RVC_THRESHOLD == 0.006
    assert pitch.threshold == 0.006 and pitch.decoder == "local_argmax"
    assert pitch.f0_max is None and pitch.interp_uv is False
    silence = pitch(np.zeros(16000, np.float32))  # the shape of the short-clip batch's 1 s clip: no compile
    assert silence.shape == (101,) and np.all(silence == 0)


# ----------------------------------------------------------------------------- loader and family


def test_bundled_checkpoint_is_found():
    import hashlib

    assert pathlib.Path(bundled_checkpoint()) == ASSET
    assert hashlib.sha256(ASSET.read_bytes()).hexdigest() == BUNDLED_SHA256


def test_family_paths_are_the_state_dict_keys():
    spec, sd, buffers = read_fcpe(ASSET)
    assert spec.family == "fcpe" and spec.kind == "fcpe"
    assert (spec.config.hidden_dims, spec.config.n_layers, spec.config.out_dims, spec.config.n_mels) == (512, 6, 360, 128)
    assert families.detect(sd).family == "fcpe"  # the registry finds the family from the keys alone
    abstract = FCPE_FAMILY.abstract(spec)
    paths = set(flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))
    keys = {k.replace(".weight_g", ".weight").replace(".weight_v", ".weight") for k in sd}
    leaf = {"kernel": "weight", "weight": "weight", "bias": "bias"}
    assert {p.rsplit("/", 1)[0].replace("/", ".") + "." + leaf[p.rsplit("/", 1)[1]] for p in paths} == keys
    assert set(buffers) == {"cent_table", "gaussian_blurred_cent_mask"}
    with torch.no_grad():
        ckpt = torch.load(ASSET, map_location="cpu", weights_only=True)
    np.testing.assert_array_equal(buffers["cent_table"], ckpt["model"]["cent_table"].numpy())


def _tiny_fcpe_sd(layers=1) -> dict:
    sd = {"input_stack.0.weight": torch.zeros(8, 4, 3), "output_proj.weight_v": torch.zeros(10, 8),
          "output_proj.weight_g": torch.ones(10, 1)}
    for i in range(layers):
        sd[f"net.encoder_layers.{i}.conformer.net.2.weight"] = torch.zeros(32, 8, 1)
        sd[f"net.encoder_layers.{i}.conformer.net.4.conv.weight"] = torch.zeros(16, 1, 31)
    return sd


def _config(**model) -> dict:
    return {"mel": {"sr": 16000, "num_mels": 4, "n_fft": 1024, "win_size": 1024, "hop_size": 160, "fmin": 0,
                    "fmax": 8000},
            "model": {"type": "CFNaiveMelPE", "out_dims": 10, "hidden_dims": 8, "n_layers": 1, "n_heads": 2,
                      "f0_min": 32.7, "f0_max": 1975.5, "use_fa_norm": True, "conv_only": True, **model}}


@pytest.mark.parametrize("case,needle", [
    ("rvc-inference", "RVC inference model"),
    ("rvc-base", "the rvc family"),
    ("garbage", "PyTorch checkpoint"),
    ("empty", "empty"),
    ("missing", "not found"),
    ("no-config", "config_dict' missing"),
    ("attention", "conv_only is not true"),
    ("config-mismatch", "config_dict.model.n_layers is 2"),
    ("code", "Python objects"),
])
def test_wrong_files_get_one_line_errors(case, needle, tmp_path):
    path = tmp_path / f"{case}.pt"
    if case == "rvc-inference":
        torch.save({"weight": {"enc_p.emb_phone.weight": torch.zeros(4, 768)}, "config": [0] * 18, "sr": "40k"},
                   path)
    elif case == "rvc-base":
        torch.save({"model": {"enc_p.emb_phone.weight": torch.zeros(192, 768), "emb_g.weight": torch.zeros(1, 256),
                              "enc_p.emb_pitch.weight": torch.zeros(256, 192)}}, path)
    elif case == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 10)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "no-config":
        torch.save({"model": _tiny_fcpe_sd()}, path)
    elif case == "attention":
        torch.save({"model": _tiny_fcpe_sd(), "config_dict": _config(conv_only=False)}, path)
    elif case == "config-mismatch":
        torch.save({"model": _tiny_fcpe_sd(), "config_dict": _config(n_layers=2)}, path)
    elif case == "code":
        torch.save({"model": _tiny_fcpe_sd(), "config_dict": _config(), "extra": os.stat_result((0,) * 10)}, path)
    with pytest.raises(FCPEFileError) as info:
        load_fcpe(path)
    msg = str(info.value)
    assert isinstance(info.value, RVCFileError)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert needle in msg, msg


# ----------------------------------------------------------------------------- random weights, tiny layout


@pytest.fixture(scope="module")
def tiny():
    """torchfcpe's CFNaiveMelPE in a tiny conv-only configuration with randomised weights
    (weight-norm magnitudes away from ‖v‖, non-zero biases and norms), and its port."""
    from torchfcpe.models import CFNaiveMelPE

    from rvclora_convert.state_dict import torch_to_flax
    from tests.torch_ref import randomize_

    torch.manual_seed(0)
    ref_model = CFNaiveMelPE(input_channels=6, out_dims=20, hidden_dims=8, n_layers=2, n_heads=2,
                             use_fa_norm=True, conv_only=True).eval()
    randomize_(ref_model, seed=1)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if "norm" in name or name.startswith("input_stack.1"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape) if name.endswith("weight") else 0.2 * torch.randn(p.shape))
    sd = {k: v.detach().numpy().copy() for k, v in ref_model.state_dict().items()}
    buffers = ("cent_table", "gaussian_blurred_cent_mask")
    spec = FCPE_FAMILY.detect({k: v for k, v in sd.items() if k not in buffers}, {})
    params = torch_to_flax(FCPE_FAMILY.abstract(spec), sd, ignore=buffers)
    return ref_model, FCPE_FAMILY.materialize(spec, params), spec, params


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_tiny_random_layout_matches_torch(tiny, use_jit):
    ref_model, model, spec, _ = tiny
    assert (spec.config.n_mels, spec.config.hidden_dims, spec.config.n_layers, spec.config.out_dims) == (6, 8, 2, 20)
    mel = np.random.default_rng(0).standard_normal((2, 37, 6)).astype(np.float32)
    with torch.no_grad():
        theirs = ref_model(torch.from_numpy(mel)).numpy()
    run = nnx.jit(lambda m, x: m(x)) if use_jit else (lambda m, x: m(x))
    ours = np.asarray(run(model, jnp.asarray(mel)))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.cent_table[...]), ref_model.cent_table.numpy(), rtol=0, atol=2e-3)


def test_tiny_masked_batch_is_each_clip_alone(tiny):
    # Two clips of different lengths in one zero-padded batch, with the mask, give what
    # torch gives for each clip on its own.
    ref_model, model, _, _ = tiny
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((30, 6)).astype(np.float32), rng.standard_normal((19, 6)).astype(np.float32)
    batch = np.zeros((2, 30, 6), np.float32)
    batch[0], batch[1, :19] = a, b
    mask = np.arange(30)[None] < np.array([[30], [19]])
    ours = np.asarray(nnx.jit(lambda m, x, k: m(x, k))(model, jnp.asarray(batch), jnp.asarray(mask)))
    with torch.no_grad():
        ta, tb = (ref_model(torch.from_numpy(x)[None])[0].numpy() for x in (a, b))
    np.testing.assert_allclose(ours[0], ta, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours[1, :19], tb, rtol=0, atol=1e-5)


def test_tiny_dtypes_and_eval_shape(tiny):
    _, _, spec, params = tiny
    shaped = FCPE_FAMILY.abstract(spec, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(shaped, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in leaves)
    model = FCPE_FAMILY.materialize(spec, params, dtype=jnp.bfloat16)  # bf16 compute, fp32 params
    y = nnx.jit(lambda m, x: m(x))(model, jnp.ones((1, 12, 6), jnp.float32))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 12, 20) and bool(jnp.all(jnp.isfinite(y)))
