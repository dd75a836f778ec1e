"""The command line, in-process: help texts, fast start, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from synth7t.cli import app

STAGES = ["demo", "preprocess", "pack", "train", "predict", "qc", "evaluate", "tune"]
runner = CliRunner()


def test_top_level_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.output


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_help(stage):
    result = runner.invoke(app, [stage, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.time(); from synth7t.cli import app; "
            "heavy=[m for m in ('torch','ants','monai','lightning','SimpleITK') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "synth7t.cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t0 < 10  # generous bound for a loaded CI machine; measured ~0.3 s


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and "synth7t" in result.output


def test_bad_manifest_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "cohort.csv"
    bad.write_text("subject,t3\nA,missing.nii.gz\n")
    result = runner.invoke(app, ["preprocess", str(bad), "-o", str(tmp_path / "work")])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "row 2: t3 file not found" in lines[0] and str(bad) in lines[0]


def test_bad_set_override_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run"), "--set", "oops"])
    assert result.exit_code == 2
    assert "expected KEY=VALUE" in result.output


def test_bad_shard(tmp_path):
    m = tmp_path / "m.csv"
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    m.write_text("subject,t3\nA,a.nii.gz\n")
    result = runner.invoke(app, ["preprocess", str(m), "-o", str(tmp_path / "w"), "--shard", "5/2"])
    assert result.exit_code == 2 and "need 1 <= K <= N" in result.output
