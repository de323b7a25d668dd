"""Torch-semantics layers and their exact LoRA adapters (rvclora_jax/layers.py).

Every numerical check compares against an independent reference: torch.nn.functional
(``linear`` / ``conv1d`` / ``conv_transpose1d``) on the same weights, or the closed-form
delta ``s·A·B`` computed with numpy in float64. The code is never compared with itself.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from rvclora_jax import lora
from rvclora_jax.layers import (
    LAYER_KINDS,
    Adaptable,
    Conv1d,
    ConvTranspose1d,
    Dense,
    LoRAParam,
    layer_kind,
    lora_scaling,
    register_layer_kind,
)

B, T = 2, 13  # odd T, not a multiple of any stride used below
RANK, ALPHA = 3, 5.0

# id -> (layer class, constructor kwargs). Channel counts are small; kernel/stride/padding/
# dilation follow the RVC generator (ResBlock1 dilations 1/3/5 with padding (k*d-d)//2,
# upsamplers K=16/s=10/p=3 and K=4/s=2/p=1).
CASES = {
    "dense": (Dense, dict(in_features=4, out_features=6)),
    "dense_nobias": (Dense, dict(in_features=4, out_features=6, use_bias=False)),
    "conv_k3_p1": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1)),
    "conv_k1": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=1)),
    "conv_stride3": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=5, stride=3, padding=2)),
    "conv_stride2_valid": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=4, stride=2, padding="valid")),
    "conv_resblock_d3": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, dilation=3, padding=3)),
    "conv_resblock_d5": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, dilation=5, padding=5)),
    "conv_same_odd": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=5, padding="same")),
    "conv_same_even_dil3": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=4, dilation=3, padding="same")),
    "conv_tuple_pad_nobias": (Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=(2, 0),
                                           use_bias=False)),
    "convT_k16_s10_p3": (ConvTranspose1d, dict(in_channels=6, out_channels=4, kernel_size=16, stride=10, padding=3)),
    "convT_k4_s2_p1": (ConvTranspose1d, dict(in_channels=6, out_channels=4, kernel_size=4, stride=2, padding=1)),
    "convT_outpad_dil": (ConvTranspose1d, dict(in_channels=6, out_channels=4, kernel_size=3, stride=3, padding=1,
                                               output_padding=2, dilation=2)),
    "convT_s1_dil3_outpad": (ConvTranspose1d, dict(in_channels=6, out_channels=4, kernel_size=3, stride=1, padding=2,
                                                   output_padding=1, dilation=3)),
    "convT_s3_nobias": (ConvTranspose1d, dict(in_channels=6, out_channels=4, kernel_size=4, stride=3, padding=0,
                                              use_bias=False)),
    # dilation 1 with output_padding: K < stride leaves gaps and the output runs past the last tap
    "convT_k2_s4_outpad3": (ConvTranspose1d, dict(in_channels=6, out_channels=4, kernel_size=2, stride=4,
                                                  output_padding=3)),
    "convT_k5_s3_p2_outpad1": (ConvTranspose1d, dict(in_channels=6, out_channels=4, kernel_size=5, stride=3,
                                                     padding=2, output_padding=1)),
}
# the configurations the merged == unmerged test covers (each kind the issue lists), eager and jitted
RVC_CASES = ["dense", "conv_k3_p1", "conv_stride3", "conv_resblock_d3", "conv_resblock_d5", "conv_same_even_dil3",
             "conv_tuple_pad_nobias", "convT_k16_s10_p3", "convT_k4_s2_p1", "convT_outpad_dil",
             "convT_k2_s4_outpad3"]
ONE_PER_TYPE = ["dense", "conv_resblock_d3", "convT_k16_s10_p3"]
# (case, use_jit): every case eagerly, one per layer type also under nnx.jit
ZERO_INIT = [pytest.param(c, False, id=f"{c}-eager") for c in CASES] + [
    pytest.param(c, True, id=f"{c}-jit") for c in ONE_PER_TYPE]
# (case, dtype): float32 for every case, float64 (tolerance 1e-12) for one per layer type
DTYPES = [pytest.param(c, "float32", id=f"{c}-f32") for c in CASES] + [
    pytest.param(c, "float64", id=f"{c}-f64") for c in ["dense", "conv_resblock_d3", "conv_stride3",
                                                         "convT_k16_s10_p3", "convT_outpad_dil",
                                                         "convT_k5_s3_p2_outpad1"]]


# --------------------------------------------------------------------------------------
# helpers (independent references)
# --------------------------------------------------------------------------------------
def in_channels(case: str) -> int:
    cls, kw = CASES[case]
    return kw["in_features"] if cls is Dense else kw["in_channels"]


def make(case: str, seed: int = 0, dtype=jnp.float32):
    cls, kw = CASES[case]
    return cls(**kw, rngs=nnx.Rngs(seed), param_dtype=dtype)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def torch_forward(case: str, x, kernel, bias) -> np.ndarray:
    """torch.nn.functional on [B, T, C] numpy input with our kernel layout converted."""
    cls, kw = CASES[case]
    dt = torch.float64 if np.asarray(kernel).dtype == np.float64 else torch.float32
    tx = torch.tensor(np.asarray(x), dtype=dt)
    tb = None if bias is None else torch.tensor(np.asarray(bias), dtype=dt)
    k = np.asarray(kernel)
    with torch.no_grad():
        if cls is Dense:
            return F.linear(tx, torch.tensor(k.T.copy(), dtype=dt), tb).numpy()
        tx = tx.permute(0, 2, 1)  # [B, C, T]
        if cls is Conv1d:
            w = torch.tensor(k.transpose(2, 1, 0).copy(), dtype=dt)  # [out, in/groups, K]
            pad = kw.get("padding", 0)
            if isinstance(pad, tuple):
                tx, pad = F.pad(tx, pad), 0
            with warnings.catch_warnings():  # torch notes that even-K 'same' pads a copy
                warnings.filterwarnings("ignore", message="Using padding='same'")
                y = F.conv1d(tx, w, tb, stride=kw.get("stride", 1), padding=pad,
                             dilation=kw.get("dilation", 1), groups=kw.get("groups", 1))
        else:
            w = torch.tensor(k.transpose(1, 2, 0).copy(), dtype=dt)  # [in, out, K]
            y = F.conv_transpose1d(tx, w, tb, stride=kw.get("stride", 1), padding=kw.get("padding", 0),
                                   output_padding=kw.get("output_padding", 0), groups=1,
                                   dilation=kw.get("dilation", 1))
        return y.permute(0, 2, 1).numpy()


def expected_length(case: str, L: int) -> int:
    """Closed-form torch output length."""
    cls, kw = CASES[case]
    if cls is Dense:
        return L
    K, s, d = kw["kernel_size"], kw.get("stride", 1), kw.get("dilation", 1)
    if cls is Conv1d:
        pad = kw.get("padding", 0)
        if pad == "same":
            return L
        if pad == "valid":
            pad = 0
        pl, pr = pad if isinstance(pad, tuple) else (pad, pad)
        return (L + pl + pr - d * (K - 1) - 1) // s + 1
    p, op = kw.get("padding", 0), kw.get("output_padding", 0)
    return (L - 1) * s - 2 * p + d * (K - 1) + op + 1


def ref_delta(case: str, a, b, scaling: float) -> np.ndarray:
    """ΔW in the kernel layout, from the factorisation documented in layers.py (float64)."""
    cls, _ = CASES[case]
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if cls is Dense:
        d = a @ b  # [in, r] @ [r, out]
    elif cls is Conv1d:
        d = np.einsum("kir,ro->kio", a, b)  # a [K, in, r], b [r, out]
    else:
        d = np.einsum("ir,kro->kio", a, b)  # a [in, r], b [K, r, out]
    return scaling * d


def randomize_b(layer, rng, scale: float = 0.5) -> None:
    shape = layer.lora_b[...].shape
    layer.lora_b[...] = jnp.asarray(rng.normal(size=shape) * scale, layer.lora_b[...].dtype)


def x_for(case: str, rng, dtype=np.float32) -> jax.Array:
    return jnp.asarray(rng.normal(size=(B, T, in_channels(case))).astype(dtype))


def bias_of(layer):
    return None if layer.bias is None else np.asarray(layer.bias[...])


def apply_fn(use_jit: bool):
    if use_jit:
        return nnx.jit(lambda m, x: m(x))
    return lambda m, x: m(x)


class Holder(nnx.Module):
    """Puts a layer at path ``layer`` so the tree functions of lora.py can address it."""

    def __init__(self, layer):
        self.layer = layer


# --------------------------------------------------------------------------------------
# 3. base forward == torch (values and output lengths)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_base_forward_matches_torch(case, rng):
    layer = make(case)
    x = x_for(case, rng)
    y = np.asarray(layer(x))
    want = torch_forward(case, x, layer.kernel[...], bias_of(layer))
    assert y.shape == want.shape
    assert y.shape[1] == expected_length(case, T)
    assert rel_err(y, want) <= 1e-5


# (case, L) pairs with a non-empty output (shorter inputs are an error in torch too)
LENGTHS = [(c, L) for c in ["conv_stride3", "conv_stride2_valid", "conv_same_even_dil3", "convT_k16_s10_p3",
                            "convT_k4_s2_p1", "convT_outpad_dil", "convT_k2_s4_outpad3"]
           for L in (1, 2, 7, 20) if expected_length(c, L) >= 1]


@pytest.mark.parametrize("case,L", LENGTHS)
def test_output_lengths_match_torch(case, L, rng):
    layer = make(case)
    x = jnp.asarray(rng.normal(size=(1, L, in_channels(case))).astype(np.float32))
    want = torch_forward(case, x, layer.kernel[...], bias_of(layer))
    assert layer(x).shape == want.shape
    assert want.shape[1] == expected_length(case, L)


def test_grouped_conv_matches_torch_and_refuses_lora(rng):
    layer = Conv1d(4, 6, 3, padding=1, groups=2, rngs=nnx.Rngs(0))
    assert layer.kernel[...].shape == (3, 2, 6)
    x = jnp.asarray(rng.normal(size=(B, T, 4)).astype(np.float32))
    w = torch.tensor(np.asarray(layer.kernel[...]).transpose(2, 1, 0).copy())
    want = F.conv1d(torch.tensor(np.asarray(x)).permute(0, 2, 1), w, torch.tensor(np.asarray(layer.bias[...])),
                    padding=1, groups=2).permute(0, 2, 1).numpy()
    assert rel_err(layer(x), want) <= 1e-5
    with pytest.raises(ValueError, match="groups"):
        layer.add_lora(2, 2.0, rngs=nnx.Rngs(1))


# --------------------------------------------------------------------------------------
# 1. a fresh (zero-b) adapter changes nothing, bit for bit
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,use_jit", ZERO_INIT)
def test_zero_init_adapter_is_bit_identical(case, use_jit, rng):
    f = apply_fn(use_jit)
    layer = make(case)
    x = x_for(case, rng)
    before = np.asarray(f(layer, x))
    layer.add_lora(RANK, ALPHA, rngs=nnx.Rngs(1))
    assert layer.has_lora
    assert not np.any(np.asarray(layer.lora_b[...]))
    assert np.any(np.asarray(layer.lora_a[...]))
    after = np.asarray(f(layer, x))
    np.testing.assert_array_equal(after, before)


# --------------------------------------------------------------------------------------
# factor shapes, init, delta_kernel closed form
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_factor_shapes_init_and_delta_closed_form(case, rng):
    layer = make(case)
    layer.add_lora(RANK, ALPHA, rngs=nnx.Rngs(1))
    cls, kw = CASES[case]
    if cls is Dense:
        i, o = kw["in_features"], kw["out_features"]
        a_shape, b_shape, fan_in = (i, RANK), (RANK, o), i
    elif cls is Conv1d:
        k, i, o = kw["kernel_size"], kw["in_channels"], kw["out_channels"]
        a_shape, b_shape, fan_in = (k, i, RANK), (RANK, o), k * i
    else:
        k, i, o = kw["kernel_size"], kw["in_channels"], kw["out_channels"]
        a_shape, b_shape, fan_in = (i, RANK), (k, RANK, o), i
    assert isinstance(layer.lora_a, LoRAParam) and isinstance(layer.lora_b, LoRAParam)
    assert layer.lora_a[...].shape == a_shape and layer.lora_b[...].shape == b_shape
    # kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in))
    assert np.max(np.abs(np.asarray(layer.lora_a[...]))) <= (1.0 + 1e-6) / math.sqrt(fan_in)
    assert layer.lora_scaling == pytest.approx(ALPHA / RANK)
    assert layer.lora_rank == RANK and layer.lora_alpha == ALPHA
    # zero adapter: zero delta
    assert not np.any(np.asarray(layer.delta_kernel()))
    randomize_b(layer, rng)
    want = ref_delta(case, layer.lora_a[...], layer.lora_b[...], ALPHA / RANK)
    assert want.shape == layer.kernel[...].shape
    assert rel_err(layer.delta_kernel(), want) <= 1e-6
    # the kind's bare-array delta, looked up by name as merges do, agrees too (jnp and float64 numpy)
    kind = layer_kind(layer.kind)
    assert kind is cls and layer.kind == cls.__name__
    want = ref_delta(case, layer.lora_a[...], layer.lora_b[...], 0.25)
    assert rel_err(kind.delta(layer.lora_a[...], layer.lora_b[...], 0.25), want) <= 1e-6
    got64 = kind.delta(layer.lora_a[...], layer.lora_b[...], 0.25, xp=np)
    assert got64.dtype == np.float64 and rel_err(got64, want) <= 1e-12
    # shapes from the kind alone: factor shapes of a kernel shape, and back
    assert kind.factor_shapes(layer.kernel.shape, RANK) == (a_shape, b_shape, fan_in)
    assert kind.kernel_shape_of(a_shape, b_shape) == tuple(layer.kernel.shape)
    assert kind.rank_of(a_shape) == RANK


def test_delta_rejects_non_factor_pairs():
    for kind in (Dense, Conv1d, ConvTranspose1d):
        with pytest.raises(ValueError, match="not a LoRA factor pair"):
            kind.delta(jnp.ones((2, 3, 4)), jnp.ones((4, 3, 2)), 1.0)
    with pytest.raises(ValueError, match="not a LoRA factor pair"):
        Dense.kernel_shape_of((4, 3), (2, 6))  # ranks disagree


# The LoRA basis written out by hand for each kind (module docstring of layers.py): the
# matrix M = A·B that SVD works on, with A, B as reshapes of the factors.
def ref_matrix(cls, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if cls is Dense:
        return a, b
    if cls is Conv1d:
        k, i, r = a.shape
        return a.reshape(k * i, r), b
    k, r, o = b.shape
    return a, b.transpose(1, 0, 2).reshape(r, k * o)


@pytest.mark.parametrize("case", ONE_PER_TYPE)
def test_lora_basis_matrix_round_trip(case, rng):
    cls, _ = CASES[case]
    kshape = tuple(make(case).kernel.shape)
    a_shape, b_shape, _ = cls.factor_shapes(kshape, RANK)
    a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
    A, Bm = ref_matrix(cls, a, b)
    delta = ref_delta(case, a, b, 1.0)
    np.testing.assert_allclose(cls.to_matrix(delta), A @ Bm, rtol=1e-12, atol=1e-12)
    # from_matrix is the inverse reshape: any factors of M give back ΔW
    U, S, Vt = np.linalg.svd(A @ Bm, full_matrices=False)
    fa, fb = cls.from_matrix(U[:, :RANK] * S[:RANK], Vt[:RANK], kshape)
    assert fa.shape == a_shape and fb.shape == b_shape
    np.testing.assert_allclose(ref_delta(case, fa, fb, 1.0), delta, rtol=1e-10, atol=1e-10)
    # ranks concatenate along rank_axes: [a1|a2]·[b1;b2] = ΔW1 + ΔW2
    ia, ib = cls.rank_axes()
    a2, b2 = rng.normal(size=a_shape), rng.normal(size=b_shape)
    cat = ref_delta(case, np.concatenate([a, a2], ia), np.concatenate([b, b2], ib), 1.0)
    np.testing.assert_allclose(cat, delta + ref_delta(case, a2, b2, 1.0), rtol=1e-12, atol=1e-12)


def test_layer_kind_registry():
    assert {k: LAYER_KINDS[k] for k in ("Dense", "Conv1d", "ConvTranspose1d")} == {
        "Dense": Dense, "Conv1d": Conv1d, "ConvTranspose1d": ConvTranspose1d}
    with pytest.raises(ValueError, match="unknown layer kind 'Conv3d'"):
        layer_kind("Conv3d")
    with pytest.raises(ValueError, match="already registered"):
        register_layer_kind("Dense", "ir,ro->io")(type("Other", (Dense,), {}))
    with pytest.raises(ValueError, match="rank axis"):
        register_layer_kind("Bad", "ij,jo->io")
    with pytest.raises(ValueError, match="exactly one factor"):
        register_layer_kind("Bad", "kir,kro->kio")
    with pytest.raises(TypeError, match="not an Adaptable"):
        register_layer_kind("Bad", "ir,ro->io")(object)
    assert "Bad" not in LAYER_KINDS and issubclass(Dense, Adaptable)


# torch modules and the layer whose torch hook must map their weight onto our kernel layout
HOOK_CASES = {
    "dense": (lambda: torch.nn.Linear(4, 6), lambda: Dense(4, 6, rngs=nnx.Rngs(0))),
    "conv": (lambda: torch.nn.Conv1d(4, 6, 3, padding=1), lambda: Conv1d(4, 6, 3, padding=1, rngs=nnx.Rngs(0))),
    "conv_kx1": (lambda: torch.nn.Conv2d(4, 6, (5, 1), stride=(3, 1), padding=(2, 0)),
                 lambda: Conv1d(4, 6, 5, stride=3, padding=2, torch_kx1=True, rngs=nnx.Rngs(0))),
    "convT": (lambda: torch.nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1),
              lambda: ConvTranspose1d(6, 4, 4, stride=2, padding=1, rngs=nnx.Rngs(0))),
}


@pytest.mark.parametrize("case", list(HOOK_CASES))
def test_torch_hooks_load_torch_modules(case, rng):
    """``from_torch`` turns the torch module's weight into our kernel: the layer then computes
    the torch module's output; ``to_torch`` gives the torch weight back exactly."""
    make_torch, make_ours = HOOK_CASES[case]
    torch.manual_seed(0)
    tm, layer = make_torch(), make_ours()
    w = tm.weight.detach().numpy()
    layer.kernel[...] = jnp.asarray(layer.from_torch(w))
    layer.bias[...] = jnp.asarray(tm.bias.detach().numpy())
    np.testing.assert_array_equal(layer.to_torch(np.asarray(layer.kernel[...])), w)
    cin = w.shape[0] if case == "convT" else w.shape[1]
    x = rng.normal(size=(2, 13, cin)).astype(np.float32)
    with torch.no_grad():
        tx = torch.tensor(x)
        if case == "dense":
            want = tm(tx).numpy()
        elif case == "conv_kx1":
            want = tm(tx.permute(0, 2, 1)[..., None])[..., 0].permute(0, 2, 1).numpy()
        else:
            want = tm(tx.permute(0, 2, 1)).permute(0, 2, 1).numpy()
    assert rel_err(layer(jnp.asarray(x)), want) <= 1e-5


