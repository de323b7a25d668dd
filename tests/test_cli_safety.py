"""Issue 11, classes 1, 2 (flags), 5 (CLI side) and 6 through the real ``rvclora`` entry
point: an output never destroys an input, an existing output is replaced only with
``--overwrite``, every numeric flag is checked when parsed, and a failed invocation leaves
nothing it created behind.

Every refusal is checked the same way (:func:`refused`): exit code 2, the last stderr line
a one-line error naming the file (or the flag), no traceback, nothing written, and the
inputs byte-identical afterwards. The guard runs before any work, so most inputs here are
a few bytes standing in for a model: nothing is loaded, compiled or trained (the module
runs in a few seconds)."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest

from rvclora_jax.cli import main


def _tree_hash(root: str) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (or of ``root`` itself)."""
    if os.path.isfile(root):
        return {"": hashlib.sha256(open(root, "rb").read()).hexdigest()}
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _snapshot(tmp) -> dict:
    return _tree_hash(str(tmp))


def refused(capsys, tmp, argv, *, names: str, rc: int = 2) -> str:
    """Run ``rvclora argv`` in ``tmp``: it must fail with ``rc``, change no file under
    ``tmp`` (inputs byte-identical, nothing written, no temporary left) and end stderr
    with one error line naming ``names``. Returns that line."""
    before = _snapshot(tmp)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        got = main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert got == rc, (argv, got, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("rvclora: error: ", "rvclora ")) and "error: " in last, err
    assert names in last, (names, last)
    assert _snapshot(tmp) == before, argv  # nothing written, nothing replaced
    assert not [p for p in os.listdir(tmp) if p.startswith(".tmp-rvclora-")]
    return last


