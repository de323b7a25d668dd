"""Whole synthesizers against RVC's four PyTorch classes: ``infer`` and the training forward."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from rvc.lib.infer_pack import models as rvc_models

from rvclora_convert.state_dict import StateDictError, flax_to_torch, torch_to_flax
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S
from tests.torch_ref import assert_close, load_torch_into, randomize_, state_dict_np, t2j


pytestmark = pytest.mark.usefixtures("no_torch_grad")

CLASSES = {
    ("v1", True): rvc_models.SynthesizerTrnMs256NSFsid,
    ("v2", True): rvc_models.SynthesizerTrnMs768NSFsid,
    ("v1", False): rvc_models.SynthesizerTrnMs256NSFsid_nono,
    ("v2", False): rvc_models.SynthesizerTrnMs768NSFsid_nono,
}


def _pair(version, f0, cfg, seed=0):
    torch.manual_seed(seed)
    ref = CLASSES[(version, f0)](*cfg.to_list(), is_half=False).eval()
    randomize_(ref, seed)
    ours = load_torch_into(S.Synthesizer(cfg, version, f0, rngs=nnx.Rngs(0)), ref)
    return ref, ours


def _inputs(version, B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = 256 if version == "v1" else 768
    phone = torch.randn(B, T, dim, generator=g)
    lengths = torch.tensor([T, T - 7][:B])
    pitchf = 90 + 250 * torch.rand(B, T, generator=g)
    pitchf[:, 3:6] = 0
    pitch = torch.randint(1, 256, (B, T), generator=g)
    sid = torch.tensor([3, 0][:B])
    return phone, lengths, pitch, pitchf, sid


# Default run: every class at one rate (f0 → 32k, nono → 40k); the full matrix is slow. 48 kHz
# (the slowest to build and run) is only there; test_port_modules checks every rate's generator.
FAST = [("v1", True, 32000), ("v2", True, 32000), ("v1", False, 40000), ("v2", False, 40000)]
SLOW = [(v, f, sr) for v in ("v1", "v2") for f in (True, False) for sr in (32000, 40000, 48000)
        if (v, f, sr) not in FAST]


def _check_infer(version, f0, sr):
    cfg = RVC.preset(version, sr)
    ref, ours = _pair(version, f0, cfg)
    phone, lengths, pitch, pitchf, sid = _inputs(version)
    B, T = phone.shape[:2]
    torch.manual_seed(21)
    if f0:
        want = ref.infer(phone, lengths, pitch, pitchf, sid)
    else:
        want = ref.infer(phone, lengths, sid)
    # regenerate torch's draws in call order: prior noise, (SineGen rand_ini, source noise)
    torch.manual_seed(21)
    eps = torch.randn(B, cfg.inter_channels, T)
    if f0:
        torch.rand(B, 1)
        noise = jnp.asarray(torch.randn(B, T * cfg.hop_length, 1).numpy())
    else:
        noise = None
    got = ours.infer(jnp.asarray(phone.numpy()), jnp.asarray(lengths.numpy()),
                     jnp.asarray(pitch.numpy()) if f0 else None, jnp.asarray(pitchf.numpy()) if f0 else None,
                     jnp.asarray(sid.numpy()), eps=jnp.asarray(t2j(eps)), source_noise=noise)
    o, x_mask, (z, z_p, m_p, logs_p) = got
    wo, wmask, (wz, wz_p, wm_p, wlogs_p) = want
    for name, a, b in [("m_p", m_p, wm_p), ("logs_p", logs_p, wlogs_p), ("z_p", z_p, wz_p), ("z", z, wz),
                       ("x_mask", x_mask, wmask), ("o", o, wo)]:
        assert_close(a, t2j(b), atol=1e-4, name=f"infer {version} f0={f0} {sr}: {name}")


def _check_train_forward(version, f0, sr):
    cfg = RVC.preset(version, sr).replace(segment_size=8)  # frames
    ref, ours = _pair(version, f0, cfg, seed=1)
    phone, lengths, pitch, pitchf, sid = _inputs(version, seed=1)
    B, T = phone.shape[:2]
    g = torch.Generator().manual_seed(2)
    spec = torch.rand(B, cfg.spec_channels, T, generator=g)
    torch.manual_seed(33)
    if f0:
        want = ref(phone, lengths, pitch, pitchf, spec, lengths, sid)
    else:
        want = ref(phone, lengths, spec, lengths, sid)
    torch.manual_seed(33)
    eps_q = torch.randn(B, cfg.inter_channels, T)
    torch.rand(B)  # slice starts (we take torch's ids_slice from its output)
    noise = None
    if f0:
        torch.rand(B, 1)
        noise = jnp.asarray(torch.randn(B, cfg.segment_size * cfg.hop_length, 1).numpy())
    ids = want[1]
    got = ours(jnp.asarray(phone.numpy()), jnp.asarray(lengths.numpy()), jnp.asarray(pitch.numpy()),
               jnp.asarray(pitchf.numpy()), jnp.asarray(t2j(spec)), jnp.asarray(lengths.numpy()),
               jnp.asarray(sid.numpy()), ids_slice=jnp.asarray(ids.numpy()), eps_q=jnp.asarray(t2j(eps_q)),
               source_noise=noise)
    o, _, x_mask, y_mask, stats = got
    wo, _, wx_mask, wy_mask, wstats = want
    assert_close(o, t2j(wo), name="o")
    assert_close(x_mask, t2j(wx_mask), name="x_mask")
    assert_close(y_mask, t2j(wy_mask), name="y_mask")
    for name, a, b in zip(("z", "z_p", "m_p", "logs_p", "m_q", "logs_q"), stats, wstats):
        assert_close(a, t2j(b), atol=1e-4, name=f"train {version} f0={f0} {sr}: {name}")


@pytest.mark.parametrize("version,f0,sr", FAST)
def test_infer_matches_rvc(version, f0, sr):
    _check_infer(version, f0, sr)


# The training forward (posterior encoder, slicing, the NSF source on a segment) of one f0
# and one nono class by default; the other two classes (whose inference parity runs above)
# with -m slow.
TRAIN_FAST = [FAST[0], FAST[3]]


@pytest.mark.parametrize("version,f0,sr", TRAIN_FAST + [pytest.param(*c, marks=pytest.mark.slow)
                                                         for c in FAST if c not in TRAIN_FAST])
def test_train_forward_matches_rvc(version, f0, sr):
    _check_train_forward(version, f0, sr)


@pytest.mark.slow
@pytest.mark.parametrize("version,f0,sr", SLOW)
def test_infer_matches_rvc_all_rates(version, f0, sr):
    _check_infer(version, f0, sr)


@pytest.mark.slow
@pytest.mark.parametrize("version,f0,sr", SLOW)
def test_train_forward_matches_rvc_all_rates(version, f0, sr):
    _check_train_forward(version, f0, sr)


# Key maps and counts for one v2 f0 and one v1 nono class by default (the two differ in
# every part that varies: feature width, pitch embedding, NSF source); all four with -m slow.
_KEYS_FAST = [("v2", True), ("v1", False)]


@pytest.mark.parametrize("version,f0", _KEYS_FAST + [pytest.param(*c, marks=pytest.mark.slow)
                                                     for c in CLASSES if c not in _KEYS_FAST])
def test_state_dict_keys_and_counts(version, f0):
    """Every RVC key maps (strict both ways) and parameter counts equal RVC's."""
    cfg = RVC.preset(version, 40000)
    torch.manual_seed(0)
    ref = CLASSES[(version, f0)](*cfg.to_list(), is_half=False)
    ours = S.Synthesizer(cfg, version, f0, rngs=nnx.Rngs(0))
    n_ours = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(nnx.state(ours, nnx.Param)))
    n_ref = sum(p.numel() for p in ref.parameters())
    # weight norm is folded here: one kernel instead of (g, v), so RVC has one g per channel more
    n_g = sum(p.numel() for k, p in ref.named_parameters() if k.endswith("weight_g"))
    assert n_ours == n_ref - n_g
    assert n_ref == {("v1", True): 36_360_514, ("v2", True): 36_458_818,
                     ("v1", False): 36_289_088, ("v2", False): 36_387_392}[(version, f0)]  # sum of the RVC state dict tensor sizes
    sd = state_dict_np(ref)
    back = flax_to_torch(ours, torch_to_flax(ours, sd))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape, k
    # weights round-trip: g and v may be re-factored, but the folded weight is the same
    ref2 = CLASSES[(version, f0)](*cfg.to_list(), is_half=False)
    ref2.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for (k, a), b in zip(ref.state_dict().items(), ref2.state_dict().values()):
        if not k.endswith(("weight_g", "weight_v")):
            assert torch.equal(a, b), k


