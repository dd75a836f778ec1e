"""Segmentation-based evaluation (thesis 3.3, "performing another automatic task") and DICE.

The segmentation of each image (real 7T, synthetic 7T, baselines) is compared with the segmentation of the
real 7T, label by label: ``DICE(A, B) = 2 |A ∩ B| / (|A| + |B|)``.

Two segmenters, chosen at run time:

* ``synthseg``: FreeSurfer's ``mri_synthseg`` when it is on PATH (as in the thesis): 32 foreground labels
  of SynthSeg 1.0/2.0 without ``--parc``, run with ``--keepgeom`` so the labels are on the input's grid.
  The thesis (4.4) drops the 4 cerebellar labels (7, 8, 46, 47: often corrupted) and CSF (24), giving its
  27 DICE labels: :data:`SYNTHSEG_DICE_LABELS`.
* ``atropos``: offline fallback, ANTs Atropos 3-class segmentation (1 = CSF, 2 = GM, 3 = WM on T1w) inside
  the brain mask. Atropos is slow at 0.65 mm (measured here, 2 cores, 226x293x239 brain box, antspyx 0.6.3:
  k-means init + 3 EM steps with MRF 0.1 ~190 s; k-means init + 1 step ~120 s; Otsu init + 1 step without
  MRF ~30 s), so the default is Otsu initialisation, one EM step, no MRF (:data:`ATROPOS_INIT`,
  :data:`ATROPOS_ITERATIONS`, :data:`ATROPOS_MRF`); ``segment_atropos(init="kmeans", mrf=0.1, ...)`` is
  there for a slower, smoother run. Its DICE is *not* comparable with SynthSeg's numbers in the thesis: a
  3-tissue DICE is dominated by large classes. The method name is returned with every segmentation so that
  results always state it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from synth7t.errors import Synth7tError
from synth7t.io import Volume, load_volume, save_volume
from synth7t.parallel import usable_cores

log = logging.getLogger(__name__)

SYNTHSEG_LABELS = (
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60,
)  # fmt: skip
"""Foreground labels of SynthSeg without cortical parcellation."""
CEREBELLUM_LABELS = (7, 8, 46, 47)
CSF_LABEL = 24
SYNTHSEG_DICE_LABELS = tuple(lab for lab in SYNTHSEG_LABELS if lab not in (*CEREBELLUM_LABELS, CSF_LABEL))
"""The 27 labels of thesis 4.4: SynthSeg's labels less cerebellum (7, 8, 46, 47) and CSF (24)."""

ATROPOS_LABELS = (1, 2, 3)
"""Atropos classes sorted by mean intensity: 1 = CSF, 2 = GM, 3 = WM (T1-weighted)."""
ATROPOS_ITERATIONS = 1
ATROPOS_MRF = 0.0
ATROPOS_INIT = "otsu"

METHOD_SYNTHSEG = "synthseg"
METHOD_ATROPOS = "atropos"


class SegmentationError(Synth7tError):
    """An external segmenter failed."""


def synthseg_available() -> bool:
    """True when FreeSurfer's ``mri_synthseg`` is on PATH."""
    return shutil.which("mri_synthseg") is not None


def dice_labels(method: str) -> tuple[int, ...]:
    """Labels the DICE is averaged over for a segmentation ``method``."""
    if method == METHOD_SYNTHSEG:
        return SYNTHSEG_DICE_LABELS
    if method == METHOD_ATROPOS:
        return ATROPOS_LABELS
    raise ValueError(f"unknown segmentation method {method!r}")


def segment(vol: Volume, mask: np.ndarray, *, method: str | None = None, threads: int | None = None):
    """Segment ``vol`` -> ``(labels, method_name)``; labels int16 (X, Y, Z) on ``vol``'s grid, 0 outside ``mask``.

    ``method`` None picks ``synthseg`` when ``mri_synthseg`` is on PATH, otherwise ``atropos``.
    """
    mask = np.asarray(mask) > 0
    if mask.shape != vol.shape:
        raise ValueError(f"mask shape {mask.shape} differs from volume shape {vol.shape}")
    if not mask.any():
        raise ValueError("brain mask is empty")
    if method is None:
        method = METHOD_SYNTHSEG if synthseg_available() else METHOD_ATROPOS
    if method == METHOD_SYNTHSEG:
        labels = segment_synthseg(vol, threads=threads)
    elif method == METHOD_ATROPOS:
        labels = segment_atropos(vol, mask)
    else:
        raise ValueError(f"unknown segmentation method {method!r}")
    labels[~mask] = 0
    return labels, method


