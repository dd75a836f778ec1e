"""Skull stripping: deepbet (default), FreeSurfer's ``mri_synthstrip``, or an intensity threshold.

:func:`strip` returns two masks on the input's grid (uint8 0/1 Volumes), both filled and reduced to their
largest connected component:

* ``brain``: the tight brain mask (deepbet's mask at probability 0.5; synthstrip ``--no-csf``). Used for
  registration (thesis 1.2.3: brains without CSF), NCC and QC.
* ``csf``: brain plus the surrounding CSF, used by N4's second pass (thesis 1.2.1: "skull stripping keeping the
  CSF") and to cut the saved images. For deepbet this is the brain mask dilated by ``CSF_MARGIN_MM`` (2 mm,
  the typical thickness of the sulcal/pial CSF layer deepbet leaves out) and filled; synthstrip's default mask
  already keeps the CSF.

Already skull-stripped inputs: deepbet is trained on heads and can cut a stripped brain (and a thin slab
badly). When the image's background is exactly zero (>= 90 % of the voxels outside the filled foreground are
0, as any stripping tool leaves them), the nonzero support (filled, largest component) is no larger than a
brain (<= 2.3 L; FreeSurfer-conformed heads also have zero backgrounds, at 3-5 L) and deepbet's mask disagrees
with it (Dice < 0.9), the support is used instead: ``method`` then reads
``"threshold (deepbet fallback)"``. ``method="threshold"`` forces the intensity mask (:func:`threshold_mask`:
above ``max(6 % of the 99th percentile, 4 x the Rayleigh background noise)``), for stripped images whose
background carries noise, such as the demo cohort's (deepbet cuts its 40 mm slabs: Dice 0.75-0.78 against
the intensity mask, 0.5 with motion ghosts).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synth7t.errors import ConfigError, InputError
from synth7t.io import Volume

log = logging.getLogger(__name__)

METHODS = ("deepbet", "synthstrip", "threshold")
CSF_MARGIN_MM = 2.0
FALLBACK_DICE = 0.9
ZERO_BACKGROUND_FRACTION = 0.9
MAX_BRAIN_LITRES = 2.3  # a nonzero support larger than this is a head, not a stripped brain
THRESHOLD_FRACTION = 0.06  # threshold mask: data > 0.06 * p99 of the positive voxels


@dataclass
class StripResult:
    """Masks of :func:`strip_with_info` and which method produced them."""

    brain: Volume  # uint8 0/1
    csf: Volume  # uint8 0/1, brain + CSF, contains ``brain``
    method: str


# ---------------------------------------------------------------------------------------------------------
# mask utilities


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    from scipy.ndimage import label

    lab, n = label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == counts.argmax()


def fill(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in 3-D and in every axial slice (ventricles touching the cut of a slab)."""
    from scipy.ndimage import binary_fill_holes

    out = binary_fill_holes(mask)
    for z in range(out.shape[2]):
        out[:, :, z] = binary_fill_holes(out[:, :, z])
    return out


def ball(radius_vox: np.ndarray) -> np.ndarray:
    """Ellipsoidal structuring element with per-axis radii in voxels."""
    r = np.maximum(np.asarray(radius_vox, float), 0.5)
    n = np.ceil(r).astype(int)
    grid = np.ogrid[-n[0]:n[0] + 1, -n[1]:n[1] + 1, -n[2]:n[2] + 1]
    return sum((g / ri) ** 2 for g, ri in zip(grid, r, strict=True)) <= 1.0


def dilate_mm(mask: np.ndarray, zooms: np.ndarray, mm: float) -> np.ndarray:
    """Binary dilation by a ball of ``mm`` millimetres (anisotropic voxels handled)."""
    from scipy.ndimage import binary_dilation

    if mm <= 0:
        return mask.astype(bool)
    return binary_dilation(mask, ball(mm / np.asarray(zooms, float)))


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest component, then holes filled."""
    return fill(largest_component(np.asarray(mask, bool)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """``2 |a & b| / (|a| + |b|)`` (1.0 for two empty masks)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def noise_sigma(data: np.ndarray) -> float:
    """Background noise level: the voxels below ``0.1 * p99`` are taken as background and, magnitude noise
    being Rayleigh-distributed there, ``sigma = median / sqrt(2 ln 2)``. 0 for an exact-zero background."""
    pos = data[data > 0]
    if pos.size == 0:
        return 0.0
    low = data[data < 0.1 * np.percentile(pos, 99)]
    return float(np.median(low) / np.sqrt(2 * np.log(2))) if low.size else 0.0


def threshold_mask(data: np.ndarray) -> np.ndarray:
    """Intensity mask of a stripped brain: ``data > max(0.06 * p99, 4 sigma_noise)``, opened by one voxel
    (detaches noise specks), largest component, filled."""
    from scipy.ndimage import binary_opening

    pos = data[data > 0]
    if pos.size == 0:
        return np.zeros(data.shape, bool)
    t = max(THRESHOLD_FRACTION * float(np.percentile(pos, 99)), 4.0 * noise_sigma(data))
    m = data > t
    opened = binary_opening(m, np.ones((3, 3, 3), bool))
    return clean_mask(opened if opened.any() else m)


def has_zero_background(data: np.ndarray) -> bool:
    """True when >= 90 % of the voxels outside the filled foreground are exactly 0 (a pre-stripped image)."""
    outside = ~threshold_mask(data)
    return bool(outside.any() and (data[outside] == 0).mean() >= ZERO_BACKGROUND_FRACTION)


