"""Interpolation baselines keep the geometry and reproduce what plain upsampling gives."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from synth7t.evaluation import baselines as B
from synth7t.io import Volume


def test_lowres_shape():
    assert B.lowres_shape((288, 244, 222), (0.65,) * 3, (1, 1, 1)) == (187, 159, 144)
    assert B.lowres_shape((10, 10, 10), (1, 1, 1), (1, 1, 1)) == (10, 10, 10)
    with pytest.raises(ValueError, match="zooms_lowres"):
        B.lowres_shape((10, 10, 10), (1, 1, 1), (1, 0, 1))


def test_same_resolution_is_identity():
    rng = np.random.default_rng(0)
    img = rng.random((8, 9, 7)).astype(np.float32)
    out = B.baseline_interpolations(img, (1, 1, 1), (1, 1, 1))
    np.testing.assert_allclose(out["trilinear"], img, atol=1e-6)
    np.testing.assert_allclose(out["bspline"], img, atol=1e-5)


def test_linear_ramp_is_reproduced_and_shape_kept():
    # a linear ramp survives smoothing (away from borders) and linear/cubic interpolation exactly
    x = np.arange(40, dtype=np.float32)
    img = np.broadcast_to(x[:, None, None], (40, 30, 20)).copy()
    out = B.baseline_interpolations(img, (0.5, 0.5, 0.5), (1, 1, 1))
    for name in ("trilinear", "bspline"):
        assert out[name].shape == img.shape and out[name].dtype == np.float32
        np.testing.assert_allclose(out[name][12:-12], img[12:-12], atol=1e-3, err_msg=name)


def test_downsample_centres_hand():
    # factor 2, no smoothing test: a ramp 0..7 -> centres at (i + 1/2) 2 - 1/2 = 0.5, 2.5, 4.5, 6.5
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 2, 2)).copy()
    low = B.downsample(ramp, (0.5, 1, 1), (1, 1, 1))
    assert low.shape == (4, 2, 2)
    np.testing.assert_allclose(low[1:3, 0, 0], [2.5, 4.5], atol=1e-4)


def test_baselines_smooth_fine_detail_and_respect_mask():
    rng = np.random.default_rng(1)
    img = ndimage.gaussian_filter(rng.random((30, 30, 30)), 0.7).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[5:25, 5:25, 5:25] = True
    out = B.baseline_interpolations(img, (0.65,) * 3, (1, 1, 1), mask=mask)
    for v in out.values():
        assert np.all(v[~mask] == 0)
        # downsampling loses high frequencies: error is clearly non-zero but bounded
        err = np.abs(v[mask] - img[mask]).mean()
        assert 0.005 < err < 0.2
    with pytest.raises(ValueError, match="mask shape"):
        B.baseline_interpolations(img, (1, 1, 1), mask=mask[:-1])


def test_resample_to_grid_world_coordinates():
    # a 2 mm source with a ramp along x in world mm; the 1 mm target grid shifted by 20 mm sees the same ramp
    src_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    xs = np.arange(30) * 2.0  # world x of source voxels
    src = Volume(np.broadcast_to(xs[:, None, None], (30, 6, 6)).astype(np.float32).copy(), src_aff)
    tgt_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    tgt_aff[:3, 3] = [20.0, 0.0, 0.0]
    tgt = Volume(np.zeros((12, 8, 8), np.float32), tgt_aff)
    out = B.baseline_from_lowres(src, tgt)
    for name, vol in out.items():
        assert vol.shape == tgt.shape and np.allclose(vol.affine, tgt_aff), name
        np.testing.assert_allclose(vol.data[:, 2, 2], 20.0 + np.arange(12), atol=1e-3, err_msg=name)
    # outside the source's field of view -> 0
    far = Volume(np.zeros((4, 4, 4), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    far.affine[:3, 3] = 100.0
    assert np.all(B.resample_to_grid(src, far.affine, far.shape).data == 0)


def test_histogram_match_hand_made():
    # 4 brain voxels of ranks 0..3 -> u = 1/8, 3/8, 5/8, 7/8 -> reference quantiles of a uniform on [0, 2]
    img = np.zeros((2, 2, 2), np.float32)
    mask = np.zeros_like(img, bool)
    img[0, :, :] = [[5.0, 1.0], [3.0, 2.0]]
    mask[0] = True
    ref = 2 * B.QUANTILE_LEVELS
    out = B.histogram_match(img, mask, ref)
    np.testing.assert_allclose(out[0], [[7 / 4, 1 / 4], [5 / 4, 3 / 4]], atol=1e-6)
    assert np.all(out[1] == 0)  # outside the mask stays 0
    # matching to an image's own quantiles changes little; the order of voxels is never inverted
    rng = np.random.default_rng(0)
    vol = rng.gamma(2.0, size=(12, 10, 8)).astype(np.float32)
    m = vol > 0.5
    same = B.histogram_match(vol, m, B.quantiles(vol[m]))
    assert np.abs(same[m] - vol[m]).max() < 0.05 * vol[m].max()
    target = B.histogram_match(vol, m, B.quantiles(rng.normal(0.5, 0.1, 5000)))
    order = np.argsort(vol[m])
    assert np.all(np.diff(target[m][order]) >= 0)
    assert abs(target[m].mean() - 0.5) < 0.01 and abs(target[m].std() - 0.1) < 0.01
    with pytest.raises(ValueError, match="mask shape"):
        B.histogram_match(vol, m[:-1], ref)
    with pytest.raises(ValueError, match="non-decreasing"):
        B.histogram_match(vol, m, ref[::-1])


def test_population_quantiles_average_subjects_equally():
    # subject A uniform on [0, 0.5], subject B (ten times as many voxels) uniform on [0.5, 1]: the mean histogram
    # weighs them equally, so the median is 0.5 and the 25th percentile 0.25
    a = B.brain_histogram(np.linspace(0, 0.5, 1000, endpoint=False))
    b = B.brain_histogram(np.linspace(0.5, 1, 10000, endpoint=False))
    q = B.population_quantiles([a, b])
    levels = B.QUANTILE_LEVELS
    assert q[np.searchsorted(levels, 0.5)] == pytest.approx(0.5, abs=2e-3)
    assert q[np.searchsorted(levels, 0.25)] == pytest.approx(0.25, abs=2e-3)
    assert q[0] == pytest.approx(0.0, abs=2e-3) and q[-1] == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(ValueError, match="non-empty"):
        B.population_quantiles([np.zeros(B.HISTOGRAM_BINS)])
