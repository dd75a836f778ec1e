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
* :func:`nyul_landmarks`, :func:`nyul_standard`, :func:`nyul_table`: Nyúl-Udupa histogram standardization
  (``data.standardize: nyul``; Nyúl, Udupa and Zhang, IEEE TMI 2000). Each training subject's 3T brain
  landmarks (percentiles :data:`NYUL_PERCENTILES`) are mapped linearly so that the first and last land on the
  standard scale :data:`NYUL_SCALE`; the standard landmarks are the mean of these rescaled landmarks. A new
  image's own landmarks are then mapped piecewise linearly onto the standard ones (the end segments extended,
  the result clipped to [0, 1]): monotone, and each landmark lands exactly on its standard landmark. Written here
  rather than taken from TorchIO's ``HistogramStandardization``: TorchIO 1.2.1 installs beside our torch (it does
  not pull torchvision) but would add five packages to every install for ~50 lines of numpy, it trains from image
  files or ``Subject`` objects rather than the memory-mapped stacks of a slice store, and the map must stay
  importable by ``predict`` with nothing but numpy.
* :func:`standardization_table` / :func:`standardize_input`: the one code path from a model folder's
  ``input_standardization`` record to the map applied to a stack, used by training, ``predict`` and ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

QUANTILE_LEVELS = np.linspace(0.0, 1.0, 1001)
"""Probabilities at which quantile functions are stored (0.1 % steps)."""
HISTOGRAM_BINS = 1024
STANDARDIZATIONS = ("none", "histmatch", "nyul")
"""Values of ``data.standardize`` and of ``input_standardization["method"]`` in a model folder's config.json."""
NYUL_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
"""Default Nyúl landmarks: percentiles of the brain voxels (the first and last define the scale's ends)."""
NYUL_SCALE = (0.0, 1.0)
"""Standard scale ``(s1, s2)``: where the first and last landmarks of every training subject are mapped. The
normalized stacks already clip at the brain's 1st and 99th percentiles onto [0, 1], so this keeps their units."""


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
    out = np.clip(np.interp(x, *table), 0.0, 1.0).astype(np.float32)  # a no-op for histmatch (reference in [0, 1])
    out[~brain] = 0
    return out


def float16_lookup(table: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
    """:func:`standardize` with ``table`` of every float16 value, indexed by its bit pattern (65,536 float32s).

    The slice store keeps its stacks in float16, so ``lookup[stack.view(np.uint16)]`` gives exactly what
    :func:`standardize` gives for ``stack.astype(np.float32)``, at a table look-up per voxel instead of a binary
    search in the map's knots (training reads thousands of slices per minute). None for no table.
    """
    if table is None:
        return None
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore"):  # +inf maps to the last knot's value (np.interp warns on the way)
        return standardize(values, table=table)  # NaN is not brain (NaN > 0 is False): 0, as in standardize


def nyul_landmarks(values: np.ndarray, percentiles: Sequence[float] = NYUL_PERCENTILES) -> np.ndarray:
    """The Nyúl landmarks of a brain: the ``percentiles`` (0-100) of ``values`` (its brain voxels), float64."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("cannot take landmarks of an empty set of values")
    return np.percentile(v, np.asarray(percentiles, np.float64))


def nyul_standard(landmarks: Sequence[np.ndarray], scale: tuple[float, float] = NYUL_SCALE) -> np.ndarray:
    """Standard landmarks learned from training subjects' landmarks (one array per subject, same percentiles).

    Each subject's landmarks ``m`` are mapped linearly so that ``m[0] -> s1`` and ``m[-1] -> s2``; the standard
    landmarks are the mean over subjects of the mapped ones (every subject weighs the same). Non-decreasing.
    """
    ms = [np.asarray(m, np.float64) for m in landmarks]
    if not ms or any(m.ndim != 1 or m.size < 2 or m.shape != ms[0].shape for m in ms):
        raise ValueError("need at least one set of >= 2 landmarks, all of the same length")
    s1, s2 = scale
    rescaled = []
    for m in ms:
        if not m[-1] > m[0]:
            raise ValueError(f"degenerate landmarks (first {m[0]:g} >= last {m[-1]:g}): a brain of one intensity?")
        rescaled.append(s1 + (m - m[0]) / (m[-1] - m[0]) * (s2 - s1))
    return np.mean(rescaled, axis=0)


def nyul_table(landmarks: np.ndarray, standard: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(xs, ys)`` on [0, 1] of the piecewise-linear map of an image's ``landmarks`` onto ``standard``.

    Between landmarks the map is linear; below the first and above the last landmark the end segments are
    extended to the ends of the normalized range (0 and 1). Tied landmarks (a heavily clipped image) map to the
    mean of their standard landmarks. Monotone when ``standard`` is non-decreasing.
    """
    m, s = np.asarray(landmarks, np.float64), np.asarray(standard, np.float64)
    if m.shape != s.shape or m.ndim != 1 or m.size < 2:
        raise ValueError(f"landmarks {m.shape} and standard landmarks {s.shape} must be two equal 1-D arrays")
    if np.any(np.diff(s) < 0):
        raise ValueError("standard landmarks must be non-decreasing")
    xs, inverse = np.unique(m, return_inverse=True)
    ys = np.bincount(inverse, weights=s) / np.bincount(inverse)
    if xs.size == 1:  # one intensity: shift it onto its standard value
        return np.array([xs[0], xs[0] + 1.0], np.float32), np.array([ys[0], ys[0] + 1.0], np.float32)
    if xs[0] > 0:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        xs, ys = np.concatenate([[0.0], xs]), np.concatenate([[ys[0] - xs[0] * slope], ys])
    if xs[-1] < 1:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        xs, ys = np.concatenate([xs, [1.0]]), np.concatenate([ys, [ys[-1] + (1.0 - xs[-1]) * slope]])
    return xs.astype(np.float32), ys.astype(np.float32)


def standardization_table(record: dict | None, brain_values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The map of a model's ``input_standardization`` ``record`` for a brain with these (non-zero) values.

    ``histmatch``: the brain's quantile function onto ``reference_quantiles`` (:func:`quantile_table`);
    ``nyul``: its landmarks at ``percentiles`` onto ``standard_landmarks`` (:func:`nyul_table`); ``none`` (or no
    record, or no brain voxel): None.
    """
    method = (record or {}).get("method", "none")
    if method not in STANDARDIZATIONS:
        raise ValueError(f"unknown input standardization {method!r} (known: {', '.join(STANDARDIZATIONS)})")
    values = np.asarray(brain_values)
    if method == "none" or values.size == 0:
        return None
    if method == "histmatch":
        return quantile_table(quantiles(values), record["reference_quantiles"])
    return nyul_table(nyul_landmarks(values, record["percentiles"]), record["standard_landmarks"])


def standardize_input(stack: np.ndarray, record: dict | None, *,
                      table: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Apply a model's input standardization to a normalized 3T ``stack`` (float32, background kept 0).

    The map is built from the stack's own brain (its non-zero voxels) unless ``table`` gives one (training
    caches each subject's). The single code path of training (:class:`synth7t.dataset.slices.SliceDataset`),
    ``predict`` and ``evaluate`` (:meth:`synth7t.inference.Predictor.predict_stack`).
    """
    x = np.asarray(stack, np.float32)
    if table is None:
        table = standardization_table(record, x[x > 0])
    return x if table is None else standardize(x, table=table)
