"""Crop/pad a brain volume into an axial slice stack and back, and clipped min-max normalization.

Shared by packing (:mod:`synth7t.dataset.pack`, thesis 3.1.2-3.1.3) and prediction (:mod:`synth7t.inference`), so
that a model sees its inputs laid out and scaled exactly as in training. Pure functions of arrays; no files.

1. **Crop and pad.** A volume is cropped to a brain bounding box (half-open ``((x0, x1), (y0, y1), (z0, z1))`` on
   its canonical RAS+ grid, :func:`crop_box`), then centre-padded in-plane to a target size rounded up to a
   multiple of ``multiple`` (``2**k`` for a U-net with ``k`` downsamplings). The axial axis is not padded.
2. **Axes.** Stacks are ``(Z, H, W)`` = ``(z, x, y)`` of the canonical volume: axial slices first; in-plane ``H``
   runs along x (left -> Right) and ``W`` along y (posterior -> Anterior). Precisely, with
   ``(bh, _), (bw, _) = pad``::

       stack[k, bh + i, bw + j] = volume[x0 + i, y0 + j, z0 + k]    0 <= i < x1 - x0, 0 <= j < y1 - y0

   and every other in-plane position is 0. :func:`uncrop` inverts this exactly.
3. **Clipped min-max** (thesis 1.3.1), per image: with ``lo, hi`` the brain's 1st / 99th percentiles
   (:func:`brain_limits`), ``v' = clip((v - lo) / (hi - lo), 0, 1)`` inside the brain mask and 0 outside
   (:func:`normalize`, :func:`clipped_minmax`); :func:`denormalize` inverts ``v = v' (hi - lo) + lo`` (exact for
   brain voxels inside ``[lo, hi]``).

(:func:`synth7t.evaluation.metrics.clipped_minmax` is a different function: it keeps the voxels outside the
mask, returns no limits and maps a constant brain to 0, as the metrics need.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

@dataclass(frozen=True)
class CropGeometry:
    """Where a ``(Z, H, W)`` stack sits in its subject's ``(X, Y, Z)`` grid (see the module docstring)."""

    full_shape: tuple[int, int, int]  # (X, Y, Z) of the subject's grid
    box: Box  # half-open brain bounding box ((x0, x1), (y0, y1), (z0, z1))
    pad: tuple[tuple[int, int], tuple[int, int]]  # ((before, after) along H, (before, after) along W)

    @property
    def hw(self) -> tuple[int, int]:
        """In-plane size (H, W) after padding."""
        (x0, x1), (y0, y1), _ = self.box
        (bh, ah), (bw, aw) = self.pad
        return (bh + x1 - x0 + ah, bw + y1 - y0 + aw)

    @property
    def stack_shape(self) -> tuple[int, int, int]:
        """Shape (Z, H, W) of the packed stack."""
        (z0, z1) = self.box[2]
        return (z1 - z0, *self.hw)

    def to_dict(self) -> dict:
        return {
            "full_shape": list(self.full_shape),
            "box": [list(b) for b in self.box],
            "pad": [list(p) for p in self.pad],
        }

    @classmethod
    def from_dict(cls, d: dict) -> CropGeometry:
        box = tuple((int(a), int(b)) for a, b in d["box"])
        pad = tuple((int(a), int(b)) for a, b in d["pad"])
        return cls(tuple(int(s) for s in d["full_shape"]), box, pad)  # type: ignore[arg-type]


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return int(math.ceil(n / multiple) * multiple)


def crop_box(mask: np.ndarray) -> Box:
    """Half-open bounding box ``((x0, x1), (y0, y1), (z0, z1))`` of the non-zero voxels of a 3-D mask."""
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {mask.shape}")
    nz = mask > 0
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(nz.any(axis=other))
        if idx.size == 0:
            raise ValueError("mask is empty: no bounding box")
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def make_geometry(
    full_shape: Sequence[int], box: Box, target_hw: Sequence[int] | None = None, multiple: int = 32
) -> CropGeometry:
    """Geometry that centre-pads ``box`` in-plane to ``target_hw`` rounded up to ``multiple``.

    ``target_hw=None`` pads the box itself up to the next multiple. Padding before = ``(H - h) // 2``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    full_shape = tuple(int(s) for s in full_shape)
    if len(full_shape) != 3:
        raise ValueError(f"full_shape must have 3 entries, got {full_shape}")
    for (a, b), n in zip(box, full_shape, strict=True):
        if not 0 <= a < b <= n:
            raise ValueError(f"box {box} does not fit in a grid of shape {full_shape}")
    h, w = box[0][1] - box[0][0], box[1][1] - box[1][0]
    th, tw = (h, w) if target_hw is None else (int(target_hw[0]), int(target_hw[1]))
    if th < h or tw < w:
        raise ValueError(f"brain box of in-plane size ({h}, {w}) does not fit in target ({th}, {tw})")
    big_h, big_w = round_up(th, multiple), round_up(tw, multiple)
    pad = (((big_h - h) // 2, big_h - h - (big_h - h) // 2), ((big_w - w) // 2, big_w - w - (big_w - w) // 2))
    return CropGeometry(full_shape, box, pad)  # type: ignore[arg-type]


def iter_crop_pad(volume: np.ndarray, geom: CropGeometry) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, slice (H, W))`` for every axial slice k of the packed stack (same dtype as ``volume``)."""
    if tuple(volume.shape) != geom.full_shape:
        raise ValueError(f"volume of shape {volume.shape} does not match the geometry's {geom.full_shape}")
    (x0, x1), (y0, y1), (z0, z1) = geom.box
    (bh, _), (bw, _) = geom.pad
    H, W = geom.hw
    for k, z in enumerate(range(z0, z1)):
        out = np.zeros((H, W), dtype=volume.dtype)
        out[bh : bh + x1 - x0, bw : bw + y1 - y0] = volume[x0:x1, y0:y1, z]
        yield k, out


