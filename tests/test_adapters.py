"""Adapter arithmetic: exact mixing, SVD compression, extraction from a voice, info, CLI.

ΔW references are computed by torch.nn.functional (linear / conv1d / conv_transpose1d)
from the factors, fed identity inputs, and each layer's kind is read off the model's
layer classes: nothing here is checked against the basis code under test.
"""

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from rvc.lib.infer_pack import models as rvc_models

from rvclora_convert import export as E
from rvclora_jax import adapters as A
from rvclora_jax import lora
from rvclora_jax.cli import main
from rvclora_jax.layers import Conv1d, ConvTranspose1d, Dense
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S
from tests.torch_ref import randomize_

NARROW = RVC.preset("v2", 48000).replace(inter_channels=16, hidden_channels=32, filter_channels=64,
                                       upsample_initial_channel=64, gin_channels=8, spk_embed_dim=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _kinds(model):
    """Each adaptable layer's kind, from the model's layer classes."""
    out = {}
    for path, m in nnx.iter_modules(model):
        for cls in (ConvTranspose1d, Conv1d, Dense):
            if isinstance(m, cls):
                out["/".join(map(str, path))] = cls.__name__
    return out


def torch_delta(kind, a, b, s):
    """ΔW = s·(adapter branch) in our kernel layout, computed by torch.nn.functional in float64
    on identity inputs: the composed map's response to every basis input is the kernel."""
    a, b = torch.tensor(np.asarray(a, np.float64)), torch.tensor(np.asarray(b, np.float64))
    with torch.no_grad():
        if kind == "Dense":  # a [in, r], b [r, out]: x -> (x a) b on x = I
            d = F.linear(F.linear(torch.eye(a.shape[0], dtype=torch.float64), a.T), b.T)  # [in, out]
        elif kind == "Conv1d":  # a [K, in, r] a conv, b [r, out] pointwise
            K, cin, r = a.shape
            # basis inputs e_(k,i) of length K: a valid conv gives one output sample = W[:, i, k]
            E = torch.eye(K * cin, dtype=torch.float64).reshape(K * cin, K, cin).permute(0, 2, 1)
            h = F.conv1d(E, a.permute(2, 1, 0))                                # [K*in, r, 1]
            d = F.conv1d(h, b.T[:, :, None])[..., 0].reshape(K, cin, -1)       # [K, in, out]
        else:  # ConvTranspose1d: a [in, r] pointwise first, b [K, r, out] a transposed conv
            cin = a.shape[0]
            h = F.conv1d(torch.eye(cin, dtype=torch.float64)[:, :, None], a.T[:, :, None])  # [in, r, 1]
            d = F.conv_transpose1d(h, b.permute(1, 2, 0)).permute(2, 0, 1)      # [in, out, K] -> [K, in, out]
    return s * d.numpy()


def _random_adapter(model, cfg, seed, emb=False):
    """Inject ``cfg`` into a copy of ``model`` and give every factor random values."""
    m = nnx.clone(model)
    lora.inject(m, cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)  # numpy: no XLA compile per factor shape
    for _, layer in lora.iter_lora_layers(m):
        if layer.has_lora:
            layer.lora_b[...] = jnp.asarray(0.05 * rng.standard_normal(layer.lora_b.shape), jnp.float32)
    if emb:
        m.emb_g.lora_delta[...] = jnp.asarray(0.1 * rng.standard_normal(m.emb_g.lora_delta.shape), jnp.float32)
    return nnx.to_pure_dict(nnx.state(m, lora.LoRAParam))


@pytest.fixture(scope="module")
def narrow():
    model = S.Synthesizer(NARROW, "v2", True, rngs=nnx.Rngs(0), with_enc_q=False)
    base = lora.partition(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[1]
    base = lora.unflatten({k: np.asarray(v) for k, v in lora.flatten(base).items()})
    return model, base


@pytest.fixture(scope="module")
def two_adapters(narrow, tmp_path_factory):
    model, base = narrow
    fp = A.fingerprint(base)
    c1 = lora.LoRAConfig.from_preset("generator", rank=4, alpha=8, rank_pattern={r"dec/ups/\d+": 6})
    c2 = lora.LoRAConfig(targets=lora.PRESETS["generator+flow"][0] + (r"enc_p/emb_phone",), rank=3, alpha=5,
                         use_rslora=True, train_embeddings=("emb_g",), exclude=(r"dec/conv_post",), preset=None)
    d = tmp_path_factory.mktemp("ads")
    out = []
    for i, (c, emb) in enumerate(((c1, False), (c2, True))):
        p = str(d / f"a{i}")
        A.save_adapter(p, _random_adapter(model, c, seed=i + 1, emb=emb), c, base_fingerprint=fp)
        out.append(A.load_adapter(p))
    return out


def _kernels(params):
    return {k: np.asarray(v, np.float64) for k, v in lora.flatten(params).items()}


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.5, -2.0)])
def test_mix_equals_weighted_sum_of_merges(narrow, two_adapters, tmp_path, weights):
    model, base = narrow
    a1, a2 = two_adapters
    mixed = A.mix([a1, a2], list(weights))
    assert mixed.base_fingerprint == A.mixed_fingerprint([a1, a2]) == a1.base_fingerprint
    # reference: base + w1·Δ1 + w2·Δ2, each ΔW from torch, the speaker table by addition
    fb = _kernels(base)
    kinds = _kinds(model)
    fw = dict(fb)
    for ad, w in zip((a1, a2), weights):
        for path, (a, b) in lora.adapter_layers(ad.params).items():
            fw[f"{path}/kernel"] = fw[f"{path}/kernel"] + w * torch_delta(
                kinds[path], a, b, ad.config.scaling_for(path, a.shape[-1]))
        for path, dv in lora.adapter_deltas(ad.params).items():
            fw[f"{path}/embedding"] = fw[f"{path}/embedding"] + w * np.asarray(dv, np.float64)
    # round trip through the files, then merge
    A.save_adapter(str(tmp_path / "mix"), mixed.params, mixed.config, kinds=mixed.kinds,
                   base_fingerprint=mixed.base_fingerprint)
    ad = A.load_adapter(str(tmp_path / "mix"))
    assert ad.kinds == {p: kinds[p] for p in lora.adapter_layers(ad.params)}
    got = lora.merge(base, ad.params, ad.config, kinds=ad.kinds)
    fg = _kernels(got)
    assert fw.keys() == fg.keys()
    worst = 0.0
    for k in fw:
        d_want, d_got = fw[k] - fb[k], fg[k] - fb[k]
        if np.any(d_want):
            worst = max(worst, _rel_err(d_got, d_want))
        np.testing.assert_allclose(fg[k], fw[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert worst <= 1e-5, worst
    # ranks concatenate, targets are exactly the mixed layers, scaling 1
    layers = lora.adapter_layers(ad.params)
    l1, l2 = lora.adapter_layers(a1.params), lora.adapter_layers(a2.params)
    assert set(layers) == set(l1) | set(l2)
    assert layers["dec/ups/0"][0].shape[-1] == 6 + 3 and layers["dec/conv_post"][0].shape[-1] == 4
    assert ad.config.scaling_for("dec/ups/0", 9) == 1.0
    assert ad.config.train_embeddings == ("emb_g",)
    all_paths = [p for p, _ in lora.iter_lora_layers(model)]
    assert sorted(p for p in all_paths if ad.config.matches(p)) == sorted(layers)
    # applies to a model through the ordinary path
    fresh = nnx.clone(model)
    A.apply_adapter(fresh, ad)
    merged_model = lora.merge_model(fresh)
    np.testing.assert_allclose(np.asarray(merged_model["dec"]["ups"][1]["kernel"]),
                               fw["dec/ups/1/kernel"], rtol=1e-5, atol=1e-6)


def test_mix_rejects_different_architectures(two_adapters, tmp_path):
    a1, a2 = two_adapters
    other = A.Adapter(a2.params, a2.config, {"structure": "0123456789abcdef"}, {}, str(tmp_path / "other"))
    with pytest.raises(ValueError) as e:
        A.mix([a1, other], [1.0, 1.0])
    assert a1.directory in str(e.value) and str(tmp_path / "other") in str(e.value)


def test_compress_full_rank_is_lossless_and_truncation_matches_numpy(narrow, two_adapters):
    model, base = narrow
    a1, a2 = two_adapters
    mixed = A.mix([a1, a2], [1.0, -0.5])
    cfg = mixed.config
    # a cross-section keeps the test fast: every layer kind, ranks 3 / 4 / 6 / 7 / 9
    keep = r"dec/(ups/\d+|conv_pre|conv_post|noise_convs/0|resblocks/0/.*)|flow/flows/0/.*|enc_p/emb_phone|emb_g"
    params = lora.unflatten({k: v for k, v in lora.flatten(mixed.params).items()
                             if re.fullmatch(keep, k.rsplit("/", 1)[0])})
    kinds = _kinds(model)
    ad = A.Adapter(params, cfg, kinds={p: mixed.kinds[p] for p in lora.adapter_layers(params)})
    assert ad.kinds == {p: kinds[p] for p in lora.adapter_layers(params)}
    assert set(ad.kinds.values()) == {"Dense", "Conv1d", "ConvTranspose1d"}
    full, rep_full = A.compress(ad, 10_000)
    got = lora.merge(base, full.params, full.config, kinds=full.kinds)
    fb, fg = _kernels(base), _kernels(got)
    for path, (a, b) in lora.adapter_layers(params).items():  # exact mixed ΔW in float64
        want = torch_delta(kinds[path], a, b, cfg.scaling_for(path, a.shape[-1]))
        assert _rel_err(fg[f"{path}/kernel"] - fb[f"{path}/kernel"], want) <= 1e-5, path
    # the speaker-table delta is kept bit for bit, and merges by exact float32 addition
    dv = np.asarray(params["emb_g"]["lora_delta"], np.float32)
    np.testing.assert_array_equal(np.asarray(full.params["emb_g"]["lora_delta"]), dv)
    np.testing.assert_array_equal(np.asarray(got["emb_g"]["embedding"]),
                                  np.asarray(base["emb_g"]["embedding"], np.float32) + dv)
    assert rep_full.kept == pytest.approx(1.0, abs=1e-9)
    # truncated: rank 3 (< 9 in dec/ups, < 7 in the generator convs)
    R = 3
    ad3, rep3 = A.compress(ad, R)
    p3 = ad3.params
    merged3 = _kernels(lora.merge(base, p3, ad3.config, kinds=ad3.kinds))
    rows = {r.path: r for r in rep3.layers}
    assert set(rows) == set(lora.adapter_layers(params))
    for path, (a, b) in lora.adapter_layers(params).items():
        kind = kinds[path]
        delta = torch_delta(kind, a, b, cfg.scaling_for(path, a.shape[-1]))
        if kind == "Dense":
            M = delta
        elif kind == "Conv1d":
            M = delta.reshape(-1, delta.shape[-1])
        else:
            M = delta.transpose(1, 0, 2).reshape(delta.shape[1], -1)
        U, s, Vt = np.linalg.svd(M, full_matrices=False)
        k = min(R, s.size)
        want_kept = (s[:k] ** 2).sum() / (s ** 2).sum()
        assert rows[path].kept == pytest.approx(want_kept, rel=1e-9, abs=1e-12), path
        assert rows[path].discarded == pytest.approx((s[k:] ** 2).sum(), rel=1e-6, abs=1e-12), path
        Mk = (U[:, :k] * s[:k]) @ Vt[:k]
        if kind == "Dense":
            rec = Mk
        elif kind == "Conv1d":
            rec = Mk.reshape(delta.shape)
        else:
            rec = Mk.reshape(delta.shape[1], delta.shape[0], delta.shape[2]).transpose(1, 0, 2)
        got_d = merged3[f"{path}/kernel"] - fb[f"{path}/kernel"]
        assert _rel_err(got_d, rec) <= 1e-5, path
        assert _rank(p3, path) == k
    assert rep3.kept < 1.0 and rep3.discarded_energy > 0


def _rank(params, path):
    return int(lora.adapter_layers(params)[path][0].shape[-1])


def test_info_lists_ranks_and_norms(two_adapters):
    a1, _ = two_adapters
    text = A.info(a1)
    assert "dec.ups.0" in text and "ConvTranspose1d" in text and "structure=" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("dec.ups.0 "))
    assert " 6 " in line  # rank 6 from rank_pattern
    line = next(ln for ln in text.splitlines() if ln.startswith("dec.conv_post "))
    assert " 4 " in line
    assert "bytes" in text


# ------------------------------------------------------------------ extraction against RVC
def _rvc_net(sd_or_ckpt):
    net = rvc_models.SynthesizerTrnMs768NSFsid(*NARROW.to_list(), is_half=False)
    del net.enc_q
    net.load_state_dict(sd_or_ckpt, strict=True)
    return net.eval()


def _rvc_infer_noise_off(net, *args):
    orig = torch.randn_like
    torch.randn_like = lambda x, *a, **k: torch.zeros_like(x)
    try:
        with torch.no_grad():
            return net.infer(*args)[0].numpy()
    finally:
        torch.randn_like = orig


def _run(argv):
    """``rvclora adapters ...`` through the real CLI entry point."""
    return main(argv)


@pytest.mark.slow  # ~60 s: full-size extraction rendered by RVC; extraction's maths is test_extract_rank8_energy_matches_direct_svd's
def test_extract_full_rank_reproduces_voice_in_rvc(tmp_path, capsys):
    torch.manual_seed(0)
    ref = randomize_(rvc_models.SynthesizerTrnMs768NSFsid(*NARROW.to_list(), is_half=False).eval(), 0)
    base_path = str(tmp_path / "base.pth")
    w = {k: v for k, v in ref.state_dict().items() if not k.startswith("enc_q.")}
    torch.save({"weight": w, "config": NARROW.to_list(), "info": "base", "sr": "48k", "f0": 1, "version": "v2"},
               base_path)  # an RVC inference file, kept in fp32
    src = E.load_source(base_path)
    # voice = base + a random adapter with a speaker delta, exported by RVC-compatible code
    cfg = lora.LoRAConfig.from_preset("generator+prior", rank=4, alpha=8, train_embeddings=("emb_g",))
    ad = _random_adapter(src.model, cfg, seed=5, emb=True)
    A.save_adapter(str(tmp_path / "true"), ad, cfg, base_fingerprint=A.fingerprint(src.params))
    voice_path = str(tmp_path / "voice.pth")
    E.export(src, voice_path, adapter=str(tmp_path / "true"), fp32=True)
    out = str(tmp_path / "extracted")
    assert _run(["adapters", "extract", "--base", base_path, "--voice", voice_path, "--rank", "100000",
                 "--keep-full", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "probe" in text and "emb_g" in text
    voice = E.load_source(voice_path)
    ex = A.load_adapter(out)
    assert ex.config.train_embeddings == ("emb_g",)
    assert ex.kinds == {p: k for p, k in _kinds(src.model).items() if p in ex.kinds}
    merged = lora.flatten(lora.merge(src.params, ex.params, ex.config, kinds=ex.kinds))
    fv = lora.flatten(voice.params)
    worst = 0.0
    for k, v in fv.items():
        if k.endswith("/kernel") or k.endswith("/embedding"):
            worst = max(worst, _rel_err(merged[k], v))
    assert worst <= 1e-5, worst
    # base + extracted, exported and rendered by RVC, equals the voice file rendered by RVC
    out_pth = str(tmp_path / "re.pth")
    E.export(src, out_pth, adapter=out, fp32=True)
    net_re = _rvc_net(torch.load(out_pth, weights_only=True)["weight"])
    net_voice = _rvc_net(torch.load(voice_path, weights_only=True)["weight"])
    B, T = 1, 20
    g = torch.Generator().manual_seed(3)
    phone, f0 = torch.randn(B, T, 768, generator=g), 100 + 150 * torch.rand(B, T, generator=g)
    pitch, lengths, sid = torch.randint(1, 256, (B, T), generator=g), torch.tensor([T]), torch.tensor([2])
    y_voice = _rvc_infer_noise_off(net_voice, phone, lengths, pitch, f0, sid)
    y_re = _rvc_infer_noise_off(net_re, phone, lengths, pitch, f0, sid)
    err = float(np.abs(y_voice - y_re).max())
    print(f"RVC audio max abs err {err:.3e} (peak {np.abs(y_voice).max():.3e}), kernel rel err {worst:.3e}")
    assert err <= 1e-4, err
    y_base = _rvc_infer_noise_off(_rvc_net(w), phone, lengths, pitch, f0, sid)
    assert np.abs(y_voice - y_base).max() > 100 * max(err, 1e-7)  # the voice really differs
    # the export command line path: fingerprint of the base matches
    assert ex.base_fingerprint == A.fingerprint(src.params)


def test_extract_reports_what_an_adapter_cannot_hold(narrow):
    model, base = narrow
    cfg = lora.LoRAConfig.from_preset("generator", rank=3)
    ad = _random_adapter(model, cfg, seed=9)
    voice = lora.flatten(lora.merge(base, ad, cfg))
    voice = {k: np.asarray(v, np.float32).copy() for k, v in voice.items()}
    voice["dec/ups/0/bias"] += 0.1
    voice["emb_g/embedding"][1] += 0.3
    voice["enc_p/encoder/attn_layers/0/conv_q/kernel"] += 0.01   # not targeted by "generator"
    voice["enc_p/encoder/norm_layers_1/0/gamma"] += 0.05
    voice = lora.unflatten(voice)
    ex, rep = A.extract(base, voice, rank=3, config_targets="generator", model=model)
    byp = {x.path: x for x in rep.full}
    assert byp["dec/ups/0/bias"].what == "bias" and not byp["dec/ups/0/bias"].stored
    assert byp["emb_g/embedding"].what == "embedding" and not byp["emb_g/embedding"].stored
    assert byp["enc_p/encoder/attn_layers/0/conv_q/kernel"].what == "untargeted kernel"
    assert byp["enc_p/encoder/norm_layers_1/0/gamma"].what == "layernorm"
    assert byp["dec/ups/0/bias"].rel_change > 0
    assert rep.probe is not None and rep.probe["max_abs_err"] > 0  # bias etc. not reproduced
    assert all(r.kept == pytest.approx(1.0, abs=1e-9) for r in rep.energy.layers)  # rank 3 = true rank
    text = rep.format()
    assert "dec.ups.0.bias" in text and "emb_g.embedding" in text
    # keep_full stores the speaker table
    ex, rep = A.extract(base, voice, rank=3, config_targets="generator", model=model, keep_full=True,
                        probe=False)
    assert ex.config.train_embeddings == ("emb_g",)
    np.testing.assert_allclose(np.asarray(ex.params["emb_g"]["lora_delta"])[1], 0.3, atol=1e-6)
    assert {x.path for x in rep.full if x.stored} == {"emb_g/embedding"}


def test_cli_mix_with_rank_and_info(two_adapters, tmp_path, capsys):
    a1, a2 = two_adapters
    out = str(tmp_path / "m")
    assert _run(["adapters", "mix", f"{a1.directory}:0.5", f"{a2.directory}:-1", "--out", out, "--rank", "2"]) == 0
    text = capsys.readouterr().out
    assert "energy kept" in text and "discarded" in text
    ad = A.load_adapter(out)
    assert max(a.shape[-1] for a, _ in lora.adapter_layers(ad.params).values()) == 2
    assert _run(["adapters", "info", out]) == 0
    assert "dec.ups.0" in capsys.readouterr().out
    assert _run(["adapters", "mix", f"{a1.directory}:abc", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "abc" in err, err
    assert not os.path.exists(tmp_path / "x")


def test_extract_rank8_energy_matches_direct_svd(narrow):
    """A full-rank 'fine-tune' (every targeted kernel perturbed): the report's kept energy at
    rank 8 equals Σσ²(top 8)/Σσ² of the reshaped ΔW computed directly with numpy."""
    model, base = narrow
    rng = np.random.default_rng(5)
    flat = {k: np.asarray(v, np.float32) for k, v in lora.flatten(base).items()}
    voice = dict(flat)
    targets = {"dec/ups/0": "convt", "dec/conv_pre": "conv", "dec/resblocks/3/convs1/1": "conv"}
    for p in targets:
        voice[p + "/kernel"] = flat[p + "/kernel"] + 0.01 * rng.standard_normal(flat[p + "/kernel"].shape).astype(
            np.float32)
    cfg = lora.LoRAConfig(targets=tuple(targets), rank=8, preset=None)
    ex, rep = A.extract(base, lora.unflatten(voice), rank=8, config_targets=cfg, model=model, probe=False)
    params, c = ex.params, ex.config
    assert ex.kinds == {"dec/ups/0": "ConvTranspose1d", "dec/conv_pre": "Conv1d", "dec/resblocks/3/convs1/1": "Conv1d"}
    by = {r.path: r for r in rep.energy.layers}
    for p, kind in targets.items():
        d = (voice[p + "/kernel"].astype(np.float64) - flat[p + "/kernel"].astype(np.float64))
        k, i, o = d.shape
        m = d.reshape(k * i, o) if kind == "conv" else d.transpose(1, 0, 2).reshape(i, k * o)
        s = np.linalg.svd(m, compute_uv=False)
        want = float((s[:8] ** 2).sum() / (s ** 2).sum())
        assert by[p].rank_kept == 8 and min(m.shape) > 8
        assert by[p].kept == pytest.approx(want, rel=1e-4), p
        assert by[p].discarded == pytest.approx(float((s[8:] ** 2).sum()), rel=1e-3), p
        # and the stored factors reproduce the truncated reconstruction
        merged = lora.flatten(lora.merge(base, params, c, kinds=ex.kinds))
        got = np.asarray(merged[p + "/kernel"], np.float64) - flat[p + "/kernel"]
        gm = got.reshape(k * i, o) if kind == "conv" else got.transpose(1, 0, 2).reshape(i, k * o)
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        np.testing.assert_allclose(gm, (u[:, :8] * sv[:8]) @ vt[:8], atol=2e-6)
