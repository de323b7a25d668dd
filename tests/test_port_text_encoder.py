"""The Flax TextEncoder / attentions.Encoder compute what RVC's torch modules compute.

RVC's own modules (``rvc==0.3.5``) are built with random weights, converted with the
generic ``rvclora_convert.state_dict.torch_to_flax`` and compared in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402  (the reference tests must run, never skip)
import rvc.lib.infer_pack.attentions as rvc_attentions  # noqa: E402
import rvc.lib.infer_pack.models as rvc_models  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from rvclora_convert.state_dict import load_params, torch_to_flax  # noqa: E402
from rvclora_jax.models.attentions import Encoder, MultiHeadAttention  # noqa: E402
from rvclora_jax.models.text_encoder import TextEncoder  # noqa: E402

ATOL = 1e-4
HIDDEN, FILTER, HEADS, LAYERS, KSIZE = 192, 768, 2, 6, 3


def _randomise_norms(module: "torch.nn.Module", gen: "torch.Generator") -> None:
    """LayerNorm gamma/beta start at 1/0 in torch; make them random so they're tested."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".beta"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _sd(module: "torch.nn.Module") -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _compare(name: str, got, want, *, atol: float = ATOL) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.max(np.abs(got - want)) if got.size else 0.0
    rel = err / max(np.max(np.abs(want)), 1e-12)
    print(f"{name}: max|Δ|={err:.3e} rel={rel:.3e} (max|ref|={np.max(np.abs(want)):.3g})")
    assert err <= atol, f"{name}: max|Δ| = {err:.3e} > {atol:g} (relative {rel:.3e})"


def _to_btc(t: "torch.Tensor") -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 1)


def _flax_like(model: nnx.Module, tmod: "torch.nn.Module") -> nnx.Module:
    load_params(model, torch_to_flax(model, _sd(tmod)))
    return model


# ---------------------------------------------------------------------------------
# (a) attentions.Encoder alone, padded batch
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("T,lengths", [(50, (50, 33)), (7, (7, 4))])
def test_encoder_matches_rvc(T, lengths):
    # T=7 < window_size+1 exercises RVC's slicing branch of _get_relative_embeddings.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tenc = rvc_attentions.Encoder(HIDDEN, FILTER, HEADS, LAYERS, KSIZE, 0.0).eval()
    _randomise_norms(tenc, gen)
    enc = _flax_like(Encoder(HIDDEN, FILTER, HEADS, LAYERS, KSIZE, 0.0, rngs=nnx.Rngs(0)), tenc)

    B = len(lengths)
    x = torch.randn(B, HIDDEN, T, generator=gen)
    lens = torch.tensor(lengths)
    mask = (torch.arange(T)[None, :] < lens[:, None]).float()[:, None, :]  # [B,1,T]
    with torch.no_grad():
        want = _to_btc(tenc(x, mask))
    got = np.asarray(enc(jnp.asarray(_to_btc(x)), jnp.asarray(_to_btc(mask))))

    _compare(f"Encoder T={T} full", got, want)
    for b, n in enumerate(lengths):
        _compare(f"Encoder T={T} b={b} valid[:{n}]", got[b, :n], want[b, :n])
        assert np.all(got[b, n:] == 0.0)


def test_multihead_attention_matches_rvc_unmasked():
    """One attention layer, no mask, longer than the window on both sides."""
    torch.manual_seed(2)
    tmha = rvc_attentions.MultiHeadAttention(HIDDEN, HIDDEN, HEADS, window_size=10).eval()
    mha = _flax_like(MultiHeadAttention(HIDDEN, HIDDEN, HEADS, rngs=nnx.Rngs(0)), tmha)  # window 10 is built in
    x = torch.randn(1, HIDDEN, 40)
    with torch.no_grad():
        want = _to_btc(tmha(x, x))
    xj = jnp.asarray(_to_btc(x))
    _compare("MHA", mha(xj, xj), want)


# ---------------------------------------------------------------------------------
# (b) TextEncoder v1 / v2 / no-f0, (c) jit == eager
# ---------------------------------------------------------------------------------

VARIANTS = {
    # name: (torch class, in_channels, f0)
    "v1_f0": (rvc_models.TextEncoder256, 256, True),
    "v2_f0": (rvc_models.TextEncoder768, 768, True),
    "v1_nof0": (rvc_models.TextEncoder256, 256, False),  # SynthesizerTrnMs256NSFsid_nono
    "v2_nof0": (rvc_models.TextEncoder768, 768, False),  # SynthesizerTrnMs768NSFsid_nono
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_text_encoder_matches_rvc(variant):
    tcls, cin, f0 = VARIANTS[variant]
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    tte = tcls(192, HIDDEN, FILTER, HEADS, LAYERS, KSIZE, 0, f0=f0).eval()
    _randomise_norms(tte, gen)
    te = _flax_like(TextEncoder(cin, 192, HIDDEN, FILTER, HEADS, LAYERS, KSIZE, 0, f0=f0,
                                rngs=nnx.Rngs(0)), tte)
    assert (te.emb_pitch is not None) == f0

    B, T, lengths = 2, 48, (48, 29)
    phone = torch.randn(B, T, cin, generator=gen)
    pitch = torch.randint(1, 256, (B, T), generator=gen) if f0 else None
    lens = torch.tensor(lengths)
    with torch.no_grad():
        tm, tlogs, tmask = tte(phone, pitch, lens)
    want = [_to_btc(tm), _to_btc(tlogs), _to_btc(tmask)]

    args = (jnp.asarray(phone.numpy()), None if pitch is None else jnp.asarray(pitch.numpy()),
            jnp.asarray(lens.numpy()))
    m, logs, mask = te(*args)
    _compare(f"{variant} m", m, want[0])
    _compare(f"{variant} logs", logs, want[1])
    np.testing.assert_array_equal(np.asarray(mask), want[2])
    for b, n in enumerate(lengths):
        _compare(f"{variant} b={b} m valid", m[b, :n], want[0][b, :n])
        _compare(f"{variant} b={b} logs valid", logs[b, :n], want[1][b, :n])

    if variant in ("v2_f0", "v1_nof0"):  # (c) jit == eager (two variants keep the suite fast)
        jitted = nnx.jit(lambda mod, p, f, n: mod(p, f, n))
        jm, jlogs, jmask = jitted(te, *args)
        _compare(f"{variant} jit m", jm, m, atol=1e-5)
        _compare(f"{variant} jit logs", jlogs, logs, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(jmask), np.asarray(mask))


def test_text_encoder_rejects_pitch_without_f0():
    te = TextEncoder(256, n_layers=1, f0=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="f0=False"):
        te(jnp.zeros((1, 4, 256)), jnp.ones((1, 4), jnp.int32), jnp.array([4]))


def test_encoder_long_sequence_jits():
    """T far beyond the window: jit compiles and stays finite (memory is O(B·H·T²))."""
    enc = Encoder(32, 64, 2, 1, 3, rngs=nnx.Rngs(0))
    T = 2000
    x = jax.random.normal(jax.random.key(0), (1, T, 32))
    mask = jnp.ones((1, T, 1))
    y = nnx.jit(lambda m, a, b: m(a, b))(enc, x, mask)
    assert y.shape == (1, T, 32) and bool(jnp.all(jnp.isfinite(y)))
