"""Bad NIfTI headers (voxel size 0, negative, NaN or absurd; NaN or singular sform; NaN qform; no sform and no
qform) are refused by every command that reads a scan, with one line naming the file and the header field.

nibabel's loader silently "fixes" pixdim 0 (to 1) and negative pixdim (to its absolute value) and builds an
affine from whichever of sform/qform is set, or makes a grid up from pixdim when neither is: so these headers
are crafted by patching the stored bytes, not through nibabel's writer (which would repair them).
"""

from __future__ import annotations

import gzip
import io
import json

import nibabel as nib
import numpy as np
import pytest

from synth7t.errors import InputError
from synth7t.io import Volume, load_volume, save_volume

# name -> (header fields to overwrite, text the one-line error must contain)
BAD_HEADERS = {
    "pixdim0": ({"pixdim": [0, 1, 1]}, "pixdim[1:4]"),
    "pixdim_negative": ({"pixdim": [1, -1, 1]}, "pixdim[1:4]"),
    "pixdim_nan": ({"pixdim": [1, 1, np.nan]}, "pixdim[1:4]"),
    "pixdim_absurd": ({"pixdim": [1, 1, 500]}, "pixdim[1:4]"),
    "pixdim0_sform_only": ({"pixdim": [0, 1, 1], "qform_code": 0}, "pixdim[1:4]"),
    "sform_nan": ({"srow_y": [0, np.nan, 0, 0]}, "srow_y"),
    "sform_singular": ({"srow_z": [0, 0, 0, 5]}, "srow_x/srow_y/srow_z"),
    "qform_nan": ({"quatern_c": np.nan, "sform_code": 0}, "quatern_c"),
    "no_sform_no_qform": ({"sform_code": 0, "qform_code": 0}, "sform_code and qform_code"),
}


def _brain(shape=(30, 36, 24)) -> np.ndarray:
    idx = np.indices(shape).astype(np.float32)
    c = (np.asarray(shape, np.float32) / 2)[:, None, None, None]
    r = np.asarray([11, 13, 9], np.float32)[:, None, None, None]
    d = np.sqrt((((idx - c) / r) ** 2).sum(0))
    return (np.where(d < 0.45, 900, np.where(d < 0.8, 600, 300)) * (d < 1.0)).astype(np.float32)


def write_bad_header(path, fields: dict):
    """A valid 1 mm scan (sform and qform set) whose stored header then gets ``fields`` as raw values."""
    save_volume(path, Volume(_brain(), np.diag([1.0, 1.0, 1.0, 1.0])))
    raw = gzip.decompress(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    for key, value in fields.items():
        if key == "pixdim":
            hdr["pixdim"][1:4] = value
        else:
            hdr[key] = value
    path.write_bytes(gzip.compress(hdr.binaryblock + raw[len(hdr.binaryblock):]))
    return path


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_load_volume_refuses_bad_header_naming_the_field(tmp_path, case):
    fields, field_text = BAD_HEADERS[case]
    path = write_bad_header(tmp_path / f"{case}.nii.gz", fields)
    before = path.read_bytes()
    with pytest.raises(InputError) as info:
        load_volume(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: header field") and field_text in msg and "\n" not in msg, msg
    assert path.read_bytes() == before


def test_nibabel_alone_would_accept_a_voxel_size_0_header(tmp_path):
    """Why the raw header is read: nibabel repairs pixdim 0 to 1 and its affine looks fine."""
    path = write_bad_header(tmp_path / "zero.nii.gz", {"pixdim": [0, 1, 1]})
    with nib.imageglobals.LoggingOutputSuppressor():
        img = nib.load(str(path))
    assert img.header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    assert abs(np.linalg.det(img.affine[:3, :3])) > 0.5


def test_good_header_variants_still_load(tmp_path):
    """sform only, qform only (both valid) and an anisotropic 0.7 x 0.7 x 3 mm grid are accepted."""
    for name, fields in {"sform_only": {"qform_code": 0}, "qform_only": {"sform_code": 0}}.items():
        assert load_volume(write_bad_header(tmp_path / f"{name}.nii.gz", fields)).shape == (30, 36, 24)
    aniso = save_volume(tmp_path / "aniso.nii.gz", Volume(_brain(), np.diag([0.7, 0.7, 3.0, 1.0])))
    np.testing.assert_allclose(load_volume(aniso).zooms, [0.7, 0.7, 3.0], atol=1e-6)


def _one_line_about(output: str, path) -> str:
    """The output holds no traceback and exactly one distinct line that names ``path``; return that line."""
    assert "Traceback" not in output, output
    lines = {line.strip().removeprefix("error: ").removeprefix("failed: ") for line in output.splitlines()
             if str(path) in line}
    lines = {line[line.index(str(path)):] for line in lines}
    assert len(lines) == 1, output
    return lines.pop()


@pytest.mark.parametrize("case", ["pixdim0", "pixdim_negative", "pixdim_nan", "sform_nan", "sform_singular",
                                  "no_sform_no_qform"])
def test_cli_predict_refuses_bad_header(tiny_model, tmp_path, case):
    from typer.testing import CliRunner

    from synth7t.cli import app

    fields, field_text = BAD_HEADERS[case]
    scan = write_bad_header(tmp_path / "scan.nii.gz", fields)
    before = scan.read_bytes()
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(tiny_model), str(scan), "-o", str(out), "--preprocessed",
                                   "--device", "cpu"])
    assert res.exit_code != 0, res.output
    line = _one_line_about(res.output, scan)
    assert field_text in line and "header field" in line, line
    assert not (out / "scan").exists()  # nothing written for it
    assert scan.read_bytes() == before


