"""predict --bids: T1w discovery and filters, participants.tsv covariates, BIDS derivative names and sidecars that
the official BIDS validator accepts (bids-validator-deno, a test extra; skipped where absent, a failure under CI),
resume, and one-line errors for a missing folder, a folder that is not BIDS, and filters matching nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from synth7t.errors import InputError
from synth7t.inference import PredictOptions, predict
from synth7t.inference.bids import BidsQuery, collect_bids, derivative_name, find_t1w

SCANS = ("sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_acq-mp2_run-1_T1w.nii.gz",
         "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz")




@pytest.fixture
def raw(tmp_path, write_brain):
    """A tiny BIDS raw dataset: three T1w scans (one with acq/run entities), a T2w to ignore, participants.tsv."""
    root = tmp_path / "bids"
    for rel in (*SCANS, "sub-01/anat/sub-01_T2w.nii.gz"):
        write_brain(root / Path(rel).parent, Path(rel).name, shape=(20, 24, 16))
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0"}))
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tdiagnosis\nsub-01\t71\tF\tmci\n"
                                           "sub-02\t64.5\tO\tn/a\n")
    return root


def test_discovery_filters_and_covariates(raw, caplog):
    rel = [p.relative_to(raw).as_posix() for p in find_t1w(BidsQuery(raw))]
    assert rel == sorted(SCANS)
    only = find_t1w(BidsQuery(raw, participants=["sub-02", "03"], sessions=["ses-1"]))
    assert [p.name for p in only] == ["sub-02_ses-1_acq-mp2_run-1_T1w.nii.gz"]
    assert "sub-03: no T1w scan found" in caplog.text
    with caplog.at_level("WARNING"):
        jobs = {j.subject: j for j in collect_bids(BidsQuery(raw), PredictOptions(diagnosis="normal"))}
    assert (jobs["sub-01_T1w"].age, jobs["sub-01_T1w"].sex, jobs["sub-01_T1w"].diagnosis) == (71, "F", "mci")
    s2 = jobs["sub-02_ses-2_T1w"]
    assert (s2.age, s2.sex, s2.diagnosis) == (64.5, None, "normal")  # "O": unknown to the model; option fills gaps
    assert "unknown sex code 'O'" in caplog.text
    assert derivative_name("sub-02_ses-1_acq-mp2_run-1_T1w.nii.gz", "brain", "mask") == \
        "sub-02_ses-1_acq-mp2_run-1_desc-brain_mask.nii.gz"


def test_bids_derivatives_are_valid_and_resume(raw, tiny_model, tmp_path):
    deriv = raw / "derivatives" / "synth7t"
    opts = PredictOptions(preprocessed=True, tta=True, workers=0)
    res = predict(tiny_model, None, deriv, opts, progress=False, bids=BidsQuery(raw))
    assert not res.failed and len(res.done) == 3
    files = sorted(p.relative_to(deriv).as_posix() for p in deriv.rglob("*") if p.is_file())
    figures = [f for f in files if "/figures/" in f]  # QC thumbnails (synth7t qc), fMRIPrep's place for them
    files = [f for f in files if f not in figures]
    assert len(figures) == 2 * len(SCANS) and all(f.endswith(".png") for f in figures)
    stems = [s.removesuffix("_T1w.nii.gz") for s in SCANS]
    assert files == sorted([".bidsignore", "README.md", "dataset_description.json", "logs/predict.json"]
                           + [f"{s}_{out}" for s in stems for out in (
                               "desc-synth7T_T1w.nii.gz", "desc-synth7T_T1w.json", "desc-brain_mask.nii.gz",
                               "desc-brain_mask.json", "desc-synth7TUncertainty_T1w.nii.gz",
                               "desc-synth7TUncertainty_T1w.json")])
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "synth7t"
    assert desc["DatasetLinks"] == {"raw": "../.."}
    main = json.loads((deriv / f"{stems[1]}_desc-synth7T_T1w.json").read_text())
    assert main["Sources"] == [f"bids:raw:{SCANS[1]}"] and main["SkullStripped"] is True
    assert len(main["Model"]["sha256"]) == 64 and main["PredictionSettings"]["tta"] is True
    mask = json.loads((deriv / f"{stems[1]}_desc-brain_mask.json").read_text())
    assert mask["Type"] == "Brain" and mask["Sources"] == main["Sources"]
    text = " ".join(p.read_text() for p in deriv.rglob("*.json"))
    assert str(tmp_path) not in text  # no absolute paths

    def leaves(node, key=""):  # (key, value) of every JSON leaf
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, k)
        elif isinstance(node, list):
            for v in node:
                yield from leaves(v, key)
        else:
            yield key, node

    # covariate values stay out, only whether each was known (checked on JSON values: a hex digest may well
    # contain the digits "71")
    found = [(k, v) for p in deriv.rglob("*.json") for k, v in leaves(json.loads(p.read_text()))
             if (v in (71, "71", "mci") and not isinstance(v, bool))
             or (k.lower() in ("age", "sex", "diagnosis", "group") and not isinstance(v, bool))]
    assert found == []
    from synth7t.cohortqc import build_qc

    build_qc(deriv)  # the cohort QC page at the root, its thumbnails in sub-*/figures: still a valid dataset
    assert (deriv / "qc.html").is_file()
    _validate(deriv)
    again = predict(tiny_model, None, deriv, opts, progress=False, bids=BidsQuery(raw))
    assert len(again.skipped) == 3 and not again.done


def _validate(deriv: Path) -> None:
    """The official BIDS validator (bids-validator-deno, offline) finds no error in ``deriv``."""
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("bids-validator-deno missing: install the test extras (pip install -e '.[test]')")
        pytest.skip("bids-validator-deno not installed (pip install -e '.[test]')")
    out = subprocess.run([exe, str(deriv), "--format", "json"], capture_output=True, text=True, timeout=300)
    issues = json.loads(out.stdout)["issues"]["issues"]
    errors = [f"{i['code']} {i.get('location')} {i.get('subCode') or ''}" for i in issues if i["severity"] == "error"]
    assert not errors, errors


def test_bad_bids_input_is_one_line(raw, tiny_model, tmp_path):
    from typer.testing import CliRunner

    from synth7t.cli import app

    runner = CliRunner()

    def run(*args):
        res = runner.invoke(app, ["predict", str(tiny_model), "-o", str(tmp_path / "d"), *args])
        return res.exit_code, res.output.strip()

    code, out = run("--bids", str(tmp_path / "absent"))
    assert code == 2 and out == f"error: {tmp_path / 'absent'}: BIDS folder not found"
    (tmp_path / "plain").mkdir()
    code, out = run("--bids", str(tmp_path / "plain"))
    assert code == 2 and "no dataset_description.json" in out and len(out.splitlines()) == 1
    code, out = run("--bids", str(raw), "--participant-label", "09", "--session", "3")
    assert code == 2 and out == (f"error: {raw}: no T1w scan (sub-*/[ses-*/]anat/*_T1w.nii[.gz]) found with "
                                 "--participant-label 09 and --session 3")
    code, out = run("--bids", str(raw), str(raw / SCANS[0]))
    assert code == 2 and "one of the two" in out
    code, out = run(str(raw / SCANS[0]), "--session", "1")
    assert code == 2 and "need --bids" in out
    with pytest.raises(InputError, match="raw BIDS dataset"):
        predict(tiny_model, None, raw, PredictOptions(preprocessed=True), progress=False, bids=BidsQuery(raw))


def test_session_ages_from_sessions_tsv(raw):
    (raw / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\nses-1\t66.5\nses-2\tn/a\n")
    jobs = {j.subject: j for j in collect_bids(BidsQuery(raw), PredictOptions())}
    assert jobs["sub-02_ses-1_acq-mp2_run-1_T1w"].age == 66.5  # the age at that session
    assert jobs["sub-02_ses-2_T1w"].age == 64.5  # none given for it: participants.tsv's


def test_raw_link_never_climbs_above_the_raw_dataset(raw, tmp_path):
    from synth7t.inference.bids import raw_link

    assert raw_link(raw, raw / "derivatives" / "synth7t") == "../.."
    assert raw_link(raw, tmp_path / "elsewhere" / "deriv") is None  # "../../bids" would name folders above it
    desc = json.loads((raw / "dataset_description.json").read_text())
    (raw / "dataset_description.json").write_text(json.dumps({**desc, "DatasetDOI": "10.18112/openneuro.x"}))
    assert raw_link(raw, tmp_path / "elsewhere" / "deriv") == "doi:10.18112/openneuro.x"
