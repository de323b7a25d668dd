"""Submodules of the port against RVC's own PyTorch classes (same weights, same noise)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from rvc.lib.infer_pack import models as rvc_models
from rvc.lib.infer_pack import modules as rvc_modules

from rvclora_jax.models import generator as G
from rvclora_jax.models import modules as M
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S
from tests.torch_ref import assert_close, load_torch_into, randomize_, t2j


pytestmark = pytest.mark.usefixtures("no_torch_grad")


def _mask(lengths, T):
    m = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    return m[:, None, :]  # torch [B, 1, T]


@pytest.mark.parametrize("gin", [0, 16])
def test_wn(gin):
    torch.manual_seed(0)
    ref = randomize_(rvc_modules.WN(24, 5, 1, 4, gin_channels=gin))
    ours = load_torch_into(M.WN(24, 5, 1, 4, gin, rngs=nnx.Rngs(0)), ref)
    x = torch.randn(2, 24, 30)
    mask = torch.from_numpy(_mask([30, 21], 30))
    g = torch.randn(2, gin, 1) if gin else None
    want = ref(x, mask, g=g)
    got = ours(jnp.asarray(t2j(x)), jnp.asarray(t2j(mask)), None if g is None else jnp.asarray(t2j(g)))
    assert_close(got, t2j(want), name="WN")


@pytest.mark.parametrize("reverse", [False, True])
def test_coupling_layer(reverse):
    torch.manual_seed(1)
    ref = randomize_(rvc_modules.ResidualCouplingLayer(32, 24, 5, 1, 3, gin_channels=16, mean_only=True))
    ours = load_torch_into(M.ResidualCouplingLayer(32, 24, 5, 1, 3, gin_channels=16, rngs=nnx.Rngs(0)), ref)
    x, g = torch.randn(2, 32, 25), torch.randn(2, 16, 1)
    mask = torch.from_numpy(_mask([25, 17], 25))
    want, _ = ref(x, mask, g=g, reverse=reverse)
    got = ours(jnp.asarray(t2j(x)), jnp.asarray(t2j(mask)), jnp.asarray(t2j(g)), reverse=reverse)
    assert_close(got, t2j(want), name=f"coupling reverse={reverse}")


def test_flow_block_both_directions_and_inverse():
    torch.manual_seed(2)
    ref = randomize_(rvc_models.ResidualCouplingBlock(32, 24, 5, 1, 3, gin_channels=16))
    ours = load_torch_into(S.ResidualCouplingBlock(32, 24, 5, 1, 3, gin_channels=16, rngs=nnx.Rngs(0)), ref)
    x, g = torch.randn(2, 32, 20), torch.randn(2, 16, 1)
    mask = torch.from_numpy(_mask([20, 13], 20))
    xj, mj, gj = (jnp.asarray(t2j(a)) for a in (x, mask, g))
    fwd = ours(xj, mj, gj)
    assert_close(fwd, t2j(ref(x, mask, g=g)), name="flow forward")
    assert_close(ours(xj, mj, gj, reverse=True), t2j(ref(x, mask, g=g, reverse=True)), name="flow reverse")
    # the flow is invertible on valid frames
    assert_close(ours(fwd, mj, gj, reverse=True) * mj, xj * mj, atol=1e-4, name="flow inverse")


def test_posterior_encoder_with_torch_noise():
    torch.manual_seed(3)
    ref = randomize_(rvc_models.PosteriorEncoder(65, 16, 24, 5, 1, 6, gin_channels=16))
    ours = load_torch_into(S.PosteriorEncoder(65, 16, 24, 5, 1, 6, gin_channels=16, rngs=nnx.Rngs(0)), ref)
    spec, g = torch.rand(2, 65, 30), torch.randn(2, 16, 1)
    lengths = torch.tensor([30, 22])
    torch.manual_seed(99)
    z, m, logs, mask = ref(spec, lengths, g=g)
    torch.manual_seed(99)
    eps = torch.randn(2, 16, 30)  # the draw randn_like(m) makes inside
    got = ours(jnp.asarray(t2j(spec)), jnp.asarray(lengths.numpy()), jnp.asarray(t2j(g)), eps=jnp.asarray(t2j(eps)))
    for a, b, n in zip(got, (z, m, logs, mask), ("z", "m", "logs", "mask")):
        assert_close(a, t2j(b), name=n)


@pytest.mark.parametrize("block,k,d", [("1", 3, (1, 3, 5)), ("1", 11, (1, 3, 5)), ("2", 3, (1, 3))])
def test_resblocks(block, k, d):
    torch.manual_seed(4)
    cls_t = rvc_modules.ResBlock1 if block == "1" else rvc_modules.ResBlock2
    cls_j = M.ResBlock1 if block == "1" else M.ResBlock2
    ref = randomize_(cls_t(16, k, d))
    ours = load_torch_into(cls_j(16, k, d, rngs=nnx.Rngs(0)), ref)
    x = torch.randn(2, 16, 64)
    assert_close(ours(jnp.asarray(t2j(x))), t2j(ref(x)), name=f"ResBlock{block} k={k}")
    mask = torch.from_numpy(_mask([64, 40], 64))
    assert_close(ours(jnp.asarray(t2j(x)), jnp.asarray(t2j(mask))), t2j(ref(x, mask)), name="masked")


def test_sine_source_matches_rvc_with_its_random_draws():
    sr, upp, B, T = 40000, 400, 2, 60
    gen = torch.Generator().manual_seed(5)
    f0 = 80 + 300 * torch.rand(B, T, generator=gen)
    f0[:, 10:18] = 0.0  # an unvoiced stretch
    f0[1, 40:] = 0.0
    src = rvc_models.SourceModuleHnNSF(sr, harmonic_num=0, is_half=False)
    randomize_(src)
    torch.manual_seed(7)
    want, _, _ = src(f0, upp)
    torch.manual_seed(7)
    torch.rand(B, 1)  # SineGen's rand_ini (identically zero for the fundamental)
    noise = torch.randn(B, T * upp, 1)
    ours = load_torch_into(G.SourceModuleHnNSF(sr, rngs=nnx.Rngs(0)), src)
    got = ours(jnp.asarray(f0.numpy()), upp, jnp.asarray(noise.numpy()))
    assert_close(got, want.numpy(), atol=1e-4, name="SourceModuleHnNSF")
    # and the raw sine part alone, noise off, against the closed form in float64
    sine = np.asarray(G.sine_source(jnp.asarray(f0.numpy()), upp, sr, jnp.zeros((B, T * upp, 1))))
    f = f0.numpy().astype(np.float64) / sr
    phase = np.concatenate([np.zeros((B, 1)), np.cumsum(f * upp, axis=1)[:, :-1]], axis=1)
    k = np.arange(1, upp + 1)
    closed = 0.1 * np.sin(2 * np.pi * (phase[:, :, None] + k * f[:, :, None])).reshape(B, -1)
    closed *= np.repeat(f0.numpy() > 0, upp, axis=1)
    assert np.abs(sine[..., 0] - closed).max() < 2e-5


def _gen_args(cfg: S.SynthConfig):
    return (cfg.inter_channels, cfg.resblock, cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes,
            cfg.upsample_rates, cfg.upsample_initial_channel, cfg.upsample_kernel_sizes)


def _small(cfg: S.SynthConfig, channels=64) -> S.SynthConfig:
    return cfg.replace(upsample_initial_channel=channels, inter_channels=16, gin_channels=8)


# Every rate's schedule with NSF; the plain Generator (nono) differs only by the missing
# source, so one rate of it runs by default and the others with -m slow.
_NONO_SLOW = pytest.mark.slow


@pytest.mark.parametrize("version,sr,nsf", [
    ("v1", 32000, True), ("v1", 40000, True), ("v1", 48000, True), ("v2", 32000, True), ("v2", 48000, True),
    ("v1", 40000, False),
    pytest.param("v1", 32000, False, marks=_NONO_SLOW), pytest.param("v1", 48000, False, marks=_NONO_SLOW),
    pytest.param("v2", 32000, False, marks=_NONO_SLOW), pytest.param("v2", 48000, False, marks=_NONO_SLOW)])
def test_generator_every_rate(version, sr, nsf):
    """Each rate's upsample schedule (5 or 4 stages, kernels 16..24), at reduced width."""
    cfg = _small(RVC.preset(version, sr))
    torch.manual_seed(8)
    if nsf:
        ref = rvc_models.GeneratorNSF(*_gen_args(cfg), gin_channels=cfg.gin_channels, sr=sr, is_half=False)
    else:
        ref = rvc_models.Generator(*_gen_args(cfg), gin_channels=cfg.gin_channels)
    randomize_(ref)
    ours = load_torch_into(G.Generator(*_gen_args(cfg), gin_channels=cfg.gin_channels, nsf=nsf, sr=sr,
                                       rngs=nnx.Rngs(0)), ref)
    B, T = 1, 12
    z, g = torch.randn(B, cfg.inter_channels, T), torch.randn(B, cfg.gin_channels, 1)
    f0 = 100 + 200 * torch.rand(B, T)
    f0[:, :3] = 0
    torch.manual_seed(9)
    want = ref(z, f0, g=g) if nsf else ref(z, g=g)
    torch.manual_seed(9)
    torch.rand(B, 1)
    noise = torch.randn(B, T * cfg.hop_length, 1)
    got = ours(jnp.asarray(t2j(z)), jnp.asarray(f0.numpy()), jnp.asarray(t2j(g)),
               source_noise=jnp.asarray(noise.numpy()))
    assert got.shape == (B, T * cfg.hop_length, 1)
    assert_close(got, t2j(want), name=f"{version} {sr} nsf={nsf}")


def test_full_size_nsf_generator_v2_40k_jit():
    """The real v2 40k decoder (512 initial channels), under jax.jit."""
    cfg = RVC.preset("v2", 40000)
    torch.manual_seed(10)
    ref = randomize_(rvc_models.GeneratorNSF(*_gen_args(cfg), gin_channels=256, sr=40000, is_half=False))
    ours = load_torch_into(G.Generator(*_gen_args(cfg), gin_channels=256, nsf=True, sr=40000,
                                       rngs=nnx.Rngs(0)), ref)
    B, T = 1, 16
    z, g = torch.randn(B, 192, T), torch.randn(B, 256, 1)
    f0 = 120 + 100 * torch.rand(B, T)
    torch.manual_seed(11)
    want = ref(z, f0, g=g)
    torch.manual_seed(11)
    torch.rand(B, 1)
    noise = torch.randn(B, T * 400, 1)
    fn = nnx.jit(lambda m, *a: m(*a[:3], source_noise=a[3]))
    got = fn(ours, jnp.asarray(t2j(z)), jnp.asarray(f0.numpy()), jnp.asarray(t2j(g)), jnp.asarray(noise.numpy()))
    assert_close(got, t2j(want), name="v2 40k GeneratorNSF (jit)")
