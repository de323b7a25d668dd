"""convert/pth.py: reading real RVC .pth layouts, detecting what they hold, and refusing bad files.

Reference files are written with torch.save from RVC's own classes (rvc==0.3.5) in each
layout RVC / Applio produce (RVC: ``rvc/lib/train/utils.py`` save_checkpoint and
``process_ckpt.py`` savee; Applio: parametrizations weight-norm keys and extra metadata)."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from rvc.lib.infer_pack import models as rvc_models

from rvclora_convert.pth import RVCFile, RVCFileError, load_rvc_file, to_flax
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S
from tests.no_init import spy_rvc_builds
from tests.torch_ref import assert_close, randomize_, t2j



# A narrow model with RVC's exact v2 48k structure for the inference-model files (their
# config list drives the build, so the width need not be a preset's).
NARROW = RVC.preset("v2", 48000).replace(inter_channels=16, hidden_channels=32, filter_channels=64,
                                       upsample_initial_channel=64, gin_channels=8, spk_embed_dim=4)
CLASSES = {("v1", True): rvc_models.SynthesizerTrnMs256NSFsid, ("v2", True): rvc_models.SynthesizerTrnMs768NSFsid,
           ("v1", False): rvc_models.SynthesizerTrnMs256NSFsid_nono,
           ("v2", False): rvc_models.SynthesizerTrnMs768NSFsid_nono}


def torch_g(cfg, version, f0, seed=0, randomize=True):
    torch.manual_seed(seed)
    net = CLASSES[(version, f0)](*cfg.to_list(), is_half=False).eval()
    return randomize_(net, seed) if randomize else net


def small_weight(net):
    """What RVC's process_ckpt writes under "weight": fp16, no enc_q, legacy names."""
    return {k: v.detach().half() for k, v in net.state_dict().items() if "enc_q" not in k}


def rvc_inference(net, cfg, version="v2", f0=True):
    return {"weight": small_weight(net), "config": cfg.to_list(), "info": "10epoch",
            "sr": f"{cfg.sr // 1000}k", "f0": int(f0), "version": version}


def applio_inference(net, cfg):
    weight = {k.replace("weight_g", "parametrizations.weight.original0")
               .replace("weight_v", "parametrizations.weight.original1"): v
              for k, v in small_weight(net).items()}
    return {"weight": weight, "config": cfg.to_list(), "epoch": 10, "step": 1234, "sr": cfg.sr, "f0": True,
            "version": "v2", "creation_date": "2025-01-01T00:00:00", "model_hash": "abc",
            "model_name": "voice", "author": "me", "embedder_model": "contentvec", "speakers_id": 0,
            "vocoder": "HiFi-GAN"}


def save(tmp, name, obj):
    p = tmp / name
    torch.save(obj, p)
    return str(p)


