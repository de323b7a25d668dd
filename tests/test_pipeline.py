"""``rvclora_jax.pipeline`` against RVC's own ``rvc.modules.vc.pipeline.Pipeline.pipeline``
(rvc==0.3.5), end to end on real speech, with the same random-weight models on both sides:

* HuBERT: a small ``transformers.HubertModel`` (hubert-base's conv geometry, 768-d so the
  synthesizers take its features, 10 layers so RVC's v1 layer 9 is not the last one, with
  a 768→256 ``final_proj``), wrapped in fairseq's ``extract_features`` / ``final_proj``
  interface for RVC; the same weights loaded into the JAX port from the HF folder.
* Synthesizers: RVC's torch classes with narrow channels and random weights, converted.
* RMVPE: RVC's ``RMVPE`` class on a reduced random ``E2E``, set as ``model_rmvpe``; the
  same file loaded into the JAX port. Harvest: pyworld on both sides.
* Index: faiss IVF-Flat written by faiss, read by faiss (RVC) and by our reader.
* Noise off on both sides: RVC's prior and NSF noise (``torch.randn_like``) patched to 0.

The x_* values are shrunk on both sides (pad 0.25 s, query 0.25 s, centre 1 s, max 1.25 s)
so a 4 s clip takes RVC's split-point path (3 splits) cheaply; a 1 s clip is not split.
RVC's module imports parselmouth and torchcrepe, which are not installed: stand-ins are
put in ``sys.modules`` for the import (neither is called: no pm/crepe here).

Tolerance: int16 samples within TOL_LSB, and SNR > 60 dB (what the README quotes).
"""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
faiss = pytest.importorskip("faiss")
sf = pytest.importorskip("soundfile")
pytest.importorskip("scipy")

from flax import nnx  # noqa: E402

from rvclora_convert import rmvpe as rmvpe_loader  # noqa: E402
from rvclora_convert.hubert import load_hubert  # noqa: E402
from rvclora_jax import pipeline as P  # noqa: E402
from rvclora_jax import retrieval  # noqa: E402
from rvclora_jax.families.rvc import RVC  # noqa: E402
from rvclora_jax.frontend import pitch as pitch_mod  # noqa: E402
from rvclora_jax.frontend import rmvpe as J  # noqa: E402
from rvclora_jax.frontend.hubert import ContentFeatures  # noqa: E402
from rvclora_jax.models import synthesizer as S  # noqa: E402
from tests.speech import speech_file  # noqa: E402
from tests.torch_ref import load_torch_into, randomize_, randomize_batch_norms_  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL_LSB = 4          # max |Δ| on int16 samples
MIN_SNR_DB = 60.0
X = dict(x_pad=0.25, x_query=0.25, x_center=1.5, x_max=1.75)
# One compiled shape per network: every chunk here is < 128 HuBERT frames (< 2.56 s). The
# default buckets differ only in how much padding they add, which both networks mask.
HUBERT_BUCKET = lambda t: max(t, 128)  # noqa: E731
SYNTH_BUCKET = lambda t: max(t, 256)  # noqa: E731
TINY_RMVPE = dict(n_blocks=2, en_de_layers=3, inter_layers=1, en_out_channels=4)
# RVC's v2 48k / v1 40k structures (upsampling, flow, NSF), narrow, with fewer text-encoder
# layers and one resblock kernel (a third of the runtime; the full structures are covered by
# the synthesizer's own parity tests)
NARROW = dict(inter_channels=16, hidden_channels=32, filter_channels=64, upsample_initial_channel=64,
              gin_channels=8, spk_embed_dim=3, n_layers=2, resblock_kernel_sizes=(3,),
              resblock_dilation_sizes=((1, 3, 5),))
V2 = RVC.preset("v2", 48000).replace(**NARROW)
V1 = RVC.preset("v1", 40000).replace(**NARROW)


# --------------------------------------------------------------------------- RVC's side


