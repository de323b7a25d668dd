"""`rvclora infer` through the real entry point: files in, WAVs out.

The conversion itself is checked against RVC's own pipeline in tests/test_pipeline.py;
here: the command writes what the library computes (16-bit PCM at the voice's rate),
``--adapter a:0.7 --adapter b:0.3`` equals the blend written by ``rvclora adapters mix``
and merged by ``rvclora export`` (two independent paths to the same weights), a RUN_DIR
brings its adapter, folders convert in one go, and every bad input is a one-line error
naming the file before anything is written."""

import os
import shutil
import wave

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("faiss")

from rvclora_jax.cli import main  # noqa: E402
from tests.test_adapters import _random_adapter  # noqa: E402
from tests.test_prepare_train import hubert_768  # noqa: E402,F401  (fixture)
from tests.test_render import NARROW, _write_inference_pth  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
COMMON = ["--f0-method", "harvest", "--noise-scale", "0", "--no-progress"]


def _read_wav(path):
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.int32), w.getframerate()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A narrow v2 f0 voice (.pth), two adapters for it, and a 1.2 s speech clip."""
    import soundfile as sf

    from rvclora_jax import adapters as A
    from rvclora_jax import lora
    from rvclora_jax.cli.render import load_model

    d = tmp_path_factory.mktemp("infer")
    voice = str(d / "voice.pth")
    _write_inference_pth(voice, f0=True, seed=7)
    model, src = load_model(voice, None, 1.0)
    fp = A.fingerprint(src.params)
    c1 = lora.LoRAConfig.from_preset("generator", rank=2, alpha=4)
    c2 = lora.LoRAConfig.from_preset("generator+flow", rank=3, alpha=3)
    for i, c in enumerate((c1, c2)):
        A.save_adapter(str(d / f"ad{i}"), _random_adapter(model, c, seed=i + 11), c, base_fingerprint=fp,
                       metadata={"base": voice})
    y, sr = sf.read(os.path.join(DATA, "arctic_a0007.wav"), dtype="float32")
    sf.write(str(d / "clip.wav"), y[: int(1.2 * sr)], sr)
    return d


def _infer(work, hub, *extra, model=None, out="o.wav"):
    return main(["infer", str(work / "clip.wav"), "--model", model or str(work / "voice.pth"),
                 "--hubert", str(hub), "--out", str(work / out), *COMMON, *extra])


def test_infer_writes_the_pipeline_output(work, hubert_768, capsys):
    from rvclora_convert.hubert import load_hubert
    from rvclora_jax.cli.render import load_model
    from rvclora_jax.frontend.hubert import ContentFeatures
    from rvclora_jax.frontend.pitch import harvest
    from rvclora_jax.pipeline import PipelineConfig, VoiceConverter, load_input

    assert _infer(work, hubert_768, "--f0-up-key", "2", "--overwrite") == 0
    got, sr = _read_wav(work / "o.wav")
    assert sr == NARROW.sr
    model, _ = load_model(str(work / "voice.pth"), None, 1.0)
    content = ContentFeatures(load_hubert(str(hubert_768)), output="v2", normalize=False)
    vc = VoiceConverter(model, content, pitch=lambda w: harvest(w, filter_radius=3),
                        config=PipelineConfig(f0_up_key=2.0), noise_scale=0.0)
    want = vc(load_input(str(work / "clip.wav")))
    assert got.shape == want.shape
    # int16 → float → int16 through the WAV writer: at most one step of rounding
    assert np.abs(got - want.astype(np.int32)).max() <= 1
    out = capsys.readouterr().out
    assert "real-time factor" in out and str(work / "o.wav") in out


def test_adapter_blend_at_load_equals_the_exported_mix(work, hubert_768):
    a0, a1 = str(work / "ad0"), str(work / "ad1")
    assert _infer(work, hubert_768, "--adapter", f"{a0}:0.7", "--adapter", f"{a1}:0.3", out="blend.wav") == 0
    assert main(["adapters", "mix", f"{a0}:0.7", f"{a1}:0.3", "--out", str(work / "mixed")]) == 0
    assert main(["export", str(work / "voice.pth"), str(work / "mixed.pth"), "--adapter", str(work / "mixed"),
                 "--fp32"]) == 0
    assert _infer(work, hubert_768, model=str(work / "mixed.pth"), out="exported.wav") == 0
    blend, _ = _read_wav(work / "blend.wav")
    exported, _ = _read_wav(work / "exported.wav")
    assert blend.shape == exported.shape
    # the same weights by two routes (rank-concatenated mix merged in memory; the mix
    # written, merged, re-factored into weight norm and read back): float rounding only
    assert np.abs(blend - exported).max() <= 2
    # and the blend is not the unadapted voice
    assert _infer(work, hubert_768, out="plain.wav") == 0
    plain, _ = _read_wav(work / "plain.wav")
    assert np.abs(blend - plain).max() > 100


def test_run_dir_brings_its_adapter_and_a_folder_skips_bad_files(work, hubert_768, tmp_path, capsys):
    # (several inputs sharing batches is tests/test_pipeline.py's; one good file here keeps
    # this test on the programs the others compiled)
    run = tmp_path / "run"
    shutil.copytree(work / "ad0", run)  # an adapter dir whose metadata names its base
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(work / "clip.wav", inp / "a.wav")
    (inp / "broken.wav").write_bytes(b"not audio at all")
    (inp / "notes.txt").write_text("not an audio file name: ignored")
    assert main(["infer", str(inp), "--model", str(run), "--hubert", str(hubert_768), "--out", str(tmp_path / "out"),
                 *COMMON]) == 0
    cap = capsys.readouterr()
    assert sorted(os.listdir(tmp_path / "out")) == ["a.wav"]
    skipped = [ln for ln in cap.err.splitlines() if ln.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.wav" in skipped[0]
    a, _ = _read_wav(tmp_path / "out" / "a.wav")
    assert main(["infer", str(work / "clip.wav"), "--model", str(work / "voice.pth"), "--adapter", str(work / "ad0"),
                 "--hubert", str(hubert_768), "--out", str(tmp_path / "single.wav"), *COMMON]) == 0
    single, _ = _read_wav(tmp_path / "single.wav")
    assert np.array_equal(a, single)  # RUN_DIR = its base + its adapter


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs_are_one_line_errors_naming_the_file(work, hubert_768, tmp_path, capsys):
    import faiss

    base = ["--model", str(work / "voice.pth"), "--hubert", str(hubert_768), *COMMON]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    _one_line_error(capsys, ["infer", str(bad), "--out", str(tmp_path / "x.wav"), *base], str(bad))
    assert not os.path.exists(tmp_path / "x.wav")
    # a v1 (256-d) index for this v2 voice
    rng = np.random.default_rng(0)
    idx = faiss.index_factory(256, "IVF4,Flat")
    v = rng.standard_normal((400, 256)).astype(np.float32)
    idx.train(v)
    idx.add(v)
    faiss.write_index(idx, str(tmp_path / "v1.index"))
    _one_line_error(capsys, ["infer", str(work / "clip.wav"), "--out", str(tmp_path / "x.wav"), *base,
                             "--index", str(tmp_path / "v1.index")], str(tmp_path / "v1.index"), "256")
    (tmp_path / "junk.index").write_bytes(b"IwFl" + b"\0" * 10)
    _one_line_error(capsys, ["infer", str(work / "clip.wav"), "--out", str(tmp_path / "x.wav"), *base,
                             "--index", str(tmp_path / "junk.index")], str(tmp_path / "junk.index"))
    _one_line_error(capsys, ["infer", str(work / "clip.wav"), "--out", str(tmp_path / "x.wav"), *base,
                             "--sid", str(NARROW.spk_embed_dim)], "sid")
    # never over an input, never over an existing output without --overwrite
    _one_line_error(capsys, ["infer", str(work / "clip.wav"), "--out", str(work / "clip.wav"), *base],
                    "is also an input")
    (tmp_path / "old.wav").write_bytes(b"an earlier conversion")
    _one_line_error(capsys, ["infer", str(work / "clip.wav"), "--out", str(tmp_path / "old.wav"), *base],
                    "old.wav: exists; pass --overwrite")
    assert (tmp_path / "old.wav").read_bytes() == b"an earlier conversion"
    assert not os.path.exists(tmp_path / "x.wav")
