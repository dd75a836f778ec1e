"""Baselines the model must beat: the 3T input itself, plain interpolation of a ~1 mm 3T to the 7T grid, and
interpolation followed by a global intensity mapping (histogram matching).

A model gains over interpolation in two ways: by mapping 3T contrast onto 7T contrast (a global, monotone
intensity map does much of that) and by adding detail. The histogram-matching baselines separate the two:

* ``histmatch_population`` (realizable): the cubic B-spline baseline with its brain histogram matched to the
  *training split's* mean 7T brain histogram (:func:`population_quantiles`). Uses nothing a user lacks.
* ``histmatch_oracle`` (an upper bound, not a method): the same, matched to the subject's own 7T. No global
  intensity mapping can do better on the histogram; the model's gain over it is the detail it adds.

Histogram matching (:func:`synth7t.intensity.histogram_match`) maps each brain voxel's rank
``u = (rank + 1/2) / N`` through the reference quantile function; voxels outside the mask keep 0.

Two ways to build the interpolation baselines:

* :func:`baseline_interpolations` (the default of ``synth7t evaluate``): the preprocessed 3T is already on the
  7T grid (``t3.nii.gz`` of the work folder). It is *simulated* at 1 mm — Gaussian anti-aliasing with
  ``sigma = (s - 1) / 2`` voxels (s = low-res / 7T voxel size along the axis, scikit-image's ``resize`` rule)
  then sampling at the centres of a 1 mm grid covering the same field of view — and interpolated back to the
  7T grid with trilinear (order 1) and cubic B-spline (order 3) interpolation. This is what a user gets by
  upsampling a standard 1 mm acquisition, without any registration error between the baselines and the model.
* :func:`baseline_from_lowres`: a separate low-resolution 3T :class:`~synth7t.io.Volume` whose affine is
  already in the 7T's world frame (e.g. registered rigidly and the transform written into its header) is
  resampled onto the 7T affine and shape through world coordinates, ``vox_src = A_src^-1 A_7T vox_7T``.
  Voxels outside the source's field of view are 0.

Both use ``scipy.ndimage.affine_transform`` with a diagonal or 4x4 matrix, so no coordinate array of the
size of the volume is ever built. Intensities are not changed (normalise before or after, as you like: the
interpolation is linear in the data).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from synth7t.intensity import (  # noqa: F401  (histogram matching lives in synth7t.intensity; re-exported)
    HISTOGRAM_BINS,
    QUANTILE_LEVELS,
    brain_histogram,
    histogram_match,
    population_quantiles,
    quantiles,
)
from synth7t.io import Volume

log = logging.getLogger(__name__)

INTERPOLATIONS = {"trilinear": 1, "bspline": 3}
"""Baseline name -> spline order used by :mod:`scipy.ndimage`."""

MODEL = "model"
ORACLES = ("histmatch_oracle",)  # upper bounds that use the subject's own 7T: never "the best baseline"
BASELINES = ("t3_input", "trilinear", "bspline", "histmatch_population", *ORACLES)
REALIZABLE = tuple(b for b in BASELINES if b not in ORACLES)
METHODS = (*BASELINES, MODEL)
"""Every method a subject is scored with, in the order of the report's rows (the model last)."""
METHOD_LABELS = {
    "t3_input": "3T input",
    "trilinear": "trilinear (1 mm 3T)",
    "bspline": "cubic B-spline (1 mm 3T)",
    "histmatch_population": "B-spline + histogram matched to the training 7T",
    "histmatch_oracle": "B-spline + histogram matched to its own 7T (oracle)",
    "model": "synth7t model",
}


def _check_zooms(zooms: Sequence[float], name: str) -> np.ndarray:
    z = np.asarray(zooms, dtype=np.float64).ravel()
    if z.shape != (3,) or not np.all(np.isfinite(z)) or np.any(z <= 0):
        raise ValueError(f"{name} must be three positive voxel sizes in mm, got {zooms!r}")
    return z


def lowres_shape(shape: Sequence[int], zooms: Sequence[float], zooms_lowres: Sequence[float]) -> tuple[int, ...]:
    """Shape of the low-res grid covering the same field of view: ``max(1, round(n * z / z_low))`` per axis."""
    z = _check_zooms(zooms, "zooms")
    zl = _check_zooms(zooms_lowres, "zooms_lowres")
    return tuple(max(1, int(round(n * a / b))) for n, a, b in zip(shape, z, zl, strict=True))