def infer_inputs(version, T=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    dim = 256 if version == "v1" else 768
    return (torch.randn(1, T, dim, generator=g), torch.tensor([T]), torch.randint(1, 256, (1, T), generator=g),
            100 + 150 * torch.rand(1, T, generator=g), torch.tensor([0]))


def torch_infer_noiseless(net, inputs, f0=True):
    phone, lengths, pitch, pitchf, sid = inputs
    orig = torch.randn_like
    try:
        torch.randn_like = lambda x, *a, **k: torch.zeros_like(x)
        if f0:
            out, *_ = net.infer(phone, lengths, pitch, pitchf, sid)
        else:
            out, *_ = net.infer(phone, lengths, sid)
    finally:
        torch.randn_like = orig
    return t2j(out)


def flax_infer(model, inputs):
    phone, lengths, pitch, pitchf, sid = (jnp.asarray(x.numpy()) for x in inputs)
    out, *_ = model.infer(phone, lengths, pitch if model.f0 else None, pitchf if model.f0 else None, sid,
                          eps=None, source_noise=None)
    return out


# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("no_torch_grad", "one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Full-size reference nets and the files written from them (built once per module)."""
    tmp = tmp_path_factory.mktemp("pth")
    out = {}
    g40 = torch_g(RVC.preset("v2", 40000), "v2", True)
    # A G_*.pth training checkpoint with a real AdamW state after one step. The step comes
    # first so that every file written from g40 holds the same (stepped) weights.
    with torch.enable_grad():
        opt = torch.optim.AdamW(g40.parameters(), 1e-4, betas=(0.8, 0.99), eps=1e-9, foreach=False)
        for p in g40.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len(opt.state_dict()["state"]) == 560
    out["g40_net"] = g40
    out["train_G"] = save(tmp, "G_2333333.pth", {"model": g40.state_dict(), "iteration": 7,
                                                 "optimizer": opt.state_dict(), "learning_rate": 1e-4})
    del opt
    out["base_v2_40k_f0"] = save(tmp, "f0G40k.pth", {"model": g40.state_dict()})
    out["base_v1_32k_f0"] = save(tmp, "v1_f0G32k.pth",
                                 {"model": torch_g(RVC.preset("v1", 32000), "v1", True, 1, False).state_dict()})
    out["base_v2_48k_nono"] = save(tmp, "G48k.pth",
                                   {"model": torch_g(RVC.preset("v2", 48000), "v2", False, 2, False).state_dict()})
    out["inference_full"] = save(tmp, "voice40k.pth", rvc_inference(g40, RVC.preset("v2", 40000)))
    # MultiPeriodDiscriminatorV2 = MultiPeriodDiscriminator + periods 23, 37 (indices 7, 8), and a
    # DiscriminatorP's weights do not depend on its period: the v1 D is the v2 one minus those two.
    dv2 = rvc_models.MultiPeriodDiscriminatorV2(False).state_dict()
    out["D_v2"] = save(tmp, "D_100.pth", {"model": dv2, "iteration": 3, "optimizer": None,
                                          "learning_rate": 1e-4})
    dv1 = {k: v for k, v in dv2.items() if not k.startswith(("discriminators.7.", "discriminators.8."))}
    assert len(dv1) == 129  # MultiPeriodDiscriminator's key count
    out["D_v1"] = save(tmp, "f0D32k.pth", {"model": dv1})
    return out


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("narrow")
    net = torch_g(NARROW, "v2", True, 5)
    return {"net": net, "tmp": tmp,
            "rvc": save(tmp, "rvc_voice.pth", rvc_inference(net, NARROW)),
            "applio": save(tmp, "applio_voice.pth", applio_inference(net, NARROW))}


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name, version, sr, f0, n_keys", [
    ("base_v2_40k_f0", "v2", 40000, True, 560),
    ("base_v1_32k_f0", "v1", 32000, True, 619),
    ("base_v2_48k_nono", "v2", 48000, False, 549),
])
def test_detect_pretrained_base_generators(files, name, version, sr, f0, n_keys):
    f = load_rvc_file(files[name])
    assert isinstance(f, RVCFile)
    assert (f.layout, f.kind, f.version, f.sr, f.f0) == ("base", "generator", version, sr, f0)
    assert f.config == RVC.preset(version, sr).replace(spk_embed_dim=109)
    assert f.has_enc_q and not f.has_optimizer and f.n_speakers == 109
    assert len(f.state_dict) == n_keys and f.dtype == "float32" and f.weight_norm_style == "legacy"
    assert f.metadata == {}
    assert f.num_params == sum(a.size for a in f.state_dict.values())
    if name == "base_v2_40k_f0":
        assert f.num_params == 36_458_818  # RVC's f0G40k.pth
    if name == "base_v1_32k_f0":
        assert f.num_params == 36_294_338


def test_detect_training_checkpoint(files):
    f = load_rvc_file(files["train_G"])
    assert (f.layout, f.kind, f.version, f.sr, f.f0) == ("train-checkpoint", "generator", "v2", 40000, True)
    assert f.has_optimizer and f.has_enc_q
    assert f.metadata == {"iteration": 7, "learning_rate": 1e-4}
    assert "optimizer" not in f.metadata


