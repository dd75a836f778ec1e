"""synth7t.io: round trips, orientation, atomic writes, header scrub, and refusal of bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from synth7t.errors import InputError
from synth7t.io import (
    Volume,
    atomic_path,
    from_canonical,
    load_volume,
    save_volume,
    to_canonical,
    voxel_to_world,
)


def _write_raw(path, data, affine, descrip=b""):
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = descrip
    nib.save(img, str(path))
    return path


def test_round_trip_oblique_lps(tmp_path, blob_volume):
    path = save_volume(tmp_path / "v.nii.gz", blob_volume)
    back = load_volume(path)
    np.testing.assert_array_equal(back.data, blob_volume.data)
    np.testing.assert_allclose(back.affine, blob_volume.affine, atol=1e-5)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1


def test_canonical_is_ras_and_exactly_invertible(blob_volume):
    assert blob_volume.orientation != "RAS"
    can, info = to_canonical(blob_volume)
    assert can.orientation == "RAS"
    # same world position for the same voxel value: check the brightest voxel's world coordinate
    i_src = np.unravel_index(np.argmax(blob_volume.data), blob_volume.shape)
    i_can = np.unravel_index(np.argmax(can.data), can.shape)
    np.testing.assert_allclose(voxel_to_world(blob_volume.affine, i_src), voxel_to_world(can.affine, i_can), atol=1e-6)
    back = from_canonical(can, info)
    np.testing.assert_array_equal(back.data, blob_volume.data)
    np.testing.assert_array_equal(back.affine, blob_volume.affine)


def test_header_scrubbed_and_input_untouched(tmp_path, blob_volume):
    src = _write_raw(tmp_path / "in.nii", blob_volume.data, blob_volume.affine, descrip=b"Patient John Doe 1950-01-01")
    src_bytes = src.read_bytes()
    vol = load_volume(src)
    out = save_volume(tmp_path / "out.nii.gz", vol)
    hdr = nib.load(str(out)).header
    for key in ("descrip", "db_name", "aux_file", "intent_name"):
        assert bytes(hdr[key]).strip(b"\x00") == b""
    assert b"John" not in gzip.decompress(out.read_bytes())
    assert src.read_bytes() == src_bytes


def test_save_refuses_to_overwrite_input(tmp_path, blob_volume):
    src = save_volume(tmp_path / "in.nii.gz", blob_volume)
    with pytest.raises(InputError, match="refusing to write over an input"):
        save_volume(src, blob_volume, inputs=(src,))


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "x.json"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_mgz_and_single_volume_4d(tmp_path, blob_volume):
    mgz = tmp_path / "v.mgz"
    nib.save(nib.MGHImage(blob_volume.data, blob_volume.affine), str(mgz))
    assert load_volume(mgz).shape == blob_volume.shape
    four = _write_raw(tmp_path / "four.nii.gz", blob_volume.data[..., None], blob_volume.affine)
    assert load_volume(four).shape == blob_volume.shape


def _bad_cases(tmp_path, vol):
    aff = vol.affine
    data = vol.data
    cases = {}
    cases["file not found"] = tmp_path / "missing.nii.gz"
    trunc = tmp_path / "trunc.nii.gz"
    full = save_volume(tmp_path / "full.nii.gz", vol).read_bytes()
    trunc.write_bytes(full[: len(full) // 2])
    cases["truncated or corrupt gzip"] = trunc
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"this is not a nifti file at all" * 20)
    cases["cannot be read as NIfTI"] = junk
    cases["not a NIfTI/MGH file"] = tmp_path / "notes.txt"
    (tmp_path / "notes.txt").write_text("hello")
    cases["4-D image with 3 volumes"] = _write_raw(tmp_path / "4d.nii.gz", np.stack([data] * 3, -1), aff)
    cases["2-D image"] = _write_raw(tmp_path / "2d.nii.gz", data[:, :, 0], aff)
    nan = data.copy()
    nan[3, 3, 3] = np.nan
    cases["1 NaN/Inf voxel"] = _write_raw(tmp_path / "nan.nii.gz", nan, aff)
    cases["all zeros"] = _write_raw(tmp_path / "zero.nii.gz", np.zeros_like(data), aff)
    big = aff.copy()
    big[:3, :3] *= 20
    cases["absurd voxel size"] = _write_raw(tmp_path / "big.nii.gz", data, big)
    sing = aff.copy()
    sing[:3, 2] = sing[:3, 1]
    cases["singular affine"] = _write_raw(tmp_path / "sing.nii.gz", data, sing)
    return cases


def test_bad_inputs_give_one_line_naming_the_file(tmp_path, blob_volume):
    for expected, path in _bad_cases(tmp_path, blob_volume).items():
        with pytest.raises(InputError) as info:
            load_volume(path)
        msg = str(info.value)
        assert expected in msg, (expected, msg)
        assert str(path) in msg and "\n" not in msg


def test_with_data_checks_shape(blob_volume):
    with pytest.raises(ValueError, match="shape"):
        blob_volume.with_data(np.zeros((2, 2, 2)))
    assert isinstance(blob_volume.with_data(blob_volume.data * 2), Volume)
