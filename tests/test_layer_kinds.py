"""A new adaptable layer kind is one class in one file.

Two kinds are defined and registered here, in the test file only, and a small model
that contains them goes through the whole adapter life cycle: inject → forward equals
the merged forward, save → load → apply, mix, compress, and the torch state-dict round
trip. Both kinds are chosen so that nothing can be guessed from factor ndims:

* ``TorchLayoutDense``: a Dense whose factors are stored in PEFT's torch layout
  (``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``): the same ndims as Dense, a
  different factor layout, and the rank on axis 0 of ``a``.
* ``PointwiseFirstConv1d``: a Conv1d whose adapter applies the 1x1 factor first and the
  spatial one second (like ConvTranspose1d's): the same ndims as ConvTranspose1d.

References are independent of the basis code under test: each layer's ΔW is the
response of its own adapter branch (``_lora_branch``, the forward computation) to
identity inputs.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvclora_convert.state_dict import flax_to_torch, torch_to_flax
from rvclora_jax import adapters as A
from rvclora_jax import lora
from rvclora_jax.layers import Conv1d, Dense, layer_kind, register_layer_kind
from rvclora_jax.params import load_params


@register_layer_kind("TorchLayoutDense", "ri,or->io")
class TorchLayoutDense(Dense):
    """Dense with adapter factors in torch's Linear layout: a [r, in], b [out, r]."""

    def _lora_branch(self, x):
        h = self._adapter_input(x) @ self.lora_a[...].T
        return (h @ self.lora_b[...].T) * self.lora_scaling


@register_layer_kind("PointwiseFirstConv1d", "ir,kro->kio")
class PointwiseFirstConv1d(Conv1d):
    """Conv1d whose adapter is a 1x1 map a [in, r] followed by a conv b [K, r, out] with the
    base stride/padding/dilation (exact: a conv is linear in its input channels)."""

    def _lora_branch(self, x):
        h = self._adapter_input(x) @ self.lora_a[...]
        return self._conv(h, self.lora_b[...]) * self.lora_scaling


IN, MID, OUT, K, B, T = 5, 3, 4, 3, 2, 9


class Tiny(nnx.Module):
    def __init__(self, *, rngs):
        self.pre = TorchLayoutDense(IN, MID, rngs=rngs)          # in != out: a Dense reading would fail
        self.conv = PointwiseFirstConv1d(MID, OUT, K, padding=1, rngs=rngs)
        self.post = Conv1d(OUT, 2, K, padding=1, weight_norm=True, rngs=rngs)  # a built-in kind next to them

    def __call__(self, x):
        return self.post(jnp.tanh(self.conv(jnp.tanh(self.pre(x)))))


KINDS = {"pre": "TorchLayoutDense", "conv": "PointwiseFirstConv1d", "post": "Conv1d"}


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, IN)).astype(np.float32))


