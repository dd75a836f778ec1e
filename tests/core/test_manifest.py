"""Manifest and BIDS discovery: validation reports every bad row, with row numbers."""

from __future__ import annotations

import pytest

from synth7t.errors import ManifestError
from synth7t.manifest import BidsMatch, diagnosis_group, pseudonym, read_bids, read_manifest


@pytest.fixture
def scans(tmp_path):
    for name in ("a3.nii.gz", "a7.nii.gz", "b3.nii.gz", "b7.nii.gz", "c3.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_reads_csv_tsv_and_keeps_extra_columns(scans):
    (scans / "m.csv").write_text(
        "subject,t3,t7,age,sex,diagnosis,site\n"
        "A,a3.nii.gz,a7.nii.gz,71.4,female,MCI,lund\n"
        "B,b3.nii.gz,b7.nii.gz,,M,normal,umea\n"
        "C,c3.nii.gz,,80,,,lund\n"
    )
    subs = read_manifest(scans / "m.csv")
    assert [s.subject for s in subs] == ["A", "B", "C"]
    a, b, c = subs
    assert a.age == 71.4 and a.sex == "F" and a.diagnosis == "mci" and a.group == "ill"
    assert b.age is None and b.group == "healthy"
    assert c.t7 is None and c.sex is None and c.group is None
    assert a.extra == {"site": "lund"} and a.t3 == scans / "a3.nii.gz"
    (scans / "m.tsv").write_text("subject\tt3\tt7\nA\ta3.nii.gz\ta7.nii.gz\n")
    assert read_manifest(scans / "m.tsv")[0].t7 == scans / "a7.nii.gz"


def test_every_bad_row_reported_at_once(scans):
    (scans / "m.csv").write_text(
        "subject,t3,t7,age,sex,diagnosis\n"
        "A,a3.nii.gz,a7.nii.gz,seventy,F,normal\n"
        "A,b3.nii.gz,b7.nii.gz,70,F,normal\n"
        "C,missing.nii.gz,,70,X,normal\n"
        "D,c3.nii.gz,,70,F,flu\n"
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(scans / "m.csv")
    msg = str(info.value)
    assert "row 2: unparseable age 'seventy'" in msg
    assert "row 3: duplicate subject 'A'" in msg
    assert "row 4: t3 file not found" in msg and "row 4: unknown sex code 'X'" in msg
    assert "row 5: unknown diagnosis 'flu'" in msg
    assert len(info.value.problems) == 5 and "\n" not in msg


@pytest.mark.parametrize(
    "text, expected",
    [("", "manifest is empty"), ("subj,t3\nA,a3.nii.gz\n", "missing column(s) subject"),
     ("subject,t3,t7\n", "no subjects")],
)
def test_malformed_manifests(scans, text, expected):
    (scans / "m.csv").write_text(text)
    with pytest.raises(ManifestError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(scans / "m.csv")


def test_missing_manifest_and_require_t7(scans):
    with pytest.raises(ManifestError, match="file not found"):
        read_manifest(scans / "nope.csv")
    (scans / "m.csv").write_text("subject,t3,t7\nC,c3.nii.gz,\n")
    with pytest.raises(ManifestError, match="row 2: empty t7"):
        read_manifest(scans / "m.csv", require_t7=True)


def test_bids_discovery_with_configurable_entities(tmp_path):
    for sub in ("01", "02"):
        for ses in ("3T", "7T"):
            d = tmp_path / f"sub-{sub}" / f"ses-{ses}" / "anat"
            d.mkdir(parents=True)
            (d / f"sub-{sub}_ses-{ses}_T1w.nii.gz").write_bytes(b"x")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tsex\tdiagnosis\nsub-01\t66\tF\tscd\n")
    subs = read_bids(tmp_path)
    assert [s.subject for s in subs] == ["sub-01", "sub-02"]
    assert subs[0].age == 66 and subs[0].group == "healthy" and subs[1].age is None
    assert subs[0].t7.name == "sub-01_ses-7T_T1w.nii.gz"
    with pytest.raises(ManifestError, match="no T1w scans with acq-3T"):
        read_bids(tmp_path, BidsMatch(entity="acq"))


def test_pseudonym_is_keyed_and_carries_no_part_of_the_id():
    p1 = pseudonym("BF2-0042-Lund", b"key-1")
    assert p1 == pseudonym("BF2-0042-Lund", b"key-1") and p1 != pseudonym("BF2-0042-Lund", b"key-2")
    for part in ("BF2", "0042", "Lund", "42"):
        assert part.lower() not in p1.lower()
    assert diagnosis_group("Dementia") == "ill" and diagnosis_group(None) is None


def test_several_3t_scans_per_subject_with_session_or_scan_column(scans):
    """Rows of one subject told apart by a session (or scan) column share its 7T; gap_days is kept."""
    (scans / "m.csv").write_text(
        "subject,t3,t7,age,sex,session,gap_days\n"
        "A,a3.nii.gz,a7.nii.gz,70,F,2019-05-01,-400\n"
        "A,b3.nii.gz,a7.nii.gz,70,F,2020-06-02,12.5\n"
        "C,c3.nii.gz,b7.nii.gz,71,M,,\n"
    )
    a1, a2, c = read_manifest(scans / "m.csv")
    assert (a1.subject, a1.session, a1.gap_days) == ("A", "2019-05-01", -400.0)
    assert (a2.session, a2.gap_days, a2.t7) == ("2020-06-02", 12.5, scans / "a7.nii.gz")
    assert c.session is None and c.gap_days is None and a1.extra == {}
    (scans / "s.tsv").write_text("subject\tt3\tt7\tscan\nA\ta3.nii.gz\ta7.nii.gz\t1\nA\tb3.nii.gz\ta7.nii.gz\t2\n")
    assert [s.session for s in read_manifest(scans / "s.tsv")] == ["1", "2"]
    from synth7t.manifest import write_manifest

    back = read_manifest(write_manifest(scans / "copy.csv", [a1, a2, c]))
    assert [(s.session, s.gap_days) for s in back] == [(a1.session, -400.0), (a2.session, 12.5), (None, None)]


def test_several_scans_errors_name_the_rows(scans):
    (scans / "m.csv").write_text(
        "subject,t3,t7,age,sex,session,gap_days\n"
        "A,a3.nii.gz,a7.nii.gz,70,F,1,\n"
        "A,b3.nii.gz,a7.nii.gz,70,F,1,\n"       # duplicate (subject, session)
        "B,a3.nii.gz,a7.nii.gz,70,F,1,\n"
        "B,b3.nii.gz,b7.nii.gz,71,F,2,\n"       # another 7T and age for the same person
        "C,c3.nii.gz,b7.nii.gz,70,F,1,soon\n"  # gap_days not a number
        "D,c3.nii.gz,b7.nii.gz,70,F,,\n"
        "D,a3.nii.gz,b7.nii.gz,70,F,2,\n"       # one row of D has no session
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(scans / "m.csv")
    problems = info.value.problems
    assert "row 3: duplicate subject 'A' session '1' (first in row 2)" in problems
    assert "rows 4, 5: subject 'B' has different t7, age in its rows (one 7T and one set of covariates per " \
           "subject)" in problems
    assert "row 6: gap_days 'soon' is not a number of days" in problems
    assert "rows 7, 8: subject 'D' has several rows; each needs its own session (or scan)" in problems
    assert len(problems) == 4
    (scans / "both.csv").write_text("subject,t3,session,scan\nA,a3.nii.gz,1,1\n")
    with pytest.raises(ManifestError, match="both a 'session' and a 'scan' column"):
        read_manifest(scans / "both.csv")
    (scans / "no7.csv").write_text("subject,t3,session\nA,a3.nii.gz,1\nA,b3.nii.gz,2\n")
    with pytest.raises(ManifestError, match="rows 2, 3: subject 'A' has several 3T scans but no 7T"):
        read_manifest(scans / "no7.csv")


def _bids_tree(root, scans: dict[str, list[str]]):
    for sub, sessions in scans.items():
        for ses in sessions:
            d = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
            d.mkdir(parents=True)
            (d / f"sub-{sub}_ses-{ses}_T1w.nii.gz").write_bytes(b"x")


def test_bids_several_3t_sessions_per_7t_with_session_ages(tmp_path):
    _bids_tree(tmp_path, {"01": ["3T1", "3T2", "7T"], "02": ["3T", "7T"]})
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t60\tF\nsub-02\t70\tM\n")
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-3T1\t64.2\nses-3T2\tn/a\n")
    with pytest.raises(ManifestError, match=r"sub-01: no 3T scan \(ses-3T\)"):  # exact value: as before
        read_bids(tmp_path)
    for pattern in ("3T*", "3t1,3T2,3T"):
        subs = read_bids(tmp_path, BidsMatch(t3=pattern))
        assert [(s.subject, s.session, s.age, s.sex) for s in subs] == [
            ("sub-01", "3T1", 64.2, "F"), ("sub-01", "3T2", 60, "F"), ("sub-02", None, 70, "M")]
        assert {s.t7.name for s in subs[:2]} == {"sub-01_ses-7T_T1w.nii.gz"}
    from synth7t.preprocess.multiscan import group_rows

    assert [len(g) for g in group_rows(subs)] == [2, 1]  # one unit per person: its 7T processed once
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-3T1\told\n")
    with pytest.raises(ManifestError, match=r"sub-01: sub-01_sessions.tsv: ses-3T1: .*old"):
        read_bids(tmp_path, BidsMatch(t3="3T*"))


def test_bids_several_7t_or_3t_without_7t_are_refused_in_one_line(tmp_path):
    _bids_tree(tmp_path, {"01": ["3Ta", "3Tb"], "02": ["3T", "7T"]})
    d = tmp_path / "sub-02" / "ses-7T" / "anat"
    (d / "sub-02_ses-7T_run-2_T1w.nii.gz").write_bytes(b"x")
    with pytest.raises(ManifestError) as err:
        read_bids(tmp_path, BidsMatch(t3="3T*"))
    msg = str(err.value)
    assert "\n" not in msg and "sub-01: 2 3T scans match but no 7T" in msg and "sub-02: 2 t7 scans match" in msg
