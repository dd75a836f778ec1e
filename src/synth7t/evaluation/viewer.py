"""The interactive NiiVue viewer page (``viewer.html``): 3T | synthetic 7T | real 7T of one subject, linked.

The page is self-contained, so it opens offline and from ``file://``: the gzip-compressed NiiVue UMD bundle
(``evaluation/static/niivue.umd.js.gz``, licence next to it) and the volumes (cropped to the brain, 1 mm,
uint8 ``.nii.gz``) are inlined as base64 and unpacked in the browser (``DecompressionStream``,
``loadFromArrayBuffer``). The page itself is the template ``evaluation/templates/viewer.html``.
"""

from __future__ import annotations

import base64
import gzip
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synth7t.dataset.cropnorm import crop_box
from synth7t.evaluation.images import load_subject
from synth7t.io import write_text
from synth7t.templating import render

STATIC = Path(__file__).with_name("static")
NIIVUE_BUNDLE = STATIC / "niivue.umd.js.gz"
VIEWER_VOXEL_MM = 1.0
BOX_MARGIN = 2  # voxels kept around the brain's bounding box


def bundle_available() -> bool:
    """True when the gzip-compressed NiiVue UMD bundle ships with the package."""
    return NIIVUE_BUNDLE.is_file()


def viewer_nifti(img: np.ndarray, box: tuple[slice, ...], zooms: np.ndarray, voxel_mm: float) -> bytes:
    """Crop to ``box``, resample to ``voxel_mm`` (never finer than the input), quantise [0, 1] -> uint8, .nii.gz."""
    import nibabel as nib
    from scipy import ndimage

    crop = np.asarray(img[box], dtype=np.float32)  # (x, y, z)
    factor = np.minimum(1.0, zooms / voxel_mm)
    if np.any(factor < 1):
        crop = ndimage.zoom(crop, factor, order=1, grid_mode=True, mode="nearest")
    new_zooms = zooms * np.asarray([c / n for c, n in zip(img[box].shape, crop.shape, strict=True)])
    data = np.clip(np.rint(crop * 255), 0, 255).astype(np.uint8)
    nii = nib.Nifti1Image(data, np.diag([*new_zooms, 1.0]))
    nii.header.set_xyzt_units("mm", "sec")
    return gzip.compress(nii.to_bytes(), compresslevel=6, mtime=0)


def viewer_html(subject: str, volumes: Sequence[tuple[str, bytes]], *, title: str = "synth7t viewer") -> str:
    """The page for ``volumes`` (name, .nii.gz bytes): one canvas per volume, each showing the same slice.

    Every NiiVue instance broadcasts its crosshair and view to the others (``broadcastTo``).
    """
    return render(
        "viewer.html",
        title=title,
        subject=subject,
        niivue_gz_b64=base64.b64encode(NIIVUE_BUNDLE.read_bytes()).decode("ascii"),
        volumes=[{"name": name, "b64": base64.b64encode(data).decode("ascii")} for name, data in volumes],
    )


def write_viewer(
    path: str | os.PathLike,
    subject: str,
    images: Mapping[str, Any],
    *,
    voxel_mm: float = VIEWER_VOXEL_MM,
    lower_pct: float = 1,
    upper_pct: float = 99,
) -> Path:
    """Write ``viewer.html`` for one subject (``images``: {"t3", "pred", "t7", "mask"}), cropped to the brain."""
    if not bundle_available():
        raise FileNotFoundError(f"{NIIVUE_BUNDLE}: NiiVue bundle missing from the package")
    t3n, pred, t7n, mask, zooms = load_subject(images, lower_pct, upper_pct)
    box = tuple(
        slice(max(0, lo - BOX_MARGIN), min(n, hi + BOX_MARGIN))
        for (lo, hi), n in zip(crop_box(mask), mask.shape, strict=True)
    )
    vols = [
        ("3T input", viewer_nifti(t3n, box, zooms, voxel_mm)),
        ("synthetic 7T", viewer_nifti(np.where(mask, pred, 0), box, zooms, voxel_mm)),
        ("real 7T", viewer_nifti(t7n, box, zooms, voxel_mm)),
    ]
    return write_text(path, viewer_html(subject, vols, title=f"synth7t viewer: {subject}"))
