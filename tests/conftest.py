"""Shared fixtures: small synthetic volumes written as NIfTI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """The developers' folder of real public heads (../shared/data), or None where absent."""
    env = os.environ.get("SYNTH7T_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def blob_volume():
    """A 24x28x20 ellipsoid 'brain' with an oblique, LPS-like affine."""
    from synth7t.io import Volume

    idx = np.indices((24, 28, 20)).astype(np.float32)
    c = np.array([12, 14, 10], dtype=np.float32)[:, None, None, None]
    r = np.array([9, 11, 7], dtype=np.float32)[:, None, None, None]
    d = (((idx - c) / r) ** 2).sum(0)
    data = np.where(d < 1, 100 + 50 * idx[0] / 24, 0).astype(np.float32)
    data[15, 9, 12] = 500.0  # a unique landmark
    theta = np.deg2rad(12)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    lin = rot @ np.diag([-1.2, -0.9, 1.5])  # L and P flips: LPS-oriented, oblique
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = [30.0, 20.0, -15.0]
    return Volume(data, aff)
