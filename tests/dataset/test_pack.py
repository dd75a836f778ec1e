"""Packing: crop/pad geometry, clipped min-max, the store on disk, splits, re-runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from synth7t.dataset.cropnorm import (
    CropGeometry,
    clipped_minmax,
    crop_box,
    crop_pad,
    denormalize,
    make_geometry,
    uncrop,
)
from synth7t.dataset.pack import pack, unpack, valid_slices
from synth7t.dataset.splits import assign_splits, split_counts
from synth7t.errors import ConfigError, InputError
from synth7t.io import load_volume

from .conftest import make_work, write_subject


def test_crop_box_is_half_open_bbox():
    mask = np.zeros((10, 12, 8), np.uint8)
    mask[2:5, 3:9, 1] = 1
    mask[4, 10, 6] = 1
    assert crop_box(mask) == ((2, 5), (3, 11), (1, 7))
    with pytest.raises(ValueError, match="empty"):
        crop_box(np.zeros((4, 4, 4)))


def test_crop_pad_layout_and_uncrop_round_trip():
    rng = np.random.default_rng(0)
    vol = rng.random((10, 12, 8)).astype(np.float32)
    box = ((2, 5), (3, 11), (1, 7))  # h = 3, w = 8, Z = 6
    stack, geom = crop_pad(vol, box, target_hw=(5, 9), multiple=4)
    assert stack.shape == (6, 8, 12)  # (Z, round_up(5, 4), round_up(9, 4))
    assert geom.pad == ((2, 3), (2, 2))  # (8 - 3) // 2 = 2 before, 3 after; (12 - 8) // 2 = 2, 2
    # stack[k, bh + i, bw + j] = vol[x0 + i, y0 + j, z0 + k]
    assert stack[4, 2 + 1, 2 + 5] == vol[2 + 1, 3 + 5, 1 + 4]
    assert np.array_equal(stack[:, 2:5, 2:10], np.transpose(vol[2:5, 3:11, 1:7], (2, 0, 1)))
    assert stack[:, :2].sum() == 0 and stack[:, 5:].sum() == 0 and stack[:, :, :2].sum() == 0
    back = uncrop(stack, geom, fill=-1.0)
    assert np.array_equal(back[2:5, 3:11, 1:7], vol[2:5, 3:11, 1:7])
    assert np.all(back[:2] == -1.0) and np.all(back[:, :, 7:] == -1.0)
    assert CropGeometry.from_dict(json.loads(json.dumps(geom.to_dict()))) == geom


def test_make_geometry_checks():
    with pytest.raises(ValueError, match="does not fit in target"):
        make_geometry((10, 12, 8), ((0, 10), (0, 5), (0, 8)), target_hw=(8, 8))
    with pytest.raises(ValueError, match="does not fit in a grid"):
        make_geometry((10, 12, 8), ((0, 11), (0, 5), (0, 8)))
    g = make_geometry((10, 12, 8), ((0, 10), (0, 5), (0, 8)), None, 32)
    assert g.hw == (32, 32) and g.stack_shape == (8, 32, 32)


def test_clipped_minmax_against_hand_values():
    vol = np.arange(101, dtype=np.float32).reshape(101, 1, 1) * np.ones((1, 2, 1), np.float32)  # 0..100
    mask = np.ones_like(vol, np.uint8)
    mask[100, 0, 0] = 0
    vol[100, 0, 0] = 1e6  # outside the mask: ignored by the percentiles, 0 in the output
    normed, (lo, hi) = clipped_minmax(vol, mask, 10.0, 90.0)
    assert (lo, hi) == pytest.approx((10.0, 90.0))  # numpy's linear percentile of 0..100 (201 values)
    assert normed[50, 0, 0] == pytest.approx((50 - 10) / 80)
    assert normed[5, 0, 0] == 0.0 and normed[95, 0, 0] == 1.0 and normed[100, 0, 0] == 0.0
    assert normed.dtype == np.float32
    assert denormalize(normed[50, 0, 0], (lo, hi)) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="constant"):
        clipped_minmax(np.ones((3, 3, 3)), np.ones((3, 3, 3)))


def test_valid_slices_area_and_min_slice():
    m = np.zeros((6, 10, 10), np.uint8)
    m[1, 0, 0] = 1  # 1 voxel: 1 % of 100 is 1, not strictly more -> invalid
    m[2, :2, :1] = 1  # 2 voxels -> valid
    m[3:5] = 1  # 100 voxels
    assert valid_slices(m).tolist() == [2, 3, 4]
    assert valid_slices(m, min_slice=3).tolist() == [3, 4]


def test_split_counts_and_stratified_split():
    assert split_counts(10, (0.7, 0.15, 0.15)) == (7, 2, 1)  # remainders .5/.5 -> the earlier split wins
    assert split_counts(3, (0.7, 0.15, 0.15)) == (1, 1, 1)  # requested splits are never left empty
    assert split_counts(5, (3, 1, 1)) == (3, 1, 1)
    with pytest.raises(ConfigError, match="sum to 6"):
        split_counts(6, (3, 1, 1))
    with pytest.raises(ConfigError, match="sum to 1"):
        split_counts(6, (0.5, 0.2, 0.2))
    names = [f"s{i}" for i in range(40)]
    groups = ["ill" if i < 10 else "healthy" for i in range(40)]
    s = assign_splits(names, groups, (0.5, 0.25, 0.25), seed=3)
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(names)
    ill = {k: sum(n in v for n in names[:10]) for k, v in s.items()}
    assert ill == {"train": 5, "val": 3, "test": 2} or ill == {"train": 5, "val": 2, "test": 3}
    assert assign_splits(names, groups, (0.5, 0.25, 0.25), seed=3) == s  # seeded
    assert assign_splits(names, groups, (0.5, 0.25, 0.25), seed=4) != s


def test_pack_skips_and_splits(packed):
    _, store = packed
    meta = json.loads((store / "store.json").read_text())
    assert set(meta["skipped"]) == {"zrej", "zund"}
    assert "rejected" in meta["skipped"]["zrej"] and ".done" in meta["skipped"]["zund"]
    splits = meta["splits"]
    assert splits["predict"] == ["znot7"]
    seen = [n for k in ("train", "val", "test", "predict") for n in splits[k]]
    assert len(seen) == len(set(seen)) == 9  # a subject is in exactly one split
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (6, 1, 1)
    assert not (store / "znot7" / "t7.npy").exists()
    assert not list(store.rglob("*.tmp*"))


def test_pack_arrays_are_float16_memmaps_with_common_inplane_size(packed):
    _, store = packed
    meta = json.loads((store / "store.json").read_text())
    H, W = meta["hw"]
    assert H % 32 == 0 and W % 32 == 0
    for name, info in meta["subjects"].items():
        t3 = np.load(store / name / "t3.npy", mmap_mode="r")
        mask = np.load(store / name / "mask.npy", mmap_mode="r")
        assert isinstance(t3, np.memmap) and t3.dtype == np.float16 and mask.dtype == np.uint8
        assert t3.shape == mask.shape == tuple(info["shape"]) and t3.shape[1:] == (H, W)
        assert float(t3.max()) == 1.0 and float(t3.min()) == 0.0
        assert np.all(np.asarray(t3)[np.asarray(mask) == 0] == 0)  # background and padding are 0


@pytest.mark.parametrize("kind", ["t3", "t7"])
def test_unpack_denormalize_round_trip(packed, kind):
    work, store = packed
    meta = json.loads((store / "store.json").read_text())
    for name in ("s000", "s003"):
        orig = load_volume(work / name / f"{kind}.nii.gz").data
        mask = load_volume(work / name / "mask.nii.gz").data > 0
        lo, hi = meta["subjects"][name]["limits"][kind]
        stack = np.load(store / name / f"{kind}.npy", mmap_mode="r")
        back = denormalize(unpack(store, name, stack), (lo, hi))
        assert back.shape == orig.shape
        inside = mask & (orig >= lo) & (orig <= hi)
        assert inside.sum() > 0.9 * mask.sum()
        err = np.abs(back[inside] - orig[inside]).max()
        assert err <= (hi - lo) * 2.0**-11  # float16 has 11 significant bits in [0, 1]
        assert np.allclose(back[mask & (orig < lo)], lo) and np.allclose(back[mask & (orig > hi)], hi, rtol=1e-3)
        m_back = unpack(store, name, np.load(store / name / "mask.npy"))
        assert np.array_equal(m_back > 0, mask)  # the crop keeps every brain voxel


def test_valid_slices_respect_min_slice(packed):
    _, store = packed
    info = json.loads((store / "store.json").read_text())["subjects"]["znot7"]
    z0 = info["geometry"]["box"][2][0]
    assert info["min_slice"] == 8 - z0 > 0
    assert min(info["valid_slices"]) == info["min_slice"]


def test_rerun_is_a_noop_and_changes_need_overwrite(tmp_path):
    work = make_work(tmp_path, 3)
    store = tmp_path / "store"
    pack(work, store, split=(1, 1, 1), progress=False)
    stamp = os.stat(store / "store.json").st_mtime_ns
    pack(work, store, split=(1, 1, 1), progress=False)
    assert os.stat(store / "store.json").st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="overwrite=True"):
        pack(work, store, split=(1, 1, 1), seed=5, progress=False)
    write_subject(work, "s999", seed=9)  # a new finished subject also changes the inputs
    pack(work, store, split=(2, 1, 1), overwrite=True, progress=False)
    meta = json.loads((store / "store.json").read_text())
    assert "s999" in meta["subjects"]


def test_pack_errors(tmp_path):
    with pytest.raises(InputError, match="work folder not found"):
        pack(tmp_path / "nope", tmp_path / "store")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no usable subject"):
        pack(tmp_path / "empty", tmp_path / "store", progress=False)
    with pytest.raises(ConfigError, match="power of two"):
        pack(tmp_path / "empty", tmp_path / "store", multiple=24)


def test_store_records_the_preprocessing(packed):
    """store.json's ``preprocessing`` is the subjects' shared recipe, read from their provenance.json."""
    _, store = packed
    prep = json.loads((store / "store.json").read_text())["preprocessing"]
    assert prep["skullstrip"] == "deepbet" and prep["n4_3t"] == "3t" and prep["n4_7t"] == "7t"
    assert prep["n4_7t_first"] == "3t" and prep["t3_already_corrected"] is False
    assert prep["registration_resolution_mm"] == 1.0 and prep["registration_transform"] == "SyN"
    assert prep["voxel_size_mm"] == [0.65, 0.65, 0.65] and prep["pipeline_version"] >= 1
    assert prep["normalization"] == {"method": "clipped_minmax", "lower_pct": 1.0, "upper_pct": 99.0}
    assert "CSF" in prep["csf"] and prep["skullstrip_used"] == {"deepbet": 9}  # 8 + the one without 7T
    assert "unknown" not in prep


def test_pack_refuses_mixed_preprocessing_unless_allowed(tmp_path, caplog):
    work = make_work(tmp_path, 4)
    write_subject(work, "zthr", seed=9, prep={"skullstrip": "threshold", "n4_3t": "demo"})
    with pytest.raises(ConfigError, match=r"different settings \(skullstrip: .*n4_3t: .*allow-mixed"):
        pack(work, tmp_path / "store", split=(3, 1, 1), progress=False)
    assert not (tmp_path / "store" / "store.json").exists()
    with caplog.at_level("WARNING"):
        pack(work, tmp_path / "store", split=(3, 1, 1), progress=False, allow_mixed=True)
    assert "different settings" in caplog.text
    prep = json.loads((tmp_path / "store" / "store.json").read_text())["preprocessing"]
    assert prep["skullstrip"] == {"mixed": {"deepbet": ["s000", "s001", "s002", "s003"], "threshold": ["zthr"]}}
    assert prep["n4_7t"] == "7t"  # shared settings are still plain values


def test_pack_without_provenance_records_unknown(tmp_path, caplog):
    work = tmp_path / "work"
    for i in range(3):
        write_subject(work, f"p{i}", seed=i, provenance=False)
    with caplog.at_level("WARNING"):
        pack(work, tmp_path / "store", split=(1, 1, 1), progress=False)
    prep = json.loads((tmp_path / "store" / "store.json").read_text())["preprocessing"]
    assert prep["unknown"] == ["p0", "p1", "p2"] and "skullstrip" not in prep
    assert "no provenance.json" in caplog.text