@pytest.mark.parametrize("case", ["pixdim0", "sform_singular", "qform_nan"])
def test_cli_preprocess_refuses_bad_header(tmp_path, case):
    from typer.testing import CliRunner

    from synth7t.cli import app

    fields, field_text = BAD_HEADERS[case]
    raw = tmp_path / "raw"
    raw.mkdir()
    scan = write_bad_header(raw / "sub01_3T.nii.gz", fields)
    before = scan.read_bytes()
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"subject,t3\nsub01,{scan}\n")
    work = tmp_path / "work"
    res = CliRunner().invoke(app, ["preprocess", str(manifest), "-o", str(work), "--skullstrip", "threshold",
                                   "--preset", "demo", "--key-file", str(tmp_path / "key")])
    assert res.exit_code != 0, res.output
    failed = [line for line in res.output.splitlines() if line.strip().startswith("failed: sub01")]
    assert len(failed) == 1 and "Traceback" not in res.output, res.output
    # the work folder never holds input paths: the scan is named by its manifest role, <t3>
    assert "<t3>: header field" in failed[0] and field_text in failed[0], failed[0]
    assert not list(work.glob("*/*.nii.gz")) if work.exists() else True  # no image written
    cohort = json.loads((work / "cohort.json").read_text()) if (work / "cohort.json").exists() else {}
    assert all(s.get("status") == "failed" for s in cohort.get("subjects", {}).values())
    assert scan.read_bytes() == before


def test_cli_pack_skips_subject_with_bad_header(tmp_path):
    """pack reads the work folder's NIfTI files: a subject whose scan has a bad header is skipped (pack's rule
    for any unusable subject), with the file and field in the log and in store.json, and nothing packed of it."""
    import importlib.util
    from pathlib import Path

    from typer.testing import CliRunner

    from synth7t.cli import app

    spec = importlib.util.spec_from_file_location(
        "ds_conftest", Path(__file__).resolve().parents[1] / "dataset" / "conftest.py")
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    work = ds.make_work(tmp_path, 4)
    t3 = work / "s000" / "t3.nii.gz"
    raw = gzip.decompress(t3.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    hdr["pixdim"][1:4] = [0, 1, 1]
    t3.write_bytes(gzip.compress(hdr.binaryblock + raw[len(hdr.binaryblock):]))
    store = tmp_path / "store"
    res = CliRunner().invoke(app, ["pack", str(work), "-o", str(store), "--multiple", "8"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "should be non-zero" not in res.output, res.output
    meta = json.loads((store / "store.json").read_text())
    assert meta["skipped"]["s000"] == (f"{t3}: header field pixdim[1:4] gives absurd voxel size (0, 1, 1) mm; "
                                       "expected finite sizes with 0 < size <= 10 mm")
    assert "s000" not in meta["subjects"] and not (store / "s000").exists()
