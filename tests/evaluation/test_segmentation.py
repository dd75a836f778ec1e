"""DICE on known label maps; the offline Atropos segmenter on a tiny three-tissue phantom."""

from __future__ import annotations

import math
import os
import sys
import tempfile

import numpy as np
import pytest

from synth7t.evaluation import segmentation as S
from synth7t.io import Volume


def test_dice_per_label_hand():
    a = np.zeros((4, 4, 1), int)
    b = np.zeros((4, 4, 1), int)
    a[:2] = 1  # 8 voxels
    b[:1] = 1  # 4 voxels, all inside a's
    a[2:, :2] = 2  # 4 voxels
    b[2:, 2:] = 2  # 4 voxels, disjoint
    d = S.dice_per_label(a, b, [1, 2, 3])
    assert d[1] == pytest.approx(2 * 4 / (8 + 4))
    assert d[2] == 0.0
    assert math.isnan(d[3])  # in neither map
    assert S.mean_dice(d) == pytest.approx((2 / 3 + 0) / 2)
    assert S.dice_per_label(a, a, [1, 2]) == {1: 1.0, 2: 1.0}
    with pytest.raises(ValueError, match="shape"):
        S.dice_per_label(a, b[:2], [1])


def test_thesis_label_set():
    assert len(S.SYNTHSEG_LABELS) == 32
    assert len(S.SYNTHSEG_DICE_LABELS) == 27  # thesis 4.4
    assert not set(S.SYNTHSEG_DICE_LABELS) & {7, 8, 46, 47, 24}
    assert S.dice_labels("atropos") == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown"):
        S.dice_labels("nope")


def _phantom():
    """Concentric spheres: WM core (bright), GM shell, CSF shell (dark), with mild noise."""
    n = 24
    g = np.indices((n, n, n)) - (n - 1) / 2
    r = np.sqrt((g**2).sum(0))
    truth = np.zeros((n, n, n), np.int16)
    truth[r < 10] = 1
    truth[r < 8] = 2
    truth[r < 5] = 3
    values = np.array([0.0, 0.15, 0.5, 0.9], np.float32)
    img = values[truth] + np.random.default_rng(0).normal(0, 0.03, truth.shape).astype(np.float32)
    return img, truth > 0, truth


@pytest.mark.parametrize("init", ["otsu", "kmeans"])
def test_atropos_three_tissues(init):
    img, mask, truth = _phantom()
    labels, method = S.segment(Volume(img, np.eye(4)), mask, method="atropos")
    assert method == "atropos" and labels.shape == img.shape and labels.dtype == np.int16
    assert np.all(labels[~mask] == 0)
    d = S.dice_per_label(truth, labels, S.ATROPOS_LABELS)
    assert min(d.values()) > 0.9, d
    if init == "kmeans":
        lab2 = S.segment_atropos(Volume(img, np.eye(4)), mask, init="kmeans", mrf=0.1, iterations=2)
        assert S.mean_dice(S.dice_per_label(truth, lab2, S.ATROPOS_LABELS)) > 0.9


def test_atropos_leaves_no_temp_files():
    img, mask, _ = _phantom()
    before = set(os.listdir(tempfile.gettempdir()))
    S.segment_atropos(Volume(img, np.eye(4)), mask)
    after = set(os.listdir(tempfile.gettempdir()))
    assert not {f for f in after - before if f.startswith("antsr")}


def test_segment_auto_without_freesurfer(monkeypatch):
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    img, mask, _ = _phantom()
    _, method = S.segment(Volume(img, np.eye(4)), mask)
    assert method == "atropos"
    with pytest.raises(S.SegmentationError, match="mri_synthseg: not found"):
        S.segment(Volume(img, np.eye(4)), mask, method="synthseg")
    with pytest.raises(ValueError, match="mask shape"):
        S.segment(Volume(img, np.eye(4)), mask[:-1])


def test_synthseg_command_and_label_cleanup(monkeypatch, tmp_path):
    """A fake mri_synthseg on PATH: checks the arguments and that labels outside the mask are dropped."""
    script = tmp_path / "mri_synthseg"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, numpy as np, nibabel as nib\n"
        "a = sys.argv\n"
        "assert '--keepgeom' in a\n"
        "img = nib.load(a[a.index('--i') + 1])\n"
        "lab = np.where(np.asarray(img.dataobj) > 0.3, 41, 2).astype(np.int16)\n"
        "nib.save(nib.Nifti1Image(lab, img.affine), a[a.index('--o') + 1])\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    img, mask, _ = _phantom()
    labels, method = S.segment(Volume(img, np.eye(4)), mask)
    assert method == "synthseg"
    assert set(np.unique(labels)) == {0, 2, 41}
    assert np.all(labels[~mask] == 0)
