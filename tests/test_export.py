"""Convert → export round trips, merged exports loaded by RVC's own code, and the CLI contract."""

import json
import os
import types

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from rvc.lib.infer_pack import models as rvc_models
from rvc.lib.train import utils as rvc_train_utils

from rvclora_convert import export as E
from rvclora_jax import adapters, lora
from rvclora_jax.cli import main
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S
from rvclora_jax.train import TrainConfig
from tests.no_init import spy_rvc_builds
from tests.torch_ref import assert_close, randomize_

CLASSES = {
    ("v1", True): rvc_models.SynthesizerTrnMs256NSFsid,
    ("v2", True): rvc_models.SynthesizerTrnMs768NSFsid,
    ("v1", False): rvc_models.SynthesizerTrnMs256NSFsid_nono,
    ("v2", False): rvc_models.SynthesizerTrnMs768NSFsid_nono,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _torch_g(version, f0, cfg, seed=0):
    torch.manual_seed(seed)
    return randomize_(CLASSES[(version, f0)](*cfg.to_list(), is_half=False).eval(), seed)


def _write(path, layout, module, cfg=None, version=None, f0=None, applio=False):
    sd = module.state_dict()
    if layout == "base":
        ckpt = {"model": sd}
    elif layout == "train-checkpoint":
        opt = torch.optim.AdamW(module.parameters(), 1e-4, betas=(0.8, 0.99), eps=1e-9)
        ckpt = {"model": sd, "iteration": 7, "optimizer": opt.state_dict(), "learning_rate": 1e-4}
    else:
        w = {k: v.half() for k, v in sd.items() if "enc_q" not in k}
        if applio:
            w = {k.replace("weight_g", "parametrizations.weight.original0")
                  .replace("weight_v", "parametrizations.weight.original1"): v for k, v in w.items()}
        ckpt = {"weight": w, "config": cfg.to_list(), "info": "3epoch",
                "sr": cfg.sr if applio else {32000: "32k", 40000: "40k", 48000: "48k"}[cfg.sr],
                "f0": bool(f0) if applio else int(f0), "version": version}
        if applio:
            ckpt.update(vocoder="HiFi-GAN", embedder_model="contentvec", model_name="x", speakers_id=0)
    torch.save(ckpt, path)
    return ckpt


def _legacy(k):
    return k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")


ROUND_TRIPS = [
    ("base", "v1", True, 32000, False),
    ("base", "v2", False, 40000, False),
    ("train-checkpoint", "v2", True, 48000, False),
    ("inference", "v1", False, 40000, False),
    ("inference", "v2", True, 40000, True),   # Applio spelling + parametrizations keys
]


@pytest.mark.parametrize("layout,version,f0,sr,applio", ROUND_TRIPS)
def test_convert_export_round_trip_is_exact(tmp_path, layout, version, f0, sr, applio):
    cfg = RVC.preset(version, sr)
    ref = _torch_g(version, f0, cfg)
    src_path = str(tmp_path / "in.pth")
    ckpt = _write(src_path, layout, ref, cfg, version, f0, applio)
    assert main(["convert", src_path, str(tmp_path / "conv")]) == 0
    out = str(tmp_path / "out.pth")
    assert main(["export", str(tmp_path / "conv"), out, "--layout", layout]) == 0
    got = torch.load(out, weights_only=True)
    key = "weight" if layout == "inference" else "model"
    want = {_legacy(k): v for k, v in ckpt[key].items()}
    assert list(got[key]) == list(want)  # same keys, same order (legacy weight-norm names)
    for k, v in want.items():
        assert got[key][k].dtype == v.dtype, k
        assert torch.equal(got[key][k], v), k  # bit-identical (fp16 preserved exactly)
    if layout == "inference":
        assert got["config"][:1] + got["config"][2:] == cfg.to_list()[:1] + cfg.to_list()[2:]
        assert got["sr"] == {32000: "32k", 40000: "40k", 48000: "48k"}[sr]
        assert got["f0"] == int(f0) and got["version"] == version
    if layout == "train-checkpoint":
        assert got["iteration"] == 7 and got["learning_rate"] == 1e-4


def test_discriminator_round_trip(tmp_path):
    torch.manual_seed(0)
    d = rvc_models.MultiPeriodDiscriminator(False)
    src = str(tmp_path / "D.pth")
    torch.save({"model": d.state_dict()}, src)
    out = str(tmp_path / "D2.pth")
    assert main(["export", src, out, "--layout", "base"]) == 0
    a, b = torch.load(src, weights_only=True)["model"], torch.load(out, weights_only=True)["model"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", src, str(tmp_path / "D3.pth")]) == 2  # no inference layout for D
    assert not os.path.exists(tmp_path / "D3.pth")


# A narrow model with RVC's exact structure (v2 48k schedule, f0), as an inference file.
NARROW = RVC.preset("v2", 48000).replace(inter_channels=16, hidden_channels=32, filter_channels=64,
                                       upsample_initial_channel=64, gin_channels=8, spk_embed_dim=4)


def _adapter_for(src: E.Source, out_dir, preset="generator+prior", seed=1):
    model = src.model
    cfg = lora.LoRAConfig.from_preset(preset, rank=4, alpha=8, rank_pattern={r"dec/ups/\d+": 6})
    lora.inject(model, cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed)
    for _, layer in lora.iter_lora_layers(model):
        if layer.has_lora:
            key, k = jax.random.split(key)
            layer.lora_b[...] = 0.05 * jax.random.normal(k, layer.lora_b.shape)
    adapter = nnx.to_pure_dict(nnx.state(model, lora.LoRAParam))
    adapters.save_adapter(str(out_dir), adapter, cfg, base_fingerprint=adapters.fingerprint(src.params))
    return model


def _rvc_infer_noise_off(net, *args):
    orig = torch.randn_like
    torch.randn_like = lambda x, *a, **k: torch.zeros_like(x)
    try:
        with torch.no_grad():
            return net.infer(*args)[0]
    finally:
        torch.randn_like = orig


def test_merged_inference_export_loads_strictly_in_rvc_and_matches_jax(tmp_path):
    ref = _torch_g("v2", True, NARROW)
    src_path = str(tmp_path / "voice.pth")
    _write(src_path, "inference", ref, NARROW, "v2", True)
    src = E.load_source(src_path)
    adapted = _adapter_for(src, tmp_path / "adapter")
    out = str(tmp_path / "merged.pth")
    assert main(["export", src_path, out, "--adapter", str(tmp_path / "adapter" / "adapter.safetensors"),
                 "--fp32"]) == 0
    cpt = torch.load(out, weights_only=True)
    # Load it exactly the way RVC's inference does, but strictly: every key accounted for.
    cfg = list(cpt["config"])
    cfg[-3] = cpt["weight"]["emb_g.weight"].shape[0]
    net = rvc_models.SynthesizerTrnMs768NSFsid(*cfg, is_half=False)
    del net.enc_q
    net.load_state_dict(cpt["weight"], strict=True)
    net.eval()
    B, T = 1, 20
    g = torch.Generator().manual_seed(3)
    phone, f0 = torch.randn(B, T, 768, generator=g), 100 + 150 * torch.rand(B, T, generator=g)
    pitch, lengths, sid = torch.randint(1, 256, (B, T), generator=g), torch.tensor([T]), torch.tensor([2])
    want = _rvc_infer_noise_off(net, phone, lengths, pitch, f0, sid)
    got, *_ = adapted.infer(jnp.asarray(phone.numpy()), jnp.asarray(lengths.numpy()), jnp.asarray(pitch.numpy()),
                            jnp.asarray(f0.numpy()), jnp.asarray(sid.numpy()))
    assert_close(got, want.numpy().transpose(0, 2, 1), atol=1e-4, name="RVC(exported merged) vs JAX adapted")
    # and the scale: 0 gives back the base weights exactly
    out0 = str(tmp_path / "scale0.pth")
    assert main(["export", src_path, out0, "--adapter", str(tmp_path / "adapter"), "--scale", "0"]) == 0
    w0, w_in = torch.load(out0, weights_only=True)["weight"], torch.load(src_path, weights_only=True)["weight"]
    assert all(torch.equal(w0[k], w_in[k]) for k in w_in)


def test_train_checkpoint_export_loads_with_rvc_load_checkpoint(tmp_path):
    cfg = RVC.preset("v2", 40000)
    ref = _torch_g("v2", True, cfg)
    src_path = str(tmp_path / "f0G40k.pth")
    _write(src_path, "base", ref, cfg)
    src = E.load_source(src_path)
    _adapter_for(src, tmp_path / "adapter", preset="ups")
    out = str(tmp_path / "G_2333333.pth")
    assert main(["export", src_path, out, "--adapter", str(tmp_path / "adapter"), "--layout",
                 "train-checkpoint"]) == 0
    net = CLASSES[("v2", True)](*cfg.to_list(), is_half=False)
    opt = torch.optim.AdamW(net.parameters(), 1e-4, betas=(0.8, 0.99), eps=1e-9)
    net, opt, lr, it = rvc_train_utils.load_checkpoint(out, net, opt)
    sd = torch.load(out, weights_only=True)["model"]
    assert list(sd) == list(net.state_dict())  # strict: same keys in the same order
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    changed = {k for k in sd if not torch.equal(sd[k], ref.state_dict()[k])}
    assert changed and all(k.startswith("dec.ups.") for k in changed)  # only the adapted layers
    group = torch.load(out, weights_only=True)["optimizer"]["param_groups"][0]
    tc = TrainConfig()
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == (tc.betas, tc.eps, tc.weight_decay)


@pytest.mark.slow  # ~25 s; the default run exports adapter directories (test_merged_inference_export_...)
def test_export_merges_an_adapter_object_like_its_directory(tmp_path):
    ref = _torch_g("v2", True, NARROW)
    src_path = str(tmp_path / "voice.pth")
    _write(src_path, "inference", ref, NARROW, "v2", True)
    src = E.load_source(src_path)
    _adapter_for(src, tmp_path / "adapter")
    from_dir = E.export(src, str(tmp_path / "a.pth"), adapter=str(tmp_path / "adapter"), info="x")
    ad = adapters.load_adapter(str(tmp_path / "adapter"))
    # duck-typed: what `rvclora train` holds after training, never written to disk
    in_memory = types.SimpleNamespace(params=ad.params, config=ad.config, base_fingerprint=ad.base_fingerprint,
                                      directory="(trained in memory)")
    rep = E.export(src, str(tmp_path / "b.pth"), adapter=in_memory, info="x")
    assert rep["adapter"] == "(trained in memory)" and from_dir["adapter"] == ad.directory
    a, b = (torch.load(str(tmp_path / n), weights_only=True) for n in ("a.pth", "b.pth"))
    assert list(a["weight"]) == list(b["weight"]) and all(torch.equal(a["weight"][k], b["weight"][k])
                                                          for k in a["weight"])
    changed = [k for k in a["weight"] if not torch.equal(a["weight"][k], torch.load(
        src_path, weights_only=True)["weight"][k])]
    assert changed  # the adapter did change the model


def test_convert_and_load_directory_never_initialise_at_random(tmp_path, monkeypatch):
    cfg = NARROW.replace(gin_channels=12, spk_embed_dim=3)  # a spec no other test uses (cached per spec)
    src_path = str(tmp_path / "voice.pth")
    _write(src_path, "inference", _torch_g("v1", True, cfg), cfg, "v1", True)
    traced = spy_rvc_builds(monkeypatch)
    E.convert_file(src_path, str(tmp_path / "conv"))
    src = E.load_source(str(tmp_path / "conv"))
    assert traced and all(traced), traced
    assert src.model.emb_g.embedding[...].shape == (3, 12)


def test_inspect_json(tmp_path, capsys):
    ref = _torch_g("v1", False, NARROW)
    p = str(tmp_path / "m.pth")
    _write(p, "inference", ref, NARROW, "v1", False, applio=True)
    assert main(["inspect", p, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "inference" and info["version"] == "v1" and info["f0"] is False
    assert info["sr"] == 48000 and info["dtype"] == "float16" and info["weight_norm"] == "parametrizations"
    assert info["metadata"]["vocoder"] == "HiFi-GAN" and info["enc_q"] is False


# ------------------------------------------------------------------ bad inputs via the CLI


def _bad(tmp_path, make, key_substr=None):
    p = str(tmp_path / "bad.pth")
    make(p)
    return p


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rvclora-pwned",))


def _narrow_inference(p, mutate=None):
    ref = _torch_g("v2", True, NARROW)
    ckpt = _write(p, "inference", ref, NARROW, "v2", True)
    if mutate:
        mutate(ckpt["weight"])
        torch.save(ckpt, p)


def _truncate(p):
    _narrow_inference(p)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


def _nan(w):
    w["dec.ups.0.weight_v"][0, 0, 0] = float("nan")


BAD = {
    "missing": (lambda p: None, None),
    "not-a-pickle": (lambda p: open(p, "w").write("hello, not a model\n"), None),
    "truncated": (_truncate, None),
    "code": (lambda p: torch.save({"model": _Evil()}, p), None),
    "wrong-layout": (lambda p: torch.save({"foo": 1, "bar": torch.zeros(3)}, p), "foo"),
    "missing-key": (lambda p: _narrow_inference(p, lambda w: w.pop("dec.conv_post.weight")), "dec.conv_post.weight"),
    "extra-key": (lambda p: _narrow_inference(p, lambda w: w.update({"dec.extra.weight": torch.zeros(2)})),
                  "dec.extra.weight"),
    "wrong-shape": (lambda p: _narrow_inference(p, lambda w: w.update({"flow.flows.0.pre.bias": torch.zeros(5)})),
                    "flow.flows.0.pre.bias"),
    "nan": (lambda p: _narrow_inference(p, _nan), "dec.ups.0.weight_v"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["export", "convert"])
def test_bad_inputs_give_one_line_error_and_no_output(tmp_path, capsys, case, command):
    make, key = BAD[case]
    p = str(tmp_path / "bad.pth")
    make(p)
    out = str(tmp_path / ("out.pth" if command == "export" else "outdir"))
    args = [command, p, out]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and p in err, err
    if key:
        assert key in err, err
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no temp left behind
    assert not os.path.exists("/tmp/rvclora-pwned")


def test_adapter_for_another_model_is_refused(tmp_path, capsys):
    # adapter made on the narrow v2 48k-schedule model, applied to a v1 model
    ref = _torch_g("v2", True, NARROW)
    src_path = str(tmp_path / "v2.pth")
    _write(src_path, "inference", ref, NARROW, "v2", True)
    _adapter_for(E.load_source(src_path), tmp_path / "adapter", preset="generator+prior")
    other = str(tmp_path / "v1.pth")
    _write(other, "inference", _torch_g("v1", True, NARROW), NARROW, "v1", True)
    out = str(tmp_path / "out.pth")
    rc = main(["export", other, out, "--adapter", str(tmp_path / "adapter")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert "enc_p.emb_phone" in err and str(tmp_path / "adapter") in err, err
    assert not os.path.exists(out)