def _adapted(rank=2, seed=1, alpha=None, rank_pattern=()):
    model = Tiny(rngs=nnx.Rngs(0))
    cfg = lora.LoRAConfig(targets=("pre", "conv", "post"), rank=rank, alpha=alpha, rank_pattern=rank_pattern)
    lora.inject(model, cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, layer in lora.iter_lora_layers(model):
        layer.lora_b[...] = jnp.asarray(0.3 * rng.standard_normal(layer.lora_b.shape), jnp.float32)
    return model, cfg


def branch_delta(layer) -> np.ndarray:
    """ΔW as the layer's own adapter branch computes it: its response to every basis input."""
    if isinstance(layer, Dense):
        return np.asarray(layer._lora_branch(jnp.eye(layer.in_features)), np.float64)  # [in, out]
    k, cin, p = layer.kernel_size, layer.in_channels, layer.padding[0]
    # basis input e_(j,i): channel i at time j of a K-sample window; the output sample at
    # the window's position p sees tap j of input channel i
    e = np.eye(k * cin, dtype=np.float32).reshape(k * cin, k, cin)
    y = np.asarray(layer._lora_branch(jnp.asarray(e)), np.float64)[:, p, :]
    return y.reshape(k, cin, -1)


def _base(model):
    return lora.partition(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_kinds_are_registered_and_recorded():
    assert layer_kind("TorchLayoutDense") is TorchLayoutDense
    assert lora.layer_kinds(Tiny(rngs=nnx.Rngs(0))) == KINDS
    model, _ = _adapted()
    assert tuple(model.pre.lora_a.shape) == (2, IN) and tuple(model.pre.lora_b.shape) == (MID, 2)
    assert tuple(model.conv.lora_a.shape) == (MID, 2) and tuple(model.conv.lora_b.shape) == (K, 2, OUT)
    for path, layer in lora.iter_lora_layers(model):  # the basis agrees with the forward branch
        np.testing.assert_allclose(np.asarray(layer.delta_kernel()), branch_delta(layer), rtol=1e-5, atol=1e-6,
                                   err_msg=path)


def test_inject_forward_equals_merged_forward():
    model, _ = _adapted()
    x = _x()
    y = np.asarray(model(x))
    base_y = np.asarray(Tiny(rngs=nnx.Rngs(0))(x))
    assert np.abs(y - base_y).max() > 1e-2  # the adapters matter
    plain = Tiny(rngs=nnx.Rngs(7))
    load_params(plain, lora.merge_model(model))
    np.testing.assert_allclose(np.asarray(plain(x)), y, rtol=1e-5, atol=1e-6)
    # the merged kernels are base + the branch's ΔW
    merged, (_, base) = lora.flatten(lora.merge_model(model)), _base(model)
    fb = lora.flatten(base)
    for path, layer in lora.iter_lora_layers(model):
        np.testing.assert_allclose(np.asarray(merged[f"{path}/kernel"], np.float64) - np.asarray(fb[f"{path}/kernel"]),
                                   branch_delta(layer), rtol=1e-5, atol=1e-6, err_msg=path)


def test_save_load_apply(tmp_path):
    model, cfg = _adapted()
    adapter, base = _base(model)
    d = A.save_adapter(str(tmp_path / "ad"), adapter, cfg, kinds=lora.layer_kinds(model),
                       base_fingerprint=A.fingerprint(base))
    raw = json.load(open(os.path.join(d, A.ADAPTER_CONFIG)))
    assert raw["layer_kinds"] == KINDS
    loaded = A.load_adapter(d)
    assert loaded.kinds == KINDS
    fresh = Tiny(rngs=nnx.Rngs(0))
    A.apply_adapter(fresh, loaded)
    np.testing.assert_array_equal(np.asarray(fresh(_x())), np.asarray(model(_x())))
    # without recorded kinds the built-in kinds would be guessed from the ndims (pre as a Dense,
    # conv as a ConvTranspose1d): applying such a file is refused, not silently mis-merged
    guessed = A.save_adapter(str(tmp_path / "guessed"), adapter, cfg)
    with pytest.raises(ValueError, match=r"(pre is a Dense|conv is a ConvTranspose1d) in the adapter but a "
                                         r"(TorchLayoutDense|PointwiseFirstConv1d)"):
        A.apply_adapter(Tiny(rngs=nnx.Rngs(0)), A.load_adapter(guessed))
    # the pure merge with the recorded kinds is the merged model
    got = lora.flatten(lora.merge(base, loaded.params, loaded.config, kinds=loaded.kinds))
    for p, v in lora.flatten(lora.merge_model(model)).items():
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(v), err_msg=p)


def test_mix_and_compress():
    m1, c1 = _adapted(rank=2, seed=1, alpha=3.0)
    m2, c2 = _adapted(rank=3, seed=2, rank_pattern={"conv": 1})
    ads = [A.Adapter(_base(m)[0], c, kinds=lora.layer_kinds(m)) for m, c in ((m1, c1), (m2, c2))]
    layers1, layers2 = dict(lora.iter_lora_layers(m1)), dict(lora.iter_lora_layers(m2))
    w = (0.75, -1.5)
    mixed = A.mix(ads, w)
    assert mixed.kinds == KINDS
    assert tuple(mixed.params["pre"]["lora_a"].shape) == (5, IN)  # ranks concatenated on axis 0 of a
    assert tuple(mixed.params["conv"]["lora_b"].shape) == (K, 3, OUT)  # ... and on axis 1 of this b
    base = _base(m1)[1]
    fb = lora.flatten(base)
    got = lora.flatten(lora.merge(base, mixed.params, mixed.config, kinds=mixed.kinds))
    want = {p: w[0] * branch_delta(layers1[p]) + w[1] * branch_delta(layers2[p]) for p in KINDS}
    for p in KINDS:
        np.testing.assert_allclose(np.asarray(got[f"{p}/kernel"], np.float64) - np.asarray(fb[f"{p}/kernel"]),
                                   want[p], rtol=1e-5, atol=1e-6, err_msg=p)
    # full rank: lossless; rank 1: the kept energy of the SVD of M written out per kind
    full, rep = A.compress(mixed, 100)
    assert rep.kept == pytest.approx(1.0, abs=1e-12) and full.kinds == KINDS
    got = lora.flatten(lora.merge(base, full.params, full.config, kinds=full.kinds))
    for p in KINDS:
        np.testing.assert_allclose(np.asarray(got[f"{p}/kernel"], np.float64) - np.asarray(fb[f"{p}/kernel"]),
                                   want[p], rtol=1e-5, atol=1e-6, err_msg=p)
    one, rep1 = A.compress(mixed, 1)
    rows = {r.path: r for r in rep1.layers}
    mats = {"pre": want["pre"],                                                # [in, out]
            "conv": want["conv"].transpose(1, 0, 2).reshape(MID, K * OUT),     # a carries in, b carries K and out
            "post": want["post"].reshape(K * OUT, 2)}                          # a carries K and in
    for p, M in mats.items():
        s = np.linalg.svd(M, compute_uv=False)
        assert rows[p].kept == pytest.approx((s[0] ** 2) / (s ** 2).sum(), rel=1e-6), p
        assert layer_kind(one.kinds[p]).rank_of(np.shape(one.params[p]["lora_a"])) == 1
    A.check_adapter_fits(Tiny(rngs=nnx.Rngs(0)), one)


def test_torch_state_dict_round_trip():
    model = Tiny(rngs=nnx.Rngs(3))
    sd = flax_to_torch(model)
    assert sd["pre.weight"].shape == (MID, IN)  # torch Linear layout, from the inherited hook
    assert sd["conv.weight"].shape == (OUT, MID, K)
    assert "post.weight_g" in sd and "post.weight_v" in sd
    params = torch_to_flax(Tiny(rngs=nnx.Rngs(0)), sd)
    for p, v in lora.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items():
        np.testing.assert_allclose(lora.flatten(params)[p], np.asarray(v), rtol=1e-6, atol=1e-7, err_msg=p)
