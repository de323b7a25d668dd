"""The dtype policy: ``dtype`` (compute) and ``param_dtype`` passed down, jax initialisers.

* A model built with ``dtype=bfloat16`` runs every convolution and matmul on bfloat16
  operands (read off the traced program, not assumed from the output) and keeps float32
  parameters; ``param_dtype`` sets the stored dtype.
* ``nnx.eval_shape`` gives the full model's shapes without drawing a weight.
* A bfloat16 forward stays close to the float32 one (loose, stated tolerance).
* Injected initialisers are the ones used; the defaults are torch's (bounds checked
  against torch's own fan-in computation).
Tiny configurations keep the file fast; layer-level checks run eagerly and under nnx.jit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import torch

from rvclora_jax import initializers
from rvclora_jax.layers import Conv1d, ConvTranspose1d, Dense, Embed
from rvclora_jax.families.rvc import RVC
from rvclora_jax.models import synthesizer as S
from rvclora_jax.models.discriminators import MultiPeriodDiscriminator
from rvclora_jax.models.generator import SOURCE_DTYPE, sine_source

BF16, F32 = jnp.bfloat16, jnp.float32
# Every submodule kind, few and narrow layers (two upsamplers, one resblock kernel), so the
# float32 and bfloat16 forwards compile in seconds.
TINY = RVC.preset("v2", 40000).replace(inter_channels=16, hidden_channels=32, filter_channels=64, n_heads=2,
                                     n_layers=2, upsample_initial_channel=32, gin_channels=8,
                                     spk_embed_dim=3, spec_channels=33, upsample_rates=(4, 2),
                                     upsample_kernel_sizes=(8, 4), resblock_kernel_sizes=(3,),
                                     resblock_dilation_sizes=((1, 3),))
B, T = 2, 12
# bf16 keeps 8 significant bits (relative rounding 2**-9 per op); through the ~30 layers of
# TINY the error is ~1e-2 of the peak (m_p, z and the audio o alike). 5e-2 of the peak is
# loose enough to be robust and still fails for a model that computes garbage.
BF16_REL_TOL = 5e-2


def _inputs(seed: int = 0):
    r = np.random.default_rng(seed)
    return dict(
        phone=jnp.asarray(r.normal(size=(B, T, 768)), F32),
        lengths=jnp.array([T, T - 3]),
        pitch=jnp.asarray(r.integers(1, 256, (B, T)), jnp.int32),
        nsff0=jnp.asarray(r.uniform(80, 400, (B, T)), F32),
        sid=jnp.array([0, 2]),
        eps=jnp.asarray(r.normal(size=(B, T, TINY.inter_channels)), F32),
    )


def _infer(model, x):
    o, x_mask, (z, z_p, m_p, logs_p) = model.infer(x["phone"], x["lengths"], x["pitch"], x["nsff0"], x["sid"],
                                                    eps=x["eps"])
    return dict(o=o, x_mask=x_mask, z=z, z_p=z_p, m_p=m_p, logs_p=logs_p)


def _param_dtypes(model) -> set:
    return {np.dtype(v.dtype) for v in jax.tree.leaves(nnx.state(model, nnx.Param))}


def _operand_dtypes(jaxpr) -> dict[str, set]:
    """dtypes of the operands of every conv / dot_general in a jaxpr, sub-jaxprs included."""
    found: dict[str, set] = {}

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                found.setdefault(eqn.primitive.name, set()).update(
                    np.dtype(v.aval.dtype) for v in eqn.invars)
            for p in eqn.params.values():  # jit / custom_vjp / scan bodies
                for j in (p if isinstance(p, (list, tuple)) else [p]):
                    sub = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub)
    walk(jaxpr.jaxpr)
    return found


def _assert_computes_in(fn, dtype, *args):
    """Trace ``fn(*args)`` (nothing runs): every conv/matmul operand and every output is ``dtype``."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    ops = _operand_dtypes(jaxpr)
    assert "conv_general_dilated" in ops
    assert ops == {k: {np.dtype(dtype)} for k in ops}, ops
    outs = jax.tree.leaves(jax.eval_shape(fn, *args))
    assert {np.dtype(v.dtype) for v in outs} == {np.dtype(dtype)}


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.fixture(scope="module")
def models():
    """The same weights (same seed; dtype does not change the draws) in f32 and bf16 compute."""
    return {dt: S.Synthesizer(TINY, "v2", True, rngs=nnx.Rngs(0), dtype=dt) for dt in (F32, BF16)}


