"""Small test volumes for the preprocessing tests: the deepmriprep 0.5 mm brain template block-averaged to
2.5 mm (68 x 82 x 68 voxels), plus helpers that add a bias field, move the brain and write subjects."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from synth7t.io import Volume, save_volume

VOXEL_MM = 2.5


@functools.lru_cache(maxsize=1)
def _template_small() -> Volume:
    import nibabel as nib

    from synth7t.demo import template_path

    img = nib.load(str(template_path()))
    data = np.asarray(img.dataobj, np.float32)  # (339, 411, 339) at 0.5 mm
    f = int(round(VOXEL_MM / 0.5))
    sx, sy, sz = (s // f * f for s in data.shape)
    small = data[:sx, :sy, :sz].reshape(sx // f, f, sy // f, f, sz // f, f).mean(axis=(1, 3, 5))
    block = np.eye(4)
    block[:3, :3] *= f
    block[:3, 3] = (f - 1) / 2  # new voxel i is centred on old voxel f * i + (f - 1) / 2
    aff = img.affine @ block
    small = small / small.max()
    small[small < 0.02] = 0.0
    return Volume(small.astype(np.float32), aff)


@pytest.fixture
def brain() -> Volume:
    """Skull-stripped brain, intensities in [0, 1], exact-zero background, 2.5 mm, RAS."""
    v = _template_small()
    return Volume(v.data.copy(), v.affine.copy())


def bias_field(vol: Volume, strength: float = 0.4) -> np.ndarray:
    """Smooth multiplicative field ``exp(strength * (x/80 + 0.5 y^2/80^2 - z/100))`` (x, y, z in mm from centre)."""
    ijk = np.indices(vol.shape).reshape(3, -1).T
    xyz = ijk @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    xyz = xyz - xyz.mean(0)
    x, y, z = xyz.T
    f = np.exp(strength * (x / 80 + 0.5 * (y / 80) ** 2 - z / 100))
    return f.reshape(vol.shape).astype(np.float32)


def moved_affine(angle_deg: float = 6.0, shift_mm=(4.0, -3.0, 5.0), center=(0.0, -18.0, 0.0)) -> np.ndarray:
    """World -> world rigid transform: rotation about z through ``center`` then ``shift_mm``."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    c = np.asarray(center)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = c - rot @ c + np.asarray(shift_mm)
    return out


def write_pair(folder: Path, sid: str, brain: Volume, *, seed: int = 0) -> tuple[Path, Path]:
    """Write a '7T' (brain x bias + noise, 2.5 mm) and a '3T' (brain moved by :func:`moved_affine`, 3 mm).

    The 3T shows the anatomy at world point ``T @ x`` at position ``x``: its affine is ``inv(T) @ A``.
    """
    from synth7t.preprocess.register import resample_to

    rng = np.random.default_rng(seed)
    t7 = brain.data * bias_field(brain, 0.3) + np.abs(rng.normal(0, 0.01, brain.shape)).astype(np.float32)
    t7[brain.data == 0] = 0
    t3 = resample_to(brain, 3.0, order=1)
    t3 = Volume(t3.data, np.linalg.inv(moved_affine()) @ t3.affine)
    p7, p3 = folder / f"{sid}_7T.nii.gz", folder / f"{sid}_3T.nii.gz"
    save_volume(p7, Volume(t7 * 1000, brain.affine), dtype=np.int16)
    save_volume(p3, Volume(t3.data * 800, t3.affine), dtype=np.int16)
    return p3, p7


@pytest.fixture
def helpers():
    """The helper functions above (test modules cannot import conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(bias_field=bias_field, moved_affine=moved_affine, write_pair=write_pair)
