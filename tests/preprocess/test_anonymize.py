"""Pseudonym keys and ID mapping files."""

import pytest

from synth7t.errors import ConfigError, InputError
from synth7t.manifest import Subject
from synth7t.preprocess import anonymize as an


def test_key_file_created_once(tmp_path):
    f = tmp_path / "k"
    k1 = an.load_or_create_key(f)
    assert an.load_or_create_key(f) == k1 and len(k1) == an.KEY_BYTES
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    f.write_text("zz")
    with pytest.raises(InputError, match="not a hex"):
        an.load_or_create_key(f)
    with pytest.raises(ConfigError, match="inside the work folder"):
        an.load_or_create_key(tmp_path / "w" / "k", work=tmp_path / "w")


def test_explicit_key_and_records(tmp_path):
    assert an.resolve_key(tmp_path / "w", b"x" * 16) == b"x" * 16
    with pytest.raises(ConfigError):
        an.resolve_key(tmp_path / "w", b"short")
    s = Subject("sub-007", tmp_path / "a.nii", age=64.5, sex="M", diagnosis="scd", extra={"site": "Lund"})
    rec = an.subject_record(s, "sabc")
    assert rec == {"id": "sabc", "age": 65, "sex": "M", "diagnosis": "scd", "group": "healthy"}


def test_mapping_merges(tmp_path):
    m = tmp_path / "priv" / "map.json"
    an.write_mapping(m, {"a": "s1"}, work=tmp_path / "w")
    an.write_mapping(m, {"b": "s2"}, work=tmp_path / "w")
    import json

    assert json.loads(m.read_text()) == {"a": "s1", "b": "s2"}
