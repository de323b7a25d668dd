"""rvclora_jax.families: recognising RVC's state dicts, abstract structures, and the registry.

The reference layouts are RVC's own classes (rvc==0.3.5) built on torch's ``meta``
device: their real keys and shapes, with nothing allocated, so every preset is cheap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from rvc.lib.infer_pack import models as rvc_models

from rvclora_jax import families
from rvclora_jax.families import DetectionError, Family, ModelSpec, dtype_kwargs
from rvclora_jax.families.rvc import RVC
from tests.no_init import is_tracing

CLASSES = {("v1", True): rvc_models.SynthesizerTrnMs256NSFsid, ("v2", True): rvc_models.SynthesizerTrnMs768NSFsid,
           ("v1", False): rvc_models.SynthesizerTrnMs256NSFsid_nono,
           ("v2", False): rvc_models.SynthesizerTrnMs768NSFsid_nono}
PRESETS = [(v, sr, f0) for v in ("v1", "v2") for sr in (32000, 40000, 48000) for f0 in (True, False)]


def shapes_only(sd, dtype=np.float32) -> dict[str, np.ndarray]:
    """A state dict of zero-stride arrays: the shapes of ``sd``, no memory."""
    return {k: np.broadcast_to(np.zeros((), dtype), tuple(v.shape)) for k, v in sd.items()}


def rvc_layout(version, sr, f0) -> dict[str, np.ndarray]:
    with torch.device("meta"):
        net = CLASSES[(version, f0)](*RVC.preset(version, sr).to_list(), is_half=False)
    return shapes_only(net.state_dict())


def rvc_discriminator_layout(version) -> dict[str, np.ndarray]:
    cls = {"v1": rvc_models.MultiPeriodDiscriminator, "v2": rvc_models.MultiPeriodDiscriminatorV2}[version]
    with torch.device("meta"):
        return shapes_only(cls(False).state_dict())


def folded_count(sd) -> int:
    """Parameters after weight norm is folded (each ``weight_g`` disappears into its weight)."""
    return sum(int(a.size) for k, a in sd.items() if not k.endswith("weight_g"))


# ----------------------------------------------------------------------------- RVC detection


@pytest.mark.parametrize("version, sr, f0", PRESETS)
def test_detects_every_rvc_preset(version, sr, f0):
    sd = rvc_layout(version, sr, f0)
    cfg = RVC.preset(version, sr)  # spk_embed_dim 109 = RVC's pretrained bases
    spec = families.detect(sd, {}, layout="base")
    assert spec == ModelSpec("rvc", "generator", version, f0, cfg, sr, with_training_only=True)
    # the small (inference) layout: no enc_q, fp16, the config list and claims in the file
    small = shapes_only({k: v for k, v in sd.items() if not RVC.is_training_only(k)}, np.float16)
    claims = {"config": cfg.to_list(), "sr": RVC.sample_rate_name(sr), "f0": int(f0), "version": version}
    spec = families.detect(small, claims, layout="inference", where="weight")
    assert spec == ModelSpec("rvc", "generator", version, f0, cfg, sr, with_training_only=False)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_detects_rvc_discriminators(version):
    spec = families.detect(rvc_discriminator_layout(version), {"sr": "40k"})
    assert spec == ModelSpec("rvc", "discriminator", version, sr=40000)


def test_rate_ambiguous_without_enc_q_unless_claimed():
    # v1 32k and 48k share the upsampler kernels; without enc_q (spec_channels) and without
    # the NSF noise convs (nof0) only the file's 'sr' tells them apart.
    sd = {k: v for k, v in rvc_layout("v1", 48000, False).items() if not k.startswith("enc_q.")}
    with pytest.raises(DetectionError, match="fit several RVC presets") as ei:
        families.detect(sd, {}, layout="base")
    assert "\n" not in str(ei.value) and "v1 32000, v1 48000" in str(ei.value)
    assert families.detect(sd, {"sr": "48k"}, layout="base").config == RVC.preset("v1", 48000)


def test_rvc_configs_and_segments():
    assert RVC.presets() == sorted({(v, sr) for v, sr, _ in PRESETS})
    assert [RVC.sample_rate_name(sr) for sr in (32000, 40000, 48000, 24000)] == ["32k", "40k", "48k", "24000"]
    assert all(RVC.parse_sr(RVC.sample_rate_name(sr)) == sr for sr in (32000, 40000, 48000))
    # RVC's configs: train.segment_size (samples) // hop; v2 48k: 17280 // 480 = 36
    assert RVC.segment_frames("v2", 40000) == 32 and RVC.segment_frames("v1", "32k") == 40
    assert RVC.segment_frames("v2", 48000) == 36 and RVC.segment_frames("v1", 48000) == 24
    assert RVC.train_segment_samples("v2", 24000) == 12800  # no RVC config: RVC's default


# ----------------------------------------------------------------------------- abstract structure


@pytest.mark.parametrize("spec, reference", [
    (RVC.generator_spec(40000, "v2", True), lambda: rvc_layout("v2", 40000, True)),
    (RVC.generator_spec(32000, "v1", False, with_training_only=False),
     lambda: {k: v for k, v in rvc_layout("v1", 32000, False).items() if not k.startswith("enc_q.")}),
    (RVC.discriminator_spec("v1"), lambda: rvc_discriminator_layout("v1")),
], ids=["v2-40k-f0", "v1-32k-nof0-inference", "D-v1"])
def test_abstract_is_structure_only(spec, reference):
    model = RVC.abstract(spec)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == folded_count(reference())
    if spec.kind == "generator":
        assert (model.enc_q is not None) == spec.with_training_only
    again = RVC.abstract(spec)  # cached structure, fresh module
    assert again is not model and jax.tree.structure(nnx.state(again)) == jax.tree.structure(nnx.state(model))


# ----------------------------------------------------------------------------- a second family


class ToyNet(nnx.Module):
    """A model of another family: jax initialisers, an RNG stream (non-parameter state)
    and a training-only head."""

    init_calls: list = []  # True per call made on a concrete key (i.e. a real random draw)

    def __init__(self, width: int, *, rngs: nnx.Rngs, with_head: bool = True, param_dtype=jnp.float32):
        def kernel_init(key, shape, dtype):
            ToyNet.init_calls.append(not is_tracing())
            return jax.random.normal(key, shape, dtype)

        self.body = nnx.Linear(4, width, kernel_init=kernel_init, rngs=rngs, param_dtype=param_dtype)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(width, 2, rngs=rngs, param_dtype=param_dtype) if with_head else nnx.data(None)


class ToyFamily(Family):
    name = "toy"
    signature = "a toy model has body.kernel"
    training_only = ("head",)

    def build(self, spec, *, rngs, dtype=None, param_dtype=None):
        return ToyNet(spec.config, rngs=rngs, with_head=spec.with_training_only,
                      **dtype_kwargs(None, param_dtype))

    def recognises(self, sd):
        return "body.kernel" in sd

    def detect(self, sd, claims, *, layout, where="model"):
        if len(sd["body.kernel"].shape) != 2:
            raise DetectionError(f"body.kernel has shape {list(sd['body.kernel'].shape)}; expected [4, width]")
        return ModelSpec(self.name, "generator", "t1", config=int(sd["body.kernel"].shape[1]),
                         with_training_only=any(self.is_training_only(k) for k in sd))


@pytest.fixture
def toy():
    fam = families.register(ToyFamily())
    ToyNet.init_calls.clear()
    yield fam
    families.unregister("toy")


def toy_state_dict(width=3, head=True, seed=0):
    r = np.random.default_rng(seed)
    sd = {"body.kernel": r.standard_normal((4, width)).astype(np.float32),
          "body.bias": r.standard_normal(width).astype(np.float32)}
    if head:
        sd.update({"head.kernel": r.standard_normal((width, 2)).astype(np.float32),
                   "head.bias": r.standard_normal(2).astype(np.float32)})
    return sd


def test_registered_family_is_detected_for_its_own_keys(toy):
    names = list(families.FAMILIES)
    assert names[0] == "rvc" and names[-1] == "toy"  # registered last; the front-end families sit between
    assert families.detect(toy_state_dict(5)) == ModelSpec("toy", "generator", "t1", config=5,
                                                           with_training_only=True)
    assert families.detect(rvc_discriminator_layout("v1")).family == "rvc"
    with pytest.raises(DetectionError) as ei:
        families.detect({"foo.weight": np.zeros(2)}, where="weight")
    msg = str(ei.value)
    assert "'weight'" in msg and "enc_p.emb_phone.weight" in msg and "toy: a toy model has body.kernel" in msg
    assert "\n" not in msg


def test_register_before_puts_a_refining_family_first(toy):
    class Greedy(ToyFamily):
        name = "greedy"

        def recognises(self, sd):
            return True

    families.register(Greedy(), before="rvc")
    try:
        assert list(families.FAMILIES)[:2] == ["greedy", "rvc"] and list(families.FAMILIES)[-1] == "toy"
        with pytest.raises(KeyError):  # greedy's detect wins, and needs body.kernel
            families.detect(rvc_discriminator_layout("v1"))
    finally:
        families.unregister("greedy")
    with pytest.raises(ValueError, match="already registered"):
        families.register(ToyFamily())


def test_toy_abstract_and_materialize_never_draw(toy):
    spec = toy.detect(toy_state_dict(3), {}, layout="base")
    abstract = toy.abstract(spec)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
    params = {"body": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)},
              "head": {"kernel": np.full((3, 2), 2.0, np.float32), "bias": np.ones(2, np.float32)}}
    model = toy.materialize(spec, params, seed=7)
    assert ToyNet.init_calls and not any(ToyNet.init_calls)  # only ever called while tracing
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), params["head"]["kernel"])
    # the RNG stream is the one a model built with nnx.Rngs(7) holds
    want = nnx.state(ToyNet(3, rngs=nnx.Rngs(7)), nnx.Not(nnx.Param))
    got = nnx.state(model, nnx.Not(nnx.Param))
    for (pw, w), (pg, g) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
        assert pw == pg
        a, b = w[...], g[...]
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="head/bias"):  # strict: every parameter must be given
        toy.materialize(spec, {"body": params["body"], "head": {"kernel": params["head"]["kernel"]}})


def test_toy_pth_goes_through_the_converter(toy, tmp_path):
    from rvclora_convert.pth import load_rvc_file, to_flax

    sd = toy_state_dict(6)
    p = tmp_path / "toy.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, p)
    f = load_rvc_file(p)
    assert f.spec == ModelSpec("toy", "generator", "t1", config=6, with_training_only=True) and f.has_enc_q
    model, params = to_flax(f)
    assert not any(ToyNet.init_calls)
    assert isinstance(model, ToyNet)
    np.testing.assert_array_equal(np.asarray(model.body.kernel[...]), sd["body.kernel"])
    np.testing.assert_array_equal(params["head"]["bias"], sd["head.bias"])
