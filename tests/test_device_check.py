"""benchmarks/device_check.py cannot rot: dry-run it on the CPU with tiny models (subprocess)
and check its one table: the rows and columns exist, the parity errors are small, the conv
micro-timings have fwd / dx / dw rows for both frameworks, the front-end rows have parity
and timings.

The default tests run the parity and convolution sections, and the front-end section as a
bare GPU machine runs it (no librosa, no torchfcpe: ``--pretend-missing``); the train-step
section compiles four training steps, minutes of CPU on 2 cores: the slow test runs every
section (the front end there with torchfcpe, when it is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")


def _run(tmp_path, *extra, timeout=900):
    out = tmp_path / "dc.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    p = subprocess.run([sys.executable, SCRIPT, "--platform", "cpu", "--tiny", "--json", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    return p.stdout, rows


def _check_rows(stdout, rows):
    header = next(ln for ln in stdout.splitlines() if ln.startswith("section"))
    assert [c.strip() for c in header.split("|")] == ["section", "item", "jax", "torch", "torch/jax", "note"]
    failed = [r for r in rows if "FAILED" in r["item"]]
    assert not failed, failed
    for r in rows:  # every table row is also printed
        assert r["item"] in stdout


def _check_table(stdout, rows):
    _check_rows(stdout, rows)
    par = {r["item"]: r["jax"] for r in rows if r["section"] == "parity"}
    assert set(par) == {"synthesizer infer audio max|d|", "discriminator scores max|d|",
                        "discriminator fmaps max|d|"}, par
    assert all(v is not None and v < 1e-4 for v in par.values()), par  # the port tests' tolerance


# Front-end parity bounds: each port test's own end-to-end fp32 tolerance for the same
# comparison (tests/test_hubert.py TOL; test_rmvpe.py's salience through the whole pipeline;
# test_fcpe.py's salience, each side its own mel). The dry run measures ~4e-6, ~5e-7 and
# ~6e-6; a librosa stand-in that ignored htk=True (a Slaney bank in RVC's RMVPE) gave 8e-2.
FRONTEND_TOL = {"hubert": 1e-4, "rmvpe": 2e-5, "fcpe": 1e-4}


def _check_frontend(rows, fcpe_reference: bool):
    front = [r for r in rows if r["section"] == "frontend"]
    for model, tol in FRONTEND_TOL.items():
        mine = [r for r in front if r["item"].startswith(model)]
        parity = [r for r in mine if "max|d|" in r["item"]]
        with_ref = model != "fcpe" or fcpe_reference
        assert len(parity) == with_ref, mine
        if with_ref:
            assert parity[0]["jax"] is not None and 0 <= parity[0]["jax"] < tol, parity
            assert "9 clips" in parity[0]["note"], parity  # every clip of B=1 and B=8 compared
        for B in (1, 8):
            for kind in ("first call", "steady"):
                r = next(r for r in mine if r["item"].endswith(f"B={B}: {kind}"))
                assert r["jax"] > 0, r
                if with_ref:
                    assert r["torch"] > 0 and r["ratio"] > 0, r
                else:
                    assert r["torch"] is None and "torchfcpe not installed: JAX only" in r["note"], r


def test_dry_run_parity_and_conv_table(tmp_path):
    stdout, rows = _run(tmp_path, "--skip", "step,infer", "--conv-limit", "2", "--conv-reps", "1")
    _check_table(stdout, rows)
    convs = [r for r in rows if r["section"] == "conv" and r["item"].endswith((" fwd", " dx", " dw"))]
    assert len(convs) == 6, convs  # 2 convs x (forward, input gradient, weight gradient)
    assert all(r["jax"] > 0 and r["torch"] > 0 and r["ratio"] > 0 for r in convs), convs
    assert any(r["item"] == "ops more than 2x slower than torch" for r in rows)


def test_dry_run_frontend_as_on_a_bare_gpu_machine(tmp_path):
    stdout, rows = _run(tmp_path, "--skip", "parity,step,conv,infer", "--pretend-missing", "librosa,torchfcpe")
    _check_rows(stdout, rows)
    _check_frontend(rows, fcpe_reference=False)
    assert "librosa missing: stubbed" in stdout


@pytest.mark.slow
def test_dry_run_every_section(tmp_path):
    stdout, rows = _run(tmp_path, "--steps", "1", "--conv-reps", "1", timeout=1800)
    _check_table(stdout, rows)
    steps = {r["item"]: r for r in rows if r["section"] == "step"}
    for label in ("B=2 jax fp32 / torch fp32: step",
                  "B=2 jax bf16 / torch fp16 autocast+GradScaler: step"):
        assert steps[label]["jax"] > 0 and steps[label]["torch"] > 0, steps[label]
    assert any(r["section"] == "compile" for r in rows) and any(r["section"] == "memory" for r in rows)
    infer = {r["item"]: r for r in rows if r["section"] == "infer"}
    assert any("steady conversion" in k and v["jax"] > 0 and v["torch"] > 0 for k, v in infer.items()), infer
    assert infer["output samples"]["jax"] == infer["output samples"]["torch"], infer
    _check_frontend(rows, fcpe_reference=importlib.util.find_spec("torchfcpe") is not None)
