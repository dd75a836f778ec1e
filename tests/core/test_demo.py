"""The simulated demo cohort: deterministic, labelled simulated, physics drawn inside documented ranges, and the
3T-like image really is degraded."""

from __future__ import annotations

import csv
from dataclasses import fields

import numpy as np
import pytest

from synth7t.demo import (
    ANATOMY_ANCHORS,
    TISSUE_7T,
    DemoSpec,
    build_demo_cohort,
    contrast_curve,
    draw_physics_3t,
    shock_sharpen,
    widen_sulci,
)
from synth7t.io import load_volume, read_json

SMALL = dict(slab_mm=10.0, fov_xy_mm=(120.0, 150.0), motion_subject=None)
# a 3T that is certainly blurrier and noisier than the 7T (the ranges' worse halves)
DEGRADED = dict(psf_inplane_mm=(1.5, 1.8), psf_through_mm=(1.5, 1.8), noise_3t_pct=(4.0, 6.0))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # sharpen=False saves the one-off shock filter of the template (tested on its own below)
    manifest = build_demo_cohort(out, DemoSpec(n_subjects=2, seed=7, sharpen=False, **SMALL, **DEGRADED),
                                 progress=False)
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
    drawn = read_json(out / "truth" / "demo-01.json")["physics_3t"]
    expected = np.full(3, drawn["voxel_inplane"])
    expected[drawn["through_axis"]] = drawn["voxel_through"]
    np.testing.assert_allclose(t3.zooms, expected, atol=1e-4)  # the voxel size drawn for this subject
    assert np.all((0.8 <= t3.zooms) & (t3.zooms <= 1.3))
    assert set(read_json(out / "demo.json")["subjects"]) == {"demo-01", "demo-02"}


def test_deterministic_for_a_seed(cohort, tmp_path):
    out, _ = cohort
    spec = dict(n_subjects=1, sharpen=False, **SMALL, **DEGRADED)
    again = build_demo_cohort(tmp_path / "a", DemoSpec(seed=7, **spec), progress=False).parent
    other = build_demo_cohort(tmp_path / "b", DemoSpec(seed=8, **spec), progress=False).parent
    ref = load_volume(out / "raw" / "demo-01_3T.nii.gz").data
    np.testing.assert_array_equal(load_volume(again / "raw" / "demo-01_3T.nii.gz").data, ref)
    assert read_json(again / "truth" / "demo-01.json") == read_json(out / "truth" / "demo-01.json")
    assert read_json(other / "truth" / "demo-01.json") != read_json(out / "truth" / "demo-01.json")


def test_parallel_build_gives_the_same_cohort(cohort, tmp_path):
    """``jobs=2`` simulates the subjects in two processes; every subject draws from its own generator, so the
    images, draws and manifest are those of the one-process build."""
    out, manifest = cohort
    spec = DemoSpec(n_subjects=2, seed=7, sharpen=False, **SMALL, **DEGRADED)
    par = build_demo_cohort(tmp_path / "p", spec, progress=False, jobs=2)
    assert par.read_text() == manifest.read_text()
    for sid in ("demo-01", "demo-02"):
        for k in ("3T", "7T"):
            a = load_volume(par.parent / "raw" / f"{sid}_{k}.nii.gz")
            b = load_volume(out / "raw" / f"{sid}_{k}.nii.gz")
            np.testing.assert_array_equal(a.data, b.data)
            np.testing.assert_array_equal(a.affine, b.affine)
        assert read_json(par.parent / "truth" / f"{sid}.json") == read_json(out / "truth" / f"{sid}.json")


def test_physics_draws_stay_inside_the_documented_ranges_and_are_reproducible():
    spec = DemoSpec()
    ranges = {f.name: getattr(spec, f.name) for f in fields(DemoSpec) if isinstance(getattr(spec, f.name), tuple)}
    draws = [draw_physics_3t(np.random.default_rng([3, i]), spec) for i in range(300)]
    assert draws[5] == draw_physics_3t(np.random.default_rng([3, 5]), spec)  # same seed, same draw

    def inside(value, name):
        lo, hi = ranges[name]
        return lo <= value <= hi

    for p in draws:
        assert inside(p.voxel_inplane, "voxel_3t_inplane_mm") and inside(p.voxel_through, "voxel_3t_through_mm")
        assert inside(p.psf_inplane, "psf_inplane_mm") and inside(p.psf_through, "psf_through_mm")
        assert inside(p.tissue[0], "csf_3t") and inside(p.tissue[1], "gm_3t") and inside(p.tissue[2], "wm_3t")
        assert p.tissue[2] - p.tissue[1] >= spec.min_gm_wm_gap_3t - 1e-12
        assert inside(p.gamma, "gamma_3t") and inside(p.bias, "bias_3t") and inside(p.noise_pct, "noise_3t_pct")
        assert p.ringing_cutoff is None or inside(p.ringing_cutoff, "ringing_cutoff_3t")
        assert p.through_axis in (0, 1, 2)
    # the ranges are really explored: every axis varies, both noise kinds and optional artefacts occur
    assert {p.through_axis for p in draws} == {0, 1, 2}
    assert {p.rician for p in draws} == {True, False}
    assert any(p.ringing_cutoff is not None for p in draws) and any(p.stripes for p in draws)
    noise = [p.noise_pct for p in draws]
    assert max(noise) - min(noise) > 4.0
    assert any(abs(p.voxel_inplane - p.voxel_through) > 0.3 for p in draws)  # anisotropic voxels happen


