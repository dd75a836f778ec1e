"""The transfer test set: recipes outside the training ranges, anatomy mapped monotonically, real brains
(skipped where the test-only folder is absent)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from synth7t.demo import DemoSpec, draw_physics_3t
from synth7t.io import Volume, load_volume, read_json
from synth7t.transfer import RECIPES, anatomy_from_brain, build_transfer_cohort, default_highres_dir

SPEC = DemoSpec()


def _outside(p) -> set[str]:
    """The DemoSpec range names that physics ``p`` leaves."""
    out = set()
    checks = {
        "voxel_3t_inplane_mm": p.voxel_inplane, "voxel_3t_through_mm": p.voxel_through,
        "psf_inplane_mm": p.psf_inplane, "psf_through_mm": p.psf_through, "csf_3t": p.tissue[0],
        "gm_3t": p.tissue[1], "wm_3t": p.tissue[2], "gamma_3t": p.gamma, "bias_3t": p.bias,
        "noise_3t_pct": p.noise_pct,
    }
    for name, value in checks.items():
        lo, hi = getattr(SPEC, name)
        if not lo <= value <= hi:
            out.add(name)
    if p.tissue[2] - p.tissue[1] < SPEC.min_gm_wm_gap_3t:
        out.add("min_gm_wm_gap_3t")
    return out


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_leaves_the_training_ranges(recipe):
    for i in range(100):
        rng = np.random.default_rng([5, i])
        physics, claimed = RECIPES[recipe](draw_physics_3t(rng, SPEC), rng)
        outside = _outside(physics)
        assert outside, f"{recipe}: draw {i} is inside every training range"
        assert outside <= set(claimed) | {"wm_3t", "gm_3t"}, (recipe, outside, claimed)
        assert set(claimed) & outside  # what the recipe says it changes is really outside


def test_anatomy_mapping_is_monotone_and_matches_the_reference():
    rng = np.random.default_rng(0)
    shape = (20, 20, 200)  # 0.5 mm along z covers the default slab
    data = rng.gamma(3.0, 10.0, shape).astype(np.float32)
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    affine[2, 3] = -58.0
    mask = np.ones(shape, bool)
    mask[:2] = False
    reference = rng.uniform(0.2, 1.0, 50_000)
    a = anatomy_from_brain(Volume(data, affine), mask, True, reference, SPEC).data
    order = np.argsort(data[mask])
    assert np.all(np.diff(a[mask][order]) >= 0)  # monotone: edges and texture of the real brain are kept
    assert abs(np.median(a[mask]) - 0.6) < 0.02 and np.all(a[~mask] == 0)
    # a brain without CSF is matched to the template's grey and white matter only
    no_csf = anatomy_from_brain(Volume(data, affine), mask, False, reference, SPEC).data
    assert no_csf[mask].min() >= 0.5 - 1e-6


@pytest.mark.skipif(default_highres_dir() is None, reason="test-only high-resolution brains absent")
def test_build_transfer_cohort_on_a_real_brain(tmp_path):
    spec = DemoSpec(slab_mm=8.0, fov_xy_mm=(100.0, 120.0))
    manifest = build_transfer_cohort(tmp_path, spec=spec, brains=("colin27",), recipes=("noisy",))
    rows = list(csv.DictReader(manifest.open()))
    assert [r["subject"] for r in rows] == ["tr-colin27-noisy"]
    assert rows[0]["age"] == "" and rows[0]["brain"] == "colin27"
    info = read_json(tmp_path / "truth" / "tr-colin27-noisy.json")
    assert info["outside_training_ranges"] == ["noise_3t_pct", "bias_3t"] and info["physics_3t"]["noise_pct"] > 6
    t7 = load_volume(tmp_path / "raw" / "tr-colin27-noisy_7T.nii.gz")
    t3 = load_volume(tmp_path / "raw" / "tr-colin27-noisy_3T.nii.gz")
    np.testing.assert_allclose(t7.zooms, 0.65, atol=1e-4)
    assert t7.data.max() > 0 and t3.data.max() > 0
    mtime = (tmp_path / "raw" / "tr-colin27-noisy_7T.nii.gz").stat().st_mtime_ns
    build_transfer_cohort(tmp_path, spec=spec, brains=("colin27",), recipes=("noisy",))  # a rerun keeps it
    assert (tmp_path / "raw" / "tr-colin27-noisy_7T.nii.gz").stat().st_mtime_ns == mtime