class FairseqHubert(torch.nn.Module):
    """An HF HubertModel behind fairseq's interface, as RVC's ``Pipeline.vc`` calls it:
    ``extract_features(source, padding_mask, output_layer)[0]`` is the output of layer
    ``output_layer`` (1-based; fairseq runs all layers of a shallower model), ``final_proj``."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.final_proj = hf, hf.final_proj

    def extract_features(self, source, padding_mask=None, output_layer=None):
        assert padding_mask is None or not bool(padding_mask.any())  # RVC's mask is all False
        hs = self.hf(source, output_hidden_states=True).hidden_states
        n = len(hs) - 1
        return hs[n if output_layer is None else min(int(output_layer), n)], None


class HubertModelWithFinalProj(transformers.HubertModel):
    def __init__(self, config):
        super().__init__(config)
        self.final_proj = torch.nn.Linear(config.hidden_size, config.classifier_proj_size)


def _rvc_pipeline_module():
    """Import RVC's pipeline with stand-ins for the two trackers it imports but we never
    call (parselmouth, torchcrepe) and pyworld's compiled module (its __init__ needs the
    removed pkg_resources)."""
    stubs = {"parselmouth": types.ModuleType("parselmouth"), "torchcrepe": types.ModuleType("torchcrepe")}
    try:
        import pyworld  # noqa: F401
    except ImportError:
        stubs["pyworld"] = pitch_mod._pyworld()
    with pytest.MonkeyPatch.context() as mp:
        for name, mod in stubs.items():
            if name not in sys.modules:
                mp.setitem(sys.modules, name, mod)
        sys.modules.pop("rvc.modules.vc.pipeline", None)
        import rvc.modules.vc.pipeline as rp
        # keep the names the module bound at import; drop the stand-ins from sys.modules
    return rp


def _rvc_pipe(rp, tgt_sr, rmvpe=None):
    cfg = types.SimpleNamespace(x_pad=1, x_query=1, x_center=1, x_max=1, is_half=False, device="cpu")
    pipe = rp.Pipeline(tgt_sr, cfg)
    # RVC's x_* are whole seconds; set its sample counts directly to the shrunk values
    pipe.t_pad = int(16000 * X["x_pad"])
    pipe.t_pad_tgt = int(tgt_sr * X["x_pad"])
    pipe.t_pad2 = 2 * pipe.t_pad
    pipe.t_query = int(16000 * X["x_query"])
    pipe.t_center = int(16000 * X["x_center"])
    pipe.t_max = int(16000 * X["x_max"])
    if rmvpe is not None:
        pipe.model_rmvpe = rmvpe
    return pipe


def _noise_off():
    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "randn_like", lambda x, *a, **k: torch.zeros_like(x))
    return mp


# --------------------------------------------------------------------------- fixtures


def _speech(name, seconds=None):
    x, sr = sf.read(speech_file(name), dtype="float32")
    assert sr == 16000
    x = x if seconds is None else x[: int(seconds * sr)]
    peak = np.abs(x).max() / 0.95  # vc_single's peak limit
    return (x / peak if peak > 1 else x).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    hf_cfg = transformers.HubertConfig(
        hidden_size=768, num_hidden_layers=3, num_attention_heads=12, intermediate_size=64,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16,
        classifier_proj_size=256)
    hf = HubertModelWithFinalProj(hf_cfg).eval()
    with torch.no_grad():  # HF initialises norms to (1, 0): random gains and biases
        g = torch.Generator().manual_seed(1)
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    hf.save_pretrained(str(d / "hubert"))
    jhubert = load_hubert(d / "hubert")

    # RMVPE: RVC's class on a reduced random E2E (as tests/test_rmvpe.py)
    from rvc.lib import rmvpe as R

    torch.manual_seed(0)
    e2e = R.E2E(TINY_RMVPE["n_blocks"], 1, (2, 2), TINY_RMVPE["en_de_layers"], TINY_RMVPE["inter_layers"], 1,
                TINY_RMVPE["en_out_channels"])
    randomize_batch_norms_(e2e).eval()
    long_wav, short_wav = _speech("arctic_a0007.wav"), _speech("arctic_a0009.wav", 1.0)
    # Random weights give every frame about the same peak salience (all voiced, so protect
    # would have nothing to do): shift the output bias so the median frame of the long clip
    # sits at RVC's 0.03 threshold and about half the frames are unvoiced.
    mel = R.MelSpectrogram(False, 128, 16000, 1024, 160, None, 30, 8000)(torch.from_numpy(long_wav)[None],
                                                                          center=True)
    n = mel.shape[-1]
    with torch.no_grad():
        sal = e2e(torch.nn.functional.pad(mel, (0, -n % 32)))[0, :n].double()
        peak_logit = torch.logit(sal).max(1).values.median()
        e2e.fc[1].bias.add_(float(np.log(0.03 / 0.97)) - float(peak_logit))
    rpath = str(d / "rmvpe.pt")
    torch.save(e2e.state_dict(), rpath)
    real = R.E2E
    with pytest.MonkeyPatch.context() as mp:
        def tiny_e2e(*_):
            mp.setattr(R, "E2E", real)
            c = TINY_RMVPE
            return real(c["n_blocks"], 1, (2, 2), c["en_de_layers"], c["inter_layers"], 1, c["en_out_channels"])

        mp.setattr(R, "E2E", tiny_e2e)
        rvc_rmvpe = R.RMVPE(rpath, is_half=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rmvpe_loader.RMVPEHashWarning)
        jrmvpe = J.RMVPEPitch(rmvpe_loader.load_rmvpe(rpath))

    # indexes from the same HuBERT on other speech (as RVC's train_index, on the features
    # of the training set): the rest of a0009, through the torch model (no extra compile)
    idx_src = torch.from_numpy(_speech("arctic_a0009.wav")[16000:])[None]
    indexes = {}
    fhub = FairseqHubert(hf).eval()
    for version in ("v1", "v2"):
        with torch.no_grad():
            h = fhub.extract_features(idx_src, None, 9 if version == "v1" else 12)[0]
            feats = (fhub.final_proj(h) if version == "v1" else h)[0].numpy()
        n_ivf = min(int(16 * np.sqrt(len(feats))), len(feats) // 39)
        ix = faiss.index_factory(feats.shape[1], f"IVF{n_ivf},Flat")
        faiss.extract_index_ivf(ix).nprobe = 1
        ix.train(feats)
        ix.add(feats)
        path = str(d / f"added_IVF{n_ivf}_Flat_nprobe_1_test_{version}.index")
        faiss.write_index(ix, path)
        indexes[version] = path
    return dict(hf=fhub, jhubert=jhubert, rvc_rmvpe=rvc_rmvpe, jrmvpe=jrmvpe,
                long=long_wav, short=short_wav, index=indexes, rp=_rvc_pipeline_module())


_SYNTHS = {}


def _synth(version, f0, seed):
    key = (version, f0, seed)
    if key not in _SYNTHS:
        from rvc.lib.infer_pack import models as M

        cls = {("v1", True): M.SynthesizerTrnMs256NSFsid, ("v1", False): M.SynthesizerTrnMs256NSFsid_nono,
               ("v2", True): M.SynthesizerTrnMs768NSFsid, ("v2", False): M.SynthesizerTrnMs768NSFsid_nono}[
            (version, f0)]
        cfg = V1 if version == "v1" else V2
        torch.manual_seed(seed)
        net = randomize_(cls(*cfg.to_list(), is_half=False).eval(), seed)
        jnet = load_torch_into(S.Synthesizer(cfg, version, f0, rngs=nnx.Rngs(0)), net)
        _SYNTHS[key] = (net, jnet, cfg.sr)
    return _SYNTHS[key]


def _rvc_convert(world, net, tgt_sr, wav, *, name, version, f0, method, index, sid, opts):
    rp = world["rp"]
    pipe = _rvc_pipe(rp, tgt_sr, world["rvc_rmvpe"])
    mp = _noise_off()
    try:
        with torch.no_grad():
            return pipe.pipeline(world["hf"], net, sid, wav.copy(), name, {"npy": 0, "f0": 0, "infer": 0},
                                 opts["f0_up_key"], method, index or "", opts["index_rate"], int(f0),
                                 opts["filter_radius"], tgt_sr, opts["resample_sr"], opts["rms_mix_rate"],
                                 version, opts["protect"])
    finally:
        mp.undo()


def _compare(got, want, name):
    assert got.dtype == np.int16 and want.dtype == np.int16
    assert got.shape == want.shape, f"{name}: {got.shape} samples, RVC {want.shape}"
    d = np.abs(got.astype(np.int64) - want.astype(np.int64))
    sig = np.sum(want.astype(np.float64) ** 2)
    snr = 10 * np.log10(sig / max(np.sum(d.astype(np.float64) ** 2), 1e-12))
    print(f"[parity] {name}: {want.size} samples, peak {np.abs(want).max()}, max|Δ| = {d.max()} LSB, "
          f"{np.mean(d > 0):.2%} differ, SNR {snr:.1f} dB")
    assert np.abs(want).max() > 1000, f"{name}: the reference is near-silent; the test would prove little"
    assert d.max() <= TOL_LSB and snr > MIN_SNR_DB, f"{name}: max|Δ| {d.max()} LSB, SNR {snr:.1f} dB"


def _opts(**kw):
    o = dict(f0_up_key=0, index_rate=0.75, protect=0.33, rms_mix_rate=0.25, filter_radius=3, resample_sr=0)
    o.update(kw)
    return o


def _ours(world, jnet, version, *, pitch, index, sid, opts):
    cfg = P.PipelineConfig(**X, **opts)
    return P.VoiceConverter(jnet, ContentFeatures(world["jhubert"], version, bucket=HUBERT_BUCKET), pitch=pitch,
                            index=None if index is None else retrieval.read_index(index),
                            config=cfg, sid=sid, noise_scale=0.0, bucket=SYNTH_BUCKET)


# --------------------------------------------------------------------------- parity


def test_split_points_are_rvcs(world):
    audio = P.highpass(world["long"])
    t_c, t_q, t_m = (int(16000 * X[k]) for k in ("x_center", "x_query", "x_max"))
    got = P.split_points(audio, t_c, t_q, t_m)
    # RVC's search, verbatim in effect: the full running sum, then the first minimum per window
    pad = np.pad(audio, (80, 80), mode="reflect")
    s = np.zeros_like(audio)
    for i in range(160):
        s += np.abs(pad[i: i - 160])
    want = [t - t_q + int(np.where(s[t - t_q: t + t_q] == s[t - t_q: t + t_q].min())[0][0])
            for t in range(t_c, audio.shape[0], t_c)]
    assert got == want and len(got) == 2
    assert P.split_points(P.highpass(world["short"]), t_c, t_q, t_m) == []


def test_rmvpe_index_protect_v2_batch_of_two(world):
    """f0 model, rmvpe, index, protect 0.33, key +3; a split input and an unsplit one
    converted in one batch, each equal to RVC converting it alone."""
    f0 = world["rvc_rmvpe"].infer_from_audio(world["long"], thred=0.03)
    assert 0.05 < np.mean(f0 < 1) < 0.95  # protect has unvoiced frames to act on
    net, jnet, sr = _synth("v2", True, 5)
    opts = _opts(f0_up_key=3, protect=0.33)
    vc = _ours(world, jnet, "v2", pitch=world["jrmvpe"], index=world["index"]["v2"], sid=1, opts=opts)
    seen = []
    got = vc.batch([world["long"], world["short"]], progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx((len(world["long"]) + len(world["short"])) / 16000)
    for name, wav, g in (("long", world["long"], got[0]), ("short", world["short"], got[1])):
        want = _rvc_convert(world, net, sr, wav, name=f"rmvpe-{name}", version="v2", f0=True, method="rmvpe",
                            index=world["index"]["v2"], sid=1, opts=opts)
        _compare(g, want, f"v2 f0 rmvpe+index+protect ({name})")


def test_harvest_no_index_v2_resampled(world):
    net, jnet, sr = _synth("v2", True, 5)
    opts = _opts(protect=0.2, rms_mix_rate=0.5, resample_sr=16000)
    vc = _ours(world, jnet, "v2", pitch=pitch_mod.harvest, index=None, sid=0, opts=opts)
    assert vc.out_sr == 16000
    got = vc(world["long"])
    want = _rvc_convert(world, net, sr, world["long"], name="harvest-long", version="v2", f0=True,
                        method="harvest", index=None, sid=0, opts=opts)
    _compare(got, want, "v2 f0 harvest, no index, resampled to 16k")


def test_v1_nono_with_index(world):
    """A model without pitch (v1: 256-d final_proj of layer 9), index blend at 0.5."""
    net, jnet, sr = _synth("v1", False, 7)
    opts = _opts(index_rate=0.5)
    vc = _ours(world, jnet, "v1", pitch=world["jrmvpe"], index=world["index"]["v1"], sid=2, opts=opts)
    got = vc(world["long"])
    want = _rvc_convert(world, net, sr, world["long"], name="nono-long", version="v1", f0=False,
                        method="rmvpe", index=world["index"]["v1"], sid=2, opts=opts)
    _compare(got, want, "v1 nono + index")


# --------------------------------------------------------------------------- errors (no compile)


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    _, jnet, _ = _synth("v2", True, 5)
    content = ContentFeatures(world["jhubert"], "v2")
    with pytest.raises(ValueError, match=r"speaker id 3 is out of range: the model has 3 speakers \(sid 0\.\.2\)"):
        P.VoiceConverter(jnet, content, pitch=world["jrmvpe"], sid=3)
    with pytest.raises(retrieval.IndexFileError, match=r"v1.*256-d.*768-d") as e:
        P.VoiceConverter(jnet, content, pitch=world["jrmvpe"], index=retrieval.read_index(world["index"]["v1"]))
    assert str(e.value).startswith(world["index"]["v1"]) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"256-d features but the v2 model takes 768-d"):
        P.VoiceConverter(jnet, ContentFeatures(world["jhubert"], "v1"), pitch=world["jrmvpe"])
    with pytest.raises(ValueError, match=r"pitch \(f0\) input"):
        P.VoiceConverter(jnet, content)
    with pytest.raises(ValueError, match=r"x_pad=0\.0001 s is not a whole number of samples at 16000 Hz"):
        P.VoiceConverter(jnet, content, pitch=world["jrmvpe"], config=P.PipelineConfig(x_pad=0.0001))
    vc = P.VoiceConverter(jnet, content, pitch=world["jrmvpe"])
    with pytest.raises(ValueError, match=r"input 0: 10 samples is too short"):
        vc(np.zeros(10, np.float32))
    # files: one line, naming the file
    bad = tmp_path / "not_audio.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk" * 4)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(1600, np.float32), 16000)
    for path, why in ((bad, "not a readable"), (silent, "silent"), (tmp_path / "missing.wav", "")):
        with pytest.raises((P.AudioError, OSError, ValueError)) as e:
            P.load_input(str(path))
        msg = str(e.value)
        assert str(path) in msg and why in msg and "\n" not in msg, msg


def test_load_input_is_vc_singles_peak_limit(tmp_path):
    loud = tmp_path / "loud.wav"
    x = np.sin(np.arange(8000) / 9.0).astype(np.float32) * 0.999
    sf.write(loud, x, 16000, subtype="FLOAT")
    y = P.load_input(str(loud))
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x / (np.abs(x).max() / 0.95), rtol=1e-6)
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, x * 0.5, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(P.load_input(str(quiet)), (x * 0.5).astype(np.float32))


def test_signal_steps_match_librosa_and_torch():
    """The RMS mix's pieces against librosa.feature.rms and F.interpolate, the resampler
    against librosa.resample (what RVC calls), the int16 rule on its edge cases."""
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    y = rng.standard_normal(48000 * 2 + 123).astype(np.float32) * 0.1
    np.testing.assert_allclose(P.rms_envelope(y, 48000), librosa.feature.rms(y=y, frame_length=48000,
                                                                             hop_length=24000)[0], rtol=1e-6)
    v = rng.random(9).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(v)[None, None], size=1001, mode="linear")[0, 0].numpy()
    np.testing.assert_allclose(P.interp_linear(v, 1001), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(P.resample(y, 48000, 16000), librosa.resample(y, orig_sr=48000, target_sr=16000))
    x = np.array([0.5, -0.5, 0.98, -0.1], np.float32)
    assert P.to_int16(x).tolist() == (x * 32768).astype(np.int16).tolist()   # no scaling below 0.99
    x2 = np.array([2.0, -1.0, 0.5], np.float32)
    assert P.to_int16(x2).tolist() == [32440, -16220, 8110]                  # peak -> 0.99·32768, truncated


# --------------------------------------------------------------------------- slow


@pytest.mark.slow  # compiles the default buckets (several shapes per network)
def test_default_buckets_and_seeded_noise(world):
    net, jnet, sr = _synth("v2", True, 5)
    opts = _opts()
    index = retrieval.read_index(world["index"]["v2"])
    cfg = P.PipelineConfig(**X, **opts)
    vc = P.VoiceConverter(jnet, ContentFeatures(world["jhubert"], "v2"), pitch=world["jrmvpe"], index=index,
                          config=cfg, sid=1, noise_scale=0.0)
    want = _rvc_convert(world, net, sr, world["long"], name="default-buckets", version="v2", f0=True,
                        method="rmvpe", index=world["index"]["v2"], sid=1, opts=opts)
    _compare(vc(world["long"]), want, "v2 f0 rmvpe+index, default buckets")
    # noise on: seeded per chunk, so a batch equals the inputs converted one by one
    noisy = P.VoiceConverter(jnet, ContentFeatures(world["jhubert"], "v2", bucket=HUBERT_BUCKET),
                             pitch=world["jrmvpe"], index=index, config=cfg, sid=1, seed=3, bucket=SYNTH_BUCKET)
    both = noisy.batch([world["long"], world["short"]])
    for got, wav in zip(both, (world["long"], world["short"])):
        assert np.abs(got.astype(np.int64) - noisy(wav)).max() <= 1
    assert np.abs(both[0].astype(np.int64) - want).max() > 100  # the noise is on
    other = P.VoiceConverter(jnet, ContentFeatures(world["jhubert"], "v2", bucket=HUBERT_BUCKET),
                             pitch=world["jrmvpe"], index=index, config=cfg, sid=1, seed=4, bucket=SYNTH_BUCKET)
    assert np.abs(other(world["long"]).astype(np.int64) - both[0]).max() > 100


def test_coarse_pitch_keeps_the_trackers_dtype():
    """RVC's get_f0 quantises in the tracker's dtype (float32 trackers store the affine map
    back into float32 before rint); the formula verbatim as the reference."""
    def rvc(f0):
        lo, hi = 1127 * np.log(1 + 50 / 700), 1127 * np.log(1 + 1100 / 700)
        mel = 1127 * np.log(1 + f0 / 700)
        mel[mel > 0] = (mel[mel > 0] - lo) * 254 / (hi - lo) + 1
        mel[mel <= 1] = 1
        mel[mel > 255] = 255
        return np.rint(mel).astype(np.int32)

    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        f0 = np.concatenate([rng.uniform(0, 1500, 200000), [0, 49, 50, 1100, 2000]]).astype(dtype)
        assert np.array_equal(P.coarse_like_rvc(f0), rvc(f0.copy())), dtype
