"""Several 3T scans of one person (issue 16): the 7T is processed once, every 3T becomes its own pair."""

import json
import shutil

import numpy as np
import pytest

from synth7t.manifest import Subject, pseudonym
from synth7t.parallel import select_shard
from synth7t.preprocess import multiscan
from synth7t.preprocess.pipeline import preprocess

FAST = {"skullstrip": "threshold", "fast": True, "registration_resolution_mm": 3.0, "progress": False,
        "registration_transform": "Affine"}
KEY = b"m" * 32
SID = "PERSON-77"
DATES = ("2019-05-01", "2020-06-02", "2021-07-03")


@pytest.fixture
def count_7t(monkeypatch):
    calls = []
    real = multiscan.process_7t

    def counted(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(multiscan, "process_7t", counted)
    return calls


def _load(name: str):
    """A sibling test module (importable only by path under --import-mode=importlib)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"pp_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One person: a 7T and three 3T scans (the third has motion stripes: QC rejects it)."""
    from synth7t.io import Volume, load_volume, save_volume

    helpers = _load("conftest")
    raw = tmp_path_factory.mktemp("raw")
    p3, p7 = helpers.write_pair(raw, "p", helpers._template_small(), seed=0)
    v = load_volume(p3)
    rng = np.random.default_rng(1)
    second = raw / "p_3T_b.nii.gz"
    save_volume(second, Volume(v.data * 0.9 + rng.normal(0, 5, v.shape) * (v.data > 0), v.affine), dtype=np.int16)
    bad = raw / "p_3T_bad.nii.gz"
    save_volume(bad, Volume(_load("test_qc")._stripes(v.data, n_lines=8, gain=6.0), v.affine), dtype=np.int16)
    rows = [Subject(SID, t3, p7, age=70.2, sex="M", diagnosis="normal", session=d, gap_days=g)
            for t3, d, g in zip((p3, second, bad), DATES, (-30.0, 45.0, None), strict=True)]
    return rows


@pytest.fixture(scope="module")
def first_run(cohort, tmp_path_factory):
    work = tmp_path_factory.mktemp("ms") / "work"
    calls = []
    real = multiscan.process_7t
    multiscan.process_7t = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        result = preprocess(cohort, work, pseudonym_key=KEY, mapping_file=work.parent / "ids.json", **FAST)
    finally:
        multiscan.process_7t = real
    return work, result, calls


def test_7t_processed_once_and_every_3t_registered(cohort, first_run):
    work, result, calls = first_run
    assert len(calls) == 1  # one 7T for three 3T scans
    labels = [f"{SID}/{d}" for d in DATES]
    assert result.done == labels[:2] and result.rejected == [labels[2]], result.failed
    person = work / pseudonym(SID, KEY)
    codes = multiscan.scan_codes(cohort, KEY)
    assert {p.name for p in person.iterdir()} >= {"t7.nii.gz", "mask.nii.gz", "mask_csf.nii.gz", "subject.json",
                                                   "qc_7t.json", "provenance.json", ".done", "scans"}
    assert not (person / "t3.nii.gz").exists()
    for d in DATES:
        scan = person / "scans" / codes[d]
        assert {p.name for p in scan.iterdir()} == {"t3.nii.gz", "qc.json", "qc.png", "transforms",
                                                     "provenance.json", ".done"}
        prov = json.loads((scan / "provenance.json").read_text())
        assert "register" in prov["timings_s"] and "n4_7t_pass2" not in prov["timings_s"]
    assert "n4_7t_pass2" in json.loads((person / "provenance.json").read_text())["timings_s"]
    good = [json.loads((person / "scans" / codes[d] / "qc.json").read_text()) for d in DATES]
    assert good[0]["registration_ncc"] > 0.9 and good[1]["registration_ncc"] > 0.9 and not good[1]["rejected"]
    assert good[2]["rejected"] and any("motion" in r for r in good[2]["reasons"])
    subj = json.loads((person / "subject.json").read_text())
    assert subj["id"] == person.name and subj["age"] == 70 and subj["group"] == "healthy"
    assert subj["scans"] == {codes[DATES[0]]: {"gap_days": -30.0}, codes[DATES[1]]: {"gap_days": 45.0},
                             codes[DATES[2]]: {"gap_days": None}}
    cohort_json = json.loads((work / "cohort.json").read_text())["subjects"][person.name]
    assert cohort_json["status"] == "done" and cohort_json["scans"][codes[DATES[2]]]["status"] == "rejected"
    mapping = json.loads((work.parent / "ids.json").read_text())
    assert mapping[f"{SID}/{DATES[0]}"] == f"{person.name}_{codes[DATES[0]]}"


def test_no_id_or_session_date_in_the_work_folder(first_run):
    work = first_run[0]
    for f in work.rglob("*"):
        assert SID not in f.name and not any(d in f.name for d in DATES)
        if f.is_file() and not f.name.endswith(".gz") and f.suffix != ".png":
            text = f.read_bytes()
            assert SID.encode() not in text and not any(d.encode() in text for d in DATES), f


def test_resume_reuses_the_7t_and_skips_done_scans(cohort, first_run, tmp_path, count_7t):
    work = tmp_path / "work"
    shutil.copytree(first_run[0], work)
    res = preprocess(cohort, work, pseudonym_key=KEY, jobs=2, **FAST)  # worker processes: nothing to redo
    assert sorted(res.skipped) == sorted(f"{SID}/{d}" for d in DATES) and not res.done and count_7t == []
    codes = multiscan.scan_codes(cohort, KEY)
    person = work / pseudonym(SID, KEY)
    (person / "scans" / codes[DATES[1]] / ".done").unlink()  # killed before this scan's .done
    res = preprocess(cohort[:2], work, pseudonym_key=KEY, **FAST)  # a manifest that dropped the bad scan
    assert res.done == [f"{SID}/{DATES[1]}"] and res.skipped == [f"{SID}/{DATES[0]}"] and count_7t == []
    entry = json.loads((work / "cohort.json").read_text())["subjects"][person.name]
    assert entry["status"] == "done" and entry["scans"][codes[DATES[0]]]["status"] == "done"
    res = preprocess(cohort[:2], work, pseudonym_key=KEY, **{**FAST, "ncc_threshold": 0.5})  # new parameters
    assert sorted(res.done) == [f"{SID}/{d}" for d in DATES[:2]] and len(count_7t) == 1
    assert not (person / "scans" / codes[DATES[2]]).exists()  # the redone 7T replaced the old scans
    single = Subject(SID, cohort[0].t3, cohort[0].t7, age=70.2, sex="M", diagnosis="normal")
    params = {**FAST, "ncc_threshold": 0.5}
    assert preprocess([single], work, pseudonym_key=KEY, **params).done == [SID]  # the session column dropped
    assert (person / "qc.json").is_file() and not (person / "scans").exists()
    assert preprocess(cohort[:1], work, pseudonym_key=KEY, **params).done == [f"{SID}/{DATES[0]}"]  # and back


def test_pack_keeps_both_pairs_in_one_split(cohort, first_run, tmp_path):
    from synth7t.dataset.pack import pack

    meta = json.loads(pack(first_run[0], tmp_path / "store", progress=False).read_text())
    person = pseudonym(SID, KEY)
    codes = multiscan.scan_codes(cohort, KEY)
    pairs = [f"{person}_{codes[d]}" for d in DATES[:2]]
    assert sorted(meta["subjects"]) == sorted(pairs)
    assert list(meta["skipped"]) == [f"{person}_{codes[DATES[2]]}"]  # the rejected scan drops only its pair
    assert meta["splits"]["train"] == sorted(pairs)
    assert meta["subjects"][pairs[0]]["person"] == person and meta["subjects"][pairs[0]]["gap_days"] == -30.0


def test_shard_keeps_a_persons_scans_together(cohort):
    other = Subject("A-single", cohort[0].t3, cohort[0].t7)
    shards = [select_shard([*cohort, other], (k, 2)) for k in range(2)]
    assert [s.subject for s in shards[0]] == ["A-single"] and [s.session for s in shards[1]] == list(DATES)


def test_bids_sessions_of_one_person_are_pairs_with_their_own_ages(cohort, tmp_path, count_7t):
    """--bids-3t '3T*': ses-3T1 and ses-3T2 of one person, its one ses-7T; ages at each session from
    sessions.tsv reach subject.json (rounded) and the slice store's entries of the two pairs."""
    from synth7t.dataset.pack import _check_folder
    from synth7t.manifest import BidsMatch, load_cohort

    root = tmp_path / "bids"
    for ses, src in (("3T1", cohort[0].t3), ("3T2", cohort[1].t3), ("7T", cohort[0].t7)):
        d = root / "sub-77" / f"ses-{ses}" / "anat"
        d.mkdir(parents=True)
        shutil.copy(src, d / f"sub-77_ses-{ses}_T1w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-77\t70\tM\n")
    (root / "sub-77" / "sub-77_sessions.tsv").write_text("session_id\tage\nses-3T1\t70.2\nses-3T2\t72.9\n")
    rows = load_cohort(root, bids=BidsMatch(t3="3T*"))
    work = tmp_path / "work"
    res = preprocess(rows, work, pseudonym_key=KEY, **FAST)
    assert sorted(res.done) == ["sub-77/3T1", "sub-77/3T2"] and len(count_7t) == 1
    person = work / pseudonym("sub-77", KEY)
    codes = multiscan.scan_codes(rows, KEY)
    subj = json.loads((person / "subject.json").read_text())
    assert {c: s["age"] for c, s in subj["scans"].items()} == {codes["3T1"]: 70, codes["3T2"]: 73}
    for ses, age in (("3T1", 70), ("3T2", 73)):
        _, cand = _check_folder(person / "scans" / codes[ses], person)
        assert cand.scan["age"] == age and cand.scan["person"] == person.name