def test_detect_inference_models(files, narrow):
    f = load_rvc_file(files["inference_full"])
    assert (f.layout, f.kind, f.version, f.sr, f.f0) == ("inference", "generator", "v2", 40000, True)
    assert not f.has_enc_q and f.dtype == "float16" and f.num_params == 27_537_346
    assert f.state_dict["dec.conv_pre.weight"].dtype == np.float16  # as stored
    assert f.metadata == {"info": "10epoch", "sr": "40k", "f0": 1, "version": "v2"}

    r = load_rvc_file(narrow["rvc"])
    assert r.config == NARROW and (r.sr, r.version, r.f0, r.n_speakers) == (48000, "v2", True, 4)
    assert r.weight_norm_style == "legacy"
    a = load_rvc_file(narrow["applio"])
    assert a.config == NARROW and (a.sr, a.version, a.f0) == (48000, "v2", True)
    assert a.weight_norm_style == "parametrizations"
    assert a.metadata["vocoder"] == "HiFi-GAN" and a.metadata["embedder_model"] == "contentvec"
    assert a.metadata["sr"] == 48000 and a.metadata["f0"] is True and "weight" not in a.metadata


def test_inference_sr_spellings_and_speaker_count(narrow):
    for sr in ("48k", 48000, "48000"):
        ck = rvc_inference(narrow["net"], NARROW)
        ck["sr"] = sr
        ck["config"][17] = sr if sr != "48k" else 48000
        ck["config"][15] = 109  # stale speaker count: RVC overwrites it from emb_g
        f = load_rvc_file(save(narrow["tmp"], f"sr_{sr}.pth", ck))
        assert f.sr == 48000 and f.config.spk_embed_dim == 4


def test_detect_discriminators(files):
    d1 = load_rvc_file(files["D_v1"])
    assert (d1.layout, d1.kind, d1.version, d1.sr, d1.config) == ("base", "discriminator", "v1", None, None)
    assert d1.num_params == 54_968_286
    d2 = load_rvc_file(files["D_v2"])
    assert (d2.layout, d2.kind, d2.version) == ("train-checkpoint", "discriminator", "v2")
    assert d2.num_params == 71_410_594 and not d2.has_optimizer