# --------------------------------------------------------------------------------------
# the synthesizer: bf16 compute, fp32 params, close to fp32
# --------------------------------------------------------------------------------------
def test_bf16_model_keeps_fp32_params_and_the_same_weights(models):
    assert _param_dtypes(models[BF16]) == {np.dtype(F32)}
    f32, bf16 = (jax.tree.leaves(nnx.state(models[d], nnx.Param)) for d in (F32, BF16))
    assert all(np.array_equal(a, b) for a, b in zip(f32, bf16, strict=True))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_every_conv_and_matmul_runs_in_the_compute_dtype(models, dtype):
    x = _inputs()
    g, state = nnx.split(models[dtype])
    _assert_computes_in(lambda st: _infer(nnx.merge(g, st), x), dtype, state)
    assert "dot_general" in _operand_dtypes(jax.make_jaxpr(lambda st: _infer(nnx.merge(g, st), x))(state))


def test_bf16_forward_is_close_to_fp32(models):
    x = _inputs()
    outs = {d: nnx.jit(_infer)(models[d], x) for d in (F32, BF16)}
    assert outs[BF16]["o"].dtype == BF16 and outs[F32]["o"].dtype == F32
    for k in ("m_p", "z", "o"):
        err = _rel(outs[BF16][k], outs[F32][k])
        print(f"bf16 vs f32 {k}: max|Δ|/max|ref| = {err:.3e}")
        assert np.all(np.isfinite(np.asarray(outs[BF16][k], np.float32)))
        assert err <= BF16_REL_TOL, (k, err)
    assert np.array_equal(outs[BF16]["x_mask"], outs[F32]["x_mask"])


def test_training_forward_in_bf16(models):
    x = _inputs()
    r = np.random.default_rng(1)
    spec = jnp.asarray(r.normal(size=(B, T, TINY.spec_channels)), F32)
    eps_q = jnp.asarray(r.normal(size=(B, T, TINY.inter_channels)), F32)
    g, state = nnx.split(models[BF16])

    def forward(st):
        o, _, x_mask, y_mask, stats = nnx.merge(g, st)(
            x["phone"], x["lengths"], x["pitch"], x["nsff0"], spec, x["lengths"], x["sid"],
            ids_slice=jnp.array([0, 3]), segment_size=4, eps_q=eps_q)
        return o, x_mask, y_mask, stats

    _assert_computes_in(forward, BF16, state)
    assert jax.eval_shape(forward, state)[0].shape == (B, 4 * TINY.hop_length, 1)


def test_param_dtype_is_honoured():
    m = S.Synthesizer(TINY, "v2", True, rngs=nnx.Rngs(0), with_enc_q=False, param_dtype=BF16, dtype=BF16)
    assert _param_dtypes(m) == {np.dtype(BF16)}
    g, state = nnx.split(m)
    _assert_computes_in(lambda st: _infer(nnx.merge(g, st), _inputs()), BF16, state)


def test_discriminator_computes_in_bf16():
    d = MultiPeriodDiscriminator((2, 3), rngs=nnx.Rngs(0), dtype=BF16)
    assert _param_dtypes(d) == {np.dtype(F32)}
    y = jnp.asarray(np.random.default_rng(2).uniform(-0.5, 0.5, (1, 600, 1)), F32)
    g, state = nnx.split(d)
    _assert_computes_in(lambda st: nnx.merge(g, st)(y, y), BF16, state)


def test_sine_source_stays_fp32():
    f0 = jnp.full((1, 4), 220.0, BF16)
    out = jax.eval_shape(lambda f, n: sine_source(f, 10, 40000, n), f0, jnp.zeros((1, 40, 1), BF16))
    assert out.dtype == SOURCE_DTYPE == F32