def segment_synthseg(vol: Volume, *, threads: int | None = None) -> np.ndarray:
    """Run ``mri_synthseg --i in.nii.gz --o out.nii.gz --keepgeom`` in a private temporary folder."""
    exe = shutil.which("mri_synthseg")
    if exe is None:
        raise SegmentationError("mri_synthseg: not found on PATH (install FreeSurfer >= 7.3)")
    with tempfile.TemporaryDirectory(prefix="synth7t_synthseg_") as tmp:
        src = save_volume(Path(tmp) / "in.nii.gz", vol)
        dst = Path(tmp) / "seg.nii.gz"
        cmd = [
            exe,
            "--i",
            str(src),
            "--o",
            str(dst),
            "--keepgeom",
            "--cpu",
            "--threads",
            str(threads or usable_cores()),
        ]
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not dst.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SegmentationError(
                f"mri_synthseg failed on {vol.source or 'volume'} (exit {proc.returncode}): {tail[0]}"
            )
        seg = load_volume(dst, check_finite=False)
    if seg.shape != vol.shape:
        raise SegmentationError(f"mri_synthseg returned shape {seg.shape}, expected {vol.shape} (--keepgeom)")
    return np.rint(seg.data).astype(np.int16)


def segment_atropos(
    vol: Volume,
    mask: np.ndarray,
    *,
    iterations: int = ATROPOS_ITERATIONS,
    mrf: float = ATROPOS_MRF,
    init: str = ATROPOS_INIT,
) -> np.ndarray:
    """3-class Atropos inside ``mask`` -> int16 labels (X, Y, Z), 1 = CSF, 2 = GM, 3 = WM on T1w.

    Runs on the mask's bounding box (1-voxel margin) with ``init`` initialisation (``"otsu"`` or
    ``"kmeans"``), an MRF of weight ``mrf`` over a 1x1x1 neighbourhood (0 = none) and at most ``iterations``
    EM steps. Classes are relabelled by increasing mean intensity whatever order Atropos returns them in.
    antspyx writes probability images into the temporary folder and leaves them; they go to a private
    folder that is removed afterwards.
    """
    import ants

    if init.lower() not in ("otsu", "kmeans"):
        raise ValueError(f"init must be 'otsu' or 'kmeans', got {init!r}")
    if iterations < 1 or mrf < 0:
        raise ValueError(f"need iterations >= 1 and mrf >= 0, got {iterations}, {mrf}")
    m = np.asarray(mask) > 0
    box = _bbox(m, margin=1)
    data = np.ascontiguousarray(np.asarray(vol.data, dtype=np.float32)[box])  # (x, y, z) crop
    spacing = tuple(float(z) for z in vol.zooms)
    img = ants.from_numpy(data, spacing=spacing)
    kmask = ants.from_numpy(np.ascontiguousarray(m[box]).astype(np.float32), spacing=spacing)
    with _private_tempdir():
        out = ants.atropos(
            a=img, x=kmask, i=f"{init.capitalize()}[3]", m=f"[{mrf},1x1x1]", c=f"[{int(iterations)},0]", verbose=0
        )
    crop = np.asarray(out["segmentation"].numpy()).astype(np.int16)
    seg = np.zeros(m.shape, dtype=np.int16)
    seg[box] = _sort_by_intensity(crop, data, ATROPOS_LABELS)
    return seg


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(
        slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + 1 + margin))
        for i, n in zip(idx, mask.shape, strict=True)
    )


@contextlib.contextmanager
def _private_tempdir():
    """Point :mod:`tempfile` at a private folder for the duration (antspyx's Atropos leaves files there)."""
    old = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="synth7t_atropos_") as tmp:
        tempfile.tempdir = tmp
        try:
            yield tmp
        finally:
            tempfile.tempdir = old


def _sort_by_intensity(seg: np.ndarray, data: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    means = [float(data[seg == lab].mean()) if np.any(seg == lab) else np.inf for lab in labels]
    order = np.argsort(means)  # darkest first
    out = np.zeros_like(seg)
    for new, idx in zip(labels, order, strict=True):
        out[seg == labels[idx]] = new
    return out


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """``DICE_l = 2 |{a = l} ∩ {b = l}| / (|{a = l}| + |{b = l}|)`` per label; NaN when l is in neither map."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    out: dict[int, float] = {}
    for lab in labels:
        in_a = a == lab
        in_b = b == lab
        total = int(in_a.sum()) + int(in_b.sum())
        out[int(lab)] = float("nan") if total == 0 else 2.0 * int(np.count_nonzero(in_a & in_b)) / total
    return out


def mean_dice(per_label: dict[int, float]) -> float:
    """Mean of the defined (non-NaN) per-label DICE values; NaN if none is defined."""
    values = [v for v in per_label.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
