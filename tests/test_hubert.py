"""HuBERT/ContentVec port against ``transformers.HubertModel`` (random weights in the real
layout), the fairseq checkpoint layout, RVC's frame arithmetic and its data loader, and
the restricted loader.

The default tests use a tiny config with hubert-base's conv geometry (so frame counts
are the real ones) and 12 layers (so RVC's layer 9 and layer 12 differ), built once per
module; one slow test runs the real hubert-base config."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from rvclora_convert.hubert import HubertFileError, load_hubert  # noqa: E402
from rvclora_jax import families  # noqa: E402
from rvclora_jax.frontend.hubert import ContentFeatures, bucket_frames, frames  # noqa: E402
from tests.torch_ref import randomize_norms_  # noqa: E402

TOL = 1e-4
CONV = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2"


class HubertModelWithFinalProj(transformers.HubertModel):
    """Applio's extension (rvc/lib/utils.py): a final_proj Linear on top of HubertModel."""

    def __init__(self, config):
        super().__init__(config)
        self.final_proj = torch.nn.Linear(config.hidden_size, config.classifier_proj_size)


def _tiny_config():
    return transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=64,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        classifier_proj_size=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_norms_(HubertModelWithFinalProj(_tiny_config()).eval())
    folder = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(str(folder))  # config.json + model.safetensors
    return model, folder


def _wav(n, seed=0):
    return (np.random.RandomState(seed).randn(n) * 0.1).astype(np.float32)


def _ref(model, wav):
    """HF's outputs for RVC's three feature kinds on the unpadded clip."""
    with torch.no_grad():
        out = model(torch.from_numpy(wav)[None], output_hidden_states=True)
        hs = out.hidden_states
        return {"v2": out.last_hidden_state[0].numpy(),
                "v1": model.final_proj(hs[9])[0].numpy(),
                "v1-applio": model.final_proj(hs[-1])[0].numpy()}


@pytest.fixture(scope="module")
def jmodel(tiny):
    return load_hubert(tiny[1])


@pytest.mark.parametrize("output", ["v2", "v1", "v1-applio"])
def test_hf_folder_parity(tiny, jmodel, output):
    model, _ = tiny
    wav = _wav(8000)
    want = _ref(model, wav)[output]
    got = ContentFeatures(jmodel, output)(wav)
    assert got.dtype == np.float32 and got.shape == want.shape == (frames(8000), 32 if output == "v2" else 16)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    if output == "v1":  # layer 9 is not layer 12
        assert np.abs(got - _ref(model, wav)["v1-applio"]).max() > 1e-2


def test_bin_with_legacy_weight_norm_via_config_json(tiny, tmp_path):
    """pytorch_model.bin with the older weight_g/weight_v names (Applio's contentvec)."""
    model, folder = tiny
    sd = dict(model.state_dict())
    base = "encoder.pos_conv_embed.conv."
    sd[base + "weight_g"] = sd.pop(base + "parametrizations.weight.original0")
    sd[base + "weight_v"] = sd.pop(base + "parametrizations.weight.original1")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    m = load_hubert(tmp_path / "config.json")
    wav = _wav(6000, 3)
    np.testing.assert_allclose(ContentFeatures(m, "v1")(wav), _ref(model, wav)["v1"], atol=TOL, rtol=0)


@pytest.mark.parametrize("use_jit", [False, True])
def test_padded_rows_match_unpadded_clip(tiny, jmodel, use_jit):
    """The model with n_samples: padding (zeros or noise) changes no real frame. Three
    layers (fairseq output_layer=3 = HF hidden_states[3]) keep the unrolled compile short."""
    model, _ = tiny
    a, b = _wav(5000, 1), _wav(7321, 2)
    x = np.zeros((2, 9000), np.float32)
    x[0, :5000], x[1, :7321] = a, b
    x[0, 5000:] = 0.5  # garbage in the padding must not leak in
    fwd = lambda m, w, n: m(w, n, output_layer=3)  # noqa: E731
    run = nnx.jit(fwd) if use_jit else fwd
    y = np.asarray(run(jmodel, jnp.asarray(x), jnp.asarray([5000, 7321], jnp.int32)))
    for row, w in ((0, a), (1, b)):
        with torch.no_grad():
            want = model(torch.from_numpy(w)[None], output_hidden_states=True).hidden_states[3][0].numpy()
        np.testing.assert_allclose(y[row, : len(want)], want, atol=TOL, rtol=0)


