"""Mel front-end and training losses vs RVC's PyTorch reference (rvc==0.3.5) and librosa."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import torch
from rvc.lib.train import losses as ref_losses
from rvc.lib.train import mel_processing as ref_mel

from rvclora_jax import audio, losses

RATES = (32000, 40000, 48000)

# RVC's spectrogram_torch uses stft(return_complex=False), deprecated in torch
pytestmark = pytest.mark.filterwarnings("ignore:stft with return_complex=False:UserWarning")


def _audio(rng: np.random.Generator, sr: int, n: int, batch: int = 2) -> np.ndarray:
    """Speech-ish test signal: a harmonic chirp (100 → 400 Hz fundamental) with a
    slow amplitude envelope, plus noise; amplitude well inside [-1, 1]."""
    t = np.arange(n) / sr
    out = []
    for b in range(batch):
        f0 = 100.0 + 300.0 * t / t[-1] + 20.0 * b
        phase = 2 * np.pi * np.cumsum(f0) / sr
        x = sum(0.3 / k * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k in range(1, 12))
        x *= 0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t)
        x += 0.02 * rng.standard_normal(n)
        out.append(x)
    return np.stack(out).astype(np.float32)


def _ref_mel_from_wave(y: np.ndarray, cfg: audio.MelConfig) -> np.ndarray:
    # RVC caches mel bases keyed by fmax+dtype+device only (not sr / n_fft), so a bank
    # built for one rate would be reused for the next: clear it between rates.
    ref_mel.mel_basis.clear()
    m = ref_mel.mel_spectrogram_torch(
        torch.from_numpy(y), cfg.filter_length, cfg.n_mel_channels, cfg.sampling_rate,
        cfg.hop_length, cfg.win_length, cfg.mel_fmin, cfg.mel_fmax)
    return m.numpy().transpose(0, 2, 1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ----------------------------------------------------------------------------- mel

@pytest.mark.parametrize("sr", RATES)
def test_mel_filterbank_matches_librosa(sr):
    cfg = audio.MelConfig.for_rate(sr)
    ours = audio.mel_filterbank(sr, cfg.filter_length, cfg.n_mel_channels, 0.0, None)
    ref = librosa.filters.mel(sr=sr, n_fft=cfg.filter_length, n_mels=cfg.n_mel_channels,
                              fmin=0.0, fmax=None)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (cfg.n_mel_channels, cfg.n_freq)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    # non-default band edges too
    ours = audio.mel_filterbank(sr, 1024, 64, fmin=55.0, fmax=sr / 2 - 1000)
    ref = librosa.filters.mel(sr=sr, n_fft=1024, n_mels=64, fmin=55.0, fmax=sr / 2 - 1000)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_mel_config_presets():
    assert audio.MelConfig.for_rate(32000) == audio.MelConfig(32000, 1024, 320, 1024, 80)
    assert audio.MelConfig.for_rate(40000) == audio.MelConfig(40000, 2048, 400, 2048, 125)
    assert audio.MelConfig.for_rate(48000) == audio.MelConfig(48000, 2048, 480, 2048, 128)
    with pytest.raises(ValueError):
        audio.MelConfig.for_rate(44100)


@pytest.mark.parametrize("sr", RATES)
@pytest.mark.parametrize("n", [12800, 12345])
def test_spectrogram_and_mel_match_rvc(sr, n, rng):
    cfg = audio.MelConfig.for_rate(sr)
    y = _audio(rng, sr, n)

    spec_ref = ref_mel.spectrogram_torch(torch.from_numpy(y), cfg.filter_length, sr,
                                         cfg.hop_length, cfg.win_length)
    spec = np.asarray(cfg.spectrogram(y))
    assert spec.shape == (2, n // cfg.hop_length, cfg.n_freq)
    spec_ref_np = spec_ref.numpy().transpose(0, 2, 1)
    np.testing.assert_allclose(spec, spec_ref_np, rtol=1e-4, atol=1e-4 * spec_ref_np.max())

    mel_ref = _ref_mel_from_wave(y, cfg)
    mel = np.asarray(cfg.mel(y))
    assert mel.shape == (2, n // cfg.hop_length, cfg.n_mel_channels)
    np.testing.assert_allclose(mel, mel_ref, atol=1e-4, rtol=0)
    assert _rel(mel, mel_ref) < 1e-5

    # spec_to_mel on the reference's own linear spectrogram
    ref_mel.mel_basis.clear()
    s2m_ref = ref_mel.spec_to_mel_torch(spec_ref, cfg.filter_length, cfg.n_mel_channels, sr,
                                        0.0, None).numpy().transpose(0, 2, 1)
    s2m = np.asarray(audio.spec_to_mel(spec_ref_np, sr, cfg.filter_length,
                                       cfg.n_mel_channels, 0.0, None))
    np.testing.assert_allclose(s2m, s2m_ref, atol=1e-5, rtol=0)


def test_spec_to_mel_clamps_silence():
    cfg = audio.MelConfig.for_rate(40000)
    mel = np.asarray(cfg.spec_to_mel(np.zeros((1, 3, cfg.n_freq), np.float32)))
    np.testing.assert_allclose(mel, np.log(1e-5), rtol=1e-6)


def test_mel_under_jit(rng):
    cfg = audio.MelConfig.for_rate(32000)
    y = _audio(rng, 32000, 12800)
    np.testing.assert_allclose(np.asarray(jax.jit(cfg.mel)(y)), np.asarray(cfg.mel(y)),
                               atol=1e-5)
    f = jax.jit(audio.mel_spectrogram, static_argnums=range(1, 8))
    np.testing.assert_allclose(np.asarray(f(y, 1024, 80, 32000, 320, 1024, 0.0, None)),
                               _ref_mel_from_wave(y, cfg), atol=1e-4)


# -------------------------------------------------------------------------- losses

def _to_last(x: torch.Tensor) -> np.ndarray:
    """torch [B, C, ...] → numpy [B, ..., C]."""
    a = x.detach().numpy()
    return np.moveaxis(a, 1, -1) if a.ndim >= 3 else a


def _fake_disc_outputs(rng, n_disc=4, batch=2):
    """Shapes like RVC's MultiPeriodDiscriminator: DiscriminatorS maps [B, C, T] and
    DiscriminatorP maps [B, C, T/p, p]; scores flattened [B, N]."""
    scores_r, scores_g, fmaps_r, fmaps_g = [], [], [], []
    for d in range(n_disc):
        period = [1, 2, 3, 5, 7, 11, 17, 23][d]
        maps_r, maps_g = [], []
        t = 600
        for ch in (16, 64, 256, 1024, 1024, 1):
            t = max(t // 3, 2)
            shape = (batch, ch, t) if d == 0 else (batch, ch, max(t // period, 1), period)
            r = rng.standard_normal(shape).astype(np.float32)
            maps_r.append(torch.from_numpy(r))
            maps_g.append(torch.from_numpy(r + 0.3 * rng.standard_normal(shape).astype(np.float32)))
        fmaps_r.append(maps_r)
        fmaps_g.append(maps_g)
        scores_r.append(torch.flatten(maps_r[-1], 1))
        scores_g.append(torch.flatten(maps_g[-1], 1))
    return scores_r, scores_g, fmaps_r, fmaps_g


def _kl_inputs(rng, batch=3, ch=192, t=40):
    z_p, logs_q, m_p, logs_p = (rng.standard_normal((batch, ch, t)).astype(np.float32)
                                for _ in range(4))
    logs_q, logs_p = 0.5 * logs_q, 0.5 * logs_p
    lengths = np.array([t, t - 7, 13])
    z_mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)[:, None, :]
    return [torch.from_numpy(a) for a in (z_p, logs_q, m_p, logs_p, z_mask)]


def _t(nested):
    return jax.tree_util.tree_map(_to_last, nested,
                                  is_leaf=lambda x: isinstance(x, torch.Tensor))


def test_feature_loss(rng):
    _, _, fr, fg = _fake_disc_outputs(rng)
    ref = ref_losses.feature_loss(fr, fg).item()
    got = float(losses.feature_loss(_t(fr), _t(fg)))
    assert abs(got - ref) / abs(ref) < 1e-5
    assert abs(float(jax.jit(losses.feature_loss)(_t(fr), _t(fg))) - ref) / abs(ref) < 1e-5


def test_feature_loss_gradients(rng):
    _, _, fr, fg = _fake_disc_outputs(rng, n_disc=2)
    jr, jg = _t(fr), _t(fg)
    g_r = jax.grad(losses.feature_loss, argnums=0)(jr, jg)
    assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in jax.tree_util.tree_leaves(g_r))
    # gradient w.r.t. the generated maps agrees with torch autograd
    tg = [[m.clone().requires_grad_(True) for m in d] for d in fg]
    ref_losses.feature_loss(fr, tg).backward()
    g_g = jax.jit(jax.grad(losses.feature_loss, argnums=1))(jr, jg)
    for d_ref, d_got in zip(tg, g_g):
        for m_ref, m_got in zip(d_ref, d_got):
            np.testing.assert_allclose(np.asarray(m_got), _to_last(m_ref.grad), rtol=1e-6,
                                       atol=1e-12)


def test_discriminator_and_generator_loss(rng):
    sr_, sg, _, _ = _fake_disc_outputs(rng)
    ref, ref_r, ref_g = ref_losses.discriminator_loss(sr_, sg)
    for fn in (losses.discriminator_loss, jax.jit(losses.discriminator_loss)):
        got, got_r, got_g = fn(_t(sr_), _t(sg))
        assert abs(float(got) - ref.item()) / ref.item() < 1e-5
        np.testing.assert_allclose(np.array(got_r, np.float64), ref_r, rtol=1e-5)
        np.testing.assert_allclose(np.array(got_g, np.float64), ref_g, rtol=1e-5)

    ref, ref_per = ref_losses.generator_loss(sg)
    for fn in (losses.generator_loss, jax.jit(losses.generator_loss)):
        got, got_per = fn(_t(sg))
        assert abs(float(got) - ref.item()) / ref.item() < 1e-5
        np.testing.assert_allclose(np.array(got_per, np.float64),
                                   [x.item() for x in ref_per], rtol=1e-5)


def test_kl_loss(rng):
    args = _kl_inputs(rng)
    ref = ref_losses.kl_loss(*args).item()
    jargs = [_to_last(a) for a in args]  # z_mask → [B, T, 1]
    assert jargs[-1].shape == (3, 40, 1)
    for fn in (losses.kl_loss, jax.jit(losses.kl_loss)):
        got = float(fn(*jargs))
        assert abs(got - ref) / abs(ref) < 1e-5
    # padded frames must not matter
    z = jargs[0].copy()
    z[2, 13:] = 1e3
    assert abs(float(losses.kl_loss(z, *jargs[1:])) - ref) / abs(ref) < 1e-5
    # bf16 inputs are upcast (like RVC's .float())
    got16 = float(losses.kl_loss(*[jnp.asarray(a, jnp.bfloat16) for a in jargs]))
    assert abs(got16 - ref) / abs(ref) < 5e-2


def test_mel_l1_and_constants(rng):
    a, b = (rng.standard_normal((2, 32, 125)).astype(np.float32) for _ in range(2))
    ref = torch.nn.functional.l1_loss(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert abs(float(jax.jit(losses.mel_l1)(a, b)) - ref) / ref < 1e-5
    assert losses.C_MEL == 45.0 and losses.C_KL == 1.0
