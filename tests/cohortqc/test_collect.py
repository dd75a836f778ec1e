"""Cohort QC collection: discovery in both layouts, flags, brain volumes, robust z, and the per-output cache."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from synth7t.cli import app
from synth7t.cohortqc import build_qc
from synth7t.cohortqc.collect import robust_z
from synth7t.cohortqc.discover import discover
from synth7t.cohortqc.thumbs import qc_paths
from synth7t.errors import InputError

from .conftest import make_output, plain_files


def _records(out):
    return {r["id"]: r for r in json.loads((out / "qc.json").read_text())["outputs"]}


def test_discovers_plain_and_bids_outputs(fake_out):
    found = {o.id: o for o in discover(fake_out)}
    assert set(found) == {"a", "b", "c", "d", "e", "big", "leak", "nan", "empty", "noprov", "sub-01_ses-1"}
    bids = found["sub-01_ses-1"]
    assert bids.layout == "bids" and bids.mask.name == "sub-01_ses-1_desc-brain_mask.nii.gz"
    assert bids.provenance.exists() and not bids.uncertainty.exists()
    assert qc_paths(bids.syn7t)["planes"] == fake_out / "sub-01" / "figures" / "sub-01_ses-1_desc-synth7T_T1w_planes.png"


def test_flags_volumes_uncertainty_and_outliers(fake_out):
    res = build_qc(fake_out, progress=False)
    rec = _records(fake_out)
    assert res.summary["total"] == 11 and res.summary["failed"] == 3
    # failed outputs, each with its reason
    assert rec["nan"]["status"] == "failed" and rec["nan"]["nonfinite_voxels"] == 1
    assert any("NaN" in f for f in rec["nan"]["flags"])
    assert rec["empty"]["status"] == "failed" and "empty mask" in rec["empty"]["flags"]
    assert rec["empty"]["brain_volume_ml"] == 0
    assert rec["noprov"]["flags"] == ["provenance missing"]
    # brain volume: 10 x 10 x depth voxels of 0.5^3 mm^3
    assert rec["a"]["brain_volume_ml"] == pytest.approx(800 * 0.125 / 1000)
    assert rec["big"]["brain_volume_ml"] == pytest.approx(2000 * 0.125 / 1000)
    assert rec["sub-01_ses-1"]["brain_volume_ml"] == pytest.approx(0.125)
    assert rec["a"]["brain_median"] == pytest.approx(0.5, abs=1e-6) and rec["a"]["brain_iqr"] == pytest.approx(0.1, abs=1e-6)
    # uncertainty: 700 voxels at 0.02 and 100 at 0.2 (a); only two maps -> no z
    assert rec["a"]["unc_mean"] == pytest.approx((700 * 0.02 + 100 * 0.2) / 800, rel=1e-5)
    assert rec["a"]["unc_p95"] == pytest.approx(0.2, rel=1e-5)
    assert rec["c"]["unc_mean"] is None and rec["a"]["z_unc_mean"] is None
    # robust z of the volume over the 8 usable outputs: depths 8 9 10 11 12 20 10 10 -> median 10, MAD 1
    assert rec["big"]["z_brain_volume_ml"] == pytest.approx(0.6745 * 10, abs=0.01)
    assert rec["a"]["z_brain_volume_ml"] == pytest.approx(-0.6745 * 2, abs=0.01)
    assert rec["big"]["status"] == "suspicious" and any(f.startswith("outlier brain volume") for f in rec["big"]["flags"])
    assert rec["nan"]["z_brain_volume_ml"] is None
    assert rec["leak"]["status"] == "suspicious" and rec["leak"]["flags"] == ["signal outside the mask (1 voxels)"]
    for name in ("a", "b", "c", "d", "e", "sub-01_ses-1"):
        assert rec[name]["status"] == "ok", (name, rec[name]["flags"])
    # tables next to the page; thumbnails drawn for every readable image, none with the input (no predict here)
    assert (fake_out / "qc.csv").read_text().count("\n") == 12
    assert rec["a"]["planes"] == "a/qc/syn7t_planes.png" and rec["a"]["compare"] is None
    assert rec["nan"]["planes"] is not None


def test_robust_z_by_hand():
    z = robust_z([1.0, 2.0, 3.0, 4.0, 100.0, None])
    assert z[2] == 0 and z[5] is None  # median 3, MAD 1
    assert z[4] == pytest.approx(0.6745 * 97)
    assert robust_z([1.0, 2.0]) == [None, None]
    assert robust_z([5.0, 5.0, 5.0, 6.0]) == pytest.approx([0, 0, 0, 1 / (1.2533 * 0.25)])  # MAD 0: mean AD


def test_second_run_reads_only_changed_outputs(fake_out):
    first = build_qc(fake_out, progress=False)
    assert first.computed == 11 and first.cached == 0
    summary, planes = qc_paths(fake_out / "a" / "syn7t.nii.gz")["summary"], fake_out / "a/qc/syn7t_planes.png"
    stamps = {p: p.stat().st_mtime_ns for p in (summary, planes)}
    second = build_qc(fake_out, progress=False)
    assert second.computed == 0 and second.cached == 11
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a rewritten output is summarised and drawn again, alone
    c_planes = fake_out / "c/qc/syn7t_planes.png"
    past = c_planes.stat().st_mtime_ns - 10_000_000_000
    os.utime(c_planes, ns=(past, past))
    make_output(plain_files(fake_out, "c"), depth=12)
    third = build_qc(fake_out, progress=False)
    assert third.computed == 1 and _records(fake_out)["c"]["brain_volume_ml"] == pytest.approx(1200 * 0.125 / 1000)
    assert c_planes.stat().st_mtime_ns >= (fake_out / "c" / "syn7t.nii.gz").stat().st_mtime_ns
    # a thumbnail older than its image is redrawn (the summary is still cached: same files)
    os.utime(c_planes, ns=(past, past))
    assert build_qc(fake_out, progress=False).computed == 1 and c_planes.stat().st_mtime_ns > past


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        build_qc(tmp_path / "absent", progress=False)
    with pytest.raises(InputError, match="no prediction outputs"):
        build_qc(tmp_path, progress=False)
    result = CliRunner().invoke(app, ["qc", str(tmp_path)])
    assert result.exit_code != 0 and result.output.count("\n") == 1 and "no prediction outputs" in result.output


def test_cli_writes_page_where_asked(fake_out, tmp_path):
    result = CliRunner().invoke(app, ["qc", str(fake_out), "-o", str(tmp_path / "pages" / "cohort.html")])
    assert result.exit_code == 0, result.output
    assert "11 outputs" in result.output
    html = (tmp_path / "pages" / "cohort.html").read_text()
    assert 'src="../out/a/qc/syn7t_planes.png"' in html
    assert (tmp_path / "pages" / "cohort.csv").exists() and (tmp_path / "pages" / "cohort.json").exists()