def downsample(
    image: np.ndarray, zooms: Sequence[float], zooms_lowres: Sequence[float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """Simulate a low-resolution acquisition of ``image`` (X, Y, Z) -> (x, y, z) float32.

    With ``s = zooms_lowres / zooms`` (> 1 when downsampling), the image is smoothed with a Gaussian of
    ``sigma = max(0, (s - 1) / 2)`` voxels, then sampled trilinearly at the low-res voxel centres
    ``c_i = (i + 1/2) s - 1/2`` (in high-res voxel indices: both grids share the field-of-view edges).
    """
    if np.asarray(image).ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {np.shape(image)}")
    s = _check_zooms(zooms_lowres, "zooms_lowres") / _check_zooms(zooms, "zooms")
    sigma = np.maximum(0.0, (s - 1.0) / 2.0)
    img = np.asarray(image, dtype=np.float32)
    if np.any(sigma > 0):
        img = ndimage.gaussian_filter(img, sigma, mode="nearest")
    out_shape = lowres_shape(img.shape, zooms, zooms_lowres)
    return _diagonal_transform(img, s, 0.5 * s - 0.5, out_shape, order=1)


def upsample(low: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Interpolate a low-res image (x, y, z) back to the high-res ``shape`` (X, Y, Z) sharing its field of view.

    High-res voxel j maps to low-res coordinate ``u = (j + 1/2) / s - 1/2`` with ``s = X / x`` per axis;
    ``order`` 1 is trilinear, 3 a cubic B-spline (scipy's spline prefilter); borders are extended (nearest).
    """
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"order must be 0..5, got {order}")
    shape = tuple(int(n) for n in shape)
    low = np.asarray(low, dtype=np.float32)
    s = np.asarray(shape, np.float64) / np.asarray(low.shape, np.float64)
    return _diagonal_transform(low, 1.0 / s, 0.5 / s - 0.5, shape, order=order)


def _diagonal_transform(img: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape, order: int) -> np.ndarray:
    """``out[j] = img(scale * j + offset)`` per axis (scipy's fast diagonal path, borders extended)."""
    with warnings.catch_warnings():  # scipy warns that 1-D matrices mean diagonals since 0.18: intended
        warnings.simplefilter("ignore", UserWarning)
        return ndimage.affine_transform(
            img, scale, offset=offset, output_shape=tuple(shape), order=order, mode="nearest", output=np.float32
        )


def baseline_interpolations(
    t3_on_7t_grid: np.ndarray,
    zooms_7t: Sequence[float],
    zooms_lowres: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Trilinear and cubic B-spline baselines from a 1 mm simulation of the 3T (module docstring).

    Returns ``{"trilinear": (X, Y, Z) float32, "bspline": (X, Y, Z) float32}`` on the input's grid. With
    ``mask``, voxels outside it are set to 0 (the 3T and 7T of the work folder are skull-stripped).
    """
    t3 = np.asarray(t3_on_7t_grid)
    if t3.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {t3.shape}")
    if mask is not None and np.shape(mask) != t3.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from image shape {t3.shape}")
    low = downsample(t3, zooms_7t, zooms_lowres)  # (x, y, z) at zooms_lowres
    log.debug("baseline: %s at %s mm -> %s at %s mm", t3.shape, tuple(zooms_7t), low.shape, tuple(zooms_lowres))
    out = {}
    for name, order in INTERPOLATIONS.items():
        up = upsample(low, t3.shape, order)
        if mask is not None:
            up[np.asarray(mask) <= 0] = 0
        out[name] = up
    return out


def resample_to_grid(
    source: Volume, target_affine: np.ndarray, target_shape: Sequence[int], *, order: int = 1
) -> Volume:
    """Resample ``source`` onto the grid (``target_affine``, ``target_shape``) through world coordinates.

    ``vox_src = A_src^-1 A_tgt vox_tgt`` (both affines voxel -> world mm); spline ``order`` 1 (trilinear) or
    3 (cubic B-spline); outside the source's field of view the value is 0.
    """
    target_affine = np.asarray(target_affine, dtype=np.float64)
    if target_affine.shape != (4, 4):
        raise ValueError(f"target_affine must be 4x4, got shape {target_affine.shape}")
    target_shape = tuple(int(n) for n in target_shape)
    if len(target_shape) != 3 or min(target_shape) < 1:
        raise ValueError(f"target_shape must be three positive ints, got {target_shape}")
    matrix = np.linalg.inv(source.affine) @ target_affine  # target voxel -> source voxel (4x4)
    src = np.asarray(source.data, dtype=np.float32)
    # interpolate with extended borders (no ringing against an artificial zero edge), then zero the voxels
    # whose source position lies outside the source's field of view [-1/2, n - 1/2]
    data = ndimage.affine_transform(
        src, matrix, output_shape=target_shape, order=order, mode="nearest", output=np.float32
    )
    inside = ndimage.affine_transform(
        np.ones(src.shape, np.uint8), matrix, output_shape=target_shape, order=0, mode="grid-constant", cval=0
    )
    data[inside == 0] = 0
    return Volume(data, target_affine.copy(), source.source)


def baseline_from_lowres(t3_lowres: Volume, target: Volume) -> dict[str, Volume]:
    """Trilinear and cubic B-spline resamplings of a separate low-res 3T onto ``target``'s grid (the 7T).

    ``t3_lowres`` must already be in the 7T's world frame (module docstring). Returns
    ``{"trilinear": Volume, "bspline": Volume}`` with ``target``'s affine and shape.
    """
    return {
        name: resample_to_grid(t3_lowres, target.affine, target.shape, order=order)
        for name, order in INTERPOLATIONS.items()
    }