def crop_pad(
    volume: np.ndarray, box: Box, target_hw: Sequence[int] | None = None, multiple: int = 32
) -> tuple[np.ndarray, CropGeometry]:
    """Crop a canonical ``(X, Y, Z)`` volume to ``box`` and centre-pad it.

    Returns ``((Z, H, W) stack, geometry)``.

    ``target_hw`` is the in-plane size to pad to (e.g. the store's, at predict time); ``None`` pads the box to
    the next multiple of ``multiple``.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    geom = make_geometry(volume.shape, box, target_hw, multiple)
    stack = np.zeros(geom.stack_shape, dtype=volume.dtype)  # (Z, H, W)
    for k, sl in iter_crop_pad(volume, geom):
        stack[k] = sl
    return stack, geom


def uncrop(stack: np.ndarray, geom: CropGeometry, fill: float = 0.0) -> np.ndarray:
    """Inverse of :func:`crop_pad`: ``(Z, H, W)`` stack -> ``(X, Y, Z)`` volume, ``fill`` outside the box."""
    if tuple(stack.shape) != geom.stack_shape:
        raise ValueError(f"stack of shape {stack.shape} does not match the geometry's {geom.stack_shape}")
    (x0, x1), (y0, y1), (z0, z1) = geom.box
    (bh, _), (bw, _) = geom.pad
    out = np.full(geom.full_shape, fill, dtype=stack.dtype)  # (X, Y, Z)
    out[x0:x1, y0:y1, z0:z1] = np.transpose(stack[:, bh : bh + x1 - x0, bw : bw + y1 - y0], (1, 2, 0))
    return out


def normalize(values: np.ndarray, mask: np.ndarray | None, limits: Sequence[float]) -> np.ndarray:
    """``clip((v - lo) / (hi - lo), 0, 1)``, 0 where ``mask`` is 0 (float32)."""
    lo, hi = float(limits[0]), float(limits[1])
    if not hi > lo:
        raise ValueError(f"normalization limits must satisfy lo < hi, got ({lo}, {hi})")
    out = np.clip((np.asarray(values, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    if mask is not None:
        out = np.where(mask > 0, out, 0.0).astype(np.float32)
    return out.astype(np.float32, copy=False)


def brain_limits(volume: np.ndarray, mask: np.ndarray, lower_pct: float = 1.0, upper_pct: float = 99.0):
    """Percentiles ``(lo, hi)`` of the brain voxels (``mask > 0``)."""
    if not 0.0 <= lower_pct < upper_pct <= 100.0:
        raise ValueError(f"need 0 <= lower_pct < upper_pct <= 100, got {lower_pct}, {upper_pct}")
    if volume.shape != mask.shape:
        raise ValueError(f"volume {volume.shape} and mask {mask.shape} differ in shape")
    brain = volume[mask > 0]
    if brain.size == 0:
        raise ValueError("mask is empty: no brain voxel to normalize with")
    lo, hi = np.percentile(brain, [lower_pct, upper_pct])
    if not hi > lo:
        raise ValueError(f"brain intensities are constant between the percentiles ({lo:g}); cannot normalize")
    return float(lo), float(hi)


def clipped_minmax(
    volume: np.ndarray, mask: np.ndarray, lower_pct: float = 1.0, upper_pct: float = 99.0
) -> tuple[np.ndarray, tuple[float, float]]:
    """Clipped min-max normalization (thesis 1.3.1): returns ``(normed float32, (lo, hi))``.

    ``lo, hi`` = brain percentiles; ``normed = clip((v - lo) / (hi - lo), 0, 1)`` in the brain, 0 outside.
    """
    limits = brain_limits(volume, mask, lower_pct, upper_pct)
    return normalize(volume, mask, limits), limits


def denormalize(values: np.ndarray, limits: Sequence[float]) -> np.ndarray:
    """Inverse of the normalization: ``v = v' (hi - lo) + lo`` (float32)."""
    lo, hi = float(limits[0]), float(limits[1])
    return (np.asarray(values, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)).astype(np.float32)