def test_discriminator_to_flax(files):
    f = load_rvc_file(files["D_v1"])
    model, params = to_flax(f)
    sd = f.state_dict
    w = sd["discriminators.3.conv_post.weight_v"].astype(np.float64)
    g = sd["discriminators.3.conv_post.weight_g"].astype(np.float64)
    folded = g * w / np.sqrt((w ** 2).sum(axis=(1, 2, 3), keepdims=True))  # [1, 1024, 3, 1]
    np.testing.assert_allclose(np.asarray(params["discriminators"][3]["conv_post"]["kernel"]),
                               folded[..., 0].transpose(2, 1, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(model.discriminators[0].convs[1].bias[...]),
                                  sd["discriminators.0.convs.1.bias"])


# ----------------------------------------------------------------------------- to_flax parity


# All parity tests use the full v2 40k net so JAX's eager per-shape compilation is paid once.


@pytest.fixture(scope="module")
def base_flax(files):
    return to_flax(load_rvc_file(files["base_v2_40k_f0"]))


@pytest.fixture(scope="module")
def fp16_reference(files, tmp_path_factory):
    """RVC's own loading of a small model: fp16 weights upcast to fp32, enc_q deleted, strict=False."""
    tmp = tmp_path_factory.mktemp("fp16")
    net, cfg = files["g40_net"], RVC.preset("v2", 40000)
    ref = CLASSES[("v2", True)](*cfg.to_list(), is_half=False).eval()
    del ref.enc_q
    missing, unexpected = ref.load_state_dict({k: v.float() for k, v in small_weight(net).items()}, strict=False)
    assert not missing and not unexpected
    return ref, {"rvc": files["inference_full"], "applio": save(tmp, "applio40k.pth", applio_inference(net, cfg))}


INPUTS = infer_inputs("v2", T=8)


def test_base_file_matches_rvc_infer(files, base_flax):
    model, _ = base_flax
    assert model.enc_q is not None
    assert_close(flax_infer(model, INPUTS), torch_infer_noiseless(files["g40_net"], INPUTS), atol=1e-4,
                 name="base v2 40k")


@pytest.mark.parametrize("style", ["rvc", "applio"])
def test_inference_fp16_file_matches_rvc_infer(fp16_reference, style):
    ref, paths = fp16_reference
    f = load_rvc_file(paths[style])
    assert f.dtype == "float16" and f.weight_norm_style == ("legacy" if style == "rvc" else "parametrizations")
    model, params = to_flax(f)
    assert model.enc_q is None and "enc_q" not in params
    assert_close(flax_infer(model, INPUTS), torch_infer_noiseless(ref, INPUTS), atol=1e-4, name=style)


def test_training_checkpoint_to_flax_equals_base(files, base_flax):
    _, p_train = to_flax(load_rvc_file(files["train_G"]))
    _, p_base = base_flax
    for path in (("dec", "ups", 0, "kernel"), ("enc_q", "pre", "kernel"), ("emb_g", "embedding")):
        a, b = p_train, p_base
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- no random init


def test_conversion_never_initialises_at_random(narrow, monkeypatch):
    # A spec no other test converts: structures are cached per spec.
    cfg = NARROW.replace(gin_channels=12)
    p = save(narrow["tmp"], "spy.pth", rvc_inference(torch_g(cfg, "v2", True, 9), cfg))
    traced = spy_rvc_builds(monkeypatch)
    f = load_rvc_file(p)
    model, params = to_flax(f)
    assert traced and all(traced), traced
    w = f.state_dict["enc_p.proj.weight"].astype(np.float32)  # a plain Conv1d (no weight norm)
    np.testing.assert_array_equal(np.asarray(model.enc_p.proj.kernel[...]), w.transpose(2, 1, 0))


def test_converted_model_holds_no_abstract_leaves(files, base_flax):
    model, params = base_flax
    leaves = jax.tree.leaves(nnx.state(model))
    assert len(leaves) == 423 and all(isinstance(x, jax.Array) for x in leaves)
    # the model's arrays are the returned params, which are exactly the file's (fp32, folded)
    np.testing.assert_array_equal(np.asarray(model.emb_g.embedding[...]), params["emb_g"]["embedding"])
    np.testing.assert_array_equal(params["dec"]["conv_pre"]["bias"],
                                  load_rvc_file(files["base_v2_40k_f0"]).state_dict["dec.conv_pre.bias"])


# ----------------------------------------------------------------------------- bad inputs


def load_and_convert(p):
    return to_flax(load_rvc_file(p))


def check_error(p, *needles):
    with pytest.raises(RVCFileError) as ei:
        load_and_convert(p)
    msg = str(ei.value)
    assert msg.startswith(str(p)), msg
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_file(tmp_path):
    check_error(str(tmp_path / "nope.pth"), "not found")


def test_garbage_and_truncated(tmp_path, narrow):
    g = tmp_path / "garbage.pth"
    g.write_bytes(np.random.default_rng(0).bytes(4096))
    check_error(str(g))
    t = tmp_path / "text.pth"
    t.write_text("this is not a checkpoint")
    check_error(str(t))
    e = tmp_path / "empty.pth"
    e.write_bytes(b"")
    check_error(str(e), "empty")
    data = open(narrow["rvc"], "rb").read()
    for cut in (len(data) // 2, len(data) - 10, 50):
        tr = tmp_path / f"trunc{cut}.pth"
        tr.write_bytes(data[:cut])
        check_error(str(tr), "truncated")


class Payload:  # a custom class: weights_only refuses to rebuild it
    pass


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + Evil.marker,))


def test_code_pickles_are_refused_and_not_run(tmp_path):
    p = save(tmp_path, "custom_class.pth", {"model": {"w": torch.zeros(2)}, "extra": Payload()})
    assert "Python objects/code" in check_error(p, "safe loading")
    Evil.marker = str(tmp_path / "PWNED")
    p2 = save(tmp_path, "evil_torch.pth", {"model": Evil()})
    check_error(p2, "Python objects/code", "system")
    p3 = tmp_path / "evil.pkl"
    p3.write_bytes(pickle.dumps({"model": Evil()}, protocol=2))
    check_error(str(p3), "Python objects/code")
    assert not os.path.exists(Evil.marker)


