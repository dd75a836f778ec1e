"""Image-quality metrics of thesis 3.3: PSNR, SSIM (3-D and the thesis' 1-D variant), HFEN and MAE.

Inputs are 3-D arrays on the same grid (shape (X, Y, Z), canonical RAS+, axial slices along axis 2):
``truth`` (the real 7T), ``pred`` (the synthetic 7T or a baseline) and a brain ``mask``.

Intensity units
---------------
Both images are compared in the *truth's clipped min-max space*:

    lo, hi = percentile(truth[mask], lower_pct), percentile(truth[mask], upper_pct)
    T = (clip(truth, lo, hi) - lo) / (hi - lo)                         # in [0, 1]

``pred`` is expected in the same [0, 1] units already; that is what the model outputs (its targets are the
7T images in clipped min-max units, thesis 1.3.1) and what :func:`clipped_minmax` gives for the 3T baselines.
``pred`` is *not* rescaled or clipped here: its overshoots count as errors. ``truth`` may be given in raw
scanner units or already normalised (the normalisation is then very nearly the identity).

The dynamic range of every metric is the range of the clipped, normalised ground truth (thesis 3.3 remark:
the maximum is replaced by the maximum of the clipped image because bright vessels make the raw range
unstable): ``R = max(T) - min(T)`` (= 1 unless the brain is constant).

Regions
-------
``full`` = every voxel; ``brain`` = voxels of ``mask``; ``brain_valid`` = brain voxels on axial slices
``z >= min_slice`` (slices below ``min_slice`` are corrupted, see ``qc.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

K1 = 0.01
K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # window radius = 3.5 sigma, as scikit-image's gaussian SSIM
HFEN_SIGMA = 1.5

METRIC_KEYS = (
    "psnr",
    "psnr_brain",
    "psnr_brain_valid",
    "ssim",
    "ssim_brain",
    "ssim_brain_valid",
    "ssim_thesis_1d",
    "ssim_thesis_1d_full",
    "hfen",
    "hfen_brain",
    "mae_brain",
    "slice_consistency_axial",
    "slice_consistency_coronal",
    "slice_consistency_sagittal",
)
#: the axis of an (X, Y, Z) canonical volume that each view's slices are stacked along (axial slices along S, ...)
CONSISTENCY_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}
# (key, column title, higher is better) in the layout of thesis table 1, then the extra metrics
TABLE_COLUMNS = (
    ("psnr", "PSNR", True),
    ("ssim", "SSIM", True),
    ("psnr_brain", "brain PSNR", True),
    ("ssim_brain", "brain SSIM", True),
    ("psnr_brain_valid", "brain PSNR no corrupt.", True),
    ("ssim_brain_valid", "brain SSIM no corrupt.", True),
    ("dice_mean", "Mean DICE", True),
    ("ssim_thesis_1d_full", "SSIM (thesis 1-D)", True),
    ("ssim_thesis_1d", "brain SSIM (thesis 1-D)", True),
    ("hfen", "HFEN", False),
    ("hfen_brain", "brain HFEN", False),
    ("mae_brain", "brain MAE", False),
    ("slice_consistency_axial", "through-plane error axial", False),
    ("slice_consistency_coronal", "through-plane error coronal", False),
    ("slice_consistency_sagittal", "through-plane error sagittal", False),
)


# ---------------------------------------------------------------------------------------------------------
# input checks and normalisation


def _check_pair(truth: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> None:
    if truth.ndim != 3:
        raise ValueError(f"expected 3-D arrays, got truth of shape {truth.shape}")
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} differs from truth shape {truth.shape}")
    if mask is not None and mask.shape != truth.shape:
        raise ValueError(f"mask shape {mask.shape} differs from truth shape {truth.shape}")


def _bool_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask) > 0
    if not m.any():
        raise ValueError("brain mask is empty")
    return m


def clipping_limits(image: np.ndarray, mask: np.ndarray, lower_pct: float = 1, upper_pct: float = 99):
    """Return ``(lo, hi)``, the ``lower_pct`` / ``upper_pct`` percentiles of ``image`` inside ``mask``."""
    if not 0 <= lower_pct < upper_pct <= 100:
        raise ValueError(f"need 0 <= lower_pct < upper_pct <= 100, got {lower_pct}, {upper_pct}")
    values = np.asarray(image)[_bool_mask(mask)]
    lo, hi = np.percentile(values, [lower_pct, upper_pct])
    return float(lo), float(hi)


def clipped_minmax(image: np.ndarray, mask: np.ndarray, lower_pct: float = 1, upper_pct: float = 99) -> np.ndarray:
    """Clipped min-max normalisation (thesis 1.3.1): ``(clip(x, lo, hi) - lo) / (hi - lo)`` in float32.

    ``lo`` / ``hi`` are the brain percentiles of :func:`clipping_limits`. A constant brain (hi == lo) maps to 0.
    """
    lo, hi = clipping_limits(image, mask, lower_pct, upper_pct)
    out = np.clip(np.asarray(image, dtype=np.float32), lo, hi) - np.float32(lo)  # (X, Y, Z)
    if hi > lo:
        out /= np.float32(hi - lo)
    return out


def region_masks(mask: np.ndarray, min_slice: int = 0) -> dict[str, np.ndarray]:
    """Boolean masks of the three regions: ``full``, ``brain`` and ``brain_valid`` (brain, z >= min_slice)."""
    brain = _bool_mask(mask)
    if not 0 <= int(min_slice) < brain.shape[2]:
        raise ValueError(f"min_slice {min_slice} outside [0, {brain.shape[2]})")
    valid = brain.copy()
    valid[:, :, : int(min_slice)] = False
    if not valid.any():
        raise ValueError(f"no brain voxel at or above min_slice {min_slice}")
    return {"full": np.ones_like(brain), "brain": brain, "brain_valid": valid}


# ---------------------------------------------------------------------------------------------------------
# PSNR and MAE


def psnr(truth: np.ndarray, pred: np.ndarray, data_range: float, region: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB over ``region`` (all voxels when None).

    ``MSE = mean_{v in region} (I(v) - I'(v))^2``;  ``PSNR = 10 log10(R^2 / MSE)`` (inf when MSE = 0).
    """
    _check_pair(truth, pred, region)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    diff = np.asarray(truth, np.float64) - np.asarray(pred, np.float64)
    sq = diff[region] if region is not None else diff
    mse = float(np.mean(sq**2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def mae(truth: np.ndarray, pred: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean absolute error ``mean_{v in region} |I(v) - I'(v)|``."""
    _check_pair(truth, pred, region)
    diff = np.abs(np.asarray(truth, np.float64) - np.asarray(pred, np.float64))
    return float(np.mean(diff[region] if region is not None else diff))


# ---------------------------------------------------------------------------------------------------------
# SSIM


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=SSIM_TRUNCATE)


def ssim_map(
    truth: np.ndarray,
    pred: np.ndarray,
    data_range: float,
    sigma: float = SSIM_SIGMA,
    *,
    truth_terms: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Local SSIM map (Wang et al. 2004) with an isotropic Gaussian window, float32 (X, Y, Z).

    With ``G*`` the Gaussian filter (sigma voxels, truncated at 3.5 sigma, reflecting borders):
    ``mu_x = G*x``, ``s_x^2 = G*(x^2) - mu_x^2``, ``s_xy = G*(xy) - mu_x mu_y`` and
    ``SSIM = (2 mu_x mu_y + c1)(2 s_xy + c2) / ((mu_x^2 + mu_y^2 + c1)(s_x^2 + s_y^2 + c2))``,
    ``c1 = (k1 R)^2``, ``c2 = (k2 R)^2``, k1 = 0.01, k2 = 0.03. Population (not sample) moments are used,
    as scikit-image does with ``gaussian_weights=True``. Filtering is done in float32 on data in [0, 1]
    scale (relative error of the local variances ~1e-6, far below what the map resolves).
    ``truth_terms`` = ``(G*x, G*(x^2))`` precomputed (see :func:`prepare_reference`) saves two filters.
    """
    _check_pair(truth, pred)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    x = np.asarray(truth, np.float32)
    y = np.asarray(pred, np.float32)
    mu_x, gxx = truth_terms if truth_terms is not None else (_gauss(x, sigma), _gauss(x * x, sigma))
    mu_x = mu_x.copy()  # modified in place below
    mu_y = _gauss(y, sigma)
    # numerator and denominator built in place to keep peak memory at ~6 volumes
    num2 = _gauss(x * y, sigma)
    num2 -= mu_x * mu_y
    num2 *= 2
    num2 += c2  # 2 s_xy + c2
    den2 = _gauss(y * y, sigma)
    den2 += gxx
    mxx = mu_x * mu_x
    myy = mu_y * mu_y
    den2 -= mxx
    den2 -= myy
    den2 += c2  # s_x^2 + s_y^2 + c2
    den1 = mxx
    den1 += myy
    den1 += c1  # mu_x^2 + mu_y^2 + c1
    num1 = mu_x
    num1 *= mu_y
    num1 *= 2
    num1 += c1  # 2 mu_x mu_y + c1
    num1 *= num2
    den1 *= den2
    num1 /= den1
    return num1


def ssim_regions(
    truth: np.ndarray, pred: np.ndarray, data_range: float, regions: dict[str, np.ndarray]
) -> dict[str, float]:
    """Average of one :func:`ssim_map` over each region (the map is computed on the whole image once)."""
    smap = ssim_map(truth, pred, data_range)
    return {name: float(np.mean(smap[reg], dtype=np.float64)) for name, reg in regions.items()}


def ssim(truth: np.ndarray, pred: np.ndarray, data_range: float, region: np.ndarray | None = None) -> float:
    """Mean of :func:`ssim_map` over ``region`` (all voxels when None)."""
    smap = ssim_map(truth, pred, data_range)
    return float(np.mean(smap[region] if region is not None else smap, dtype=np.float64))


def ssim_thesis_1d(truth: np.ndarray, pred: np.ndarray, data_range: float, region: np.ndarray | None = None) -> float:
    """The thesis' SSIM (3.3): one global SSIM of the flattened voxel vectors of ``region``.

    ``SSIM = (2 E(I) E(I') + c1)(2 Cov(I, I') + c2) / ((E(I)^2 + E(I')^2 + c1)(V(I) + V(I') + c2))`` with
    population moments over the region's voxels, ``c1 = (k1 R)^2``, ``c2 = (k2 R)^2``. Reported for
    comparison with thesis table 1; the windowed 3-D SSIM is the standard one.
    """
    _check_pair(truth, pred, region)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    a = np.asarray(truth, np.float64)
    b = np.asarray(pred, np.float64)
    if region is not None:
        a, b = a[region], b[region]
    a, b = a.ravel(), b.ravel()
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    ma, mb = a.mean(), b.mean()
    va, vb = a.var(), b.var()
    cov = float(np.mean((a - ma) * (b - mb)))
    return float((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))


# ---------------------------------------------------------------------------------------------------------
# HFEN


def hfen(
    truth: np.ndarray,
    pred: np.ndarray,
    sigma: float = HFEN_SIGMA,
    region: np.ndarray | None = None,
    *,
    log_truth: np.ndarray | None = None,
) -> float:
    """High-frequency error norm (Ravishankar & Bresler 2011).

    ``HFEN = ||LoG(I') - LoG(I)||_2 / ||LoG(I)||_2`` with ``LoG`` the Laplacian of a Gaussian of ``sigma``
    voxels (scipy.ndimage.gaussian_laplace, reflecting borders), the norms taken over ``region`` (the whole
    image when None). 0 for identical images; lower is better. ``log_truth`` = precomputed ``LoG(I)``.
    """
    _check_pair(truth, pred, region)
    log_t = log_truth if log_truth is not None else ndimage.gaussian_laplace(np.asarray(truth, np.float32), sigma)
    return _hfen_ratio(_log_error(log_t, pred, sigma), log_t, region)


def _log_error(log_t: np.ndarray, pred: np.ndarray, sigma: float = HFEN_SIGMA) -> np.ndarray:
    """``LoG(I') - LoG(I)`` given ``LoG(I)``."""
    log_p = ndimage.gaussian_laplace(np.asarray(pred, np.float32), sigma)
    log_p -= log_t
    return log_p


def _hfen_ratio(log_err: np.ndarray, log_t: np.ndarray, region: np.ndarray | None) -> float:
    if region is not None:
        log_t, log_err = log_t[region], log_err[region]
    den = float(np.linalg.norm(log_t.ravel().astype(np.float64)))
    if den == 0:
        raise ValueError("HFEN undefined: the ground truth has no high-frequency content (LoG is zero)")
    return float(np.linalg.norm(log_err.ravel().astype(np.float64)) / den)


# ---------------------------------------------------------------------------------------------------------
# all at once


def second_difference(x: np.ndarray, axis: int) -> np.ndarray:
    """``D_a(x)[i] = x[i-1] - 2 x[i] + x[i+1]`` along ``axis`` (float32; 2 shorter along it)."""
    x = np.asarray(x, np.float32)
    n = x.shape[axis]
    d = x[_along(x.ndim, axis, 0, n - 2)] + x[_along(x.ndim, axis, 2, n)]  # slices: views, no copies
    d -= 2 * x[_along(x.ndim, axis, 1, n - 1)]
    return d


def _along(ndim: int, axis: int, start: int, stop: int) -> tuple[slice, ...]:
    return tuple(slice(start, stop) if a == axis else slice(None) for a in range(ndim))


def slice_consistency(truth: np.ndarray, pred: np.ndarray, region: np.ndarray, axis: int) -> float:
    """Through-plane consistency along ``axis`` (lower is better; 0 = the truth's slice-to-slice changes exactly):

        slice_consistency_a = || D_a(pred) - D_a(truth) ||_2 / || D_a(truth) ||_2

    over the voxels of ``region`` (the brain) that have both neighbours along ``axis``; ``D_a`` is
    :func:`second_difference`. ``truth`` and ``pred`` in the same min-max-normalized units (here the truth's
    clipped min-max, module docstring). A stack of 2-D predictions that jump from slice to slice along ``a`` (an
    intensity offset, a structure that comes and goes) scores high along ``a`` and not along the in-plane axes.
    NaN when the truth has no second difference in the region."""
    region = np.asarray(region, bool)
    reg = region[_along(region.ndim, axis, 1, region.shape[axis] - 1)]
    dt = second_difference(truth, axis)[reg]
    dp = second_difference(pred, axis)[reg]
    den = float(np.sqrt(np.sum(dt.astype(np.float64) ** 2)))
    if den == 0:
        return float("nan")
    return float(np.sqrt(np.sum((dp.astype(np.float64) - dt) ** 2)) / den)


@dataclass
class Reference:
    """The ground truth's share of the metrics, computed once per subject by :func:`prepare_reference`."""

    truth: np.ndarray  # (X, Y, Z) float32, clipped min-max [0, 1]
    regions: dict[str, np.ndarray]  # full / brain / brain_valid boolean masks
    data_range: float  # R = max - min of the clipped normalised truth
    mu: np.ndarray  # G * T (SSIM window mean)
    sq: np.ndarray  # G * T^2
    log: np.ndarray  # LoG(T) for HFEN


def prepare_reference(
    truth: np.ndarray, mask: np.ndarray, *, min_slice: int = 0, lower_pct: float = 1, upper_pct: float = 99
) -> Reference:
    """Normalise the truth (module docstring) and precompute its filtered terms for SSIM and HFEN."""
    truth = np.asarray(truth)
    mask = np.asarray(mask)
    if truth.ndim != 3:
        raise ValueError(f"expected 3-D arrays, got truth of shape {truth.shape}")
    if mask.shape != truth.shape:
        raise ValueError(f"mask shape {mask.shape} differs from truth shape {truth.shape}")
    regions = region_masks(mask, min_slice)
    t = clipped_minmax(truth, regions["brain"], lower_pct, upper_pct)  # (X, Y, Z) float32 in [0, 1]
    data_range = float(t.max() - t.min())
    if data_range <= 0:
        raise ValueError("ground truth is constant inside the brain: PSNR/SSIM range is zero")
    log_t = ndimage.gaussian_laplace(t, HFEN_SIGMA)
    return Reference(t, regions, data_range, _gauss(t, SSIM_SIGMA), _gauss(t * t, SSIM_SIGMA), log_t)


def metrics_against(ref: Reference, pred: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRIC_KEYS` of ``pred`` ([0, 1] units) against a prepared reference."""
    t = ref.truth
    p = np.asarray(pred, np.float32)
    _check_pair(t, p)
    out: dict[str, float] = {}
    for name, reg in ref.regions.items():
        suffix = "" if name == "full" else f"_{name}"
        out[f"psnr{suffix}"] = psnr(t, p, ref.data_range, None if name == "full" else reg)
    smap = ssim_map(t, p, ref.data_range, truth_terms=(ref.mu, ref.sq))
    for name, reg in ref.regions.items():
        out["ssim" if name == "full" else f"ssim_{name}"] = float(np.mean(smap[reg], dtype=np.float64))
    del smap
    out["ssim_thesis_1d"] = ssim_thesis_1d(t, p, ref.data_range, ref.regions["brain"])
    out["ssim_thesis_1d_full"] = ssim_thesis_1d(t, p, ref.data_range)
    log_err = _log_error(ref.log, p)
    out["hfen"] = _hfen_ratio(log_err, ref.log, None)
    out["hfen_brain"] = _hfen_ratio(log_err, ref.log, ref.regions["brain"])
    out["mae_brain"] = mae(t, p, ref.regions["brain"])
    for view, axis in CONSISTENCY_AXES.items():
        out[f"slice_consistency_{view}"] = slice_consistency(t, p, ref.regions["brain"], axis)
    return {k: out[k] for k in METRIC_KEYS}


def compute_metrics(
    truth: np.ndarray,
    pred: np.ndarray,
    mask: np.ndarray,
    *,
    min_slice: int = 0,
    lower_pct: float = 1,
    upper_pct: float = 99,
) -> dict[str, float]:
    """Every metric of thesis 3.3 plus HFEN and MAE, in the truth's clipped min-max units (module docstring).

    Returns the keys of :data:`METRIC_KEYS`: ``psnr``, ``psnr_brain``, ``psnr_brain_valid`` (dB, R = range of
    the clipped normalised truth); ``ssim``, ``ssim_brain``, ``ssim_brain_valid`` (3-D Gaussian-window SSIM map
    averaged over each region); ``ssim_thesis_1d`` / ``ssim_thesis_1d_full`` (thesis formula on the flattened
    brain voxels / on the whole image, the "brain SSIM" and "SSIM" columns of thesis table 1); ``hfen`` /
    ``hfen_brain`` (LoG sigma 1.5 voxels, norms over the whole image / the brain); ``mae_brain``;
    ``slice_consistency_axial`` / ``_coronal`` / ``_sagittal`` (:func:`slice_consistency` along canonical axes 2,
    1, 0 over the brain: how far the slice-to-slice second differences depart from the truth's). To score
    several predictions of one subject, use
    :func:`compute_metrics_many` (the truth's filtering is then done once).
    """
    _check_pair(np.asarray(truth), np.asarray(pred), np.asarray(mask))
    ref = prepare_reference(truth, mask, min_slice=min_slice, lower_pct=lower_pct, upper_pct=upper_pct)
    return metrics_against(ref, pred)


def compute_metrics_many(
    truth: np.ndarray,
    preds: Mapping[str, np.ndarray],
    mask: np.ndarray,
    *,
    min_slice: int = 0,
    lower_pct: float = 1,
    upper_pct: float = 99,
) -> dict[str, dict[str, float]]:
    """:func:`compute_metrics` for several predictions of one truth: ``{name: metrics}``."""
    ref = prepare_reference(truth, mask, min_slice=min_slice, lower_pct=lower_pct, upper_pct=upper_pct)
    return {name: metrics_against(ref, pred) for name, pred in preds.items()}
