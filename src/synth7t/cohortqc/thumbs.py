"""QC thumbnails of one prediction output: small grayscale PNGs of mid-brain slices.

Two images per output, kept in the output's QC folder (:func:`qc_paths`):

* ``<stem>_planes.png``: the synthetic 7T in three planes (axial | coronal | sagittal) through the brain's
  centre, cropped to the brain's bounding box, each plane 96 px high;
* ``<stem>_compare.png``: the preprocessed input and the synthetic 7T side by side (axial, same slice, same
  crop). The preprocessed input on the output grid is only in memory during ``synth7t predict``, which writes
  this one (:func:`save_prediction_thumbnails`); outputs predicted without it get the planes only.

Volumes are expected on a canonical RAS+ grid (what ``synth7t predict`` writes; :func:`synth7t.io.to_canonical`
makes one). Each image is windowed to its brain's 0.5-99.5th percentiles. Files are written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from synth7t.dataset.cropnorm import crop_box
from synth7t.io import nifti_stem

log = logging.getLogger(__name__)
PLANE_PX = 96
COMPARE_PX = 128
GAP_PX = 3
BIDS_SUFFIX = "_desc-synth7T_T1w"


def qc_paths(output: str | Path) -> dict[str, Path]:
    """Where an output's thumbnails and cached summary live.

    ``OUT/<name>/syn7t.nii.gz`` -> ``OUT/<name>/qc/syn7t_{planes,compare}.png`` and ``syn7t_summary.json``;
    a BIDS derivative ``sub-X/[ses-Y/]anat/<base>_desc-synth7T_T1w.nii.gz`` -> ``sub-X/figures/`` (the
    fMRIPrep convention for a subject's figures), same names with the output's stem.
    """
    output = Path(output)
    stem = nifti_stem(output)
    if stem.endswith(BIDS_SUFFIX) and output.parent.name == "anat":
        subject_dir = output.parent.parent
        if subject_dir.name.startswith("ses-"):
            subject_dir = subject_dir.parent
        folder = subject_dir / "figures"
    else:
        folder = output.parent / "qc"
    return {"planes": folder / f"{stem}_planes.png", "compare": folder / f"{stem}_compare.png",
            "summary": folder / f"{stem}_summary.json"}


def _window(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float volume -> uint8, the brain's 0.5-99.5th percentiles mapped to 0-255 (NaN -> 0)."""
    data = np.nan_to_num(np.asarray(data, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    inside = data[mask] if mask.any() else data[data != 0]
    if inside.size == 0:
        return np.zeros(data.shape, np.uint8)
    lo, hi = np.percentile(inside, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((data - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _geometry(mask: np.ndarray, shape: tuple[int, ...]) -> tuple[list[int], list[slice]]:
    """The brain's centre voxel and its bounding box (2 voxels of margin); the whole grid without a brain."""
    if not mask.any():
        return [s // 2 for s in shape], [slice(0, s) for s in shape]
    box = crop_box(mask)
    centre = [int(round((a + b - 1) / 2)) for a, b in box]
    return centre, [slice(max(0, a - 2), min(s, b + 2)) for (a, b), s in zip(box, shape, strict=True)]


def _planes(img8: np.ndarray, zooms, centre, box) -> list[tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal slices with their pixel aspect (width / height): superior (axial: anterior) at
    the top; patient left on the image's left in axial and coronal views (neurological), anterior on the right
    in the sagittal one."""
    x, y, z = centre
    zx, zy, zz = (float(v) for v in zooms)
    axial = img8[box[0], box[1], z].T[::-1]
    coronal = img8[box[0], y, box[2]].T[::-1]
    sagittal = img8[x, box[1], box[2]].T[::-1]
    return [(axial, zx / zy), (coronal, zx / zz), (sagittal, zy / zz)]


def _resized(sl: np.ndarray, aspect: float, height: int):
    from PIL import Image

    h, w = sl.shape
    width = max(1, int(round(w * aspect * height / max(h, 1))))
    return Image.fromarray(np.ascontiguousarray(sl)).resize((width, height), Image.BILINEAR)


def _strip(images, height: int):
    from PIL import Image

    tiles = [_resized(sl, aspect, height) for sl, aspect in images]
    strip = Image.new("L", (sum(t.width for t in tiles) + GAP_PX * (len(tiles) - 1), height), 0)
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + GAP_PX
    return strip


def _save_png(image, path: Path) -> Path:
    from synth7t.io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


def write_thumbnails(output: str | Path, syn7t: np.ndarray, mask: np.ndarray, zooms,
                     preprocessed_input: np.ndarray | None = None) -> dict[str, Path]:
    """Write the planes image (and, given the preprocessed input on the same grid, the compare image)."""
    mask = np.asarray(mask) > 0
    paths = qc_paths(output)
    centre, box = _geometry(mask, syn7t.shape)
    out8 = _window(syn7t, mask)
    written = {"planes": _save_png(_strip(_planes(out8, zooms, centre, box), PLANE_PX), paths["planes"])}
    if preprocessed_input is not None:
        in8 = _window(preprocessed_input, mask)
        pair = [_planes(in8, zooms, centre, box)[0], _planes(out8, zooms, centre, box)[0]]
        written["compare"] = _save_png(_strip(pair, COMPARE_PX), paths["compare"])
    return written


def save_prediction_thumbnails(output: str | Path, res: dict) -> None:
    """The ``synth7t predict`` hook: thumbnails from :func:`synth7t.inference.predict_volume`'s result, while the
    preprocessed input (``res["input"]``) is in memory. Best effort: a failure is logged, never raised."""
    try:
        vol = res["syn7t"]
        inp = res.get("input")
        write_thumbnails(output, vol.data, res["mask"].data, vol.zooms, None if inp is None else inp.data)
    except Exception as exc:  # QC pictures must never cost a prediction
        log.warning("%s: QC thumbnails not written (%s: %s)", output, type(exc).__name__, exc)
