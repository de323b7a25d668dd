"""LoRA on the RVC port: presets, base paths, and merged weights rendered by RVC's own code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from rvc.lib.infer_pack import models as rvc_models

from rvclora_convert.state_dict import flax_to_torch, torch_to_flax
from rvclora_jax import adapters as A
from rvclora_jax import lora
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S
from rvclora_jax.params import load_params
from tests.torch_ref import assert_close, randomize_, state_dict_np, t2j


pytestmark = pytest.mark.usefixtures("no_torch_grad")

# A narrow model with RVC's exact structure (v2 48k schedule, f0) keeps this fast.
CFG = RVC.preset("v2", 48000).replace(inter_channels=16, hidden_channels=32, filter_channels=64,
                                    upsample_initial_channel=64, gin_channels=8, spk_embed_dim=4)


def _paths(model):
    return sorted(lora.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


@pytest.mark.parametrize("preset_name", list(lora.PRESETS))
def test_presets_keep_base_paths_and_wrap_what_they_say(preset_name):
    model = S.Synthesizer(CFG, "v2", True, rngs=nnx.Rngs(0))
    before = _paths(model)
    adapted = lora.inject(model, lora.LoRAConfig.from_preset(preset_name, rank=2), rngs=nnx.Rngs(1))
    after = _paths(model)
    base_after = [p for p in after if not p.endswith(("lora_a", "lora_b"))]
    assert base_after == before  # base paths identical with or without LoRA
    assert sorted(p for p in after if p.endswith(("lora_a", "lora_b"))) == sorted(
        f"{a}/{k}" for a in adapted for k in ("lora_a", "lora_b"))
    tops = {p.split("/")[0] for p in adapted}
    assert "dec" in tops and "enc_q" not in tops and "emb_g" not in tops
    assert ("flow" in tops) == (preset_name in ("generator+flow", "generator+prior"))
    assert ("enc_p" in tops) == (preset_name == "generator+prior")
    if preset_name == "ups":
        assert adapted == [f"dec/ups/{i}" for i in range(4)]
    else:
        assert "dec/m_source/l_linear" not in adapted
        assert {"dec/conv_pre", "dec/cond", "dec/conv_post", "dec/noise_convs/0",
                "dec/resblocks/11/convs1/2", "dec/resblocks/0/convs2/0"} <= set(adapted)


def test_merged_adapter_rendered_by_rvc_matches_adapted_jax_model():
    """Adapted JAX model == RVC's own torch infer on the merged, weight-norm-refactored weights."""
    torch.manual_seed(0)
    ref = randomize_(rvc_models.SynthesizerTrnMs768NSFsid(*CFG.to_list(), is_half=False).eval())
    sd = state_dict_np(ref)
    model = S.Synthesizer(CFG, "v2", True, rngs=nnx.Rngs(0))
    load_params(model, torch_to_flax(model, sd))
    config = lora.LoRAConfig.from_preset("generator+prior", rank=4, alpha=8, rank_pattern={r"dec/ups/\d+": 6})
    lora.inject(model, config, rngs=nnx.Rngs(1))
    key = jax.random.key(2)
    for _, layer in lora.iter_lora_layers(model):
        if layer.has_lora:
            key, k = jax.random.split(key)
            layer.lora_b[...] = 0.05 * jax.random.normal(k, layer.lora_b.shape)
    assert model.dec.ups[0].lora_a.shape == (64, 6)  # ups.0 is 64 -> 32 channels here

    B, T = 1, 20
    g = torch.Generator().manual_seed(3)
    phone, pitchf = torch.randn(B, T, 768, generator=g), 100 + 150 * torch.rand(B, T, generator=g)
    pitch, lengths, sid = torch.randint(1, 256, (B, T), generator=g), torch.tensor([T]), torch.tensor([1])
    ours, *_ = model.infer(jnp.asarray(phone.numpy()), jnp.asarray(lengths.numpy()), jnp.asarray(pitch.numpy()),
                           jnp.asarray(pitchf.numpy()), jnp.asarray(sid.numpy()))

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    adapter, base = lora.partition(params)
    merged = lora.merge(base, adapter, config)
    rvc_sd = flax_to_torch(model, merged)
    assert set(rvc_sd) == set(sd)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in rvc_sd.items()}, strict=True)
    # RVC's infer with its noise switched off: zero prior noise, zero source noise.
    orig_randn_like = torch.randn_like
    try:
        torch.randn_like = lambda x, *a, **k: torch.zeros_like(x)
        want, *_ = ref.infer(phone, lengths, pitch, pitchf, sid)
    finally:
        torch.randn_like = orig_randn_like
    err, rel = assert_close(ours, t2j(want), atol=1e-4, name="adapted JAX vs RVC(merged)")
    # and the adapter really changed the output
    base_model = S.Synthesizer(CFG, "v2", True, rngs=nnx.Rngs(0))
    load_params(base_model, torch_to_flax(base_model, sd))
    plain, *_ = base_model.infer(jnp.asarray(phone.numpy()), jnp.asarray(lengths.numpy()),
                                 jnp.asarray(pitch.numpy()), jnp.asarray(pitchf.numpy()), jnp.asarray(sid.numpy()))
    assert np.abs(np.asarray(plain) - np.asarray(ours)).max() > 100 * max(err, 1e-7)


