"""Synthetic preprocessed work folders (docs/data-layout.md) for the dataset tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synth7t.io import Volume, save_volume, write_json

AFFINE = np.diag([0.65, 0.65, 0.65, 1.0])


def brain_volumes(shape, center, radii, rng: np.random.Generator):
    """An ellipsoidal 'brain' with three tissue classes: returns (t3, t7, mask) float32/uint8 (X, Y, Z)."""
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(sum(((g - c) / rr) ** 2 for g, c, rr in zip(grid, center, radii, strict=True)))
    mask = (r < 1.0).astype(np.uint8)
    tissue = np.where(r < 0.45, 2, np.where(r < 0.8, 1, 0))  # WM core, GM shell, CSF rim
    t3_means, t7_means = np.array([300.0, 600.0, 900.0]), np.array([150.0, 500.0, 700.0])
    t3 = (t3_means[tissue] + rng.normal(0, 40, shape)) * mask
    t7 = (t7_means[tissue] + rng.normal(0, 30, shape)) * mask
    return t3.astype(np.float32), t7.astype(np.float32), mask


def write_subject(work: Path, name: str, *, shape=(40, 48, 30), center=None, radii=None, seed=0,
                  t7=True, age=70, sex="F", group="healthy", min_slice=0, rejected=False, done=True,
                  prep: dict | None = None, provenance: bool = True):
    """One subject folder of the preprocessed work layout; returns the folder.

    ``provenance.json`` records the pipeline's default settings, changed by ``prep`` (PreprocessConfig fields).
    """
    rng = np.random.default_rng(seed)
    center = center or tuple(n / 2 for n in shape)
    radii = radii or tuple(n * 0.35 for n in shape)
    t3, t7v, mask = brain_volumes(shape, center, radii, rng)
    folder = work / name
    folder.mkdir(parents=True)
    save_volume(folder / "t3.nii.gz", Volume(t3, AFFINE))
    if t7:
        save_volume(folder / "t7.nii.gz", Volume(t7v, AFFINE))
    save_volume(folder / "mask.nii.gz", Volume(mask, AFFINE), dtype=np.uint8)
    save_volume(folder / "mask_csf.nii.gz", Volume(mask, AFFINE), dtype=np.uint8)
    write_json(folder / "subject.json", {"id": name, "age": age, "sex": sex, "diagnosis": None, "group": group})
    write_json(folder / "qc.json", {"min_slice": min_slice, "motion_score": 0.1, "registration_ncc": 0.9,
                                    "rejected": rejected, "flagged": False,
                                    "reasons": ["too much motion"] if rejected else [],
                                    "details": {"mask_method_3t": (prep or {}).get("skullstrip", "deepbet")}})
    if provenance:
        from synth7t.preprocess.pipeline import PreprocessConfig

        cfg = PreprocessConfig(**(prep or {}))
        write_json(folder / "provenance.json", {"params": cfg.method_params(), "params_hash": cfg.params_hash()})
    if done:
        (folder / ".done").write_text(json.dumps({"params_hash": "abc"}))
    return folder


def make_work(root: Path, n: int = 6, **kw) -> Path:
    """A work folder of ``n`` subjects of varied brain positions, sizes and covariates."""
    work = root / "work"
    groups = ["healthy", "ill", None]
    for i in range(n):
        shape = (40 + 2 * (i % 3), 48, 30 + i % 2)
        radii = (12 + i % 4, 15 + (i * 3) % 5, 9 + i % 3)
        center = (18 + i % 5, 22 + (i * 2) % 5, 15)
        write_subject(work, f"s{i:03d}", shape=shape, center=center, radii=radii, seed=i,
                      age=60 + i, sex="FM"[i % 2], group=groups[i % 3], **kw)
    return work


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    """(work, store) for a packed cohort of 8 subjects plus one rejected, one unfinished, one without 7T."""
    from synth7t.dataset.pack import pack

    root = tmp_path_factory.mktemp("packed")
    work = make_work(root, 8)
    write_subject(work, "zrej", rejected=True, seed=20)
    write_subject(work, "zund", done=False, seed=21)
    write_subject(work, "znot7", t7=False, seed=22, min_slice=8)
    store = root / "store"
    pack(work, store, seed=0, progress=False)
    return work, store


def write_store(out: Path, n: int, shape=(20, 64, 64), seed: int = 0) -> Path:
    """A slice store written directly (no NIfTI, no GMM): fast, for memory and loader tests."""
    from synth7t.dataset.cropnorm import make_geometry
    from synth7t.dataset.pack import _write_meta

    rng = np.random.default_rng(seed)
    Z, H, W = shape
    subjects = {}
    for i in range(n):
        name = f"m{i:04d}"
        (out / name).mkdir(parents=True)
        for kind, dtype in (("t3", np.float16), ("t7", np.float16), ("mask", np.uint8)):
            arr = np.lib.format.open_memmap(out / name / f"{kind}.npy", mode="w+", dtype=dtype, shape=shape)
            arr[:] = rng.random(shape) if kind != "mask" else 1
            arr.flush()
            del arr
        geom = make_geometry((H, W, Z), ((0, H), (0, W), (0, Z)), (H, W), 32)
        subjects[name] = {"geometry": geom.to_dict(), "shape": list(shape), "has_t7": True,
                          "limits": {"t3": [0.0, 1.0], "t7": [0.0, 1.0]}, "valid_slices": list(range(Z)),
                          "z_mid": (Z - 1) / 2, "age": None, "sex": None, "group": None, "gmm_t3": None}
    opts = {"split": (n, 0, 0), "seed": 0, "stratify": False, "lower_pct": 1.0, "upper_pct": 99.0}
    return _write_meta(out, subjects, {}, (H, W), opts, "synthetic")
