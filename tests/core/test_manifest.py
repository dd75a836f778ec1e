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
