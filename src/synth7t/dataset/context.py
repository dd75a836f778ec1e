"""The context vector: subject covariates and slice position fed to the U-net (thesis 3.1.5).

``CONTEXT_DIM = 7`` float32 values, in this order::

    [age_scaled, age_known, sex_F, sex_M, healthy, ill, slice_position]

* ``age_scaled = (age - 70) / 10`` when the age is known, else ``0`` with ``age_known = 0``: a missing age is
  explicit, never a 0-year-old.
* sex one-hot (``sex_F``, ``sex_M``); both 0 = unknown.
* diagnosis group one-hot (``healthy`` = cognitively normal or SCD, ``ill`` = MCI or dementia);
  both 0 = unknown.
* ``slice_position = (z - z_mid) / (Z / 2)`` with ``Z`` the number of slices of the subject's brain stack
  (cropped to the brain's bounding box) and ``z_mid = (Z - 1) / 2`` its middle slice: about -1 at the bottom
  of the brain, 0 in the middle, +1 at the top.
"""

from __future__ import annotations

import math

import numpy as np

CONTEXT_DIM = 7
CONTEXT_ORDER = ("age_scaled", "age_known", "sex_F", "sex_M", "healthy", "ill", "slice_position")
AGE_CENTER = 70.0
AGE_SCALE = 10.0
SEXES = ("F", "M")
GROUPS = ("healthy", "ill")


def slice_position(z: float, z_mid: float, n_slices: int) -> float:
    """Relative slice position ``(z - z_mid) / (n_slices / 2)``.

    ``z`` and ``z_mid`` are indices in the same (cropped) stack of ``n_slices`` axial slices.
    """
    if n_slices <= 0:
        raise ValueError(f"n_slices must be positive, got {n_slices}")
    return float((z - z_mid) / (n_slices / 2.0))


def middle_slice(n_slices: int) -> float:
    """Middle of a stack of ``n_slices`` slices: ``(n_slices - 1) / 2``."""
    if n_slices <= 0:
        raise ValueError(f"n_slices must be positive, got {n_slices}")
    return (n_slices - 1) / 2.0


def _age_code(age: float | None) -> tuple[float, float]:
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return 0.0, 0.0
    age = float(age)
    if not math.isfinite(age) or age < 0:
        raise ValueError(f"age must be a finite non-negative number or None, got {age!r}")
    return (age - AGE_CENTER) / AGE_SCALE, 1.0


def _one_hot(value: str | None, choices: tuple[str, ...], what: str, *, upper: bool) -> list[float]:
    if value is None:
        return [0.0] * len(choices)
    key = value.upper() if upper else value.lower()
    if key not in choices:
        raise ValueError(f"{what} must be one of {choices} or None, got {value!r}")
    return [1.0 if key == c else 0.0 for c in choices]


def encode_context(
    age: float | None, sex: str | None, group: str | None, slice_position: float
) -> np.ndarray:
    """Encode one slice's context as a float32 vector of shape (CONTEXT_DIM,) (order: module docstring).

    ``sex`` is "F", "M" or None; ``group`` is "healthy", "ill" or None; ``slice_position`` comes from
    :func:`slice_position`.
    """
    age_scaled, age_known = _age_code(age)
    sex_code = _one_hot(sex, SEXES, "sex", upper=True)
    group_code = _one_hot(group, GROUPS, "group", upper=False)
    if not math.isfinite(slice_position):
        raise ValueError(f"slice_position must be finite, got {slice_position!r}")
    vec = [age_scaled, age_known, *sex_code, *group_code, float(slice_position)]
    return np.asarray(vec, dtype=np.float32)  # (CONTEXT_DIM,)


def describe() -> dict:
    """The encoding as stored in ``store.json`` (so a model folder can record what it was trained with)."""
    return {
        "dim": CONTEXT_DIM,
        "order": list(CONTEXT_ORDER),
        "age_center": AGE_CENTER,
        "age_scale": AGE_SCALE,
        "slice_position": "(z - z_mid) / (Z / 2), Z = slices of the cropped stack, z_mid = (Z - 1) / 2",
    }