def test_unmerge_restores_base_weights():
    model = S.Synthesizer(CFG, "v2", True, rngs=nnx.Rngs(0), with_enc_q=False)
    config = lora.LoRAConfig.from_preset("generator", rank=3)
    lora.inject(model, config, rngs=nnx.Rngs(1))
    for _, layer in lora.iter_lora_layers(model):
        if layer.has_lora:
            layer.lora_b[...] = jnp.ones(layer.lora_b.shape) * 0.1
    adapter, base = lora.partition(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    back = lora.unmerge(lora.merge(base, adapter, config), adapter, config)
    fb, fr = lora.flatten(base), lora.flatten(back)
    assert fb.keys() == fr.keys()
    for k in fb:
        np.testing.assert_allclose(np.asarray(fr[k]), np.asarray(fb[k]), rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow  # ~40 s on the full-size model; --train-speaker is off by default
def test_speaker_embedding_delta_trains_one_row_and_merges_exactly(tmp_path):
    """train_embeddings=("emb_g",): a full-size delta of the speaker table (modules_to_save)."""
    model = S.Synthesizer(CFG, "v2", True, rngs=nnx.Rngs(0), with_enc_q=False)
    base = lora.partition(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[1]
    cfg = lora.LoRAConfig.from_preset("ups", rank=2, train_embeddings=("emb_g",))
    assert "emb_g" in lora.inject(model, cfg, rngs=nnx.Rngs(1))
    T = 10
    x = (jnp.ones((1, T, 768)), jnp.array([T]), jnp.full((1, T), 60, jnp.int32), jnp.full((1, T), 150.0),
         jnp.array([2]))
    y0 = model.infer(*x)[0]
    graphdef, adapter, rest = nnx.split(model, lora.LoRAParam, ...)

    def loss(ad):
        return jnp.sum(nnx.merge(graphdef, ad, rest).infer(*x)[0] ** 2)

    grads = jax.grad(loss)(adapter)
    gd = np.asarray(nnx.to_pure_dict(grads)["emb_g"]["lora_delta"])
    assert np.abs(gd[2]).max() > 0 and np.abs(np.delete(gd, 2, axis=0)).max() == 0  # only row sid=2
    model.emb_g.lora_delta[...] = model.emb_g.lora_delta[...].at[2].set(0.5)
    y1 = model.infer(*x)[0]
    assert np.abs(np.asarray(y1 - y0)).max() > 1e-4
    ad = nnx.to_pure_dict(nnx.state(model, lora.LoRAParam))
    merged = lora.merge(base, ad, cfg)
    np.testing.assert_array_equal(np.asarray(merged["emb_g"]["embedding"])[2],
                                  np.asarray(base["emb_g"]["embedding"])[2] + np.float32(0.5))
    plain = S.Synthesizer(CFG, "v2", True, rngs=nnx.Rngs(7), with_enc_q=False)
    load_params(plain, merged)
    assert_close(plain.infer(*x)[0], y1, atol=1e-5, name="merged speaker delta")
    A.save_adapter(str(tmp_path), ad, cfg, base_fingerprint=A.fingerprint(base))
    fresh = S.Synthesizer(CFG, "v2", True, rngs=nnx.Rngs(0), with_enc_q=False)
    A.apply_adapter(fresh, A.load_adapter(str(tmp_path)))
    np.testing.assert_array_equal(np.asarray(fresh.infer(*x)[0]), np.asarray(y1))
    back = lora.unmerge(merged, ad, cfg)
    np.testing.assert_allclose(np.asarray(back["emb_g"]["embedding"]), np.asarray(base["emb_g"]["embedding"]),
                               atol=1e-6)
