"""Prediction with an imported published model: the training semantics on a template-grid scan, and a raw scan
through the registration path landing back on its own grid."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from synth7t.inference import PredictOptions, predict
from synth7t.io import Volume, load_volume, save_volume


def expected_on_template(ref, vol: np.ndarray, age: float, sex_f: float, n_slices: int, slice_dim: int = 1):
    """The authors' training semantics, written out by hand for slice axis 1 and 24 x 22 slices."""
    v = vol[vol > 0]
    p1, p99 = np.percentile(v, 1), np.percentile(v, 99)
    x = (vol - p1) / (p99 - p1)  # not clipped: the background is negative
    occupied = np.flatnonzero((vol > 0).any(axis=(0, 2)))
    mid = (occupied[0] + occupied[-1]) / 2
    n = vol.shape[1]
    out = np.zeros_like(vol, dtype=np.float32)
    with torch.no_grad():
        for j in range(n - 2):
            window = np.transpose(x[:, j:j + 3, :], (1, 0, 2))  # slices j, j+1, j+2 of axis 1: (3, 24, 22)
            inp = torch.from_numpy(np.pad(window, ((0, 0), (0, 0), (1, 1)))[None].astype(np.float32))  # 22 -> 24
            ctx = torch.tensor([[[sex_f], [age], [2 * (j - mid) / n_slices]]], dtype=torch.float32)
            y = ref(inp, torch.ones(1), ctx)[0, 0, :, 1:-1].numpy()
            out[:, j, :] = y  # window j..j+2 predicts slice j
    return out * (vol > 0)


def test_template_grid_scan_follows_the_training_semantics(authors_files, imported_model, thesis, tmp_path):
    tv = thesis.template_volume(seed=5)
    scan = save_volume(tmp_path / "sub-01_T1w.nii.gz", tv.with_data(tv.data * 3.7))  # on the template grid
    res = predict(imported_model, [scan], tmp_path / "out",
                  PredictOptions(preprocessed=True, age=71.0, sex="F", device="cpu", precision="32"), progress=False)
    assert not res.failed, res.failed
    folder = tmp_path / "out" / "sub-01_T1w"
    on_template = load_volume(folder / "syn7t_space-thesis7T.nii.gz")
    assert np.allclose(on_template.affine, tv.affine, atol=1e-5) and on_template.shape == tv.shape
    want = expected_on_template(authors_files["net"], tv.data * 3.7, 71.0, 1.0, thesis.SMALL["n_slices"])
    got = on_template.data
    scale = np.abs(want).max()
    assert scale > 0.01
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert (got[:, -2:, :] == 0).all()  # no window predicts the last two slices
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["transforms"]["method"].startswith("none")  # same grid: not registered
    assert np.allclose(prov["transforms"]["template7T_to_scan"], np.eye(4))
    # and the output over the input's own frame (canonical, 0.65 mm) overlays the scan
    native = load_volume(folder / "syn7t.nii.gz")
    back = load_volume(folder / "syn7t_space-thesis7T.nii.gz")
    from synth7t.preprocess.register import resample_to

    again = resample_to(back, native, order=1, antialias=False)
    inside = load_volume(folder / "mask.nii.gz").data > 0
    assert np.abs(again.data - native.data)[inside].max() <= 1e-4 * scale


