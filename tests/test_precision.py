"""Mixed precision and rematerialisation of the train step (``TrainConfig.precision/remat``).

* A bf16 step really computes its convolutions in bfloat16 (read off the traced step),
  keeps every state leaf float32, and its losses are within BF16_LOSS_TOL of the fp32
  step on the same weights, batch and key.
* The adapter a bf16 run produces merges exactly: the merged fp32 model's forward equals
  the unmerged LoRA model's fp32 forward.
* ``remat="all"`` recomputes instead of storing; the step's numbers are the plain step's.
A tiny generator (tests/train_worker.py's narrow one with fewer layers; hop 400 as RVC's
v2 40k) and a 2-period discriminator keep each compile short; trainers are built once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvclora_jax import lora
from rvclora_jax.layers import LoRAParam
from rvclora_jax.models import synthesizer as S
from rvclora_jax.params import load_params
from rvclora_jax.train import PRECISIONS, REMAT_CHOICES, TrainConfig, Trainer

from . import train_worker as W

# bf16 rounds every activation to 8 significant bits (2**-9 relative). The stated bounds on
# one step's losses, bf16 vs fp32 (same weights, batch and key): 3% for the generator's
# reconstruction terms (mel, KL); 10% for the terms read off the discriminator (adv, fm,
# loss_d and the total, which adv dominates here): this tiny random discriminator's scores
# are in the tens (adv ~2600, where a trained one gives ~1-5), so bf16's rounding through
# its 6-layer stacks shows up larger in them (measured 4.5% on loss_g). Loose enough to be
# robust, tight enough to catch a loss computed from garbage or a missing float32 cast.
BF16_LOSS_TOL = {"mel": 3e-2, "kl": 3e-2, "adv": 1e-1, "fm": 1e-1, "loss_d": 1e-1, "loss_g": 1e-1}
LOSSES = ("loss_g", "mel", "kl", "fm", "adv", "loss_d")
LR = 1e-2  # large, so one step gives the adapter a clearly non-zero delta to merge


def tiny_config():
    """The narrow generator with fewer layers (two ×20 upsamplers still give hop 400, one
    resblock kernel, two attention layers): every layer kind, a fraction of the compile."""
    return W.narrow_config().replace(n_layers=2, n_heads=2, upsample_rates=(20, 20), upsample_kernel_sizes=(40, 40),
                                     resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),))


def build_models(seed: int = 0):
    from rvclora_jax.models.discriminators import MultiPeriodDiscriminator

    g = S.Synthesizer(tiny_config(), "v2", True, rngs=nnx.Rngs(seed))
    d = MultiPeriodDiscriminator(periods=(2, 3), channel_divisor=8, rngs=nnx.Rngs(seed + 1))
    lora.inject(g, lora.LoRAConfig.from_preset("generator", rank=W.LORA_RANK), rngs=nnx.Rngs(seed + 2))
    return g, d


def _trainer(batches, precision="fp32", remat="none"):
    g, d = build_models(0)  # same seed: same weights for every trainer
    cfg = TrainConfig(batch_size=batches.batch_size, segment_frames=batches.segment_frames, lr=LR,
                      precision=precision, remat=remat)
    return Trainer(g, d, cfg, steps_per_epoch=len(batches))


@pytest.fixture(scope="module")
def batch():
    batches = W.example_batches()
    return batches, next(batches.iterate(0))


@pytest.fixture(scope="module")
def steps(batch):
    """One step from the initial state for each precision: (trainer, state after, metrics)."""
    batches, b = batch
    out = {}
    for p in ("fp32", "bf16"):
        tr = _trainer(batches, p)
        state, m = tr.step(tr.init_state(), b)
        out[p] = (tr, jax.device_get(state), {k: float(v) for k, v in jax.device_get(m).items()})
        tr._compiled.clear()  # the executables are not needed again: free them before the next compile
    return out


def _conv_operand_dtypes(jaxpr) -> set:
    found = set()

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.update(np.dtype(v.aval.dtype) for v in eqn.invars)
            for p in eqn.params.values():
                for j in (p if isinstance(p, (list, tuple)) else [p]):
                    sub = getattr(j, "jaxpr", j)
                    if hasattr(sub, "eqns"):
                        walk(sub)
    walk(jaxpr.jaxpr)
    return found


@pytest.mark.slow  # two GAN-step compiles (fp32 + bf16, ~80 s of CPU): outside the default budget
def test_bf16_step_computes_convolutions_in_bf16(steps, batch):
    tr = steps["bf16"][0]
    b = tr.put_batch(batch[1])
    jaxpr = jax.make_jaxpr(tr._train_step)(tr.init_state(), b, tr.frozen)
    assert _conv_operand_dtypes(jaxpr) == {np.dtype(jnp.bfloat16)}
    assert _conv_operand_dtypes(jax.make_jaxpr(steps["fp32"][0]._train_step)(
        steps["fp32"][0].init_state(), b, steps["fp32"][0].frozen)) == {np.dtype(jnp.float32)}


@pytest.mark.slow  # two GAN-step compiles (fp32 + bf16, ~80 s of CPU): outside the default budget
def test_bf16_state_stays_fp32_and_the_caller_models_are_untouched(steps):
    tr, state, _ = steps["bf16"]
    floats = {np.dtype(x.dtype) for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating)}
    assert floats == {np.dtype(np.float32)}
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))
    # the compute dtype lives in the trainer's copy of the graph, not in the caller's modules
    for model in (tr.generator, tr.discriminator):
        assert not any(getattr(m, "dtype", None) == jnp.bfloat16 for _, m in nnx.iter_modules(model))


@pytest.mark.slow  # two GAN-step compiles (fp32 + bf16, ~80 s of CPU): outside the default budget
def test_bf16_losses_match_fp32_losses(steps):
    f32, bf16 = steps["fp32"][2], steps["bf16"][2]
    rel = {k: abs(bf16[k] - f32[k]) / max(abs(f32[k]), 1e-6) for k in LOSSES}
    for k in LOSSES:
        print(f"{k}: fp32 {f32[k]:.5f} bf16 {bf16[k]:.5f} rel {rel[k]:.2e} (bound {BF16_LOSS_TOL[k]:g})")
    for k in LOSSES:
        assert np.isfinite(bf16[k]) and rel[k] <= BF16_LOSS_TOL[k], (k, f32[k], bf16[k])


def _forward(model, phone, pitch, pitchf, eps, src):
    T = phone.shape[1]
    o, _, _ = model.infer(phone, jnp.array([T]), pitch, pitchf, jnp.array([0]), eps=eps, source_noise=src)
    return o


@pytest.mark.slow  # two GAN-step compiles (fp32 + bf16, ~80 s of CPU): outside the default budget
def test_bf16_adapter_merges_exactly(steps, batch):
    """The trained adapter loaded into the (fp32) generator, merged into its base: the merged
    model computes what the unmerged LoRA model computes, in float32."""
    tr, state, _ = steps["bf16"]
    tr.load_into_models(state)
    g = tr.generator
    ad = jax.tree.leaves(nnx.state(g, LoRAParam))
    assert all(x.dtype == jnp.float32 for x in ad)
    assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(nnx.state(g, LoRAParam)))
    merged = S.Synthesizer(tiny_config(), "v2", True, rngs=nnx.Rngs(0), with_enc_q=False)
    load_params(merged, {k: v for k, v in lora.merge_model(g).items() if k != "enc_q"})
    b = batch[1]
    T = 24
    r = np.random.default_rng(0)
    args = (jnp.asarray(b["phone"][:1, :T]), jnp.asarray(b["pitch"][:1, :T]), jnp.asarray(b["pitchf"][:1, :T]),
            jnp.asarray(r.normal(size=(1, T, tiny_config().inter_channels)), jnp.float32),
            jnp.asarray(r.normal(size=(1, T * g.config.hop_length, 1)), jnp.float32))
    fwd = nnx.jit(_forward)
    want, got = np.asarray(fwd(g, *args)), np.asarray(fwd(merged, *args))
    assert want.dtype == got.dtype == np.float32
    plain = S.Synthesizer(tiny_config(), "v2", True, rngs=nnx.Rngs(0), with_enc_q=False)
    base_out = np.asarray(fwd(plain, *args))
    # the adapter changes the output by far more than the merge's float32 rounding
    change = np.max(np.abs(want - base_out))
    err = np.max(np.abs(got - want))
    print(f"adapter changes the output by {change:.3e}; merged vs unmerged {err:.3e}")
    assert change > 1e-4 and err <= 1e-5 * max(np.max(np.abs(want)), 1.0)


@pytest.mark.slow
def test_remat_step_equals_the_plain_step(steps, batch):
    batches, b = batch
    tr = _trainer(batches, "fp32", remat="all")
    state, m = tr.step(tr.init_state(), b)
    ref_state, ref_m = steps["fp32"][1], steps["fp32"][2]
    for k in LOSSES:
        np.testing.assert_allclose(float(m[k]), ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, r in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_cli_choices_are_the_trainers():
    from rvclora_jax.cli import train as cli_train

    assert tuple(sorted(PRECISIONS)) == cli_train.PRECISIONS
    assert REMAT_CHOICES == cli_train.REMAT_CHOICES
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="remat"):
        TrainConfig(remat="everything")