def _as_volume(mask: np.ndarray, like: Volume) -> Volume:
    return Volume(mask.astype(np.uint8), like.affine.copy(), like.source)


# ---------------------------------------------------------------------------------------------------------
# deepbet


@functools.lru_cache(maxsize=1)
def _deepbet_model(use_gpu: bool):
    """Load deepbet's two TorchScript networks once per process (deepbet picks its device at import)."""
    from deepbet.bet import BrainExtraction

    return BrainExtraction(no_gpu=not use_gpu)


def deepbet_mask(data: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """deepbet's brain mask of a canonical (RAS+) array: bbox network at 128^3, brain network at 256^3 crop,
    probability > ``threshold``, largest component, filled. Runs on CUDA when present, else CPU."""
    import torch

    bet = _deepbet_model(torch.cuda.is_available())
    try:
        prob = bet.run_model(np.ascontiguousarray(data, dtype=np.float32).copy())
    except AssertionError as exc:  # deepbet asserts on too little foreground
        raise InputError(f"deepbet found no brain ({exc})") from None
    return clean_mask(prob > threshold)


def _strip_deepbet(vol: Volume) -> StripResult:
    brain = deepbet_mask(vol.data)
    method = "deepbet"
    if has_zero_background(vol.data):
        support = threshold_mask(vol.data)
        d = dice(brain, support)
        support_l = support.sum() * np.prod(vol.zooms) / 1e6
        if d < FALLBACK_DICE and support_l <= MAX_BRAIN_LITRES:  # larger: a zero-filled head, trust deepbet
            log.info("deepbet mask disagrees with the nonzero support of a stripped image (Dice %.2f): "
                     "using the support", d)
            return StripResult(_as_volume(support, vol), _as_volume(support, vol),
                               "threshold (deepbet fallback)")
        csf = clean_mask(dilate_mm(brain, vol.zooms, CSF_MARGIN_MM) & support) | brain
        return StripResult(_as_volume(brain, vol), _as_volume(csf, vol), method)
    csf = clean_mask(dilate_mm(brain, vol.zooms, CSF_MARGIN_MM))
    return StripResult(_as_volume(brain, vol), _as_volume(csf, vol), method)


# ---------------------------------------------------------------------------------------------------------
# synthstrip


def synthstrip_available() -> bool:
    return shutil.which("mri_synthstrip") is not None


def _run_synthstrip(vol: Volume, extra: list[str], threads: int | None) -> np.ndarray:
    from synth7t.io import load_volume, save_volume

    with tempfile.TemporaryDirectory(prefix="synth7t-synthstrip-") as tmp:
        src, out = Path(tmp) / "in.nii.gz", Path(tmp) / "mask.nii.gz"
        save_volume(src, vol)
        cmd = ["mri_synthstrip", "-i", str(src), "-m", str(out), *extra]
        if threads:
            cmd += ["-n", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0 or not out.exists():
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError(f"{vol.source or '<volume>'}: mri_synthstrip failed ({tail[0]})")
        mask = load_volume(out).data > 0
    return clean_mask(mask)


def _strip_synthstrip(vol: Volume, threads: int | None) -> StripResult:
    if not synthstrip_available():
        raise ConfigError("skull stripping with synthstrip asked for, but FreeSurfer's mri_synthstrip is "
                          "not on PATH (install FreeSurfer >= 7.3 or use --skullstrip deepbet)")
    csf = _run_synthstrip(vol, [], threads)
    brain = _run_synthstrip(vol, ["--no-csf"], threads) & csf
    return StripResult(_as_volume(brain, vol), _as_volume(csf, vol), "synthstrip")


# ---------------------------------------------------------------------------------------------------------
# public


def strip_with_info(vol: Volume, method: str = "deepbet", *, threads: int | None = None) -> StripResult:
    """Brain and brain+CSF masks of a canonical volume, and the method that made them (see module doc)."""
    if method not in METHODS:
        raise ConfigError(f"unknown skull-stripping method {method!r} (known: {', '.join(METHODS)})")
    if method == "synthstrip":
        res = _strip_synthstrip(vol, threads)
    elif method == "threshold":
        m = threshold_mask(vol.data)
        res = StripResult(_as_volume(m, vol), _as_volume(m, vol), "threshold")
    else:
        res = _strip_deepbet(vol)
    n = int(res.brain.data.sum())
    if n == 0:
        raise InputError(f"{vol.source or '<volume>'}: skull stripping ({res.method}) found no brain")
    log.debug("%s: brain %.3f L, brain+CSF %.3f L", res.method, n * np.prod(vol.zooms) / 1e6,
              res.csf.data.sum() * np.prod(vol.zooms) / 1e6)
    return res


def strip(vol: Volume, method: str = "deepbet", *, threads: int | None = None) -> tuple[Volume, Volume]:
    """``(brain_mask, csf_mask)`` of a canonical volume as uint8 0/1 Volumes on its grid."""
    res = strip_with_info(vol, method, threads=threads)
    return res.brain, res.csf


def mask_volume_litres(mask: Volume) -> float:
    """Volume of a mask in litres: ``count * prod(zooms) / 1e6``."""
    return float(np.asarray(mask.data > 0).sum() * np.prod(mask.zooms) / 1e6)
