"""Port check: rvclora_jax.models.discriminators vs RVC's torch MultiPeriodDiscriminator(V2).

Random torch weights (RVC applies weight norm itself, so the state dict has
weight_g/weight_v) go through the generic converter; both sides run on the same
waveforms and every score and feature map of every sub-discriminator is compared.
N = 12010 is divisible by 2 and 5 but not by 3, 7, 11, 17, 23, 37, so both the
plain reshape and the reflect-pad branch of DiscriminatorP are exercised. It is about
RVC's training segment (12800 samples) rather than ~4000 because, with ~4000, the last
1024->1024 conv of DiscriminatorP(17/23/37) sees < 5 time steps, and XLA:CPU's conv is
pathologically slow there (~3 s per call, vs ~10 ms at 5 steps); 12010 makes the file
faster overall (~25 s vs ~29 s on 2 cores) with the same coverage.
"""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402  (the reference tests must run, never skip)
import rvc.lib.infer_pack.models as rvc_models  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from rvclora_convert.state_dict import torch_to_flax, load_params  # noqa: E402
from rvclora_jax.layers import Conv1d  # noqa: E402
from tests.conftest import release_memory  # noqa: E402
from rvclora_jax.models.discriminators import (  # noqa: E402
    V1_PERIODS, V2_PERIODS, DiscriminatorP, DiscriminatorS, MultiPeriodDiscriminator,
    multi_period_discriminator)

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")

B, N = 2, 12010
ATOL = 1e-4
# torch's parameters(): weight_g + weight_v + bias of every weight-normed conv.
TORCH_PARAMS = {"v1": 54_968_286, "v2": 71_410_594}
TORCH_CLS = {"v1": "MultiPeriodDiscriminator", "v2": "MultiPeriodDiscriminatorV2"}


_PAIR: dict = {}


def _pair(version):
    """(torch parameter counts (all, weight_g), converted flax model, y, y_hat, torch outputs
    as numpy); built once. One version at a time: v2's pair alone is ~1.5 GB with both
    frameworks' weights, so the previous version (and the executables its eager run
    compiled) is freed BEFORE the next is built, and the torch model is dropped as soon as
    its outputs and counts are read. The tests below are ordered v1 first, then v2."""
    if version in _PAIR:
        return _PAIR[version]
    _PAIR.clear()
    release_memory()
    torch.manual_seed(1234 + (version == "v2"))
    tm = getattr(rvc_models, TORCH_CLS[version])().eval()
    counts = (sum(p.numel() for p in tm.parameters()),
              sum(p.numel() for k, p in tm.named_parameters() if k.endswith("weight_g")))
    fm = multi_period_discriminator(version, nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    load_params(fm, torch_to_flax(fm, sd, source=f"rvc {version} MPD"))
    del sd
    rng = np.random.default_rng(7)
    y = (0.5 * rng.standard_normal((B, 1, N))).astype(np.float32)
    y_hat = (0.5 * rng.standard_normal((B, 1, N))).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(y), torch.from_numpy(y_hat))
    ref = tuple([[t.numpy() for t in x] if not isinstance(x[0], list) else [[t.numpy() for t in f] for f in x]
                 for x in ref])
    del tm
    _PAIR[version] = (counts, fm, y, y_hat, ref)
    return _PAIR[version]


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _PAIR.clear()  # ~1 GB of torch + flax weights; don't keep it for later test files


def _to_torch_layout(f: np.ndarray) -> np.ndarray:
    # S fmaps [B, T, C] -> [B, C, T]; P fmaps [B, H, p, C] -> [B, C, H, p]
    return f.transpose(0, 2, 1) if f.ndim == 3 else f.transpose(0, 3, 1, 2)


def _compare(version, ref, out, label):
    y_d_rs, y_d_gs, fmap_rs, fmap_gs = ref
    o_rs, o_gs, o_frs, o_fgs = out
    n_disc = 1 + len(V1_PERIODS if version == "v1" else V2_PERIODS)
    assert len(o_rs) == len(o_gs) == len(o_frs) == len(o_fgs) == len(y_d_rs) == n_disc
    worst_abs, worst_rel, n = 0.0, 0.0, 0
    for i in range(n_disc):
        pairs = [(f"score_r[{i}]", y_d_rs[i], np.asarray(o_rs[i])),
                 (f"score_g[{i}]", y_d_gs[i], np.asarray(o_gs[i]))]
        assert len(o_frs[i]) == len(fmap_rs[i]) == (7 if i == 0 else 6)
        for j in range(len(fmap_rs[i])):
            pairs.append((f"fmap_r[{i}][{j}]", fmap_rs[i][j], _to_torch_layout(np.asarray(o_frs[i][j]))))
            pairs.append((f"fmap_g[{i}][{j}]", fmap_gs[i][j], _to_torch_layout(np.asarray(o_fgs[i][j]))))
        for name, r, o in pairs:
            assert o.shape == r.shape, f"{version} {label} {name}: shape {o.shape} != torch {r.shape}"
            d = float(np.max(np.abs(o - r)))
            rel = d / max(float(np.max(np.abs(r))), 1e-12)
            assert d <= ATOL, f"{version} {label} {name}: max|Δ| {d:.3g} (rel {rel:.3g}) > {ATOL}"
            worst_abs, worst_rel, n = max(worst_abs, d), max(worst_rel, rel), n + 1
    print(f"\n{version} {label}: {n} tensors, max|Δ| = {worst_abs:.3g}, max rel = {worst_rel:.3g}")


def test_v1_matches_torch_eager():
    # v1 runs eagerly and v2 under jit: together they cover both paths within budget.
    version = "v1"
    _, fm, y, y_hat, ref = _pair(version)
    out = fm(jnp.asarray(y.transpose(0, 2, 1)), jnp.asarray(y_hat.transpose(0, 2, 1)))
    _compare(version, ref, out, "eager")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_param_count(version):
    (t_all, t_g), fm, *_ = _pair(version)
    assert t_all == TORCH_PARAMS[version]
    flax_n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(fm, nnx.Param)))
    # Weight norm is stored folded (one kernel instead of g and v): torch has one extra
    # weight_g entry per output channel of every conv, nothing else differs.
    wn_out = sum(m.out_channels for _, m in nnx.iter_modules(fm) if isinstance(m, Conv1d) and m.weight_norm)
    assert wn_out == t_g
    assert flax_n == t_all - t_g
    assert flax_n + wn_out == TORCH_PARAMS[version]


def test_v2_matches_torch_jit():
    version = "v2"
    _, fm, y, y_hat, ref = _pair(version)

    @nnx.jit
    def run(model, a):  # one input at a time, as a GAN step would use it
        return model.apply_one(a)

    s_r, f_r = run(fm, jnp.asarray(y.transpose(0, 2, 1)))
    s_g, f_g = run(fm, jnp.asarray(y_hat.transpose(0, 2, 1)))  # same shape: no recompile
    _compare(version, ref, (s_r, s_g, f_r, f_g), "jit(apply_one)")


def test_structure_and_api():
    m = MultiPeriodDiscriminator((3, 5), rngs=nnx.Rngs(0))
    assert isinstance(m.discriminators[0], DiscriminatorS)
    assert [d.period for d in m.discriminators[1:]] == [3, 5]
    assert all(isinstance(d, DiscriminatorP) for d in m.discriminators[1:])
    assert V2_PERIODS[: len(V1_PERIODS)] == V1_PERIODS and V2_PERIODS[-2:] == (23, 37)
    with pytest.raises(ValueError):
        multi_period_discriminator("v3", nnx.Rngs(0))
