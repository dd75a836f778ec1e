"""The simulated demo cohort: deterministic, labelled simulated, and the 3T-like image really is degraded."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from synth7t.demo import DemoSpec, build_demo_cohort
from synth7t.io import load_volume

SMALL = dict(slab_mm=10.0, fov_xy_mm=(120.0, 150.0), motion_subject=None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = build_demo_cohort(out, DemoSpec(n_subjects=2, seed=7, **SMALL), progress=False)
    return out, manifest


def test_manifest_and_labels(cohort):
    out, manifest = cohort
    rows = list(csv.DictReader(manifest.open()))
    assert [r["subject"] for r in rows] == ["demo-01", "demo-02"]
    assert all(r["simulated"] == "yes" for r in rows)
    assert all(55 <= float(r["age"]) <= 85 and r["sex"] in "FM" for r in rows)
    assert "SIMULATED DATA" in (out / "SIMULATED.txt").read_text()
    t7 = load_volume(out / "raw" / "demo-01_7T.nii.gz")
    t3 = load_volume(out / "raw" / "demo-01_3T.nii.gz")
    np.testing.assert_allclose(t7.zooms, 0.65, atol=1e-4)
    np.testing.assert_allclose(t3.zooms, 1.0, atol=1e-4)


def test_deterministic_for_a_seed(cohort, tmp_path):
    out, _ = cohort
    again = build_demo_cohort(tmp_path / "a", DemoSpec(n_subjects=1, seed=7, **SMALL), progress=False)
    other = build_demo_cohort(tmp_path / "b", DemoSpec(n_subjects=1, seed=8, **SMALL), progress=False)
    ref = load_volume(out / "raw" / "demo-01_3T.nii.gz").data
    np.testing.assert_array_equal(load_volume(again.parent / "raw" / "demo-01_3T.nii.gz").data, ref)
    assert not np.array_equal(load_volume(other.parent / "raw" / "demo-01_3T.nii.gz").data, ref)


def _sharpness_and_noise(vol):
    """Edge sharpness: 99th percentile of the gradient magnitude per mm (after a 3x3x3 median filter that
    removes most of the noise) inside the brain, relative to the brain's 90th intensity percentile; and the
    noise level (std of the image minus its median-filtered self, in the brain) relative to the same."""
    from scipy.ndimage import median_filter

    d = vol.data
    brain = d > np.percentile(d, 60)
    scale = np.percentile(d[brain], 90)
    grads = np.gradient(median_filter(d, 3), *vol.zooms)
    gmag = np.sqrt(sum(g * g for g in grads))
    residual = d - median_filter(d, 3)
    return float(np.percentile(gmag[brain], 99) / scale), float(residual[brain].std() / scale)


def test_3t_is_blurrier_and_noisier_than_7t(cohort):
    out, _ = cohort
    sharp3, noise3 = _sharpness_and_noise(load_volume(out / "raw" / "demo-01_3T.nii.gz"))
    sharp7, noise7 = _sharpness_and_noise(load_volume(out / "raw" / "demo-01_7T.nii.gz"))
    assert sharp3 < 0.6 * sharp7, (sharp3, sharp7)
    assert noise3 > 1.5 * noise7, (noise3, noise7)


def test_3t_has_lower_grey_white_contrast(cohort):
    from synth7t.demo import TISSUE_3T, TISSUE_7T

    out, _ = cohort
    # The simulated tissue intensities themselves, and what a 2-class split of each image shows.
    assert (TISSUE_3T[2] - TISSUE_3T[1]) / TISSUE_3T[2] < (TISSUE_7T[2] - TISSUE_7T[1]) / TISSUE_7T[2]
    for name, limit in (("3T", 0.45), ("7T", 0.45)):
        d = load_volume(out / "raw" / f"demo-01_{name}.nii.gz").data
        brain = d[d > np.percentile(d, 55)]
        gm, wm = np.percentile(brain, 25), np.percentile(brain, 85)
        contrast = (wm - gm) / wm
        if name == "3T":
            c3 = contrast
        else:
            assert c3 < contrast, (c3, contrast)
        assert contrast < limit + 0.5