# --------------------------------------------------------------------------------------
# nnx.eval_shape: the full model's structure without drawing a weight
# --------------------------------------------------------------------------------------
def test_eval_shape_of_the_full_model():
    abstract = nnx.eval_shape(lambda: S.Synthesizer(RVC.preset("v2", 40000), "v2", True, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert leaves and all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    p = nnx.state(abstract, nnx.Param)
    assert p["dec"]["ups"][0]["kernel"].shape == (16, 512, 256)  # [K, in, out]
    assert p["emb_g"]["embedding"].shape == (109, 256)
    assert p["enc_p"]["encoder"]["attn_layers"][0]["emb_rel_k"].shape == (1, 21, 96)
    assert sum(math.prod(v.shape) for v in leaves) > 30_000_000  # the v2 synthesizer, enc_q included
    # same structure and shapes as a concrete build
    tiny = nnx.eval_shape(lambda: S.Synthesizer(TINY, "v2", True, rngs=nnx.Rngs(0), dtype=BF16))
    concrete = S.Synthesizer(TINY, "v2", True, rngs=nnx.Rngs(0))
    shapes = lambda m: jax.tree.map(lambda v: (v.shape, np.dtype(v.dtype)), nnx.to_pure_dict(nnx.state(m)))  # noqa: E731
    assert shapes(tiny) == shapes(concrete)


def test_enc_q_does_not_change_the_other_weights():
    """enc_q draws from its own fork, so an inference build has the training build's weights."""
    full = nnx.to_pure_dict(nnx.state(S.Synthesizer(TINY, "v2", True, rngs=nnx.Rngs(5))))
    inference = nnx.to_pure_dict(nnx.state(S.Synthesizer(TINY, "v2", True, rngs=nnx.Rngs(5), with_enc_q=False)))
    del full["enc_q"]
    assert jax.tree.structure(full) == jax.tree.structure(inference)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(inference)))


# --------------------------------------------------------------------------------------
# layers: compute dtype eagerly and under nnx.jit, LoRA branch included
# --------------------------------------------------------------------------------------
LAYERS = {
    "dense": (lambda **kw: Dense(6, 5, **kw), (B, T, 6)),
    "conv": (lambda **kw: Conv1d(6, 5, 3, padding=1, **kw), (B, T, 6)),
    "conv_grouped": (lambda **kw: Conv1d(6, 4, 3, groups=2, padding=1, **kw), (B, T, 6)),
    "conv_t": (lambda **kw: ConvTranspose1d(6, 5, 4, stride=2, padding=1, **kw), (B, T, 6)),
}


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_computes_in_dtype_with_fp32_params(name, use_jit):
    make, shape = LAYERS[name]
    x = jnp.asarray(np.random.default_rng(3).normal(size=shape), F32)
    ref, layer = make(rngs=nnx.Rngs(0)), make(rngs=nnx.Rngs(0), dtype=BF16)
    if name != "conv_grouped":  # LoRA is not supported on grouped convs
        for m in (ref, layer):
            m.add_lora(2, 4.0, rngs=nnx.Rngs(1))
            m.lora_b[...] = jnp.full(m.lora_b[...].shape, 0.1, F32)
    call = nnx.jit(lambda m, a: m(a)) if use_jit else (lambda m, a: m(a))
    y, want = call(layer, x), call(ref, x)
    assert y.dtype == BF16 and want.dtype == F32
    assert _param_dtypes(layer) == {np.dtype(F32)}
    assert all(v.dtype == F32 for v in jax.tree.leaves(nnx.state(layer, nnx.LoRAParam)))
    assert _rel(y, want) <= 2e-2


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_embed_dtype(use_jit):
    e = Embed(4, 3, rngs=nnx.Rngs(0), dtype=BF16)
    e.add_delta()
    call = nnx.jit(lambda m, i: m(i)) if use_jit else (lambda m, i: m(i))
    out = call(e, jnp.array([1, 3]))
    assert out.dtype == BF16 and e.embedding[...].dtype == e.lora_delta[...].dtype == F32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(e.embedding[...][jnp.array([1, 3])].astype(BF16)))


def test_none_dtype_promotes_like_flax():
    layer = Dense(3, 2, rngs=nnx.Rngs(0), param_dtype=BF16)
    assert layer(jnp.ones((1, 3), BF16)).dtype == BF16
    assert layer(jnp.ones((1, 3), F32)).dtype == F32  # bf16 params, f32 input -> f32


