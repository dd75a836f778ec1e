"""preprocess --deterministic: N4, skull stripping and SyN give bit-identical work folders whatever the cores
(one thread, one process or a pool), and the setting is recorded in provenance and the parameter hash."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from synth7t.manifest import Subject
from synth7t.preprocess.pipeline import PreprocessConfig, preprocess

# N4 (demo preset), threshold strip, SyN (the fast iterations) at 3 mm: every ITK step whose result can depend
# on the thread count
SETTINGS = {"skullstrip": "threshold", "fast": True, "registration_resolution_mm": 3.0, "progress": False,
            "deterministic": True}
KEY = b"d" * 32


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("pp_conftest_det", Path(__file__).with_name("conftest.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    raw = tmp_path_factory.mktemp("raw")
    rows = []
    for i in range(2):
        p3, p7 = helpers.write_pair(raw, f"d{i}", helpers._template_small(), seed=i)
        rows.append(Subject(f"d{i}", p3, p7, age=60 + i, sex="F"))
    return rows


def _contents(work: Path) -> dict[str, bytes]:
    """Every file's bytes (gzip streams decompressed: their header holds a time), provenance without timings."""
    out = {}
    for f in sorted(work.rglob("*")):
        if not f.is_file() or f.suffix == ".lock":
            continue
        rel = f.relative_to(work).as_posix()
        data = f.read_bytes()
        if f.name.endswith(".gz"):
            data = gzip.decompress(data)
        elif f.name == "provenance.json":
            prov = json.loads(data)
            prov.pop("timings_s", None)
            data = json.dumps(prov, sort_keys=True).encode()
        out[rel] = data
    return out


def test_work_folders_are_bit_identical_whatever_the_cores(subjects, tmp_path):
    runs = {"1 thread": dict(threads=1, jobs=1), "2 threads": dict(threads=2, jobs=1)}  # a pool: test_cores.py
    # ANTs reads its thread count once per process: register here first at 2 threads, so that a deterministic run
    # that worked in this process would inherit them (it must not: it runs its subjects in fresh processes)
    preprocess(subjects[:1], tmp_path / "warm", pseudonym_key=KEY, **{**SETTINGS, "deterministic": False}, threads=2)
    contents = {}
    for name, run in runs.items():
        res = preprocess(subjects, tmp_path / name.replace(" ", "_"), pseudonym_key=KEY, **SETTINGS, **run)
        assert len(res.done) == 2 and not res.failed, res.failed
        assert res.threads == 1  # every subject at one thread: --jobs fills the cores
        contents[name] = _contents(tmp_path / name.replace(" ", "_"))
    first = contents["1 thread"]
    assert any(k.endswith("0GenericAffine.mat") for k in first) and any(k.endswith("1Warp.nii.gz") for k in first)
    for name, other in contents.items():
        assert other.keys() == first.keys()
        differ = [k for k in first if other[k] != first[k]]
        assert differ == [], f"{name}: {differ}"
    prov = json.loads(next((tmp_path / "1_thread").glob("*/provenance.json")).read_text())
    assert prov["params"]["deterministic"] is True


def test_deterministic_is_in_the_hash_only_when_on():
    off, on = PreprocessConfig(), PreprocessConfig(deterministic=True)
    assert "deterministic" not in off.method_params()  # earlier work folders keep their hash
    assert on.method_params()["deterministic"] is True and on.params_hash() != off.params_hash()
    assert PreprocessConfig(threads=3).params_hash() == off.params_hash()  # the cores are no setting