def test_config_list_round_trip_and_presets():
    cfg = RVC.preset("v2", "48k")
    lst = cfg.to_list()
    assert len(lst) == 18 and lst[12] == [12, 10, 2, 2] and lst[14] == [24, 20, 4, 4]
    assert S.SynthConfig.from_list(lst) == cfg
    assert S.SynthConfig.from_list(lst[:17] + ["48k"]).sr == 48000
    assert RVC.preset("v2", 40000) == RVC.preset("v1", "40000")  # RVC reuses v1/40k.json for v2
    assert RVC.preset("v1", 32000).hop_length == 320 and RVC.preset("v2", 48000).hop_length == 480
    with pytest.raises(ValueError):
        RVC.preset("v3", 40000)
    with pytest.raises(ValueError):
        S.SynthConfig.from_list(lst[:17])


def test_inference_model_without_enc_q_is_strict():
    cfg = RVC.preset("v2", 40000)
    torch.manual_seed(0)
    ref = rvc_models.SynthesizerTrnMs768NSFsid(*cfg.to_list(), is_half=False)
    sd = {k: v for k, v in state_dict_np(ref).items() if not k.startswith("enc_q.")}
    ours = S.Synthesizer(cfg, "v2", True, rngs=nnx.Rngs(0), with_enc_q=False)
    torch_to_flax(ours, sd)  # exact fit
    sd.pop("dec.ups.0.weight_g")
    with pytest.raises(StateDictError, match="dec.ups.0.weight_v"):
        torch_to_flax(ours, sd)
