"""Intensity maps shared by packing, training, prediction and evaluation: quantiles, histograms, matching.

* :func:`quantiles`, :func:`brain_histogram`, :func:`population_quantiles`: a brain's intensity distribution as a
  quantile function on :data:`QUANTILE_LEVELS`, and the mean distribution of a population (every subject weighs
  the same).
* :func:`histogram_match`: exact rank-based matching of an image's brain to a reference distribution (the
  ``histmatch_*`` baselines of :mod:`synth7t.evaluation.baselines`).
* :func:`quantile_map` / :func:`standardize`: the smooth version used as *input standardization*
  (``data.standardize: histmatch``): a 3T stack's brain intensities are mapped through its own quantile function
  onto the training split's mean 7T distribution before the network sees them, at training and at prediction
  time alike (the reference is stored in the model folder). The map is monotone: it never inverts contrast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

QUANTILE_LEVELS = np.linspace(0.0, 1.0, 1001)
"""Probabilities at which quantile functions are stored (0.1 % steps)."""
HISTOGRAM_BINS = 1024


def quantiles(values: np.ndarray) -> np.ndarray:
    """The quantile function of ``values`` at :data:`QUANTILE_LEVELS` (linear interpolation), float64."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("cannot take quantiles of an empty set of values")
    return np.quantile(v, QUANTILE_LEVELS)


def population_quantiles(histograms: Sequence[np.ndarray], value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Quantile function of the *mean* of per-subject histograms (each normalised to sum 1 first).

    ``histograms`` are counts on :data:`HISTOGRAM_BINS` equal bins over ``value_range`` (see
    :func:`brain_histogram`); every subject weighs the same whatever its brain size. Within a bin the mass is
    spread uniformly, so the quantile function is piecewise linear in the bin edges.
    """
    hs = [np.asarray(h, np.float64) for h in histograms]
    if not hs or any(h.shape != (HISTOGRAM_BINS,) or h.sum() <= 0 for h in hs):
        raise ValueError(f"need at least one non-empty histogram of {HISTOGRAM_BINS} bins")
    mean = np.mean([h / h.sum() for h in hs], axis=0)
    edges = np.linspace(value_range[0], value_range[1], HISTOGRAM_BINS + 1)
    cdf = np.concatenate([[0.0], np.cumsum(mean)])
    cdf /= cdf[-1]
    keep = np.concatenate([[True], np.diff(cdf) > 0])  # strictly increasing for the inverse
    return np.interp(QUANTILE_LEVELS, cdf[keep], edges[keep])


def brain_histogram(values: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Counts of ``values`` on :data:`HISTOGRAM_BINS` bins over ``value_range`` (values outside are clipped in)."""
    v = np.clip(np.asarray(values, np.float64).ravel(), *value_range)
    return np.histogram(v, bins=HISTOGRAM_BINS, range=value_range)[0]


def histogram_match(image: np.ndarray, mask: np.ndarray, reference_quantiles: np.ndarray) -> np.ndarray:
    """Map the brain voxels of ``image`` so that their histogram follows ``reference_quantiles``.

    Voxel of rank ``r`` (ties broken by position) among the N brain voxels gets ``Q((r + 1/2) / N)``, ``Q`` the
    reference quantile function (piecewise linear on :data:`QUANTILE_LEVELS`); outside ``mask`` the output is 0.
    The map is monotone: it never inverts contrast. Returns float32 of the image's shape.
    """
    img = np.asarray(image)
    m = np.asarray(mask) > 0
    if m.shape != img.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {img.shape}")
    ref = np.asarray(reference_quantiles, np.float64)
    if ref.shape != QUANTILE_LEVELS.shape or np.any(np.diff(ref) < 0):
        raise ValueError(f"reference quantiles must be {QUANTILE_LEVELS.size} non-decreasing values")
    values = img[m]
    out = np.zeros(img.shape, np.float32)
    if values.size == 0:
        return out
    order = np.argsort(values, kind="stable")
    u = np.empty(values.size, np.float64)
    u[order] = (np.arange(values.size) + 0.5) / values.size
    out[m] = np.interp(u, QUANTILE_LEVELS, ref)
    return out


def quantile_table(source_quantiles: np.ndarray, reference_quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(xs, ys)`` of the piecewise-linear map ``Q_ref(F_src(v))`` (:func:`quantile_map`)."""
    src = np.asarray(source_quantiles, np.float64)
    ref = np.asarray(reference_quantiles, np.float64)
    if src.shape != QUANTILE_LEVELS.shape or ref.shape != QUANTILE_LEVELS.shape:
        raise ValueError(f"quantile functions must have {QUANTILE_LEVELS.size} values")
    xs, inverse = np.unique(src, return_inverse=True)
    ys = np.bincount(inverse, weights=ref) / np.bincount(inverse)
    return xs.astype(np.float32), ys.astype(np.float32)


def quantile_map(values: np.ndarray, source_quantiles: np.ndarray, reference_quantiles: np.ndarray) -> np.ndarray:
    """Map values through ``Q_ref(F_src(v))``: piecewise linear between the quantiles (float32, monotone).

    Tied source quantiles (a clipped intensity shared by many voxels) map to the mean of their reference
    quantiles; values outside the source range map to the end values.
    """
    xs, ys = quantile_table(source_quantiles, reference_quantiles)
    return np.interp(np.asarray(values, np.float32), xs, ys).astype(np.float32)


def standardize(stack: np.ndarray, reference_quantiles: np.ndarray | None = None,
                source_quantiles: np.ndarray | None = None, *,
                table: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Input standardization of a normalized 3T stack: its brain voxels (``> 0``) mapped onto the reference
    distribution by :func:`quantile_map`; the background stays 0. ``source_quantiles`` default to the stack's own;
    a precomputed :func:`quantile_table` (``table``) replaces both quantile arguments.
    """
    x = np.asarray(stack, np.float32)
    brain = x > 0
    if not brain.any():
        return np.zeros_like(x)
    if table is None:
        src = quantiles(x[brain]) if source_quantiles is None else source_quantiles
        table = quantile_table(src, reference_quantiles)
    out = np.interp(x, *table).astype(np.float32)
    out[~brain] = 0
    return out
