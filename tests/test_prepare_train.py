"""`rvclora train --data RAW_DIR`: a folder of recordings is prepared into the run
directory with the JAX front end (HuBERT features, harvest pitch), for the base's
version, rate and f0, and that folder is what training reads. The training itself is
covered by tests/test_train.py; here ``run`` is replaced by a spy that stops the command
once it has the prepared folder, so no train step is compiled."""

import os
import shutil

import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rvclora_jax.cli import main  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def hubert_768(tmp_path_factory):
    """A two-layer HuBERT with v2's 768-d output (random weights), as a Hugging Face folder."""
    torch.manual_seed(0)
    cfg = transformers.HubertConfig(hidden_size=768, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                    num_conv_pos_embedding_groups=4)
    folder = tmp_path_factory.mktemp("hubert")
    transformers.HubertModel(cfg).eval().save_pretrained(str(folder))
    return folder


def test_train_on_recordings_prepares_them_into_the_run(tmp_path, hubert_768, monkeypatch, capsys):
    from rvclora_jax import data, run as run_mod
    from rvclora_jax.cli.train import write_example_base

    raw = tmp_path / "recordings"
    raw.mkdir()
    shutil.copy(os.path.join(DATA, "arctic_a0007.wav"), raw / "a.wav")
    base = str(tmp_path / "G.pth")
    write_example_base(base, 0)  # RVC v2 40k with f0, random weights
    seen = {}

    def spy(g, rcfg, **kw):
        # what training would read (checked here: the command removes what it created
        # when it fails, as it does on any error)
        seen["data_dir"] = rcfg.data_dir
        seen["items"] = data.scan_experiment(rcfg.data_dir, version="v2", f0=True, sr=40000)
        seen["arrays"] = [(np.load(it.feature), np.load(it.pitchf),
                           len(sf.read(os.path.join(rcfg.data_dir, "1_16k_wavs", os.path.basename(it.wav)))[0]))
                          for it in seen["items"]]
        raise _Stop

    monkeypatch.setattr(run_mod, "run", spy)
    out = str(tmp_path / "run")
    args = ["train", "--base", base, "--data", str(raw), "--out", out, "--steps", "1", "--no-progress",
            "--f0-method", "harvest"]
    # without --hubert: one line, before anything is prepared
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs --hubert" in err and str(raw) in err, err
    assert not os.path.exists(os.path.join(out, "data"))
    with pytest.raises(_Stop):
        main(args + ["--hubert", str(hubert_768)])
    exp = os.path.join(out, "data")
    assert seen["data_dir"] == exp
    assert len(seen["items"]) >= 1
    for feat, f0, n in seen["arrays"]:
        assert feat.shape == ((n - 400) // 320 + 1, 768) and np.isfinite(feat).all()
        assert len(f0) == 1 + n // 160 and (f0 > 0).any()
