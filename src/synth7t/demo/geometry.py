"""Geometry of the simulator: axis-aligned grids, random affines, world coordinates of voxels, sampling."""

from __future__ import annotations

import numpy as np

from synth7t.io import Volume


def grid_affine(shape: tuple[int, int, int], voxel, center: np.ndarray) -> np.ndarray:
    """Affine of an axis-aligned RAS grid of ``shape`` voxels of ``voxel`` mm (scalar or 3) centred on ``center``."""
    v = np.broadcast_to(np.asarray(voxel, float), (3,))
    aff = np.diag([*v, 1.0])
    aff[:3, 3] = center - v * (np.asarray(shape) - 1) / 2.0
    return aff


def rotation(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation matrix of x, y, z angles in degrees (applied in that order)."""
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine(rng: np.random.Generator, rotation_deg: float, scale_pct: float, translation_mm: float,
                  center: np.ndarray) -> np.ndarray:
    """World -> world affine (4x4) about ``center``: rotation, anisotropic scale, translation."""
    rot = rotation(rng.uniform(-rotation_deg, rotation_deg, 3))
    scale = np.diag(1 + rng.uniform(-scale_pct, scale_pct, 3) / 100)
    lin = rot @ scale
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = center - lin @ center + rng.uniform(-translation_mm, translation_mm, 3)
    return out


def grid_points(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (N, 3) of every voxel of the grid (``shape``, ``affine``), in C order."""
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    return idx @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def sample_at(vol: Volume, world: np.ndarray, order: int = 1) -> np.ndarray:
    """Values of ``vol`` at (N, 3) world points (spline ``order``, 0 outside)."""
    from scipy.ndimage import map_coordinates

    inv = np.linalg.inv(vol.affine)
    ijk = (world @ inv[:3, :3].T.astype(np.float32) + inv[:3, 3].astype(np.float32)).T
    return map_coordinates(vol.data, ijk, order=order, mode="constant", cval=0.0)