def test_missing_age_or_sex_is_refused_in_one_line(imported_model, thesis, tmp_path):
    scan = save_volume(tmp_path / "a_T1w.nii.gz", thesis.template_volume(seed=6))
    r = subprocess.run([sys.executable, "-m", "synth7t.cli", "predict", str(imported_model), str(scan), "-o",
                        str(tmp_path / "out"), "--preprocessed", "--sex", "M"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "needs sex and age" in r.stdout + r.stderr or "needs age" in r.stdout + r.stderr
    assert not (tmp_path / "out" / "a_T1w" / "syn7t.nii.gz").exists()


def big_template(shape=(64, 56, 60), seed=0) -> Volume:
    """A 1 mm 'brain' large enough for a rigid registration: an ellipsoid of smooth structure."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    c = (np.array(shape, np.float32) - 1) / 2
    d = sum(((idx[i] - c[i]) / (0.4 * shape[i])) ** 2 for i in range(3))
    tex = gaussian_filter(rng.normal(0, 1, shape), 2.5)
    data = np.where(d < 1, 100 + 300 * tex + 30 * idx[0] / shape[0], 0).clip(0)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = -c
    return Volume(data.astype(np.float32), aff)


def rotation(deg_z: float, deg_x: float, t) -> np.ndarray:
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx
    m[:3, 3] = t
    return m


@pytest.fixture(scope="module")
def registered_model(thesis, tmp_path_factory):
    """An imported model whose templates are 1 mm grids of 64 x 56 x 60 (slices along axis 1: 64 x 60)."""
    from synth7t.preprocess.register import write_itk_affine
    from synth7t.thesis import import_thesis

    root = tmp_path_factory.mktemp("bigtemplate")
    params = {**thesis.SMALL, "slice_size": (64, 60), "n_slices": 56}
    ckpt = thesis.save_authors_checkpoint(thesis.reference_net(params), root / "ck.pt")
    (root / "p.txt").write_text(str(params))
    t3 = big_template(seed=0)
    to7 = rotation(0.0, 0.0, [2.0, 0.0, -1.0])  # 7T template points -> 3T template points: a 2 mm / 1 mm shift
    t7 = save_volume(root / "t7.nii.gz", Volume(t3.data, t3.affine))
    save_volume(root / "t3.nii.gz", t3)
    write_itk_affine(to7, root / "a.mat")
    model = import_thesis(ckpt, root / "p.txt", t7, root / "model", template_3t=root / "t3.nii.gz",
                          template_affine=root / "a.mat")
    return model, t3, to7


def test_a_scan_through_the_registration_path_lands_on_its_input(registered_model, tmp_path):
    from synth7t.preprocess.register import grid_for_zooms, resample_to

    model, t3, to7 = registered_model
    truth = rotation(9.0, -6.0, [4.0, -6.0, 3.0])  # scan points -> 3T template points
    lps = np.diag([-1.2, -1.2, 1.2, 1.0])  # an LPS-oriented 1.2 mm grid, moved
    lps[:3, 3] = [36.0, 36.0, -36.0]
    grid = Volume(np.zeros((60, 60, 60), np.float32), lps)
    scan = resample_to(t3, grid, order=1, world=truth)
    path = save_volume(tmp_path / "sub-02_T1w.nii.gz", scan)
    res = predict(model, [path], tmp_path / "out", PredictOptions(preprocessed=True, age=64, sex="M", device="cpu"),
                  progress=False)
    assert not res.failed, res.failed
    folder = tmp_path / "out" / "sub-02_T1w"
    prov = json.loads((folder / "provenance.json").read_text())
    rigid = np.array(prov["transforms"]["rigid_template3T_to_scan"])
    corners = np.array([[x, y, z, 1.0] for x in (-25, 25) for y in (-22, 22) for z in (-24, 24)])
    err = np.linalg.norm((corners @ rigid.T)[:, :3] - (corners @ np.linalg.inv(truth).T)[:, :3], axis=1)
    assert err.max() < 1.5, err  # the rigid registration found the motion (mm, over the brain's box)
    assert np.allclose(prov["transforms"]["template7T_to_scan"], rigid @ to7, atol=1e-6)
    # the output sits on the model's 0.65-1 mm grid over the scan's own canonical frame and overlays it
    syn = nib.load(folder / "syn7t.nii.gz")
    from synth7t.io import to_canonical

    canonical, _ = to_canonical(load_volume(path))
    shape, aff = grid_for_zooms(canonical, 1.0)
    assert syn.shape == shape and np.allclose(syn.affine, aff, atol=1e-4)
    out_brain = np.asarray(syn.dataobj) != 0
    scan_brain = resample_to(canonical, (shape, aff), order=0).data > 0
    dice = 2 * (out_brain & scan_brain).sum() / (out_brain.sum() + scan_brain.sum())
    assert dice > 0.9, dice
    on_template = load_volume(folder / "syn7t_space-thesis7T.nii.gz")
    assert on_template.shape == (64, 56, 60)


def test_bids_outputs_carry_the_template_space(imported_model, thesis, tmp_path):
    raw = tmp_path / "bids"
    (raw / "sub-01" / "anat").mkdir(parents=True)
    (raw / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (raw / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t68\tF\n")
    save_volume(raw / "sub-01" / "anat" / "sub-01_T1w.nii.gz", thesis.template_volume(seed=7))
    from synth7t.inference.bids import BidsQuery

    res = predict(imported_model, None, tmp_path / "deriv", PredictOptions(preprocessed=True, device="cpu", tta=True),
                  progress=False, bids=BidsQuery(raw))
    assert not res.failed, res.failed
    anat = tmp_path / "deriv" / "sub-01" / "anat"
    names = sorted(p.name for p in anat.iterdir())
    assert "sub-01_space-thesis7T_desc-synth7T_T1w.nii.gz" in names
    assert "sub-01_space-thesis7T_desc-synth7TUncertainty_T1w.nii.gz" in names
    assert "sub-01_desc-synth7T_T1w.nii.gz" in names
    meta = json.loads((anat / "sub-01_space-thesis7T_desc-synth7T_T1w.json").read_text())
    assert "template grid" in meta["Description"] and "thesis7T" in meta["SpatialReference"]