@pytest.fixture
def work(tmp_path):
    """Stand-ins for the inputs (a base, features, f0, an adapter directory); a few bytes
    each, since the guard refuses before anything is read."""
    (tmp_path / "base.pth").write_bytes(b"PK\x03\x04 a 146 MB training base" * 10)
    np.save(tmp_path / "feats.npy", np.zeros((10, 768), np.float32))
    np.save(tmp_path / "f0.npy", np.full((20,), 200.0, np.float32))
    ad = tmp_path / "a"
    ad.mkdir()
    (ad / "adapter.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (ad / "adapter_config.json").write_text('{"format": "rvclora-adapter"}\n')
    (tmp_path / "data").mkdir()
    return tmp_path


# ------------------------------------------------------------------ class 1: never over an input


@pytest.mark.parametrize("argv, names", [
    (["export", "base.pth", "base.pth"], "base.pth: is also an input"),
    (["export", "base.pth", "./base.pth", "--overwrite"], "base.pth: is also an input"),  # not even with it
    (["export", "base.pth", "a/adapter.safetensors", "--adapter", "a", "--overwrite"], "a/adapter.safetensors"),
    (["render", "base.pth", "--features", "feats.npy", "--f0", "f0.npy", "--out", "base.pth"], "base.pth"),
    (["render", "base.pth", "--features", "feats.npy", "--f0", "f0.npy", "--out", "feats.npy", "--overwrite"],
     "feats.npy: is also an input"),
    (["render", "base.pth", "--features", "feats.npy", "--f0", "f0.npy", "--out", "f0.npy"], "f0.npy"),
    (["adapters", "mix", "a:0.5", "--out", "a"], "a: the output directory holds the input"),
    (["adapters", "mix", "a/adapter.safetensors:0.5", "--out", "a", "--overwrite"], "a: "),
    (["adapters", "mix", "a:0.5", "--out", ".", "--overwrite"], "holds the input"),
    (["adapters", "extract", "--base", "base.pth", "--voice", "base.pth", "--rank", "4", "--out", "a"],
     "a: exists and is not empty; pass --overwrite"),
    (["adapters", "extract", "--base", "base.pth", "--voice", "base.pth", "--rank", "4", "--out", ".",
      "--overwrite"], "holds the input"),
    (["train", "--base", "base.pth", "--data", "data", "--out", "a"], "a/adapter.safetensors: exists"),
    (["train", "--base", "base.pth", "--data", "data", "--out", "data"], "data: is also an input"),
    (["convert", "base.pth", "a"], "a: exists and is not empty; pass --overwrite"),
    (["convert", "base.pth", ".", "--overwrite"], "holds the input base.pth"),
    (["example", "--out", "."], "adapter"),  # `example` writes OUT/adapter: refused when it exists
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_output_never_replaces_an_input_or_an_existing_output(capsys, work, argv, names):
    if argv[0] == "example":
        os.rename(work / "a", work / "adapter")
    refused(capsys, work, argv, names=names)


def test_output_given_through_a_link_is_still_the_input(capsys, work):
    os.symlink(work / "base.pth", work / "link.pth")
    refused(capsys, work, ["export", "link.pth", "base.pth", "--overwrite"], names="is also an input")


@pytest.mark.parametrize("argv", [
    ["export", "base.pth", "a/model.pth", "--adapter", "a"],  # a new file inside the adapter (a RUN_DIR)
    ["export", "base.pth", "a/model.pth", "--adapter", "a", "--overwrite"],
    ["render", "base.pth", "--features", "feats.npy", "--f0", "f0.npy", "--out", "."],  # ./feats.wav
    ["adapters", "mix", "a:0.5", "--out", "a/half"],
], ids=" ".join)
def test_the_guard_lets_outputs_beside_or_inside_inputs_through(capsys, work, argv):
    """Not an input, not an existing output: the command goes on (and fails only on the
    stand-in base or adapter, which are not real files)."""
    if "--overwrite" in argv:
        (work / "a" / "model.pth").write_bytes(b"the run's earlier export")
    last = refused(capsys, work, argv, names="")
    assert "input" not in last and "exists" not in last, last
    assert not os.path.exists(work / "a" / "half")


def test_existing_output_file_needs_overwrite(capsys, work):
    (work / "old.pth").write_bytes(b"an earlier export")
    refused(capsys, work, ["export", "base.pth", "old.pth"], names="old.pth: exists; pass --overwrite")
    (work / "old.wav").write_bytes(b"RIFF an earlier render")
    refused(capsys, work, ["render", "base.pth", "--features", "feats.npy", "--f0", "f0.npy", "--out", "old.wav"],
            names="old.wav: exists; pass --overwrite")


def _tiny_adapter(path: str, value: float = 1.0) -> None:
    from rvclora_jax import adapters, lora

    ad = {"dec": {"conv_pre": {"lora_a": np.full((3, 4, 2), value, np.float32),
                               "lora_b": np.full((2, 5), value, np.float32)}}}
    adapters.save_adapter(path, ad, lora.LoRAConfig(rank=2, targets=("dec/conv_pre",)))


def test_mix_writes_a_new_output_refuses_it_after_and_replaces_it_with_overwrite(capsys, tmp_path):
    """The positive side: a new --out is written; the same command again is refused
    (byte-identical); with --overwrite it is replaced."""
    _tiny_adapter(str(tmp_path / "x"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["adapters", "mix", "x:0.5", "--out", "half"]) == 0
    finally:
        os.chdir(cwd)
    capsys.readouterr()
    first = _tree_hash(str(tmp_path / "half"))
    refused(capsys, tmp_path, ["adapters", "mix", "x:0.25", "--out", "half"], names="half: exists")
    os.chdir(tmp_path)
    try:
        assert main(["adapters", "mix", "x:0.25", "--out", "half", "--overwrite"]) == 0
    finally:
        os.chdir(cwd)
    assert _tree_hash(str(tmp_path / "half"))["adapter.safetensors"] != first["adapter.safetensors"]


# ------------------------------------------------------------------ class 2: flags checked when parsed


_T = ["train", "--example", "--out", "run"]
_R = ["render", "base.pth", "--features", "feats.npy", "--f0", "f0.npy", "--out", "o.wav"]


@pytest.mark.parametrize("argv, flag", [
    (_T + ["--lr", "-1"], "--lr"), (_T + ["--lr", "nan"], "--lr"), (_T + ["--lr", "0"], "--lr"),
    (_T + ["--lr-d", "inf"], "--lr-d"),
    (_T + ["--steps", "0"], "--steps"), (_T + ["--steps", "-5"], "--steps"),
    (_T + ["--epochs", "0"], "--epochs"), (_T + ["--epochs", "-1"], "--epochs"),
    (_T + ["--keep", "0"], "--keep"), (_T + ["--save-every", "0"], "--save-every"),
    (_T + ["--log-every", "0"], "--log-every"), (_T + ["--sample-every", "0"], "--sample-every"),
    (_T + ["--seed", str(2 ** 64)], "--seed"), (_T + ["--seed", "-1"], "--seed"),
    (_T + ["--batch-size", "0"], "--batch-size"), (_T + ["--rank", "0"], "--rank"),
    (_T + ["--segment-frames", "0"], "--segment-frames"),
    (_T + ["--alpha", "nan"], "--alpha"), (_T + ["--dropout", "1"], "--dropout"),
    (_T + ["--dropout", "-0.1"], "--dropout"), (_T + ["--val-fraction", "1"], "--val-fraction"),
    (_T + ["--val-fraction", "nan"], "--val-fraction"), (_T + ["--sid", "-1"], "--sid"),
    (["export", "base.pth", "o.pth", "--scale", "2"], "--scale needs --adapter"),
    (["export", "base.pth", "o.pth", "--scale", "1"], "--scale needs --adapter"),
    (["export", "base.pth", "o.pth", "--adapter", "a", "--scale", "nan"], "--scale"),
    (["export", "base.pth", "o.pth", "--adapter", "a", "--scale", "1e309"], "--scale"),
    (["example", "--frames", "0"], "--frames"), (["example", "--rank", "0"], "--rank"),
    (_R + ["--noise-scale", "-0.1"], "--noise-scale"), (_R + ["--noise-scale", "nan"], "--noise-scale"),
    (_R + ["--f0-up-key", "nan"], "--f0-up-key"), (_R + ["--sid", "-1"], "--sid"),
    (_R + ["--scale", "inf"], "--scale"), (_R + ["--scale", "2"], "--scale needs --adapter"),
    (_R + ["--seed", str(2 ** 63)], "--seed"),
    (["adapters", "mix", "a", "--out", "m", "--rank", "0"], "--rank"),
    (["adapters", "mix", "a:nan", "--out", "m"], "a:nan"), (["adapters", "mix", "a:1e309", "--out", "m"], "a:1e309"),
    (["adapters", "extract", "--base", "base.pth", "--voice", "base.pth", "--rank", "0", "--out", "e"], "--rank"),
], ids=lambda x: " ".join(x[-2:]) if isinstance(x, list) else None)
def test_bad_flag_values_are_usage_errors(capsys, work, argv, flag):
    refused(capsys, work, argv, names=flag)


# ------------------------------------------------------------------ class 5: nothing left by a failure


def test_failed_train_removes_the_run_directory_it_created(capsys, work):
    """The base is not an RVC file: the run directory this invocation created is gone."""
    refused(capsys, work, ["train", "--base", "base.pth", "--data", "data", "--out", "new/run"], names="base.pth")
    assert not os.path.exists(work / "new")


def test_failed_train_keeps_a_directory_it_did_not_create(capsys, work):
    (work / "mine").mkdir()
    refused(capsys, work, ["train", "--base", "base.pth", "--data", "data", "--out", "mine"], names="base.pth")
    assert os.path.isdir(work / "mine") and not os.listdir(work / "mine")


def test_resume_with_nothing_to_resume_says_so(capsys, work):
    """SIGKILL before the first checkpoint leaves a log but no checkpoint: --resume refuses
    (one line, nothing changed) instead of restarting and logging step 1 a second time."""
    (work / "run").mkdir()
    (work / "run" / "metrics.jsonl").write_text('{"step": 1, "mel": 100.0}\n')
    refused(capsys, work, ["train", "--base", "base.pth", "--data", "data", "--out", "run", "--resume"],
            names="run: nothing to resume")
    # and starting again over it needs --overwrite
    refused(capsys, work, ["train", "--base", "base.pth", "--data", "data", "--out", "run"],
            names="metrics.jsonl: exists; pass --overwrite")


def test_failed_export_leaves_no_parent_directories(capsys, work):
    refused(capsys, work, ["export", "base.pth", "x/y/out.pth"], names="base.pth")
    assert not os.path.exists(work / "x")


# ------------------------------------------------------------------ class 6: the umask


def test_outputs_honour_the_umask(tmp_path, capsys):
    _tiny_adapter(str(tmp_path / "x"))
    old = os.umask(0o027)
    try:
        assert main(["adapters", "mix", str(tmp_path / "x"), "--out", str(tmp_path / "new" / "m")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    for p in (tmp_path / "new", tmp_path / "new" / "m"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o750, p
    for f in ("adapter.safetensors", "adapter_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "new" / "m" / f).st_mode) == 0o640, f


# ------------------------------------------------------------------ class 5: the real train command (slow)


def _signal_after_first_checkpoint(cmd, root, run, sig):
    """Start ``cmd`` (an ``rvclora train`` writing RUN_DIR ``run``), send ``sig`` once its
    first checkpoint exists; (exit code, combined output)."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 900 and proc.poll() is None:
            if os.path.exists(os.path.join(run, "checkpoints", "1")):
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        out = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


@pytest.mark.slow
def test_cli_train_ctrl_c_resume_finished_rerun_and_overwrite(tmp_path):
    """Full-size `rvclora train --example` (several minutes on 2 cores): Ctrl-C after the
    first periodic checkpoint exits 130 with the adapter and plot written; a plain rerun is
    refused (byte-identical run); --resume finishes; --resume of the finished run re-exports
    (exit 0, no duplicate log lines); --overwrite starts afresh."""
    import json
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = str(tmp_path / "RUN")
    cmd = [sys.executable, "-m", "rvclora_jax.cli", "train", "--example", "--out", run, "--steps", "3",
           "--batch-size", "1", "--segment-frames", "8", "--log-every", "1", "--save-every", "1", "--no-progress"]
    metrics = os.path.join(run, "metrics.jsonl")
    rc, out = _signal_after_first_checkpoint(cmd, root, run, signal.SIGINT)
    assert rc == 130, out
    assert "Traceback" not in out and "already exists" not in out, out
    for name in ("adapter.safetensors", "adapter_config.json", "loss.png"):
        assert os.path.exists(os.path.join(run, name)), (name, out)

    def cli(*extra):
        p = subprocess.run(cmd + list(extra), cwd=root, capture_output=True, text=True, timeout=900)
        return p.returncode, p.stdout + p.stderr

    before = _tree_hash(run)
    rc, out = cli()
    assert rc == 2 and "pass --overwrite" in out.strip().splitlines()[-1], out
    assert _tree_hash(run) == before
    rc, out = cli("--resume")
    assert rc == 0, out
    steps = [json.loads(line)["step"] for line in open(metrics) if '"mel"' in line]
    assert steps == [1, 2, 3], steps
    rc, out = cli("--resume")
    assert rc == 0 and "already finished" in out, out
    assert [json.loads(line)["step"] for line in open(metrics) if '"mel"' in line] == [1, 2, 3]
    assert sum('"val_mel"' in line for line in open(metrics)) == len(
        {json.loads(line)["step"] for line in open(metrics) if '"val_mel"' in line})
    rc, out = cli("--overwrite", "--steps", "1")
    assert rc == 0, out
    assert [json.loads(line)["step"] for line in open(metrics) if '"mel"' in line] == [1]


@pytest.mark.slow
def test_cli_train_sigterm_saves_a_checkpoint_and_resumes(tmp_path):
    """`kill` (SIGTERM, a scheduler's stop) through the real entry point: like Ctrl-C, the
    step finishes, a checkpoint and the adapter are written, exit 130, no traceback, no
    temporary file left; --resume then finishes the run."""
    import json
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = str(tmp_path / "RUN")
    cmd = [sys.executable, "-m", "rvclora_jax.cli", "train", "--example", "--out", run, "--steps", "4",
           "--batch-size", "1", "--segment-frames", "8", "--log-every", "1", "--save-every", "1", "--no-progress"]
    rc, out = _signal_after_first_checkpoint(cmd, root, run, signal.SIGTERM)
    assert rc == 130, out
    assert "Traceback" not in out, out
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert os.path.exists(os.path.join(run, name)), (name, out)
    left = [n for _, _, files in os.walk(run) for n in files if ".tmp" in n or n.startswith("tmp")]
    assert not left, left
    p = subprocess.run(cmd + ["--resume"], cwd=root, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl")) if '"mel"' in line]
    assert steps == [1, 2, 3, 4], steps


def test_apply_umask_gives_a_temporary_tree_the_modes_of_plain_files(tmp_path):
    """fileio.apply_umask: for trees built in a mkdtemp (0700) by writers that create 0600
    files (convert's directory), before they are renamed into place."""
    import tempfile

    from rvclora_jax.fileio import apply_umask

    d = tempfile.mkdtemp(dir=tmp_path)
    os.mkdir(os.path.join(d, "sub"), 0o700)
    fd = os.open(os.path.join(d, "sub", "f"), os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    old = os.umask(0o022)
    try:
        apply_umask(d)
    finally:
        os.umask(old)
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (d, os.path.join(d, "sub"), os.path.join(d, "sub", "f"))] \
        == [0o755, 0o755, 0o644]
