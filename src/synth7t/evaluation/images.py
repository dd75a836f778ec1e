"""A subject's images for scoring and display: paths, :class:`~synth7t.io.Volume` objects or arrays in, arrays in
clipped min-max units out.

The one loader shared by :mod:`~synth7t.evaluation.evaluate` (scores), :mod:`~synth7t.evaluation.report` (which
hands the arrays to :mod:`~synth7t.evaluation.figures`) and :mod:`~synth7t.evaluation.viewer`; it imports none
of them, so the evaluation package has no import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from synth7t.evaluation.metrics import clipped_minmax
from synth7t.io import Volume, load_volume


def as_array(item: Any, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A path, :class:`Volume` or array -> ``(data, zooms)`` (zooms 1 mm for a bare array)."""
    if isinstance(item, (str, os.PathLike)):
        item = load_volume(item, check_finite=False)
    if isinstance(item, Volume):
        return np.asarray(item.data, dtype=dtype), np.asarray(item.zooms, dtype=np.float64)
    arr = np.asarray(item, dtype=dtype)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {arr.shape}")
    return arr, np.ones(3)


def zooms_of(item: Any) -> np.ndarray:
    """Voxel size of a path (read from the header only), :class:`Volume` or array (1 mm)."""
    if isinstance(item, (str, os.PathLike)):
        import nibabel as nib

        return np.asarray(nib.load(str(item)).header.get_zooms()[:3], dtype=np.float64)
    if isinstance(item, Volume):
        return np.asarray(item.zooms, dtype=np.float64)
    return np.ones(3)


def load_subject(paths: Mapping[str, Any], lower_pct: float, upper_pct: float):
    """Load one subject's images -> (t3n, pred, t7n, mask, zooms), each (X, Y, Z) float32 in [0, 1] units."""
    missing = [k for k in ("t3", "pred", "t7", "mask") if k not in paths]
    if missing:
        raise ValueError(f"images entry lacks {missing}")
    mask, _ = as_array(paths["mask"])
    mask = mask > 0
    zooms = zooms_of(paths["t7"])
    t3, _ = as_array(paths["t3"])
    t3n = clipped_minmax(t3, mask, lower_pct, upper_pct)
    t3n[~mask] = 0
    del t3
    t7, _ = as_array(paths["t7"])
    t7n = clipped_minmax(t7, mask, lower_pct, upper_pct)
    t7n[~mask] = 0
    del t7
    pred, _ = as_array(paths["pred"])
    return t3n, pred, t7n, mask, zooms
