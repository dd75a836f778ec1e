"""Packing persons with several 3T scans (issue 16): one store entry per pair, one split per person."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from synth7t.dataset.pack import pack
from synth7t.dataset.slices import SliceStore
from synth7t.errors import InputError
from synth7t.io import write_json

from .conftest import make_work, write_subject


def write_person(work, name: str, n_scans: int, *, seed: int, group=None, rejected=()) -> list[str]:
    """A multi-scan work folder (docs/data-layout.md): the person's 7T and masks, ``scans/<code>/`` per 3T.

    Returns the store names ``<name>_<code>`` of the scans."""
    person = write_subject(work, name, seed=seed, group=group)
    codes = [f"{seed:02d}{k:04x}" for k in range(n_scans)]
    for k, code in enumerate(codes):
        scan = person / "scans" / code
        scan.mkdir(parents=True)
        shutil.copy(person / "t3.nii.gz", scan / "t3.nii.gz")
        shutil.copy(person / "provenance.json", scan / "provenance.json")
        qc = json.loads((person / "qc.json").read_text())
        write_json(scan / "qc.json", {**qc, "rejected": code in rejected or k in rejected})
        (scan / ".done").write_text(json.dumps({"params_hash": "abc"}))
    for f in ("t3.nii.gz", "qc.json"):
        (person / f).unlink()
    subj = json.loads((person / "subject.json").read_text())
    write_json(person / "subject.json", {**subj, "scans": {c: {"gap_days": 10.0 * k} for k, c in enumerate(codes)}})
    return [f"{name}_{c}" for c in codes]


def test_all_pairs_of_a_person_land_in_one_split(tmp_path):
    work = make_work(tmp_path, 4)  # four single-pair subjects, today's layout
    persons = {f"p{i}": write_person(work, f"p{i}", 2 + i % 2, seed=10 + i, group=("healthy", "ill")[i % 2])
               for i in range(8)}
    meta = json.loads(pack(work, tmp_path / "store", split=(0.5, 0.25, 0.25), seed=3, progress=False).read_text())
    split_of = {n: k for k, names in meta["splits"].items() for n in names}
    for person, pairs in persons.items():
        assert {split_of[p] for p in pairs} == {split_of[pairs[0]]}, person  # no person in two splits
        assert all(meta["subjects"][p]["person"] == person for p in pairs)
    counts = {k: len({meta["subjects"][n].get("person", n) for n in v}) for k, v in meta["splits"].items()}
    assert counts == {"train": 6, "val": 3, "test": 3, "predict": 0}  # fractions are of persons
    assert set(split_of) == set(meta["subjects"]) == {f"s{i:03d}" for i in range(4)} | {
        p for pairs in persons.values() for p in pairs}
    entry = meta["subjects"][persons["p1"][1]]
    assert entry["gap_days"] == 10.0 and entry["scan"] == persons["p1"][1].split("_")[1]
    assert "person" not in meta["subjects"]["s000"]  # single pairs are written as before
    store = SliceStore(tmp_path / "store")
    a, b = persons["p0"]
    assert np.array_equal(store.array(a, "t7"), store.array(b, "t7"))  # one 7T, shared by the person's pairs


def test_a_rejected_scan_drops_only_its_pair(tmp_path):
    work = tmp_path / "work"
    pairs = write_person(work, "p0", 3, seed=1, rejected=(1,))
    meta = json.loads(pack(work, tmp_path / "store", progress=False).read_text())
    assert sorted(meta["subjects"]) == [pairs[0], pairs[2]]
    assert "rejected" in meta["skipped"][pairs[1]]
    (work / "p0" / ".done").unlink()  # the person's 7T unfinished: none of its pairs is usable
    with pytest.raises(InputError, match="no usable subject"):
        pack(work, tmp_path / "store2", progress=False)
