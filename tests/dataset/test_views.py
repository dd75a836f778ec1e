"""Multi-view samples (data.views): coronal and sagittal slice windows cut from the axial-first store, their fixed
size, their slice-position covariate and view code, checked against hand-written indices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synth7t.dataset import views as V
from synth7t.dataset.slices import SliceDataset, VolumeSlices

from .conftest import write_store

Z, H, W = 6, 8, 10


def _coded_store(tmp_path, min_slice: int = 0, empty_w: int = 0):
    """One subject whose t3 voxel (z, h, w) holds z*100 + h*10 + w + 1 (exact in float16) and t7 that + 0.5; the
    first ``empty_w`` columns (w) of t3 are 0 (outside the brain)."""
    root = tmp_path / "store"
    write_store(root, 1, shape=(Z, H, W))
    z, h, w = np.meshgrid(np.arange(Z), np.arange(H), np.arange(W), indexing="ij")
    code = (z * 100 + h * 10 + w + 1).astype(np.float16)
    code[:, :, :empty_w] = 0
    for kind, arr in (("t3", code), ("t7", (code + 0.5).astype(np.float16))):
        mm = np.load(root / "m0000" / f"{kind}.npy", mmap_mode="r+")
        mm[:] = arr
        mm.flush()
    meta = json.loads((root / "store.json").read_text())
    meta["subjects"]["m0000"]["min_slice"] = min_slice
    (root / "store.json").write_text(json.dumps(meta))
    return root, code.astype(np.float32)


def _index(ds, view: str, j: int) -> int:
    hits = [i for i in range(len(ds)) if ds.view_of(i) == view and ds.locate(i)[1] == j]
    assert len(hits) == 1
    return hits[0]


def test_samples_along_each_axis_are_the_volume_slices(tmp_path):
    root, t3 = _coded_store(tmp_path)
    ds = SliceDataset(root, "train", views=("axial", "coronal", "sagittal"), view_code=True)
    assert len(ds) == Z + W + H  # every slice of each view holds brain (the mask is all ones)
    assert ds.shape == (8, 10)  # axial 8x10, coronal 8x6, sagittal 6x10: the largest on each axis
    # axial slice 2: slices 1, 2, 3 as they are
    s = ds[_index(ds, "axial", 2)]
    np.testing.assert_array_equal(s["input"], t3[[1, 2, 3]])
    np.testing.assert_array_equal(s["target"][0], t3[2] + 0.5)
    # coronal slice 4 (along W): rows = H, cols = Z centred in 10 (2 zero columns before)
    s = ds[_index(ds, "coronal", 4)]
    assert s["input"].shape == (3, 8, 10)
    for k, w in enumerate((3, 4, 5)):
        for h in range(H):
            for z in range(Z):
                assert s["input"][k, h, 2 + z] == t3[z, h, w]
    assert not s["input"][:, :, :2].any() and not s["input"][:, :, 8:].any()
    assert s["target"][0, 5, 2 + 3] == t3[3, 5, 4] + 0.5
    # sagittal slice 3 (along H): rows = Z centred in 8 (1 zero row before), cols = W
    s = ds[_index(ds, "sagittal", 3)]
    for k, h in enumerate((2, 3, 4)):
        np.testing.assert_array_equal(s["input"][k, 1:1 + Z, :], t3[:, h, :])
    np.testing.assert_array_equal(s["mask"][0, 1:1 + Z], 1)
    assert not s["mask"][0, 0].any()
    # edges are replicated as on the axial view: coronal slice 0 reads w = 0, 0, 1
    s = ds[_index(ds, "coronal", 0)]
    np.testing.assert_array_equal(s["input"][:, 0, 2:8], t3[:, 0, [0, 0, 1]].T)


def test_position_covariate_and_code_per_view(tmp_path):
    root, _ = _coded_store(tmp_path, empty_w=3)  # no brain signal in columns 0-2
    ds = SliceDataset(root, "train", views=("axial", "coronal", "sagittal"), view_code=True)
    pos = 6  # slice_position in the context vector
    assert ds[_index(ds, "axial", 0)]["context"][pos] == pytest.approx((0 - 2.5) / 3)
    # coronal: the brain spans w = 3..9, centre 6, half-extent 3.5
    assert ds[_index(ds, "coronal", 8)]["context"][pos] == pytest.approx((8 - 6) / 3.5)
    # sagittal: the brain spans h = 0..7, centre 3.5, half-extent 4
    assert ds[_index(ds, "sagittal", 1)]["context"][pos] == pytest.approx((1 - 3.5) / 4)
    for view in V.VIEWS:
        c = ds[_index(ds, view, 4)]["context"]
        assert c.shape == (10,)
        np.testing.assert_array_equal(c[7:], V.view_code(view))
    single = SliceDataset(root, "train", views=("coronal",))
    assert single.shape == (8, 6) and single[0]["context"].shape == (7,)


def test_qc_cut_slices_are_left_out_of_every_view(tmp_path):
    root, t3 = _coded_store(tmp_path, min_slice=2)
    ds = SliceDataset(root, "train", views=("coronal", "sagittal"))
    assert ds.shape == (8, 10)  # coronal 8x6 and sagittal 6x10
    cor = ds[_index(ds, "coronal", 4)]  # Z in the columns, from column 2
    for key in ("input", "target", "mask"):
        assert not cor[key][:, :, 2:4].any(), key
    assert cor["input"][0, 0, 4] == t3[2, 0, 3]
    sag = ds[_index(ds, "sagittal", 4)]  # Z in the rows, from row 1
    assert not sag["target"][:, 1:3].any() and sag["target"][0, 3, 0] == t3[2, 4, 0] + 0.5


def test_multiview_patch_size_and_batches(tmp_path):
    root, _ = _coded_store(tmp_path)
    ds = SliceDataset(root, "train", views=("axial", "sagittal"), min_size=12, multiple=4)
    assert ds.shape == (12, 12)  # Z 6 -> 8 (multiple of 4); then at least the patch side
    shapes = {ds[i]["input"].shape for i in range(len(ds))}
    assert shapes == {(3, 12, 12)}


def test_views_helpers_round_trip():
    stack = np.arange(Z * H * W, dtype=np.float32).reshape(Z, H, W)
    for view in V.VIEWS:
        vs = V.to_view(stack, view)
        assert vs.shape == V.view_shape(stack.shape, view)
        np.testing.assert_array_equal(V.from_view(vs, view), stack)
        j = 2
        np.testing.assert_array_equal(V.read_window(stack, view, [j])[0], vs[j])
    assert V.to_view(stack, "coronal")[4, 5, 3] == stack[3, 5, 4]
    assert V.to_view(stack, "sagittal")[5, 3, 4] == stack[3, 5, 4]
    with pytest.raises(ValueError, match="repeat"):
        V.check_views(["axial", "axial"])


def test_volume_slices_take_a_views_positions_and_code():
    stack = np.ones((4, 8, 8), np.float32)
    pos = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    batches = list(VolumeSlices(stack, 3, batch_size=3, positions=pos, extra=V.view_code("sagittal")))
    ctx = np.concatenate([b["context"] for b in batches])
    assert ctx.shape == (4, 10)
    np.testing.assert_allclose(ctx[:, 6], pos)
    np.testing.assert_array_equal(ctx[:, 7:], np.tile([0, 0, 1], (4, 1)))


def test_left_right_flip_is_the_mirrored_brain_in_every_view(tmp_path):
    """data.augment.flip_lr mirrors the anatomical R axis (the stack's axis H) whatever the view: a flipped sample of
    a brain equals the sample of its mirror image (a store whose stacks are flipped along H) at the mirrored
    position: the same slice index for axial and coronal views (R is their rows), slice H - 1 - j for the sagittal
    view (cut along R), whose slice-position covariate changes sign."""
    from synth7t.dataset.augment import Augmenter, FlipLR, replay

    root, code = _coded_store(tmp_path / "a", empty_w=3)
    mirror = tmp_path / "b" / "store"
    write_store(mirror, 1, shape=(Z, H, W))
    for kind, arr in (("t3", code), ("t7", np.where(code > 0, code + 0.5, 0.5))):
        mm = np.load(mirror / "m0000" / f"{kind}.npy", mmap_mode="r+")
        mm[:] = arr[:, ::-1, :].astype(np.float16)
        mm.flush()
    mm = np.load(root / "m0000" / "t7.npy", mmap_mode="r+")
    mm[:] = np.where(code > 0, code + 0.5, 0.5).astype(np.float16)
    mm.flush()
    kw = {"views": ("axial", "coronal", "sagittal"), "view_code": True}
    ds, dm = SliceDataset(root, "train", **kw), SliceDataset(mirror, "train", **kw)
    pos = 6
    for view, n in (("axial", Z), ("coronal", W), ("sagittal", H)):
        for j in range(n):
            flipped = FlipLR()(ds[_index(ds, view, j)])
            ref = dm[_index(dm, view, H - 1 - j if view == "sagittal" else j)]
            for key in ("input", "target", "mask", "context"):
                np.testing.assert_array_equal(flipped[key], ref[key], err_msg=f"{view} {j} {key}")
    s = ds[_index(ds, "sagittal", 1)]
    assert FlipLR()(s)["context"][pos] == pytest.approx(-(1 - 3.5) / 4) and s["context"][pos] < 0
    # drawn with probability p, recorded and replayed like the other augmentations
    aug = Augmenter({"flip_lr": {"enabled": True, "p": 0.5}})
    raw = ds[_index(ds, "axial", 2)]
    out = [aug(raw, rng=np.random.default_rng(i)) for i in range(40)]
    n_flipped = sum(json.loads(o["augment"]) == [{"name": "flip_lr"}] for o in out)
    assert 8 < n_flipped < 32 and all(o["augment"] in ("[]", '[{"name": "flip_lr"}]') for o in out)
    for o in out:
        np.testing.assert_array_equal(replay(raw, o["augment"])["input"], o["input"])