def test_wrong_layouts(tmp_path):
    msg = check_error(save(tmp_path, "wrong.pth", {"net": {"a": torch.zeros(1)}, "epoch": 3}),
                      "'epoch'", "'net'", "expected 'model'")
    assert "'weight' + 'config'" in msg
    check_error(save(tmp_path, "list.pth", [torch.zeros(1)]), "list")
    check_error(save(tmp_path, "tensor.pth", torch.zeros(3)), "Tensor")
    check_error(save(tmp_path, "noconfig.pth", {"weight": {"a": torch.zeros(1)}, "sr": "40k"}), "'config'")
    check_error(save(tmp_path, "notsd.pth", {"model": [1, 2, 3]}), "'model'")
    check_error(save(tmp_path, "unknown_sd.pth", {"model": {"foo.weight": torch.zeros(2)}}),
                "enc_p.emb_phone.weight")


def _mutated(narrow, name, fn, **top):
    ck = rvc_inference(narrow["net"], NARROW)
    fn(ck["weight"])
    ck.update(top)
    return save(narrow["tmp"], name, ck)


def test_missing_extra_and_wrong_shape_keys(narrow):
    p = _mutated(narrow, "missing.pth", lambda w: w.pop("dec.conv_post.weight"))
    check_error(p, "missing keys", "dec.conv_post.weight")
    p = _mutated(narrow, "extra.pth", lambda w: w.__setitem__("dec.extra_layer.weight", torch.zeros(3).half()))
    check_error(p, "unexpected keys", "dec.extra_layer.weight")
    p = _mutated(narrow, "shape.pth",
                 lambda w: w.__setitem__("flow.flows.0.post.weight", torch.zeros(8, 32, 3).half()))
    check_error(p, "flow.flows.0.post.weight", "shape")
    p = _mutated(narrow, "ups_shape.pth", lambda w: w.__setitem__(
        "dec.ups.1.weight_v", torch.zeros(32, 16, 18).half()))
    check_error(p, "upsample_kernel_sizes")  # the config list disagrees with the weights


def test_non_finite_weights(narrow):
    def nan(w):
        w["flow.flows.2.enc.in_layers.1.weight_v"][0, 0, 0] = float("nan")
    check_error(_mutated(narrow, "nan.pth", nan), "flow.flows.2.enc.in_layers.1.weight_v", "NaN")

    def inf(w):
        w["emb_g.weight"][1, 1] = float("inf")
    check_error(_mutated(narrow, "inf.pth", inf), "emb_g.weight")


def test_claims_that_contradict_the_shapes(narrow, files):
    msg = check_error(_mutated(narrow, "ver.pth", lambda w: None, version="v1"), "'version'",
                      "enc_p.emb_phone.weight")
    assert "[32, 768]" in msg
    check_error(_mutated(narrow, "f0.pth", lambda w: None, f0=0), "'f0'", "enc_p.emb_pitch.weight")
    check_error(_mutated(narrow, "sr.pth", lambda w: None, sr="40k"), "'sr'")
    ck = rvc_inference(narrow["net"], NARROW)
    ck["config"][13] = 128
    check_error(save(narrow["tmp"], "cfg.pth", ck), "upsample_initial_channel", "dec.conv_pre.weight")
    ck = rvc_inference(narrow["net"], NARROW)
    ck["config"] = ck["config"][:17]
    check_error(save(narrow["tmp"], "cfg17.pth", ck), "'config'", "18")
    # a base file whose 'sr' key disagrees with its kernel sizes
    sd = torch.load(files["base_v1_32k_f0"], weights_only=True)
    sd["sr"] = "48k"
    check_error(save(narrow["tmp"], "base_sr.pth", sd), "'sr'", "v1 32000")
    # a D whose 'version' key disagrees with its sub-discriminator count
    d = torch.load(files["D_v1"], weights_only=True)
    d["version"] = "v2"
    check_error(save(narrow["tmp"], "d_ver.pth", d), "'version'", "discriminators")
