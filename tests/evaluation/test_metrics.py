"""Metrics of thesis 3.3 against hand computations on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from synth7t.evaluation import metrics as M


@pytest.fixture
def pair():
    """A smooth 3-D 'brain' in [0, 1] units with a cube mask, and a noisy prediction."""
    rng = np.random.default_rng(0)
    truth = ndimage.gaussian_filter(rng.random((20, 22, 18)), 2).astype(np.float32)
    truth = (truth - truth.min()) / (truth.max() - truth.min())
    mask = np.zeros(truth.shape, bool)
    mask[4:16, 5:17, 3:15] = True
    truth[~mask] = 0
    pred = truth + 0.05 * rng.standard_normal(truth.shape).astype(np.float32)
    return truth, pred, mask


def test_psnr_known_mse_and_range():
    truth = np.zeros((2, 2, 2))
    pred = truth.copy()
    pred[0, 0, 0] = 0.5  # MSE = 0.25 / 8
    assert M.psnr(truth, pred, 1.0) == pytest.approx(10 * math.log10(1 / (0.25 / 8)))
    assert M.psnr(truth, pred, 2.0) == pytest.approx(10 * math.log10(4 / (0.25 / 8)))
    region = np.zeros((2, 2, 2), bool)
    region[0, 0, :] = True  # MSE over 2 voxels = 0.125
    assert M.psnr(truth, pred, 1.0, region) == pytest.approx(10 * math.log10(1 / 0.125))
    assert M.psnr(truth, truth, 1.0) == math.inf


def test_mae_hand():
    truth = np.zeros((2, 2, 2))
    pred = np.full((2, 2, 2), 0.1)
    pred[1] = -0.3
    assert M.mae(truth, pred) == pytest.approx((4 * 0.1 + 4 * 0.3) / 8)


def test_ssim_identical_is_one(pair):
    truth, _, mask = pair
    assert M.ssim(truth, truth, 1.0) == pytest.approx(1.0, abs=1e-6)
    assert M.ssim(truth, truth, 1.0, mask) == pytest.approx(1.0, abs=1e-6)


def test_ssim_map_matches_hand_formula_at_a_voxel(pair):
    truth, pred, _ = pair
    smap = M.ssim_map(truth, pred, 1.0)
    x, y = truth.astype(np.float64), pred.astype(np.float64)
    # explicit Gaussian weights around one interior voxel: the same window as the separable filter
    r = int(M.SSIM_TRUNCATE * M.SSIM_SIGMA + 0.5)
    g1 = np.exp(-0.5 * (np.arange(-r, r + 1) / M.SSIM_SIGMA) ** 2)
    g1 /= g1.sum()
    w = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
    c = (10, 11, 9)
    sl = tuple(slice(i - r, i + r + 1) for i in c)
    xs, ys = x[sl], y[sl]
    mx, my = (w * xs).sum(), (w * ys).sum()
    vx, vy = (w * xs * xs).sum() - mx**2, (w * ys * ys).sum() - my**2
    cxy = (w * xs * ys).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    hand = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert smap[c] == pytest.approx(hand, abs=2e-5)


def test_ssim_thesis_1d_hand_formula():
    a = np.array([0.1, 0.4, 0.8, 0.3]).reshape(1, 2, 2)
    b = np.array([0.2, 0.35, 0.7, 0.5]).reshape(1, 2, 2)
    ea, eb = a.mean(), b.mean()
    va, vb = ((a - ea) ** 2).mean(), ((b - eb) ** 2).mean()
    cov = ((a - ea) * (b - eb)).mean()
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    hand = (2 * ea * eb + c1) * (2 * cov + c2) / ((ea**2 + eb**2 + c1) * (va + vb + c2))
    assert M.ssim_thesis_1d(a, b, 2.0) == pytest.approx(hand, rel=1e-12)
    assert M.ssim_thesis_1d(a, a, 1.0) == pytest.approx(1.0)


def test_hfen_identical_zero_and_scaling(pair):
    truth, _, _ = pair
    assert M.hfen(truth, truth) == 0.0
    # pred = 0 -> ||0 - LoG(T)|| / ||LoG(T)|| = 1; pred = 2T -> 1 (LoG is linear)
    assert M.hfen(truth, np.zeros_like(truth)) == pytest.approx(1.0)
    assert M.hfen(truth, 2 * truth) == pytest.approx(1.0, rel=1e-5)
    # LoG ignores constant offsets away from the borders' influence: the error is small
    assert M.hfen(truth, truth + 0.5) < 0.05


def test_clipped_minmax_hand():
    img = np.arange(101, dtype=np.float32).reshape(1, 1, 101)
    mask = np.ones_like(img, bool)
    out = M.clipped_minmax(img, mask, 10, 90)  # lo 10, hi 90
    assert out[0, 0, 0] == 0 and out[0, 0, 100] == 1
    assert out[0, 0, 50] == pytest.approx(0.5)
    assert M.clipping_limits(img, mask, 10, 90) == (10.0, 90.0)


def test_regions():
    mask = np.zeros((3, 3, 6), bool)
    mask[1, 1, :] = True
    reg = M.region_masks(mask, min_slice=2)
    assert reg["full"].sum() == 54 and reg["brain"].sum() == 6 and reg["brain_valid"].sum() == 4
    assert not reg["brain_valid"][1, 1, :2].any()
    with pytest.raises(ValueError, match="min_slice"):
        M.region_masks(mask, min_slice=6)
    with pytest.raises(ValueError, match="empty"):
        M.region_masks(np.zeros((3, 3, 3)), 0)


def test_compute_metrics_regions_and_units():
    # truth in raw units 0..100 inside the brain (percentiles 0/100 keep it unclipped): [0, 1] after scaling
    truth = np.zeros((4, 4, 4), np.float32)
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, :] = True  # 16 voxels, 4 per axial slice
    truth[mask] = np.linspace(0, 100, 16)
    pred = truth / 100
    pred[1, 1, 0] += 0.2  # one error on slice 0 (corrupted)
    pred[0, 0, 3] += 0.4  # one error in the background
    out = M.compute_metrics(truth, pred, mask, min_slice=1, lower_pct=0, upper_pct=100)
    assert list(out) == list(M.METRIC_KEYS)
    assert out["psnr"] == pytest.approx(10 * math.log10(1 / ((0.04 + 0.16) / 64)), rel=1e-5)
    assert out["psnr_brain"] == pytest.approx(10 * math.log10(1 / (0.04 / 16)), rel=1e-5)
    assert out["psnr_brain_valid"] == math.inf
    assert out["mae_brain"] == pytest.approx(0.2 / 16, rel=1e-5)


def test_ssim_valid_region_excludes_corrupted_slices(pair):
    truth, _, mask = pair
    t = M.clipped_minmax(truth, mask)
    pred = t.copy()
    rng = np.random.default_rng(2)
    pred[:, :, :5] += 0.3 * rng.standard_normal(pred[:, :, :5].shape).astype(np.float32)  # corrupted slices
    out = M.compute_metrics(truth, pred, mask, min_slice=10)  # window radius 5: slices >= 10 are untouched
    assert out["ssim_brain_valid"] == pytest.approx(1.0, abs=1e-5)
    assert out["ssim_brain"] < 0.95 and out["ssim"] < 0.95
    assert out["psnr_brain_valid"] == math.inf and math.isfinite(out["psnr_brain"])


def test_compute_metrics_ordering(pair):
    truth, pred, mask = pair
    good = M.compute_metrics(truth, pred, mask)
    bad = M.compute_metrics(truth, pred + 0.1 * np.random.default_rng(1).standard_normal(pred.shape), mask)
    for key in ("psnr", "psnr_brain", "ssim", "ssim_brain", "ssim_thesis_1d"):
        assert good[key] > bad[key], key
    assert good["hfen"] < bad["hfen"] and good["mae_brain"] < bad["mae_brain"]
    same = M.compute_metrics(truth, M.clipped_minmax(truth, mask), mask)  # pred in the truth's units
    assert same["ssim_brain"] == pytest.approx(1, abs=1e-5) and same["hfen"] == 0


def test_argument_errors(pair):
    truth, pred, mask = pair
    with pytest.raises(ValueError, match="pred shape"):
        M.compute_metrics(truth, pred[:-1], mask)
    with pytest.raises(ValueError, match="3-D"):
        M.psnr(truth[0], pred[0], 1.0)
    with pytest.raises(ValueError, match="data_range"):
        M.psnr(truth, pred, 0.0)
    with pytest.raises(ValueError, match="lower_pct"):
        M.clipping_limits(truth, mask, 99, 1)


def test_compute_metrics_many_matches_single_calls(pair):
    truth, pred, mask = pair
    preds = {"a": pred, "b": np.clip(pred, 0, 1), "c": M.clipped_minmax(truth, mask)}
    many = M.compute_metrics_many(truth, preds, mask, min_slice=5)
    for name, p in preds.items():
        single = M.compute_metrics(truth, p, mask, min_slice=5)
        assert many[name] == pytest.approx(single, rel=1e-6, abs=1e-9), name
    ref = M.prepare_reference(truth, mask, min_slice=5)
    M.metrics_against(ref, pred)
    assert np.array_equal(ref.mu, M.prepare_reference(truth, mask, min_slice=5).mu)  # reference not modified


def test_slice_consistency_flags_alternating_offsets_along_that_axis_only():
    """A prediction whose axial slices alternate an intensity offset (a stack of 2-D outputs that disagree from
    slice to slice) is worse along the axial axis (2) only; the truth itself scores 0 everywhere."""
    from synth7t.evaluation.metrics import compute_metrics, second_difference, slice_consistency

    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    truth = (0.5 + 0.3 * np.sin(3 * x) * np.cos(2 * y) * np.cos(z) + 0.02 * rng.random((24, 24, 24))).astype(np.float32)
    mask = (x**2 + y**2 + z**2) < 0.8
    offset = 0.05 * (-1.0) ** np.arange(24)  # +, -, +, ... per axial slice
    pred = truth + offset[None, None, :].astype(np.float32)
    for axis in range(3):
        assert slice_consistency(truth, truth, mask, axis) == 0.0
    axial = slice_consistency(truth, pred, mask, 2)
    assert axial > 0.1
    assert slice_consistency(truth, pred, mask, 0) == pytest.approx(0.0, abs=1e-5)
    assert slice_consistency(truth, pred, mask, 1) == pytest.approx(0.0, abs=1e-5)
    # the hand formula on one voxel: D(pred) - D(truth) = offset[i-1] - 2 offset[i] + offset[i+1] = +-0.2
    # by hand at the centre i = 4 (output index 3): 0.05 * ((-1)^3 - 2 (-1)^4 + (-1)^5) = -0.2
    d = second_difference(pred, 2) - second_difference(truth, 2)
    np.testing.assert_allclose(d[5, 5, 3], -0.2, atol=1e-5)
    np.testing.assert_allclose(d[5, 5, 4], 0.2, atol=1e-5)
    t = M.clipped_minmax(truth, mask)  # compute_metrics scores in the truth's clipped min-max units
    m = compute_metrics(truth, t + offset[None, None, :].astype(np.float32), mask)
    assert m["slice_consistency_axial"] > 0.1
    assert m["slice_consistency_coronal"] < 1e-3 and m["slice_consistency_sagittal"] < 1e-3
