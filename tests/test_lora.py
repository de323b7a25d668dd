"""LoRA configuration, injection, training split, pure merge, summaries (rvclora_jax/lora.py)
and adapter files (rvclora_jax/adapters/files.py), on a tiny model laid out like RVC (``dec.ups.0``,
``dec.resblocks.0.convs1.0``, ``enc_p.emb_phone``, ...).

References are independent of the code under test: merged kernels are computed with
numpy from the documented factorisation ``ΔW = s·A·B``, parameter counts from the layer
table below by closed form, scalings from ``alpha/r`` or ``alpha/sqrt(r)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rvclora_jax import adapters as A
from rvclora_jax import lora
from rvclora_jax.layers import Conv1d, ConvTranspose1d, Dense, LoRAParam
from rvclora_jax.families.rvc import RVC
from rvclora_jax.lora import LoRAConfig

PHONE, H, C1, C2 = 6, 8, 4, 2
B, T = 2, 5
UP = 20  # total upsampling: 10 * 2


# --------------------------------------------------------------------------------------
# a tiny RVC-shaped model
# --------------------------------------------------------------------------------------
def lrelu(x):
    return jnp.where(x >= 0, x, 0.1 * x)


class ResBlock1(nnx.Module):
    def __init__(self, ch: int, *, rngs: nnx.Rngs, k: int = 3, dilations=(1, 3, 5)):
        self.convs1 = nnx.List([Conv1d(ch, ch, k, dilation=d, padding=(k * d - d) // 2, rngs=rngs)
                                for d in dilations])
        self.convs2 = nnx.List([Conv1d(ch, ch, k, padding=(k - 1) // 2, rngs=rngs) for _ in dilations])

    def __call__(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(lrelu(c1(lrelu(x))))
        return x


class SourceModule(nnx.Module):
    def __init__(self, *, rngs):
        self.l_linear = Dense(3, 1, rngs=rngs)

    def __call__(self, har):
        return jnp.tanh(self.l_linear(har))


class Generator(nnx.Module):
    def __init__(self, *, rngs, up0_kernel: int = 16):
        self.conv_pre = Conv1d(H, H, 7, padding=3, rngs=rngs)
        self.ups = nnx.List([
            ConvTranspose1d(H, C1, up0_kernel, stride=10, padding=(up0_kernel - 10) // 2, rngs=rngs),
            ConvTranspose1d(C1, C2, 4, stride=2, padding=1, rngs=rngs),
        ])
        self.resblocks = nnx.List([ResBlock1(C1, rngs=rngs), ResBlock1(C2, rngs=rngs)])
        self.m_source = SourceModule(rngs=rngs)
        self.conv_post = Conv1d(C2, 1, 7, padding=3, use_bias=False, rngs=rngs)

    def __call__(self, x, har):
        x = self.conv_pre(x)
        for up, rb in zip(self.ups, self.resblocks):
            x = rb(up(lrelu(x)))
        x = x + self.m_source(har)
        return jnp.tanh(self.conv_post(lrelu(x)))


class TextEncoder(nnx.Module):
    def __init__(self, *, rngs):
        self.emb_phone = Dense(PHONE, H, rngs=rngs)
        self.proj = Conv1d(H, H, 1, rngs=rngs)

    def __call__(self, phone):
        return self.proj(lrelu(self.emb_phone(phone)))


class TinyRVC(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, up0_kernel: int = 16, extra: bool = False):
        self.enc_p = TextEncoder(rngs=rngs)
        self.dec = Generator(rngs=rngs, up0_kernel=up0_kernel)
        # an extra (never adapted) layer: same adapted shapes, different architecture
        self.emb_g = Dense(2, H, rngs=rngs) if extra else nnx.data(None)

    def __call__(self, phone, har):
        return self.dec(self.enc_p(phone), har)


# The model's layers by hand: path -> (kind, in, out, K, has_bias). Independent of the code.
LAYERS = {
    "enc_p/emb_phone": ("Dense", PHONE, H, 1, True),
    "enc_p/proj": ("Conv1d", H, H, 1, True),
    "dec/conv_pre": ("Conv1d", H, H, 7, True),
    "dec/ups/0": ("ConvTranspose1d", H, C1, 16, True),
    "dec/ups/1": ("ConvTranspose1d", C1, C2, 4, True),
    **{f"dec/resblocks/0/convs{j}/{i}": ("Conv1d", C1, C1, 3, True) for j in (1, 2) for i in range(3)},
    **{f"dec/resblocks/1/convs{j}/{i}": ("Conv1d", C2, C2, 3, True) for j in (1, 2) for i in range(3)},
    "dec/m_source/l_linear": ("Dense", 3, 1, 1, True),
    "dec/conv_post": ("Conv1d", C2, 1, 7, False),
}
UPS = {"dec/ups/0", "dec/ups/1"}
GENERATOR = {p for p in LAYERS if p.startswith("dec/") and p != "dec/m_source/l_linear"}
PRIOR = {"enc_p/emb_phone", "enc_p/proj"}


def base_count(path: str) -> int:
    kind, i, o, k, bias = LAYERS[path]
    return (i * o if kind == "Dense" else k * i * o) + (o if bias else 0)


def adapter_count(path: str, r: int) -> int:
    kind, i, o, k, _ = LAYERS[path]
    return {"Dense": r * (i + o), "Conv1d": r * (k * i + o), "ConvTranspose1d": r * (i + k * o)}[kind]


def ref_delta(kind: str, a, b, s: float) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if kind == "Dense":
        return s * (a @ b)
    if kind == "Conv1d":
        return s * np.einsum("kir,ro->kio", a, b)
    return s * np.einsum("ir,kro->kio", a, b)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def inputs(seed: int = 0):
    r = np.random.default_rng(seed)
    phone = jnp.asarray(r.normal(size=(B, T, PHONE)).astype(np.float32))
    har = jnp.asarray(r.normal(size=(B, T * UP, 3)).astype(np.float32))
    return phone, har


def layers_of(model) -> dict:
    return dict(lora.iter_lora_layers(model))


def adapted_paths(model) -> set[str]:
    return {p for p, layer in lora.iter_lora_layers(model) if layer.has_lora}


def randomize_adapters(model, seed: int = 0, scale: float = 0.3) -> None:
    r = np.random.default_rng(seed)
    for _, layer in sorted(lora.iter_lora_layers(model)):
        if layer.has_lora:
            shape = layer.lora_b[...].shape
            layer.lora_b[...] = jnp.asarray(r.normal(size=shape).astype(np.float32) * scale)


def make_adapted(config: LoRAConfig | None = None, *, seed: int = 0, randomize: bool = True, **model_kw):
    model = TinyRVC(rngs=nnx.Rngs(seed), **model_kw)
    lora.inject(model, config or LoRAConfig(rank=2), rngs=nnx.Rngs(100))
    if randomize:
        randomize_adapters(model)
    return model


def load_params(model, params: dict) -> None:
    """Load a pure-dict parameter tree into ``model``; it must supply every leaf."""
    state = nnx.state(model, nnx.Param)
    assert set(lora.flatten(params)) == set(lora.flatten(nnx.to_pure_dict(state)))
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def snapshot(tree) -> dict:
    return {p: np.array(v, copy=True) for p, v in lora.flatten(tree).items()}


def flat_state(state) -> dict:
    return {p: np.asarray(v) for p, v in lora.flatten(nnx.to_pure_dict(state)).items()}


# --------------------------------------------------------------------------------------
# 5. config: presets, matching, patterns, rsLoRA, validation, round trip
# --------------------------------------------------------------------------------------
def test_model_layer_table_matches_model():
    # guards the hand-written table the counts below rely on
    model = TinyRVC(rngs=nnx.Rngs(0))
    found = {p: (type(m).__name__, tuple(m.kernel[...].shape), m.bias is not None)
             for p, m in lora.iter_lora_layers(model)}
    assert lora.layer_kinds(model) == {p: kind for p, (kind, *_) in LAYERS.items()}
    want = {}
    for p, (kind, i, o, k, bias) in LAYERS.items():
        shape = (i, o) if kind == "Dense" else (k, i, o)
        want[p] = (kind, shape, bias)
    assert found == want


@pytest.mark.parametrize("preset,expected", [
    ("ups", UPS),
    ("generator", GENERATOR),
    ("generator+flow", GENERATOR),  # the tiny model has no flow
    ("generator+prior", GENERATOR | PRIOR),
])
def test_presets_select_expected_layers(preset, expected):
    assert preset in lora.PRESETS
    cfg = LoRAConfig.from_preset(preset, rank=2)
    assert cfg.preset == preset and cfg.rank == 2 and cfg.targets == lora.PRESETS[preset][0]
    model = TinyRVC(rngs=nnx.Rngs(0))
    done = lora.inject(model, cfg, rngs=nnx.Rngs(1))
    assert set(done) == expected == adapted_paths(model)
    assert len(done) == len(set(done))


def test_presets_and_default():
    assert set(lora.PRESETS) == {"ups", "generator", "generator+flow", "generator+prior"}
    assert LoRAConfig().targets == LoRAConfig.from_preset("generator").targets
    # preset names where the targets came from: the default, a named one, or none for custom targets
    assert LoRAConfig().preset == "generator"
    assert LoRAConfig(preset="ups") == LoRAConfig.from_preset("ups")
    assert LoRAConfig(targets=(r"dec/ups/\d+",)).preset is None
    assert LoRAConfig.from_preset("ups", family=RVC).targets == RVC.lora_presets["ups"][0]
    with pytest.raises(ValueError, match="unknown preset"):
        LoRAConfig(preset="everything")
    # files written before the fix name a preset next to custom targets: they load as written
    old = LoRAConfig.from_dict({**LoRAConfig(targets=("enc_p/proj",)).to_dict(), "preset": "generator"})
    assert old.targets == ("enc_p/proj",) and old.preset == "generator"
    assert LoRAConfig().alpha == LoRAConfig().rank  # alpha defaults to rank: scaling 1
    # the generator preset covers the RVC generator's own module names
    cfg = LoRAConfig.from_preset("generator")
    for p in ["dec/conv_pre", "dec/cond", "dec/ups/3", "dec/noise_convs/2", "dec/resblocks/11/convs1/2",
              "dec/resblocks/0/convs2/0", "dec/resblocks/4/convs/1", "dec/conv_post"]:
        assert cfg.matches(p), p
    for p in ["dec/m_source/l_linear", "flow/flows/0/pre", "enc_p/proj", "dec/ups"]:
        assert not cfg.matches(p), p
    prior = LoRAConfig.from_preset("generator+prior")
    for p in ["flow/flows/6/enc/in_layers/2", "flow/flows/0/post", "enc_p/encoder/attn_layers/5/conv_o",
              "enc_p/encoder/ffn_layers/0/conv_2", "enc_p/emb_phone", "enc_p/proj"]:
        assert prior.matches(p), p


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        LoRAConfig.from_preset("everything")


def test_matches_is_fullmatch_and_exclude():
    cfg = LoRAConfig(targets=(r"dec/ups/\d+", r"dec/resblocks/.*"), exclude=(r"dec/resblocks/1/.*",))
    assert cfg.matches("dec/ups/0") and cfg.matches("dec/ups/12")
    assert not cfg.matches("dec/ups/0/kernel")  # no prefix match
    assert not cfg.matches("xdec/ups/0")  # no search
    assert not cfg.matches("dec/ups/a")
    assert cfg.matches("dec/resblocks/0/convs1/2")
    assert not cfg.matches("dec/resblocks/1/convs1/2")  # excluded
    model = TinyRVC(rngs=nnx.Rngs(0))
    lora.inject(model, cfg, rngs=nnx.Rngs(1))
    want = UPS | {p for p in LAYERS if p.startswith("dec/resblocks/0/")}
    assert adapted_paths(model) == want


def test_rank_and_alpha_patterns_first_match_wins():
    cfg = LoRAConfig(rank=4, targets=lora.PRESETS["generator+prior"][0],
                     rank_pattern={r"dec/ups/\d+": 2, r"dec/.*": 3},
                     alpha_pattern={"dec/conv_post": 9.0, r"dec/ups/1": 1.0, r"dec/.*": 6.0})
    assert cfg.alpha == 4.0
    model = TinyRVC(rngs=nnx.Rngs(0))
    lora.inject(model, cfg, rngs=nnx.Rngs(1))
    layers = layers_of(model)
    for path in GENERATOR | PRIOR:
        r = 2 if path in UPS else 3 if path.startswith("dec/") else 4
        alpha = {"dec/conv_post": 9.0, "dec/ups/1": 1.0}.get(path, 6.0 if path.startswith("dec/") else 4.0)
        layer = layers[path]
        kind, i, o, k, _ = LAYERS[path]
        a_shape, b_shape = {"Dense": ((i, r), (r, o)), "Conv1d": ((k, i, r), (r, o)),
                            "ConvTranspose1d": ((i, r), (k, r, o))}[kind]
        assert layer.lora_a[...].shape == a_shape, path
        assert layer.lora_b[...].shape == b_shape, path
        assert layer.lora_rank == r and layer.lora_alpha == alpha, path
        assert layer.lora_scaling == pytest.approx(alpha / r), path
        assert cfg.rank_for(path) == r and cfg.scaling_for(path) == pytest.approx(alpha / r)
    assert not layers["dec/m_source/l_linear"].has_lora

    # reversed order: the broad pattern now wins for the upsamplers too
    rev = LoRAConfig(rank=4, rank_pattern={r"dec/.*": 3, r"dec/ups/\d+": 2})
    assert rev.rank_for("dec/ups/0") == 3 and rev.rank_for("enc_p/proj") == 4


def test_rslora_scaling():
    for r, alpha in [(4, 8.0), (3, 5.0)]:
        cfg = LoRAConfig(rank=r, alpha=alpha, use_rslora=True, targets=(r"dec/ups/\d+",))
        plain = LoRAConfig(rank=r, alpha=alpha, targets=(r"dec/ups/\d+",))
        model = TinyRVC(rngs=nnx.Rngs(0))
        lora.inject(model, cfg, rngs=nnx.Rngs(1))
        for p in UPS:
            assert layers_of(model)[p].lora_scaling == pytest.approx(alpha / math.sqrt(r))
        assert cfg.scaling_for("dec/ups/0") == pytest.approx(alpha / math.sqrt(r))
        assert plain.scaling_for("dec/ups/0") == pytest.approx(alpha / r)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"),
    (dict(rank=-2), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(rank_pattern={"dec/.*": 0}), "rank_pattern"),
    (dict(targets=("dec/(ups",)), "invalid path pattern"),
    (dict(exclude=("dec/[",)), "invalid path pattern"),
    (dict(rank_pattern={"dec/(": 2}), "invalid path pattern"),
    (dict(alpha_pattern={"*bad": 2.0}), "invalid path pattern"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(init="xavier"), "init"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, use_rslora=True, init="gaussian",
                     targets=(r"dec/ups/\d+", r"enc_p/.*"), exclude=("enc_p/proj",),
                     rank_pattern={"dec/ups/0": 6, r"dec/.*": 2}, alpha_pattern={"enc_p/.*": 3.0}, preset=None)
    d = cfg.to_dict()
    assert d["rank_pattern"] == {"dec/ups/0": 6, r"dec/.*": 2}
    assert LoRAConfig.from_dict(d) == cfg
    assert LoRAConfig.from_dict(json.loads(json.dumps(d))) == cfg
    back = LoRAConfig.from_dict(json.loads(json.dumps(d)))
    assert back.rank_for("dec/ups/0") == 6 and back.rank_for("dec/ups/1") == 2
    for name in lora.PRESETS:
        p = LoRAConfig.from_preset(name)
        assert LoRAConfig.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="unknown LoRA config keys"):
        LoRAConfig.from_dict({**d, "lora_rank": 3})


def test_inject_errors():
    model = TinyRVC(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="match none"):
        lora.inject(model, LoRAConfig(targets=("flow/.*",)), rngs=nnx.Rngs(1))
    assert not adapted_paths(model)
    lora.inject(model, LoRAConfig.from_preset("ups"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.inject(model, LoRAConfig.from_preset("ups"), rngs=nnx.Rngs(1))
    # a failed inject leaves no half-injected model behind (dec/conv_*, dec/resblocks/* come
    # before dec/ups/0 in the walk, so they would otherwise have been adapted already)
    with pytest.raises(ValueError, match=r"dec/ups/0 already has an adapter"):
        lora.inject(model, LoRAConfig.from_preset("generator+prior"), rngs=nnx.Rngs(1))
    assert adapted_paths(model) == UPS


# --------------------------------------------------------------------------------------
# 1 (model level). a fresh adapter leaves the model output bit-identical
# --------------------------------------------------------------------------------------
def test_fresh_adapters_leave_model_output_bit_identical():
    phone, har = inputs()
    model = TinyRVC(rngs=nnx.Rngs(0))
    before = np.asarray(model(phone, har))
    before_params = flat_state(nnx.state(model, nnx.Param))
    lora.inject(model, LoRAConfig.from_preset("generator+prior", rank=2), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model(phone, har)), before)
    after_params = flat_state(nnx.state(model, nnx.Param))
    for p, v in before_params.items():  # base paths are unchanged by injection
        np.testing.assert_array_equal(after_params[p], v)
    assert set(after_params) - set(before_params) == {f"{p}/{k}" for p in GENERATOR | PRIOR
                                                      for k in ("lora_a", "lora_b")}


# --------------------------------------------------------------------------------------
# 4. gradients reach only the adapter; the optimizer changes only LoRA leaves
# --------------------------------------------------------------------------------------
def _loss(model, phone, har, target):
    return jnp.mean((model(phone, har) - target) ** 2)


def test_gradients_reach_only_adapter():
    phone, har = inputs()
    target = jnp.asarray(np.random.default_rng(9).normal(size=(B, T * UP, 1)).astype(np.float32)) * 0.5
    cfg = LoRAConfig.from_preset("generator+prior", rank=2)
    model = make_adapted(cfg, randomize=False)
    lora_paths = {f"{p}/{k}" for p in GENERATOR | PRIOR for k in ("lora_a", "lora_b")}

    graphdef, lora_state, base_state, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    assert set(flat_state(lora_state)) == lora_paths
    assert not any(p.endswith(("lora_a", "lora_b")) for p in flat_state(base_state))
    assert set(flat_state(base_state)) == {f"{p}/{leaf}" for p, (*_, bias) in LAYERS.items()
                                           for leaf in (("kernel", "bias") if bias else ("kernel",))}
    # lora.split is the same split
    g2, l2, b2, _ = lora.split(model)
    assert set(flat_state(l2)) == lora_paths and set(flat_state(b2)) == set(flat_state(base_state))

    @jax.jit
    @jax.grad
    def grad_fn(ls, base, rest):  # gradient w.r.t. the LoRA state only
        return _loss(nnx.merge(graphdef, ls, base, rest), phone, har, target)

    # b == 0: dL/da = 0 exactly, dL/db != 0 for every adapted layer
    grads = flat_state(grad_fn(lora_state, base_state, rest))
    assert set(grads) == lora_paths
    for p in GENERATOR | PRIOR:
        assert not np.any(grads[f"{p}/lora_a"]), p
        assert np.any(grads[f"{p}/lora_b"]), p
        assert np.all(np.isfinite(grads[f"{p}/lora_b"]))

    # non-zero b: both factors get gradients
    randomize_adapters(model)
    _, lora_state, base_state, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    grads = flat_state(grad_fn(lora_state, base_state, rest))
    for p in lora_paths:
        assert np.any(grads[p]), p
        assert np.all(np.isfinite(grads[p])), p


def test_optimizer_step_changes_only_lora_leaves():
    phone, har = inputs()
    target = jnp.asarray(np.random.default_rng(9).normal(size=(B, T * UP, 1)).astype(np.float32)) * 0.5
    model = make_adapted(LoRAConfig.from_preset("generator+prior", rank=2), randomize=False)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    lora_paths = {f"{p}/{k}" for p in GENERATOR | PRIOR for k in ("lora_a", "lora_b")}

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, phone, har, target)
        optimizer.update(model, grads)
        return loss, grads

    base0 = {p: v for p, v in flat_state(nnx.state(model, nnx.Param)).items()
             if not p.endswith(("lora_a", "lora_b"))}
    lora0 = flat_state(nnx.state(model, LoRAParam))
    loss, grads = step(model, optimizer)
    assert set(flat_state(grads)) == lora_paths  # the DiffState differentiates the adapter only
    losses = [float(loss)]
    after1 = flat_state(nnx.state(model, nnx.Param))
    for p, v in base0.items():
        np.testing.assert_array_equal(after1[p], v, err_msg=p)
    for p, v in lora0.items():
        if p.endswith("lora_b"):
            assert not np.array_equal(after1[p], v), p  # b had a gradient
        else:
            np.testing.assert_array_equal(after1[p], v, err_msg=p)  # dL/da = 0 while b = 0
    for _ in range(3):
        losses.append(float(step(model, optimizer)[0]))
    after = flat_state(nnx.state(model, nnx.Param))
    for p, v in base0.items():
        np.testing.assert_array_equal(after[p], v, err_msg=p)
    for p, v in lora0.items():
        assert not np.array_equal(after[p], v), p
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------
# 6. dropout via the config: train mode only
# --------------------------------------------------------------------------------------
def test_config_dropout_only_in_train_mode():
    phone, har = inputs()
    # adapters on one layer of each kind (the layer tests cover dropout per kind in detail)
    cfg = LoRAConfig(rank=2, dropout=0.3, targets=("enc_p/emb_phone", "dec/conv_pre", r"dec/ups/\d+"))
    model = make_adapted(cfg)
    assert adapted_paths(model) == {"enc_p/emb_phone", "dec/conv_pre"} | UPS
    for _, layer in lora.iter_lora_layers(model):
        if layer.has_lora:
            assert layer.lora_dropout is not None and layer.lora_dropout.rate == 0.3
    # the no-dropout reference: the merged kernels in an adapter-free model
    plain = TinyRVC(rngs=nnx.Rngs(5))
    load_params(plain, lora.merge_model(model))
    ref = np.asarray(plain(phone, har))

    eval1 = np.asarray(model(phone, har))  # fresh adapters start in eval mode
    assert rel_err(eval1, ref) <= 1e-5
    model.train()
    fwd = nnx.jit(lambda m, p, h: m(p, h))  # one compile instead of one per dropout mask shape
    t1, t2 = np.asarray(fwd(model, phone, har)), np.asarray(fwd(model, phone, har))
    assert np.all(np.isfinite(t1))
    assert rel_err(t1, ref) > 1e-3 and rel_err(t1, eval1) > 1e-3
    assert not np.array_equal(t1, t2)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(phone, har)), eval1)
    np.testing.assert_array_equal(np.asarray(model(phone, har)), eval1)


# --------------------------------------------------------------------------------------
# 7. pure merge / unmerge / merge_model
# --------------------------------------------------------------------------------------
def _trees(model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return lora.partition(params)


def test_merge_is_pure_and_matches_closed_form():
    cfg = LoRAConfig.from_preset("generator", rank=3, alpha=5.0, rank_pattern={r"dec/ups/\d+": 2})
    model = make_adapted(cfg)
    adapter, base = _trees(model)
    assert set(lora.flatten(adapter)) == {f"{p}/{k}" for p in GENERATOR for k in ("lora_a", "lora_b")}
    adapter_snap, base_snap = snapshot(adapter), snapshot(base)
    adapter_ids = {p: id(v) for p, v in lora.flatten(adapter).items()}
    base_ids = {p: id(v) for p, v in lora.flatten(base).items()}

    merged = lora.merge(base, adapter, cfg)

    # inputs untouched: same keys, same leaf objects, same values
    assert {p: id(v) for p, v in lora.flatten(adapter).items()} == adapter_ids
    assert {p: id(v) for p, v in lora.flatten(base).items()} == base_ids
    for snap, tree in ((adapter_snap, adapter), (base_snap, base)):
        flat = lora.flatten(tree)
        assert set(flat) == set(snap)
        for p, v in snap.items():
            np.testing.assert_array_equal(np.asarray(flat[p]), v)

    flat_m = lora.flatten(merged)
    assert set(flat_m) == set(base_snap)  # no adapter leaves, nothing lost
    fa = lora.flatten(adapter)
    for path, (kind, *_rest) in LAYERS.items():
        k = f"{path}/kernel"
        if path in GENERATOR:
            r = 2 if path in UPS else 3
            want = base_snap[k] + ref_delta(kind, fa[f"{path}/lora_a"], fa[f"{path}/lora_b"], 5.0 / r)
            assert rel_err(flat_m[k], want) <= 1e-6, path
            assert not np.array_equal(np.asarray(flat_m[k]), base_snap[k]), path
        else:
            np.testing.assert_array_equal(np.asarray(flat_m[k]), base_snap[k])
        if f"{path}/bias" in base_snap:
            np.testing.assert_array_equal(np.asarray(flat_m[f"{path}/bias"]), base_snap[f"{path}/bias"])
        assert np.asarray(flat_m[k]).dtype == base_snap[k].dtype

    # an explicit {path: scaling} map gives the same result
    scal = {p: 5.0 / (2 if p in UPS else 3) for p in GENERATOR}
    merged2 = lora.flatten(lora.merge(base, adapter, scal))
    for p, v in flat_m.items():
        np.testing.assert_array_equal(np.asarray(merged2[p]), np.asarray(v))


def test_unmerge_inverts_merge_and_scale():
    cfg = LoRAConfig.from_preset("generator+prior", rank=2, alpha=3.0)
    model = make_adapted(cfg)
    adapter, base = _trees(model)
    fb, fa = snapshot(base), lora.flatten(adapter)
    merged = lora.merge(base, adapter, cfg)
    back = lora.flatten(lora.unmerge(merged, adapter, cfg))
    assert set(back) == set(fb)
    for p, v in fb.items():
        assert rel_err(back[p], v) <= 1e-6, p

    half = lora.flatten(lora.merge(base, adapter, cfg, scale=0.5))
    full = lora.flatten(merged)
    for path in GENERATOR | PRIOR:
        k = f"{path}/kernel"
        delta = ref_delta(LAYERS[path][0], fa[f"{path}/lora_a"], fa[f"{path}/lora_b"], 3.0 / 2)
        got_half = np.asarray(half[k], np.float64) - fb[k]
        got_full = np.asarray(full[k], np.float64) - fb[k]
        tol = 1e-6 * np.abs(fb[k]).max()
        np.testing.assert_allclose(got_half, 0.5 * delta, rtol=0, atol=tol, err_msg=path)
        np.testing.assert_allclose(got_full, delta, rtol=0, atol=tol, err_msg=path)
    # unmerge with the same scale undoes a half merge
    back_half = lora.flatten(lora.unmerge(lora.merge(base, adapter, cfg, scale=0.5), adapter, cfg, scale=0.5))
    for p, v in fb.items():
        assert rel_err(back_half[p], v) <= 1e-6, p


def test_merge_model_equals_adapted_forward():
    phone, har = inputs()
    cfg = LoRAConfig.from_preset("generator+prior", rank=3, alpha=4.0, use_rslora=True,
                                 rank_pattern={"dec/conv_post": 1})
    model = make_adapted(cfg)
    y = np.asarray(model(phone, har))
    base_y = np.asarray(TinyRVC(rngs=nnx.Rngs(0))(phone, har))
    assert rel_err(y, base_y) > 1e-2  # the adapters matter

    before = flat_state(nnx.state(model, nnx.Param))
    merged = lora.merge_model(model)
    after = flat_state(nnx.state(model, nnx.Param))
    assert set(before) == set(after)
    for p in before:  # merge_model does not change the model
        np.testing.assert_array_equal(after[p], before[p])

    plain = TinyRVC(rngs=nnx.Rngs(5))  # different init: every value must come from `merged`
    assert not adapted_paths(plain)
    load_params(plain, merged)
    assert rel_err(plain(phone, har), y) <= 1e-5
    # closed form for one upsampler (rsLoRA scaling alpha/sqrt(r))
    k = "dec/ups/0"
    want = before[f"{k}/kernel"] + ref_delta("ConvTranspose1d", before[f"{k}/lora_a"], before[f"{k}/lora_b"],
                                             4.0 / math.sqrt(3))
    assert rel_err(lora.flatten(merged)[f"{k}/kernel"], want) <= 1e-6
    # scale=0 is the base model
    plain0 = TinyRVC(rngs=nnx.Rngs(5))
    load_params(plain0, lora.merge_model(model, scale=0.0))
    np.testing.assert_array_equal(np.asarray(plain0(phone, har)), base_y)


def test_merge_errors():
    cfg = LoRAConfig.from_preset("ups", rank=2)
    model = make_adapted(cfg)
    adapter, base = _trees(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match="adapter leaves"):
        lora.merge(params, adapter, cfg)
    with pytest.raises(ValueError, match="rank"):
        lora.merge(base, adapter, LoRAConfig.from_preset("ups", rank=3))
    with pytest.raises(ValueError, match="no scaling"):
        lora.merge(base, adapter, {"dec/ups/0": 1.0})
    bad = lora.flatten(adapter)
    del bad["dec/ups/1/lora_b"]
    with pytest.raises(ValueError, match=r"dec/ups/1 lacks lora_b"):
        lora.merge(base, lora.unflatten(bad), cfg)
    # combine() is partition()'s inverse
    both = lora.flatten(lora.combine(base, adapter))
    assert set(both) == set(lora.flatten(params))


# --------------------------------------------------------------------------------------
# 8. adapter files
# --------------------------------------------------------------------------------------
def _save(tmp_path, model, cfg, name="adapter", fingerprint=True, **kw):
    adapter, base = _trees(model)
    fp = A.fingerprint(base) if fingerprint else None
    d = str(tmp_path / name)
    assert A.save_adapter(d, adapter, cfg, base_fingerprint=fp, **kw) == d
    return d, adapter, base, fp


def test_save_load_round_trip(tmp_path):
    from safetensors.numpy import load_file

    cfg = LoRAConfig.from_preset("generator+prior", rank=2, alpha=3.0, rank_pattern={r"dec/ups/\d+": 3},
                                 alpha_pattern={"enc_p/.*": 1.5})
    model = make_adapted(cfg)
    d, adapter, base, fp = _save(tmp_path, model, cfg, metadata={"steps": 10, "note": "hi"})
    assert sorted(os.listdir(d)) == ["adapter.safetensors", "adapter_config.json"]  # no temp files left

    tensors = load_file(os.path.join(d, "adapter.safetensors"))
    assert set(tensors) == {f"{p.replace('/', '.')}.{k}" for p in GENERATOR | PRIOR for k in ("lora_a", "lora_b")}
    assert "dec.ups.0.lora_a" in tensors and "dec.resblocks.0.convs1.0.lora_b" in tensors
    with open(os.path.join(d, "adapter_config.json")) as f:
        raw = json.load(f)
    assert raw["base_fingerprint"] == fp and set(fp) == {"structure", "weights"}
    assert raw["lora"]["rank"] == 2
    # format 2 records every adapted layer's kind (the hand-written table above)
    assert raw["format_version"] == 2
    assert raw["layer_kinds"] == {p: LAYERS[p][0] for p in GENERATOR | PRIOR}

    want = snapshot(adapter)
    for src in (d, os.path.join(d, "adapter.safetensors")):
        loaded = A.load_adapter(src)
        assert os.path.abspath(loaded.directory) == os.path.abspath(d)
        got = lora.flatten(loaded.params)
        assert set(got) == set(want)
        for p, v in want.items():
            assert got[p].dtype == v.dtype
            np.testing.assert_array_equal(got[p], v)
        assert loaded.config == cfg
        assert loaded.base_fingerprint == fp == A.fingerprint(base)
        assert loaded.metadata == {"steps": 10, "note": "hi"}
        assert loaded.kinds == raw["layer_kinds"]


def _as_version_1(d):
    """Rewrite an adapter config as format 1 wrote it: no layer_kinds."""
    cpath = os.path.join(d, "adapter_config.json")
    raw = json.load(open(cpath))
    raw["format_version"] = 1
    del raw["layer_kinds"]
    json.dump(raw, open(cpath, "w"))


def test_version_1_files_still_load_and_apply(tmp_path):
    cfg = LoRAConfig.from_preset("generator+prior", rank=2)
    model = make_adapted(cfg)
    phone, har = inputs()
    y = np.asarray(model(phone, har))
    d, *_ = _save(tmp_path, model, cfg)
    _as_version_1(d)
    want = {p: LAYERS[p][0] for p in GENERATOR | PRIOR}
    assert A.load_adapter(d).kinds == want  # from the factor ndims (the documented fallback)
    assert A.load_adapter(d, model=TinyRVC(rngs=nnx.Rngs(0))).kinds == want  # from the model
    fresh = TinyRVC(rngs=nnx.Rngs(0))
    A.apply_adapter(fresh, A.load_adapter(d, model=fresh))
    np.testing.assert_array_equal(np.asarray(fresh(phone, har)), y)


def test_recorded_kinds_are_checked(tmp_path):
    cfg = LoRAConfig.from_preset("ups", rank=2)
    d, *_ = _save(tmp_path, make_adapted(cfg), cfg)
    cpath = os.path.join(d, "adapter_config.json")
    raw = json.load(open(cpath))
    json.dump({**raw, "layer_kinds": {**raw["layer_kinds"], "dec/ups/0": "Conv3d"}}, open(cpath, "w"))
    with pytest.raises(ValueError, match=r"dec\.ups\.0.*unknown layer kind 'Conv3d'"):
        A.load_adapter(d)
    json.dump({**raw, "layer_kinds": {"dec/ups/0": "ConvTranspose1d"}}, open(cpath, "w"))
    with pytest.raises(ValueError, match=r"layer_kinds and the weights disagree on dec\.ups\.1"):
        A.load_adapter(d)
    # a kind the model's layer is not
    json.dump({**raw, "layer_kinds": {**raw["layer_kinds"], "dec/ups/1": "Dense"}}, open(cpath, "w"))
    target = TinyRVC(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dec\.ups\.1 is a Dense in the adapter but a ConvTranspose1d"):
        A.apply_adapter(target, A.load_adapter(d))
    assert not adapted_paths(target)


def test_fingerprint_semantics():
    _, base = _trees(make_adapted(LoRAConfig(rank=2)))
    _, base_same = _trees(make_adapted(LoRAConfig(rank=3)))  # adapter does not enter the fingerprint
    _, base_other_w = _trees(TinyRVC(rngs=nnx.Rngs(3)))
    _, base_other_arch = _trees(TinyRVC(rngs=nnx.Rngs(0), extra=True))
    fp = A.fingerprint(base)
    assert A.fingerprint(base_same) == fp
    assert A.fingerprint(base_other_w)["structure"] == fp["structure"]
    assert A.fingerprint(base_other_w)["weights"] != fp["weights"]
    assert A.fingerprint(base_other_arch)["structure"] != fp["structure"]
    assert A.fingerprint(base, with_weights=False) == {"structure": fp["structure"]}
    # lora leaves in the tree are ignored
    params = nnx.to_pure_dict(nnx.state(make_adapted(LoRAConfig(rank=2)), nnx.Param))
    assert A.fingerprint(params) == fp


def test_apply_adapter_reproduces_outputs(tmp_path):
    phone, har = inputs()
    cfg = LoRAConfig.from_preset("generator+prior", rank=2, rank_pattern={"dec/ups/0": 4})
    model = make_adapted(cfg)
    y = np.asarray(model(phone, har))
    d, adapter, _, _ = _save(tmp_path, model, cfg)

    fresh = TinyRVC(rngs=nnx.Rngs(0))
    paths = A.apply_adapter(fresh, A.load_adapter(d))
    assert set(paths) == GENERATOR | PRIOR == adapted_paths(fresh)
    got = flat_state(nnx.state(fresh, LoRAParam))
    for p, v in snapshot(adapter).items():
        np.testing.assert_array_equal(got[p], v)
    np.testing.assert_array_equal(np.asarray(fresh(phone, har)), y)
    assert layers_of(fresh)["dec/ups/0"].lora_rank == 4


def test_rank_pattern_order_survives_save_load(tmp_path):
    # first match wins, so the order of rank_pattern / alpha_pattern must survive the file
    cfg = LoRAConfig.from_preset("generator", rank=2, rank_pattern={"dec/ups/0": 3, r"dec/.*": 1},
                                 alpha_pattern={"dec/ups/1": 5.0, r"dec/.*": 2.0})
    model = make_adapted(cfg)
    assert layers_of(model)["dec/ups/0"].lora_rank == 3
    d, *_ = _save(tmp_path, model, cfg)
    loaded = A.load_adapter(d)
    assert loaded.config.rank_pattern == cfg.rank_pattern
    assert loaded.config == cfg
    assert loaded.config.rank_for("dec/ups/0") == 3
    assert loaded.config.alpha_for("dec/ups/1") == 5.0
    phone, har = inputs()
    fresh = TinyRVC(rngs=nnx.Rngs(0))
    A.apply_adapter(fresh, loaded)
    np.testing.assert_array_equal(np.asarray(fresh(phone, har)), np.asarray(model(phone, har)))


def test_apply_adapter_shape_mismatch_names_key(tmp_path):
    cfg = LoRAConfig.from_preset("generator", rank=2)
    model = make_adapted(cfg)
    # dec.ups.0 has kernel 20 instead of 16 (same stride, same output length)
    other = lambda: TinyRVC(rngs=nnx.Rngs(0), up0_kernel=20)  # noqa: E731

    d_nofp, *_ = _save(tmp_path, model, cfg, name="nofp", fingerprint=False)
    target = other()
    phone, har = inputs()
    y0 = np.asarray(target(phone, har))
    with pytest.raises(ValueError, match=r"dec\.ups\.0 ") as e:
        A.apply_adapter(target, A.load_adapter(d_nofp))
    assert "(20, 8, 4)" in str(e.value) and "(16, 8, 4)" in str(e.value)
    # a failed apply leaves the model as it was: no adapters, some of them already filled
    assert not adapted_paths(target)
    np.testing.assert_array_equal(np.asarray(target(phone, har)), y0)

    # with a fingerprint too, the per-key check fires first, so the message names the key
    d, *_ = _save(tmp_path, model, cfg)
    for check_base in (False, True):
        with pytest.raises(ValueError, match=r"dec\.ups\.0 was made for a kernel of shape \(16, 8, 4\)"):
            A.apply_adapter(other(), A.load_adapter(d), check_base=check_base)


def test_apply_adapter_architecture_and_weights_checks(tmp_path):
    cfg = LoRAConfig.from_preset("ups", rank=2)
    model = make_adapted(cfg)
    d, *_ = _save(tmp_path, model, cfg)
    loaded = A.load_adapter(d)

    # same adapted layers, extra base layer: only the fingerprint catches it
    extra = TinyRVC(rngs=nnx.Rngs(0), extra=True)
    with pytest.raises(ValueError, match="different model architecture"):
        A.apply_adapter(extra, loaded)
    assert not adapted_paths(extra)  # rejected before anything was injected
    A.apply_adapter(TinyRVC(rngs=nnx.Rngs(0), extra=True), loaded, check_base=False)

    # same architecture, other weights: a warning, then applied
    other_w = TinyRVC(rngs=nnx.Rngs(3))
    with pytest.warns(UserWarning, match="different base"):
        A.apply_adapter(other_w, loaded)
    assert adapted_paths(other_w) == UPS

    # same base: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        A.apply_adapter(TinyRVC(rngs=nnx.Rngs(0)), loaded)


def test_apply_adapter_key_mismatches(tmp_path):
    model = make_adapted(LoRAConfig.from_preset("generator", rank=2))
    adapter, base = _trees(model)
    # weights for layers the (narrower) config does not adapt
    d = A.save_adapter(str(tmp_path / "wide"), adapter, LoRAConfig.from_preset("ups", rank=2))
    target = TinyRVC(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dec\.(conv_pre|conv_post|resblocks\.\d\.convs[12]\.\d)"):
        A.apply_adapter(target, A.load_adapter(d))
    assert not adapted_paths(target)
    # config adapts layers the file has no weights for
    ups_only = {"dec": {"ups": lora.unflatten(
        {k[len("dec/ups/"):]: v for k, v in lora.flatten(adapter).items() if k.startswith("dec/ups/")})}}
    d2 = A.save_adapter(str(tmp_path / "narrow"), ups_only, LoRAConfig.from_preset("generator", rank=2))
    with pytest.raises(ValueError, match=r"lacks weights for dec\."):
        A.apply_adapter(TinyRVC(rngs=nnx.Rngs(0)), A.load_adapter(d2))


def test_load_adapter_missing_files(tmp_path):
    cfg = LoRAConfig.from_preset("ups", rank=2)
    d, *_ = _save(tmp_path, make_adapted(cfg), cfg)

    missing_dir = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(missing_dir)):
        A.load_adapter(missing_dir)

    os.rename(os.path.join(d, "adapter.safetensors"), os.path.join(tmp_path, "moved.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"adapter\.safetensors"):
        A.load_adapter(d)
    os.rename(os.path.join(tmp_path, "moved.safetensors"), os.path.join(d, "adapter.safetensors"))
    A.load_adapter(d)  # back in place: fine

    os.remove(os.path.join(d, "adapter_config.json"))
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        A.load_adapter(d)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        A.load_adapter(os.path.join(d, "adapter.safetensors"))

    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"x")
    with pytest.raises(ValueError, match="adapter directory"):
        A.load_adapter(str(stray))


def test_load_adapter_rejects_bad_config(tmp_path):
    cfg = LoRAConfig.from_preset("ups", rank=2)
    d, *_ = _save(tmp_path, make_adapted(cfg), cfg)
    cpath = os.path.join(d, "adapter_config.json")
    raw = json.load(open(cpath))
    json.dump({**raw, "format_version": 99}, open(cpath, "w"))
    with pytest.raises(ValueError, match="format_version"):
        A.load_adapter(d)
    json.dump({**raw, "format": "peft"}, open(cpath, "w"))
    with pytest.raises(ValueError, match="not an rvclora adapter"):
        A.load_adapter(d)
    open(cpath, "w").write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        A.load_adapter(d)


# --------------------------------------------------------------------------------------
# 9. summarize
# --------------------------------------------------------------------------------------
def test_summarize_counts_closed_form():
    cfg = LoRAConfig.from_preset("generator+prior", rank=2, alpha=4.0, rank_pattern={r"dec/ups/\d+": 3})
    model = make_adapted(cfg, randomize=False)
    s = lora.summarize(model)

    ranks = {p: (3 if p in UPS else 2) for p in GENERATOR | PRIOR}
    base_total = sum(base_count(p) for p in LAYERS)
    trainable = sum(adapter_count(p, r) for p, r in ranks.items())
    assert trainable == (
        3 * (8 + 16 * 4) + 3 * (4 + 4 * 2)  # ups: r*(in + K*out)
        + 2 * (6 + 8)  # emb_phone: r*(in + out)
        + 2 * (1 * 8 + 8) + 2 * (7 * 8 + 8)  # proj, conv_pre: r*(K*in + out)
        + 6 * 2 * (3 * 4 + 4) + 6 * 2 * (3 * 2 + 2)  # resblocks
        + 2 * (7 * 2 + 1)  # conv_post
    )
    assert s.trainable_params == trainable
    assert s.total_params == base_total + trainable
    assert s.adapted_base_params == sum(base_count(p) for p in ranks)
    assert s.trainable_percent == pytest.approx(100 * trainable / (base_total + trainable))

    rows = {r.path: r for r in s.rows}
    assert set(rows) == set(ranks)
    for p, r in ranks.items():
        kind, i, o, k, _ = LAYERS[p]
        row = rows[p]
        assert row.kind == kind
        assert row.kernel_shape == ((i, o) if kind == "Dense" else (k, i, o))
        assert row.rank == r and row.alpha == 4.0 and row.scaling == pytest.approx(4.0 / r)
        assert row.base_params == base_count(p)
        assert row.adapter_params == adapter_count(p, r)

    text = s.format()
    for p in ranks:
        assert p in text
    assert "dec/m_source/l_linear" not in text
    assert f"{trainable:,}" in text and f"{base_total + trainable:,}" in text
    short = s.format(max_rows=3)
    assert f"... {len(ranks) - 3} more adapted modules" in short

    # no adapters: nothing trainable
    s0 = lora.summarize(TinyRVC(rngs=nnx.Rngs(0)))
    assert s0.rows == [] and s0.trainable_params == 0 and s0.total_params == base_total