def test_batch_matches_hf_per_clip(tiny, jmodel):
    model, _ = tiny
    lengths = [400, 719, 720, 2999, 8000, 5520, 8079, 399, 6100, 7000]  # two buckets (8 and 24 frames)
    wavs = [_wav(n, i) for i, n in enumerate(lengths)]
    seen = []
    feats = ContentFeatures(jmodel, "v1", batch_size=4)
    got = feats.batch(wavs, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(wavs), len(wavs)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    for n, w, g in zip(lengths, wavs, got):
        assert g.shape == (frames(n), 16)
        if n >= 400:
            np.testing.assert_allclose(g, _ref(model, w)["v1"], atol=TOL, rtol=0)


def test_frame_arithmetic_matches_hf_and_rvc_loader(tiny, jmodel, tmp_path):
    """N samples at 16 kHz -> RVC's 50 fps frame count; RVC's loader pairs each frame
    (repeated x2) with two 100 fps pitch frames and never runs out of pitch."""
    model, _ = tiny
    n = np.arange(0, 40000, 7)
    hf = model._get_feat_extract_output_lengths(torch.from_numpy(n)).numpy()  # HF's own conv arithmetic
    closed = np.where(n >= 400, (n - 400) // 320 + 1, 0)
    assert np.array_equal(np.maximum(hf, 0), closed)
    assert [frames(int(k)) for k in n] == closed.tolist()
    from rvc.lib.train.data_utils import TextAudioLoaderMultiNSFsid

    assert ContentFeatures(jmodel, "v2")(_wav(59200, 5)).shape == (frames(59200), 32)  # a 3.7 s segment
    for n_samples in (59200, 48000, 16000, 9999, 16080):  # 3.7 s and 3.0 s RVC segments, odd sizes
        f = np.zeros((frames(n_samples), 32), np.float32)
        f0_frames = 1 + n_samples // 160  # RMVPE / FCPE frame count
        assert 2 * f.shape[0] <= f0_frames
        np.save(tmp_path / "p.npy", f)
        np.save(tmp_path / "c.npy", np.ones(f0_frames, np.int64))
        np.save(tmp_path / "h.npy", np.ones(f0_frames))
        phone, pitch, pitchf = TextAudioLoaderMultiNSFsid.get_labels(
            None, str(tmp_path / "p.npy"), str(tmp_path / "c.npy"), str(tmp_path / "h.npy"))
        assert phone.shape[0] == pitch.shape[0] == pitchf.shape[0] == min(2 * f.shape[0], 900)
        np.testing.assert_array_equal(phone[0::2].numpy(), phone[1::2].numpy())
    assert frames(59200) * 2 == 368 and frames(48000) * 2 == 298  # the table in frontend-facts §5.2


def test_buckets():
    for t in (1, 8, 9, 100, 184, 185, 1000, 12345):
        b = bucket_frames(t)
        assert b >= t and (b - t) <= max(8, b // 8)


# ----------------------------------------------------------------------------- fairseq layout

# HF name -> fairseq name, written from fairseq's modules (fairseq/models/hubert/hubert.py:
# feature_extractor, layer_norm, post_extract_proj, encoder, final_proj, mask_emb,
# label_embs_concat; wav2vec2.py: ConvFeatureExtractionModel's Sequential(conv, dropout,
# Fp32GroupNorm, GELU) -> conv_layers.<i>.0 / .2, TransformerEncoder.pos_conv =
# Sequential(weight_norm(Conv1d), SamePad, GELU) -> pos_conv.0, TransformerSentenceEncoderLayer's
# self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm).
_HF_TO_FAIRSEQ = [
    ("feature_extractor.conv_layers.{i}.conv.weight", "feature_extractor.conv_layers.{i}.0.weight"),
    ("feature_extractor.conv_layers.0.layer_norm.{p}", "feature_extractor.conv_layers.0.2.{p}"),
    ("feature_projection.layer_norm.{p}", "layer_norm.{p}"),
    ("feature_projection.projection.{p}", "post_extract_proj.{p}"),
    ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
    ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
    ("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
    ("encoder.layers.{i}.attention.{q}_proj.{p}", "encoder.layers.{i}.self_attn.{q}_proj.{p}"),
    ("encoder.layers.{i}.layer_norm.{p}", "encoder.layers.{i}.self_attn_layer_norm.{p}"),
    ("encoder.layers.{i}.feed_forward.intermediate_dense.{p}", "encoder.layers.{i}.fc1.{p}"),
    ("encoder.layers.{i}.feed_forward.output_dense.{p}", "encoder.layers.{i}.fc2.{p}"),
    ("encoder.layers.{i}.final_layer_norm.{p}", "encoder.layers.{i}.final_layer_norm.{p}"),
    ("final_proj.{p}", "final_proj.{p}"),
    ("masked_spec_embed", "mask_emb"),
]


def _fairseq_state_dict(model):
    import re
    out = {}
    for k, v in model.state_dict().items():
        for hf, fs in _HF_TO_FAIRSEQ:
            rx = "^" + re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") \
                .replace(r"\{q\}", r"(?P<q>q|k|v|out)") + "$"
            m = re.match(rx, k)
            if m:
                out[fs.format(**m.groupdict())] = v.clone()
                break
        else:
            raise AssertionError(f"no fairseq name for {k}")
    out["label_embs_concat"] = torch.randn(504, 16)
    return out


@pytest.fixture()
def fake_fairseq_module():
    """Makes `fairseq.data.dictionary.Dictionary` picklable by name, as in real checkpoints."""
    names = ["fairseq", "fairseq.data", "fairseq.data.dictionary"]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType("fairseq.data.dictionary")

    class Dictionary:
        def __init__(self):
            self.symbols, self.count, self.indices = ["<s>", "<pad>"], [1, 1], {"<s>": 0, "<pad>": 1}

    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    mod.Dictionary = Dictionary
    sys.modules.update({"fairseq": types.ModuleType("fairseq"), "fairseq.data": types.ModuleType("fairseq.data"),
                        "fairseq.data.dictionary": mod})
    yield Dictionary
    for n, m in saved.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m


def _save_fairseq(path, model, Dictionary, *, normalize=False, with_args=False):
    ckpt = {
        "args": argparse.Namespace(normalize=normalize, conv_feature_layers=CONV, extractor_mode="default",
                                   encoder_attention_heads=4, layer_norm_first=False) if with_args else None,
        "cfg": None if with_args else {
            "_name": None, "common": {"fp16": True},
            "model": {"_name": "hubert", "extractor_mode": "default", "encoder_layers": 12,
                      "encoder_embed_dim": 32, "encoder_attention_heads": 4, "conv_feature_layers": CONV,
                      "conv_pos": 16, "conv_pos_groups": 4, "layer_norm_first": False, "final_dim": 16},
            "task": {"_name": "hubert_pretraining", "normalize": normalize, "sample_rate": 16000}},
        "model": _fairseq_state_dict(model),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 400000}],
        "task_state": {"dictionaries": [Dictionary()]},
        "extra_state": {"epoch": 100, "train_iterator": {"epoch": 100}, "previous_training_time": 1.0},
        "last_optimizer_state": None,
    }
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("with_args", [False, True], ids=["cfg", "args-namespace"])
def test_fairseq_checkpoint(tiny, tmp_path, fake_fairseq_module, with_args):
    model, _ = tiny
    path = _save_fairseq(tmp_path / "hubert_base.pt", model, fake_fairseq_module, with_args=with_args)
    sys.modules.pop("fairseq.data.dictionary")  # loading must not need fairseq
    with pytest.raises(pickle.UnpicklingError):  # why a plain weights_only load is not enough
        torch.load(path, weights_only=True)
    m = load_hubert(path)
    assert m.config.final_proj_dim == 16 and m.config.num_layers == 12 and not m.config.normalize_waveform
    wav = _wav(7500, 7)
    ref = _ref(model, wav)
    for output in ("v1", "v2"):
        np.testing.assert_allclose(ContentFeatures(m, output)(wav), ref[output], atol=TOL, rtol=0)


def test_fairseq_task_normalize(tiny, tmp_path, fake_fairseq_module):
    """task.normalize: RVC's extractor layer-normalises the waveform first."""
    model, _ = tiny
    m = load_hubert(_save_fairseq(tmp_path / "n.pt", model, fake_fairseq_module, normalize=True))
    assert m.config.normalize_waveform
    wav = _wav(7000, 8) + 0.3
    want = _ref(model, torch.nn.functional.layer_norm(torch.from_numpy(wav)[None], (1, 7000)).numpy()[0])["v2"]
    np.testing.assert_allclose(ContentFeatures(m, "v2")(wav), want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- refusals

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_pickled_code(tiny, tmp_path):
    model, _ = tiny
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _fairseq_state_dict(model), "cfg": {"x": _Evil(marker)}}, path)
    with pytest.raises(HubertFileError) as e:
        load_hubert(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "system" in msg and "\n" not in msg
    assert not marker.exists()


def test_wrong_kinds_of_file(tiny, tmp_path):
    model, folder = tiny
    rvc = tmp_path / "voice.pth"
    torch.save({"weight": {"enc_p.emb_phone.weight": torch.zeros(192, 768)}, "config": [1025], "version": "v2"}, rvc)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    w2v = tmp_path / "w2v"
    w2v.mkdir()
    (w2v / "config.json").write_text('{"model_type": "wav2vec2"}')
    (w2v / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    extra = tmp_path / "extra.bin"
    sd = dict(model.state_dict())
    sd["encoder.layers.0.attention.extra.weight"] = torch.zeros(3)
    torch.save(sd, extra)
    cases = {rvc: "RVC voice model", junk: "not a", empty: "empty", nocfg: "config.json",
             w2v / "config.json": "wav2vec2", extra: "encoder.layers.0.attention.extra.weight",
             tmp_path / "missing.pt": "not found"}
    for path, words in cases.items():
        with pytest.raises(HubertFileError) as e:
            load_hubert(path)
        msg = str(e.value)
        assert msg.startswith(str(path)) or str(path) in msg, msg
        assert words in msg and "\n" not in msg, msg


def test_rvc_loader_names_a_hubert_state_dict(tiny):
    """The other way round: the family registry says a HuBERT state dict is not an RVC model."""
    sd = {k: v.numpy() for k, v in tiny[0].state_dict().items()}
    with pytest.raises(families.DetectionError, match="HuBERT/ContentVec"):
        families.detect(sd, {}, layout="base")


def test_family_abstract_paths_are_hf_keys(jmodel):
    spec = families.get("hubert").spec(jmodel.config)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(families.get("hubert").abstract(spec),
                                                                             nnx.Param))}
    assert "encoder/layers/0/attention/k_proj/kernel" in paths
    assert "feature_extractor/conv_layers/0/layer_norm/weight" in paths
    assert "encoder/pos_conv_embed/conv/kernel" in paths and "final_proj/kernel" in paths


# ----------------------------------------------------------------------------- real size

@pytest.mark.slow
def test_hubert_base_real_config_parity():
    torch.manual_seed(0)
    model = randomize_norms_(HubertModelWithFinalProj(transformers.HubertConfig()).eval())
    from rvclora_convert.hubert import fold_pos_conv
    from rvclora_convert.state_dict import torch_to_flax
    fam = families.get("hubert")
    sd = fold_pos_conv({k: v.numpy() for k, v in model.state_dict().items() if k != "masked_spec_embed"})
    spec = fam.detect(sd, {}, layout="hf")
    assert spec.config.num_layers == 12 and spec.config.hidden_size == 768 and spec.config.final_proj_dim == 256
    m = fam.materialize(spec, torch_to_flax(fam.abstract(spec), sd))
    wav = _wav(16000, 9)
    ref = _ref(model, wav)
    for output in ("v2", "v1"):
        np.testing.assert_allclose(ContentFeatures(m, output)(wav), ref[output], atol=TOL, rtol=0)