# --------------------------------------------------------------------------------------
# initialisers: injected ones are used; defaults follow torch
# --------------------------------------------------------------------------------------
def test_injected_initialisers_are_used():
    c = nnx.initializers.constant
    d = Dense(3, 2, kernel_init=c(0.5), bias_init=c(-1.0), rngs=nnx.Rngs(0))
    conv = Conv1d(3, 2, 5, kernel_init=nnx.initializers.zeros_init(), bias_init=c(2.0), rngs=nnx.Rngs(0))
    ct = ConvTranspose1d(3, 2, 4, stride=2, kernel_init=c(0.25), use_bias=False, rngs=nnx.Rngs(0))
    e = Embed(4, 3, embedding_init=c(7.0), rngs=nnx.Rngs(0))
    assert np.all(np.asarray(d.kernel[...]) == 0.5) and np.all(np.asarray(d.bias[...]) == -1.0)
    assert not np.any(np.asarray(conv.kernel[...])) and np.all(np.asarray(conv.bias[...]) == 2.0)
    assert np.all(np.asarray(ct.kernel[...]) == 0.25) and ct.bias is None
    assert np.all(np.asarray(e.embedding[...]) == 7.0)
    # and a flax initialiser works under eval_shape too (traced key)
    abstract = nnx.eval_shape(lambda: Conv1d(3, 2, 5, kernel_init=nnx.initializers.lecun_normal(),
                                             rngs=nnx.Rngs(0)))
    assert abstract.kernel.shape == (5, 3, 2)


@pytest.mark.parametrize("torch_layer,ours", [
    (lambda: torch.nn.Linear(300, 40), lambda: Dense(300, 40, rngs=nnx.Rngs(0))),
    (lambda: torch.nn.Conv1d(48, 64, 5), lambda: Conv1d(48, 64, 5, rngs=nnx.Rngs(0))),
    (lambda: torch.nn.Conv1d(64, 64, 5, groups=4), lambda: Conv1d(64, 64, 5, groups=4, rngs=nnx.Rngs(0))),
    (lambda: torch.nn.ConvTranspose1d(96, 24, 16, stride=8),
     lambda: ConvTranspose1d(96, 24, 16, stride=8, rngs=nnx.Rngs(0))),
], ids=["dense", "conv", "conv_grouped", "conv_t"])
def test_default_init_is_torchs(torch_layer, ours):
    """U(±1/sqrt(fan_in)) with torch's fan-in (out·K for a transposed conv), weight and bias."""
    t, layer = torch_layer(), ours()
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(t.weight)
    bound = 1.0 / math.sqrt(fan_in)
    kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    assert np.max(np.abs(kernel)) <= bound * (1 + 1e-6) and np.max(np.abs(bias)) <= bound * (1 + 1e-6)
    assert np.max(np.abs(kernel)) >= 0.99 * bound  # really this bound, not a smaller one
    assert abs(float(np.std(kernel)) * math.sqrt(3) / bound - 1.0) <= 0.05  # uniform: std = bound/sqrt(3)
    assert bias.shape == tuple(t.bias.shape)


def test_initialisers_are_deterministic_and_traceable():
    init = initializers.fan_in_uniform()
    key = jax.random.key(4)
    a, b = init(key, (3, 7, 5), F32), init(key, (3, 7, 5), F32)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jitted = jax.jit(lambda k: init(k, (3, 7, 5), F32))(key)  # the traced path gives the same numbers
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(a))
    closed = jax.jit(lambda: init(key, (3, 7, 5), F32))()  # a concrete key inside a trace
    np.testing.assert_array_equal(np.asarray(closed), np.asarray(a))
    assert init(key, (0, 4, 2), F32).shape == (0, 4, 2)
    big = initializers.normal(1.0)(key, (70_000,), F32)  # spans two blocks
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda k: initializers.normal(1.0)(k, (70_000,), F32))(key)),
                                  np.asarray(big))
    assert abs(float(np.std(np.asarray(big))) - 1.0) < 0.02 and len(np.unique(np.asarray(big))) > 69_000
    assert initializers.uniform(0.5)(key, (4,), BF16).dtype == BF16