def test_contrast_curve_is_monotone_and_hits_the_tissue_values():
    a = np.linspace(0, 1.2, 2001)
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = draw_physics_3t(rng, DemoSpec())
        assert np.all(np.diff(contrast_curve(a, p.tissue, p.gamma)) >= 0)
    np.testing.assert_allclose(contrast_curve(np.array(ANATOMY_ANCHORS), TISSUE_7T), TISSUE_7T, atol=1e-6)
    # deep grey matter (anatomy ~0.85, between GM and WM) stays between the GM and WM values
    deep = contrast_curve(np.array([0.85]), TISSUE_7T)[0]
    assert TISSUE_7T[1] + 0.2 * (TISSUE_7T[2] - TISSUE_7T[1]) < deep < TISSUE_7T[2] - 0.2 * (TISSUE_7T[2] - TISSUE_7T[1])


def test_anatomy_variety(cohort):
    out, _ = cohort
    info = read_json(out / "demo.json")["subjects"]
    for ev in info.values():
        assert 1.0 <= ev["texture_pct"] <= 3.0 and 0 <= ev["atrophy"] <= 1
    # sulcal widening is monotone, keeps the tissue plateaus and darkens CSF/GM partial volumes
    a = np.linspace(0, 1, 1001, dtype=np.float32)
    w = widen_sulci(a, 1.0)
    assert np.all(np.diff(w) >= 0)
    assert np.all(w <= a + 1e-7) and w[np.searchsorted(a, 0.5)] < 0.5
    np.testing.assert_allclose(w[a <= ANATOMY_ANCHORS[0]], a[a <= ANATOMY_ANCHORS[0]])
    np.testing.assert_allclose(w[a >= ANATOMY_ANCHORS[1]], a[a >= ANATOMY_ANCHORS[1]])


def test_shock_filter_steepens_an_edge_without_overshoot():
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    edge = np.broadcast_to(0.5 + 0.4 * np.tanh(x / 0.2)[:, None], (64, 16)).copy()
    sharp = shock_sharpen(edge, steps=6, smooth=0)
    assert np.abs(np.diff(sharp[:, 8])).max() > 1.5 * np.abs(np.diff(edge[:, 8])).max()
    assert sharp.min() >= edge.min() - 1e-6 and sharp.max() <= edge.max() + 1e-6


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
    for sid in ("demo-01", "demo-02"):
        sharp3, noise3 = _sharpness_and_noise(load_volume(out / "raw" / f"{sid}_3T.nii.gz"))
        sharp7, noise7 = _sharpness_and_noise(load_volume(out / "raw" / f"{sid}_7T.nii.gz"))
        assert sharp3 < 0.6 * sharp7, (sid, sharp3, sharp7)
        assert noise3 > 1.5 * noise7, (sid, noise3, noise7)


def test_simulated_cohort_key_is_fixed_per_seed_and_an_existing_key_is_kept(tmp_path):
    """The demo's pseudonyms (hence its train/test split) follow the seed; a folder started earlier keeps its key."""
    from synth7t.errors import Synth7tError
    from synth7t.pipeline_demo import prepare_store, simulated_cohort_key

    assert simulated_cohort_key(0) == simulated_cohort_key(0) != simulated_cohort_key(1)
    assert len(simulated_cohort_key(0)) == 32
    missing = tmp_path / "absent.csv"
    for private, existing in ((tmp_path / "new", None), (tmp_path / "old", "ab" * 32 + "\n")):
        if existing is not None:
            private.mkdir()
            (private / "pseudonym.key").write_text(existing)
        with pytest.raises(Synth7tError, match="absent.csv"):  # the manifest is read after the key is in place
            prepare_store(missing, tmp_path / "work", tmp_path / "store", private, jobs=1, seed=0, n_test=2,
                          progress=False)
        expected = simulated_cohort_key(0).hex() + "\n" if existing is None else existing
        assert (private / "pseudonym.key").read_text() == expected
