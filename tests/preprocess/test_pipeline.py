"""Cohort behaviour of ``preprocess``: layout, anonymity, failures, resume, shards, prediction-only subjects."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from synth7t.errors import ConfigError
from synth7t.manifest import Subject, pseudonym
from synth7t.parallel import select_shard
from synth7t.preprocess.anonymize import default_key_file, round_age
from synth7t.preprocess.pipeline import PreprocessConfig, preprocess

FAST = {"skullstrip": "threshold", "fast": True, "registration_resolution_mm": 3.0, "progress": False,
        "registration_transform": "Affine", "output_resolution_mm": 1.5}  # SyN itself is tested in test_register.py
KEY = b"k" * 32
SECRET = "SECRET-SUBJ"


def _with_descrip(path, text):
    img = nib.load(str(path))
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    img.header["descrip"] = text.encode()
    nib.save(img, str(path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pp_conftest", Path(__file__).with_name("conftest.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    root = tmp_path_factory.mktemp("cohort")
    raw = root / "raw"
    raw.mkdir()
    brain = helpers._template_small()
    subjects = []
    for i in range(2):
        p3, p7 = helpers.write_pair(raw, f"{SECRET}{i}", brain, seed=i)
        _with_descrip(p7, f"{SECRET}{i} scanned 2021-03-04")
        subjects.append(Subject(f"{SECRET}{i}", p3, p7, age=70.6 + i, sex="F", diagnosis="mci"))
    subjects.append(Subject(f"{SECRET}-pred", subjects[0].t3, None, age=None))
    bad = raw / "bad_7T.nii.gz"
    bad.write_bytes(subjects[0].t7.read_bytes()[:3000])  # truncated gzip
    subjects.append(Subject(f"{SECRET}-bad", subjects[0].t3, bad))
    work = root / "work"
    result = preprocess(subjects, work, pseudonym_key=KEY, **FAST)
    return {"root": root, "work": work, "subjects": subjects, "result": result}


def test_layout_and_statuses(run):
    res, work = run["result"], run["work"]
    assert sorted(res.done) == sorted([f"{SECRET}0", f"{SECRET}1", f"{SECRET}-pred"])
    assert list(res.failed) == [f"{SECRET}-bad"] and "truncated or corrupt gzip" in res.failed[f"{SECRET}-bad"]
    pair = work / pseudonym(f"{SECRET}0", KEY)
    names = {p.name for p in pair.iterdir()}
    assert names == {"t7.nii.gz", "t3.nii.gz", "mask.nii.gz", "mask_csf.nii.gz", "subject.json", "qc.json",
                     "qc.png", "transforms", "provenance.json", ".done"}
    assert {p.name for p in (pair / "transforms").iterdir()} == {"0GenericAffine.mat"}
    t7, t3, mask = (nib.load(str(pair / f)) for f in ("t7.nii.gz", "t3.nii.gz", "mask.nii.gz"))
    assert t7.shape == t3.shape == mask.shape and np.allclose(t7.affine, t3.affine)
    assert mask.get_data_dtype() == np.uint8 and t7.get_data_dtype() == np.float32
    q = json.loads((pair / "qc.json").read_text())
    assert q["registration_ncc"] > 0.9 and not q["rejected"] and q["min_slice"] == 0
    assert json.loads((pair / "subject.json").read_text()) == {
        "id": pair.name, "age": 71, "sex": "F", "diagnosis": "mci", "group": "ill"}
    prov = json.loads((pair / "provenance.json").read_text())
    assert {"synth7t", "antspyx", "SimpleITK", "deepbet", "numpy", "nibabel"} <= set(prov["versions"])
    assert prov["params"]["n4_7t"]["iterations"] == [25, 25, 25]  # fast -> demo preset
    pred = work / pseudonym(f"{SECRET}-pred", KEY)
    assert not (pred / "t7.nii.gz").exists()
    assert np.allclose(nib.load(str(pred / "t3.nii.gz")).header.get_zooms(), 1.5)


def test_cohort_json_names_failure_without_ids(run):
    work = run["work"]
    cohort = json.loads((work / "cohort.json").read_text())
    bad = pseudonym(f"{SECRET}-bad", KEY)
    assert cohort["subjects"][bad]["status"] == "failed"
    assert "gzip" in cohort["subjects"][bad]["reason"]
    assert cohort["counts"] == {"done": 3, "failed": 1, "rejected": 0}
    assert not (work / f".{bad}.partial").exists() and not (work / bad).exists()


def test_no_identifier_anywhere(run):
    """Pseudonyms carry nothing of the ID; no output file (headers included) contains the ID or descrip."""
    for s in run["subjects"]:
        p = pseudonym(s.subject, KEY)
        assert "SECRET" not in p and "SUBJ" not in p and not any(part in p for part in s.subject.split("-"))
    for f in run["work"].rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            if f.name.endswith(".gz"):
                import gzip

                blob = gzip.decompress(blob)
            assert SECRET.encode() not in blob and b"scanned" not in blob, f
    for f in run["work"].rglob("*.nii.gz"):
        assert nib.load(str(f)).header["descrip"].item() == b""


def test_resume(run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(run["work"], work)
    a, b = (pseudonym(f"{SECRET}{i}", KEY) for i in range(2))
    (work / a / ".done").unlink()  # interrupted after writing, before .done
    (work / f".{b}.partial").mkdir()  # a killed run left a partial folder of b (b itself is complete)
    (work / f".{b}.partial" / "t7.nii.gz").write_bytes(b"junk")
    res = preprocess(run["subjects"][:3], work, pseudonym_key=KEY, jobs=2, **FAST)
    assert res.done == [f"{SECRET}0"]
    assert sorted(res.skipped) == sorted([f"{SECRET}1", f"{SECRET}-pred"])
    assert (work / a / ".done").exists() and not (work / f".{a}.partial").exists()
    # a changed parameter redoes the subject
    res = preprocess(run["subjects"][1:2], work, pseudonym_key=KEY, **{**FAST, "ncc_threshold": 0.5})
    assert res.done == [f"{SECRET}1"]


def test_shards_partition():
    subs = [Subject(f"s{i:02d}", t3=None) for i in (5, 1, 3, 0, 4, 2, 6)]  # type: ignore[arg-type]
    shards = [[s.subject for s in select_shard(subs, (k, 3))] for k in range(3)]
    assert shards[0] == ["s00", "s03", "s06"] and shards[1] == ["s01", "s04"]
    assert sorted(sum(shards, [])) == sorted(s.subject for s in subs)
    with pytest.raises(ConfigError):
        preprocess(subs, "/tmp/unused-synth7t", shard=(3, 3))


def test_key_file_and_mapping(tmp_path, run):
    work = tmp_path / "w"
    subs = [run["subjects"][3]]  # the corrupt one: fails fast, but pseudonyms and mapping are written
    mapping = tmp_path / "private" / "ids.json"
    preprocess(subs, work, mapping_file=mapping, **FAST)
    key_file = default_key_file(work)
    assert key_file.exists() and key_file.parent == tmp_path and (key_file.stat().st_mode & 0o077) == 0
    first = json.loads(mapping.read_text())
    preprocess(subs, work, mapping_file=mapping, **FAST)
    assert json.loads(mapping.read_text()) == first  # stable key: same pseudonym on rerun
    assert first[subs[0].subject] == pseudonym(subs[0].subject, bytes.fromhex(key_file.read_text().strip()))
    with pytest.raises(ConfigError, match="outside the work folder"):
        preprocess(subs, work, mapping_file=work / "ids.json", **FAST)


def test_config_hash_and_errors():
    a, b = PreprocessConfig(), PreprocessConfig(jobs=4, progress=False)
    assert a.params_hash() == b.params_hash()
    assert PreprocessConfig(n4_7t="demo").params_hash() != a.params_hash()
    with pytest.raises(ConfigError, match="skullstrip"):
        preprocess([], "/tmp/unused-synth7t", skullstrip="bet2")
    assert round_age(70.5) == 71 and round_age(70.49) == 70 and round_age(None) is None


def test_summary_reports_slices_cut_per_subject(tmp_path, caplog):
    """A 7T with inferior drop-out is cut by QC, another subject by its manifest min_slice; the per-subject log
    line, qc.json and the run summary say how many slices (mm) each lost, and clean subjects say none."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pp_conftest", Path(__file__).with_name("conftest.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    from synth7t.io import Volume, load_volume, save_volume

    brain = helpers._template_small()
    subjects = []
    for i, sid in enumerate(("drop", "clean", "manual")):
        p3, p7 = helpers.write_pair(tmp_path, sid, brain, seed=i)
        subjects.append(Subject(sid, p3, p7, min_slice=12 if sid == "manual" else None))
    # drop-out: an ellipsoid at the bottom-back of the 7T brain at 20 % of its signal
    v = load_volume(subjects[0].t7)
    d = v.data.copy()
    zs, ys = np.nonzero(d.any(axis=(0, 1)))[0], np.nonzero(d.any(axis=(0, 2)))[0]
    c = np.array([d.shape[0] / 2, ys[0] + 0.3 * (ys[-1] - ys[0]), zs[0] + 4])
    inside = (((np.indices(d.shape).transpose(1, 2, 3, 0) - c) / np.array([12, 10, 7])) ** 2).sum(-1) <= 1
    d[inside] *= 0.2
    save_volume(subjects[0].t7, Volume(d, v.affine), dtype=np.int16)
    with caplog.at_level("INFO", logger="synth7t.preprocess.pipeline"):
        res = preprocess(subjects, tmp_path / "work", pseudonym_key=KEY, **FAST)
    assert sorted(res.done) == ["clean", "drop", "manual"], res.failed
    assert set(res.cuts) == {"drop", "manual"} and res.cuts["manual"]["by"] == "manifest"
    drop = res.cuts["drop"]
    assert drop["by"] == "qc" and drop["slices"] >= 3 and drop["mm"] == pytest.approx(2.5 * drop["slices"])
    q = json.loads((tmp_path / "work" / pseudonym("drop", KEY) / "qc.json").read_text())
    assert q["cut"] == drop and q["min_slice"] > 0
    summary = res.summary()
    assert "inferior slices cut: 2 of 3 subject(s):" in summary
    assert f"  drop: {drop['slices']} slice(s) ({drop['mm']:.1f} mm) for drop-out" in summary
    assert "  manual: " in summary and "by the manifest" in summary
    lines = {s: next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{s} -> "))
             for s in ("drop", "clean")}
    assert "for drop-out" in lines["drop"] and "no slice cut" in lines["clean"]


def test_threads_follow_the_usable_cores_not_the_machine(tmp_path, caplog, monkeypatch):
    """On a shared node (a SLURM job's CPU set, taskset) the jobs share the cores this process may use, not
    os.cpu_count(): 6 usable cores of 64, 2 jobs -> 3 threads each (was 32 each)."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    with caplog.at_level("INFO", logger="synth7t.preprocess.pipeline"):
        preprocess([], tmp_path / "work", pseudonym_key=KEY, **{**FAST, "jobs": 2})
    assert any("(jobs 2, cores: 6 (CPU affinity), 3 thread(s) each" in r.getMessage()
               for r in caplog.records), caplog.text
