"""Fake prediction outputs (tiny NIfTIs in both layouts); Chromium comes from tests/conftest.py's ``chromium``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synth7t.io import Volume, save_volume

VOXEL_MM = 0.5
SHAPE = (16, 16, 26)
PROVENANCE = {"synth7t_version": "0.1.0", "model": {"folder": "tiny-run", "sha256": "ab" * 32},
              "parameters": {"tta": False}}


def make_output(files: dict[str, Path], *, depth: int = 10, base: float = 0.5, nan: bool = False,
                empty_mask: bool = False, provenance: bool = True, uncertainty: bool = False,
                leak: bool = False) -> None:
    """A synthetic 7T whose mask is a 10 x 10 x ``depth`` box (0.5 mm voxels: ``depth`` x 0.0125 mL); brain
    values alternate base -/+ 0.05 (median ``base``, IQR 0.1). Uncertainty: 0.02, 0.2 in one of 10 slices."""
    aff = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    mask = np.zeros(SHAPE, np.float32)
    mask[3:13, 3:13, 2:2 + depth] = 1
    checker = (np.indices(SHAPE).sum(0) % 2) * 0.1 - 0.05
    img = np.where(mask > 0, base + checker, 0).astype(np.float32)
    if nan:
        img[8, 8, 5] = np.nan
    if leak:
        img[0, 0, 0] = 0.3
    save_volume(files["syn7t"], Volume(img, aff))
    save_volume(files["mask"], Volume(mask * (not empty_mask), aff), dtype=np.uint8)
    if uncertainty:
        unc = mask * 0.02
        unc[3:13, 3:13, 2] = 0.2
        save_volume(files["uncertainty"], Volume(unc.astype(np.float32), aff))
    if provenance:
        files["provenance"].write_text(json.dumps(PROVENANCE))


def plain_files(root: Path, name: str) -> dict[str, Path]:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    return {"syn7t": d / "syn7t.nii.gz", "mask": d / "mask.nii.gz", "uncertainty": d / "uncertainty.nii.gz",
            "provenance": d / "provenance.json"}


def bids_files(root: Path, sub: str, ses: str) -> dict[str, Path]:
    anat = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    base = anat / f"sub-{sub}_ses-{ses}"
    return {"syn7t": Path(f"{base}_desc-synth7T_T1w.nii.gz"), "mask": Path(f"{base}_desc-brain_mask.nii.gz"),
            "uncertainty": Path(f"{base}_desc-synth7TUncertainty_T1w.nii.gz"),
            "provenance": Path(f"{base}_desc-synth7T_T1w.json")}


COHORT = {  # name: make_output arguments; brain volume = depth x 0.0125 mL
    "a": {"depth": 8, "base": 0.50, "uncertainty": True},
    "b": {"depth": 9, "base": 0.52, "uncertainty": True},
    "c": {"depth": 10, "base": 0.48},
    "d": {"depth": 11, "base": 0.51},
    "e": {"depth": 12, "base": 0.49},
    "big": {"depth": 20, "base": 0.50},
    "leak": {"depth": 10, "base": 0.50, "leak": True},
    "nan": {"nan": True},
    "empty": {"empty_mask": True},
    "noprov": {"provenance": False},
}


@pytest.fixture
def fake_out(tmp_path) -> Path:
    """OUT with the plain-layout :data:`COHORT` and one BIDS output (sub-01_ses-1, depth 10)."""
    root = tmp_path / "out"
    for name, kwargs in COHORT.items():
        make_output(plain_files(root, name), **kwargs)
    make_output(bids_files(root, "01", "1"), depth=10, base=0.50)
    return root