def test_gaussian_init(rng):
    layer = Dense(256, 6, rngs=nnx.Rngs(0))
    layer.add_lora(4, 4.0, rngs=nnx.Rngs(1), init="gaussian")
    a = np.asarray(layer.lora_a[...])
    assert a.shape == (256, 4)
    assert np.std(a) == pytest.approx(1 / 4, rel=0.15)  # N(0, 1)/r
    assert not np.any(np.asarray(layer.lora_b[...]))


def test_add_lora_validation():
    layer = Dense(4, 6, rngs=nnx.Rngs(0))
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="rank"):
            layer.add_lora(bad, 1.0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="init"):
        layer.add_lora(2, 1.0, rngs=nnx.Rngs(1), init="xavier")
    assert not layer.has_lora
    layer.add_lora(2, 1.0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has an adapter"):
        layer.add_lora(2, 1.0, rngs=nnx.Rngs(1))


def test_lora_scaling_closed_form():
    assert lora_scaling(4, 8.0) == 2.0
    assert lora_scaling(4, 8.0, use_rslora=True) == 4.0
    assert lora_scaling(16, 4.0, use_rslora=True) == 1.0


@pytest.mark.parametrize("case", ONE_PER_TYPE)
def test_remove_lora_restores_base_exactly(case, rng):
    layer = make(case)
    x = x_for(case, rng)
    base = np.asarray(layer(x))
    layer.add_lora(RANK, ALPHA, rngs=nnx.Rngs(1))
    randomize_b(layer, rng)
    assert not np.array_equal(np.asarray(layer(x)), base)
    layer.remove_lora()
    assert not layer.has_lora
    assert not jax.tree.leaves(nnx.state(layer, LoRAParam))
    np.testing.assert_array_equal(np.asarray(layer(x)), base)


def test_layer_argument_validation():
    with pytest.raises(ValueError, match="same"):
        Conv1d(2, 2, 3, stride=2, padding="same", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding"):
        Conv1d(2, 2, 3, padding="full", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="groups"):
        Conv1d(3, 4, 3, groups=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="output_padding"):
        ConvTranspose1d(2, 2, 4, stride=2, output_padding=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding"):
        ConvTranspose1d(2, 2, 3, padding=3, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------
# 2. merged == unmerged (plain layer with kernel + ΔW, and the pure lora.merge)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", RVC_CASES)
def test_merged_equals_unmerged(case, use_jit, rng):
    f = apply_fn(use_jit)
    layer = make(case)
    layer.add_lora(RANK, ALPHA, rngs=nnx.Rngs(1))
    randomize_b(layer, rng)
    x = x_for(case, rng)
    y_adapter = np.asarray(f(layer, x))
    base_y = np.asarray(make(case)(x))
    # the adapter must actually matter for this comparison to mean anything
    assert rel_err(y_adapter, base_y) > 1e-2

    # (a) plain layer (no adapter) with the closed-form merged kernel
    delta = ref_delta(case, layer.lora_a[...], layer.lora_b[...], ALPHA / RANK)
    plain = make(case)
    assert not plain.has_lora
    plain.kernel[...] = jnp.asarray(np.asarray(layer.kernel[...], np.float64) + delta, jnp.float32)
    y_plain = np.asarray(f(plain, x))
    assert rel_err(y_plain, y_adapter) <= 1e-5

    # (b) the pure merge on parameter trees, loaded into an adapter-free model
    params = nnx.to_pure_dict(nnx.state(Holder(layer), nnx.Param))
    adapter, base = lora.partition(params)
    assert set(adapter["layer"]) == {"lora_a", "lora_b"}
    merged = lora.merge(base, adapter, {"layer": layer.lora_scaling})
    target = Holder(make(case, seed=7))  # different init: every value must come from `merged`
    state = nnx.state(target, nnx.Param)
    assert set(lora.flatten(merged)) == set(lora.flatten(nnx.to_pure_dict(state)))  # every leaf supplied
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(target, state)
    y_merged = np.asarray(f(target.layer, x))
    assert rel_err(y_merged, y_adapter) <= 1e-5
    assert rel_err(target.layer.kernel[...], np.asarray(layer.kernel[...], np.float64) + delta) <= 1e-6


# --------------------------------------------------------------------------------------
# 3b. adapted forward == torch with the merged kernel (float32 and float64)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,dtype", DTYPES)
def test_adapted_forward_matches_torch_with_merged_kernel(case, dtype, rng):
    ctx = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    tol = 1e-5 if dtype == "float32" else 1e-12
    with ctx:
        jdt = jnp.float64 if dtype == "float64" else jnp.float32
        layer = make(case, dtype=jdt)
        layer.add_lora(RANK, ALPHA, rngs=nnx.Rngs(1))
        randomize_b(layer, rng)
        assert layer.kernel[...].dtype == jdt and layer.lora_b[...].dtype == jdt
        x = x_for(case, rng, dtype=np.dtype(dtype))
        y = np.asarray(layer(x))
        assert y.dtype == np.dtype(dtype)
        merged = (np.asarray(layer.kernel[...], np.float64)
                  + ref_delta(case, layer.lora_a[...], layer.lora_b[...], ALPHA / RANK)).astype(dtype)
        bias = bias_of(layer)
        want = torch_forward(case, x, merged, bias)
        assert y.shape == want.shape and y.shape[1] == expected_length(case, T)
        assert rel_err(y, want) <= tol
        # and it is really different from the base layer
        assert rel_err(want, torch_forward(case, x, layer.kernel[...], bias)) > 1e-2


# --------------------------------------------------------------------------------------
# 6. dropout on the adapter input: train mode only
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dense", "conv_resblock_d5", "convT_k4_s2_p1"])
def test_dropout_only_in_train_mode(case, rng):
    holder = Holder(make(case))
    layer = holder.layer
    layer.add_lora(RANK, ALPHA, rngs=nnx.Rngs(1), dropout=0.5)
    x = x_for(case, rng)
    base = torch_forward(case, x, layer.kernel[...], bias_of(layer))

    # b == 0: dropout only touches the adapter branch, so even train mode is the base output
    holder.train()
    np.testing.assert_allclose(np.asarray(layer(x)), base, rtol=0, atol=1e-5 * np.abs(base).max())

    randomize_b(layer, rng)
    merged = np.asarray(layer.kernel[...], np.float64) + ref_delta(case, layer.lora_a[...], layer.lora_b[...],
                                                                   ALPHA / RANK)
    no_dropout = torch_forward(case, x, merged.astype(np.float32), bias_of(layer))

    holder.eval()
    y1, y2 = np.asarray(layer(x)), np.asarray(layer(x))
    np.testing.assert_array_equal(y1, y2)  # deterministic
    assert rel_err(y1, no_dropout) <= 1e-5  # == the no-dropout output

    holder.train()
    t1, t2 = np.asarray(layer(x)), np.asarray(layer(x))
    assert np.all(np.isfinite(t1))
    assert rel_err(t1, no_dropout) > 1e-3
    assert rel_err(t1, y1) > 1e-3
    assert not np.array_equal(t1, t2)  # a fresh mask per call

    holder.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), y1)


# --------------------------------------------------------------------------------------
# gradient of the adapter, closed form (Dense): y = x W + c + s (x A) B
# --------------------------------------------------------------------------------------
def test_dense_adapter_gradient_closed_form(rng):
    layer = Dense(4, 6, rngs=nnx.Rngs(0))
    layer.add_lora(2, 3.0, rngs=nnx.Rngs(1))
    randomize_b(layer, rng)
    s = 3.0 / 2
    x = rng.normal(size=(B, T, 4)).astype(np.float32)
    g = rng.normal(size=(B, T, 6)).astype(np.float32)
    graphdef, lora_state, rest = nnx.split(layer, LoRAParam, ...)

    def loss(ls):
        return jnp.sum(nnx.merge(graphdef, ls, rest)(jnp.asarray(x)) * g)

    grads = jax.grad(loss)(lora_state)
    a = np.asarray(layer.lora_a[...], np.float64)
    b = np.asarray(layer.lora_b[...], np.float64)
    x2, g2 = x.reshape(-1, 4).astype(np.float64), g.reshape(-1, 6).astype(np.float64)
    want_b = s * (x2 @ a).T @ g2  # [r, out]
    want_a = s * x2.T @ g2 @ b.T  # [in, r]
    assert rel_err(grads["lora_a"][...], want_a) <= 1e-5
    assert rel_err(grads["lora_b"][...], want_b) <= 1e-5


@pytest.mark.parametrize("groups,stride,k", [(4, 4, 41), (16, 1, 5)])
def test_grouped_conv_gradients_match_torch_autograd(groups, stride, k):
    """Conv1d(groups>1) has a custom backward (slices + einsum); check it against torch."""
    import torch

    cin, cout, T = 32, 64, 120
    layer = Conv1d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, T, cin)).astype(np.float32)
    gy_shape = np.asarray(layer(jnp.asarray(x))).shape
    gy = rng.standard_normal(gy_shape).astype(np.float32)

    graphdef, params = nnx.split(layer, nnx.Param)

    def f(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) * gy)

    kern = layer.kernel[...]
    gp, gx = jax.jit(jax.grad(f, argnums=(0, 1)))(params, jnp.asarray(x))
    gk = gp["kernel"][...]
    tx = torch.tensor(x.transpose(0, 2, 1), requires_grad=True)
    tw = torch.tensor(np.asarray(kern).transpose(2, 1, 0), requires_grad=True)
    ty = torch.nn.functional.conv1d(tx, tw, torch.tensor(np.asarray(layer.bias[...])), stride=stride,
                                    padding=k // 2, groups=groups)
    (ty * torch.tensor(gy.transpose(0, 2, 1))).sum().backward()
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gk), tw.grad.numpy().transpose(2, 1, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ci,co,k,stride,padding,dilation,T", [
    (8, 6, 5, 1, 2, 1, 30), (8, 6, 5, 1, 6, 3, 30), (8, 6, 3, 1, "same", 5, 31), (8, 6, 4, 1, "same", 3, 31),
    (1, 6, 80, 40, 20, 1, 400),  # RVC noise_convs.0 at 40k
    (8, 6, 5, 3, 2, 1, 64), (8, 6, 5, 3, 2, 1, 65),  # DiscriminatorP, lengths with and without a tail
    (8, 6, 4, 2, 0, 1, 33), (8, 6, 3, 1, 0, 1, 20), (8, 6, 5, 2, (3, 0), 1, 23)])
def test_conv_gradients_match_torch_autograd(ci, co, k, stride, padding, dilation, T):
    """Conv1d's custom input gradient (flipped-kernel conv / polyphase) against torch."""
    import torch

    layer = Conv1d(ci, co, k, stride=stride, padding=padding, dilation=dilation, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, T, ci)).astype(np.float32)
    gy = rng.standard_normal(np.asarray(layer(jnp.asarray(x))).shape).astype(np.float32)
    gp, gx = jax.jit(jax.grad(lambda p, xx: jnp.sum(nnx.merge(graphdef, p)(xx) * gy), argnums=(0, 1)))(
        params, jnp.asarray(x))
    tx = torch.tensor(x.transpose(0, 2, 1), requires_grad=True)
    tw = torch.tensor(np.asarray(layer.kernel[...]).transpose(2, 1, 0), requires_grad=True)
    pl, pr = layer.padding
    ty = torch.nn.functional.conv1d(torch.nn.functional.pad(tx, (pl, pr)), tw, stride=stride, dilation=dilation)
    (ty * torch.tensor(gy.transpose(0, 2, 1))).sum().backward()
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gp["kernel"][...]), tw.grad.numpy().transpose(2, 1, 0), rtol=1e-4, atol=1e-4)
