"""Quality control of a preprocessed scan (thesis 1.2.2 and 3.1.4): pure functions on arrays.

Two kinds of flaw are measured, both on a canonical (RAS+, axis 2 = S) image and its brain mask:

**Corrupted inferior region** (:func:`corruption_min_slice`). 7T field inhomogeneity and metal cause
(a) *signal drop-out*: a region inside the brain whose intensity collapses toward 0 (thesis fig. 9), and
(b) *abnormally smooth tissue*, typically the cerebellum (fig. 10). With ``L(x)`` the local mean inside the
mask (normalised convolution ``G*(I m) / G*m``, Gaussian of ``sigma_mm``) and ``M`` its median over the mask:

* drop-out voxels: ``L(x) < dropout_ratio * M``;
* smooth voxels: ``E(x) < smooth_ratio * median(E)`` with the relative high-frequency energy
  ``E = G*((I - G_1*I)^2 m) / G*m / L^2`` (``G_1``: Gaussian of one voxel), among voxels of grey-matter-like
  intensity ``0.3 M < L < 0.9 M`` (white matter is smooth by nature and excluded).

Only connected components of at least ``min_volume_ml`` that reach the brain's surface (ventricles are
internal), reach at least ``min_depth_mm`` into the brain (their deepest voxel is that far from the outside of
the mask; the edges of the field of view do not count as outside, so a drop-out cut by a slab's edge keeps its
depth) and lie entirely in the inferior ``inferior_fraction`` of the brain's axial extent count (the thesis
only ever cut the bottom of the brain); ``min_slice`` is the axial slice just above the highest such component,
the lowest usable slice. Training uses slices ``>= min_slice``.

Voxels of the mask whose intensity is exactly 0 are treated as outside it: a magnitude image is never exactly 0
where it measured tissue (noise alone keeps it positive, and a drop-out attenuates rather than erases), so such
voxels are holes an earlier skull strip cut (cisterns, ventricles of an already stripped brain) that a filled
mask covers again, and they are surface, not drop-out.

The depth criterion separates drop-out from CSF: a mask that keeps some CSF (a loosely stripped brain, the
nonzero support of a stripped template) has dark cisterns and sulci at the base of the brain whose local mean
falls below ``dropout_ratio * M`` too, but they form a shell along the surface, whereas a drop-out is a
bulk region of tissue. Calibration (``min_depth_mm`` 12, ``dropout_ratio`` 0.25, ``min_volume_ml`` 0.5,
measured at 1.3 mm and checked at 0.65 mm): 11 clean real heads (N4, deepbet brain mask, 0.65 mm) with their
brain mask and with masks loosened by 5 and 8 mm of CSF, 0 flagged (the former defaults 0.2 / 1 mL / no depth:
0, 7 and 10 of 11, measured at 1.3 mm); the demo's simulated drop-out (``corrupt_cerebellum``) found in 7 of 8
simulated 7T slabs at 0.65 mm (formerly 3 of 8), 0 of 4 clean slabs flagged; the same drop-out profile injected
into the cerebellum of the real heads found in 9 of 11 at 0.65 mm (the former defaults: the same 9; the two
misses are draws that leave little below ``dropout_ratio``) and 11 of 11 at 1.3 mm (formerly 10). CSF shells
of the loosened masks reached at most ~9.5 mm deep, drop-outs 11-22 mm. Known limit: in a slab (the demo's
40 mm 7T) a dark basal cistern cut open by the slab's lower edge reaches "the surface" there and is as deep as a
drop-out; one of two further clean demo slabs is cut for it (as with the former defaults).

**Motion** (:func:`motion_score`). Motion during an acquisition corrupts some phase-encode lines of k-space;
in the image this shows as stripes and ghosts along that axis (thesis fig. 11). A natural image's power
spectrum along an axis, averaged over all lines parallel to it, is smooth in ``k``; corrupted lines stand out
as spikes. For each axis ``a`` the brain (mean removed, zero outside the mask, cropped to its bounding box) is
Fourier transformed along ``a``, ``P_a(k)`` is the power summed over the other two axes, and the spike score
is the largest excess of ``log P_a(k)`` over its running median (9 bins), ignoring ``k < 4`` (the brain's
shape and a corrected bias field live there). The motion
score is the largest over the three axes; a line with 1.35x the energy of its neighbours scores 0.3. Measured
here: 0.0-0.07 for ten clean real scans and simulated brains (1 mm heads, 2 mm, 0.65-0.8 mm brains), 0.63-0.67
for the demo's heavy 7T motion (12 corrupted lines), 0.03 for its mild 3T stripes (4 lines, kept). A subject is
rejected above ``motion_threshold`` (0.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULTS = {
    "sigma_mm": 3.0,
    "dropout_ratio": 0.25,
    "smooth_ratio": 0.15,
    "min_volume_ml": 0.5,
    "min_depth_mm": 12.0,
    "inferior_fraction": 0.5,
}
MOTION_THRESHOLD = 0.3


@dataclass
class CorruptionReport:
    """Result of :func:`corruption_min_slice`."""

    min_slice: int  # lowest usable axial slice (0: nothing cut)
    dropout_ml: float  # volume of drop-out components counted
    smooth_ml: float  # volume of abnormally smooth components counted
    reasons: list[str] = field(default_factory=list)


def _check(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(data, np.float32)
    mask = np.asarray(mask) > 0
    if data.ndim != 3 or data.shape != mask.shape:
        raise ValueError(f"expected a 3-D image and a mask of the same shape, got {data.shape}, {mask.shape}")
    if not mask.any():
        raise ValueError("empty brain mask")
    return data, mask


def _sigma_vox(zooms, sigma_mm: float) -> np.ndarray:
    z = np.broadcast_to(np.asarray(zooms, float), (3,))
    if np.any(z <= 0):
        raise ValueError(f"voxel sizes must be positive, got {zooms}")
    return sigma_mm / z


def local_mean(data: np.ndarray, mask: np.ndarray, sigma_vox) -> np.ndarray:
    """Normalised convolution ``G*(I m) / G*m`` (0 outside the mask): a local mean that ignores the background."""
    from scipy.ndimage import gaussian_filter

    m = mask.astype(np.float32)
    num = gaussian_filter(data * m, sigma_vox)
    den = gaussian_filter(m, sigma_vox)
    return np.where(mask, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)


def dropout_map(data: np.ndarray, mask: np.ndarray, zooms, *, sigma_mm: float = DEFAULTS["sigma_mm"],
                ratio: float = DEFAULTS["dropout_ratio"]) -> np.ndarray:
    """Voxels of the mask whose local mean is below ``ratio`` times the brain's median local mean."""
    data, mask = _check(data, mask)
    lm = local_mean(data, mask, _sigma_vox(zooms, sigma_mm))
    return mask & (lm < ratio * np.median(lm[mask]))


def smooth_map(data: np.ndarray, mask: np.ndarray, zooms, *, sigma_mm: float = DEFAULTS["sigma_mm"],
               ratio: float = DEFAULTS["smooth_ratio"]) -> np.ndarray:
    """Grey-matter-intensity voxels whose relative high-frequency energy is below ``ratio`` times the median."""
    from scipy.ndimage import gaussian_filter

    data, mask = _check(data, mask)
    sv = _sigma_vox(zooms, sigma_mm)
    lm = local_mean(data, mask, sv)
    hp = (data - gaussian_filter(data, 1.0)) * mask
    energy = local_mean(hp * hp, mask, sv) / np.maximum(lm, 1e-6) ** 2
    med_l = np.median(lm[mask])
    grey = mask & (lm > 0.3 * med_l) & (lm < 0.9 * med_l)
    if not grey.any():
        return np.zeros(mask.shape, bool)
    return grey & (energy < ratio * np.median(energy[mask & (lm > 0.3 * med_l)]))


def depth_mm(mask: np.ndarray, zooms, z_stop: int | None = None) -> np.ndarray:
    """Distance (mm) of each mask voxel from the outside of the mask, the array's edges not counting as outside.

    With ``z_stop`` only axial slices ``< z_stop`` are computed (the rest is 0): exact wherever the true
    depth is below ``(z_stop - 1 - z) * zooms[2]``.
    """
    from scipy.ndimage import distance_transform_edt

    sub = np.asarray(mask[:, :, :z_stop], bool)
    z = np.broadcast_to(np.asarray(zooms, float), (3,))
    out = np.zeros(mask.shape, np.float32)
    if sub.all():  # no outside in reach: deeper than anything measured here
        out[:, :, : sub.shape[2]] = np.inf
    elif sub.any():
        out[:, :, : sub.shape[2]] = distance_transform_edt(np.pad(sub, 1, mode="edge"), sampling=z)[1:-1, 1:-1, 1:-1]
    return out


def _inferior_components(flags: np.ndarray, mask: np.ndarray, zooms, *, min_volume_ml: float,
                         inferior_fraction: float, min_depth_mm: float = 0.0) -> tuple[np.ndarray, float]:
    """Union of the components of ``flags`` of at least ``min_volume_ml``, reaching the brain's surface and
    ``min_depth_mm`` into the brain, lying entirely in the inferior ``inferior_fraction`` of the brain's axial
    extent; and their volume in mL."""
    from scipy.ndimage import binary_dilation, find_objects, label

    zs = np.nonzero(mask.any(axis=(0, 1)))[0]
    z_limit = zs[0] + inferior_fraction * (zs[-1] - zs[0] + 1)
    lab, n = label(flags, structure=np.ones((3, 3, 3), bool))
    voxel_ml = float(np.prod(np.broadcast_to(np.asarray(zooms, float), (3,)))) / 1000.0
    keep = np.zeros(n + 1, bool)
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    # voxels next to the outside of the mask (or the edge of the array): drop-out reaches the brain's surface
    outside = np.pad(~mask, 1, constant_values=True)
    rim = binary_dilation(outside, np.ones((3, 3, 3), bool))[1:-1, 1:-1, 1:-1] & mask
    depth = None
    z_mm = float(np.broadcast_to(np.asarray(zooms, float), (3,))[2])
    for i, sl in enumerate(find_objects(lab), start=1):
        if sl is None or counts[i] * voxel_ml < min_volume_ml or sl[2].stop > z_limit:
            continue
        comp = lab[sl] == i
        if not rim[sl][comp].any():
            continue
        if min_depth_mm > 0:
            if depth is None:  # only where a candidate exists; exact up to min_depth_mm above the limit
                depth = depth_mm(mask, zooms, int(np.ceil(z_limit + min_depth_mm / z_mm)) + 1)
            if depth[sl][comp].max() < min_depth_mm:
                continue
        keep[i] = True
    out = keep[lab]
    return out, float(out.sum() * voxel_ml)


def corruption_min_slice(data: np.ndarray, mask: np.ndarray, zooms, **params: float) -> CorruptionReport:
    """Lowest usable axial slice after drop-out and smooth-region detection (module doc); 0 when clean.

    ``params`` override :data:`DEFAULTS` (``sigma_mm``, ``dropout_ratio``, ``smooth_ratio``, ``min_volume_ml``,
    ``min_depth_mm``, ``inferior_fraction``).
    """
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown QC parameter(s): {', '.join(sorted(unknown))}")
    p = {**DEFAULTS, **params}
    data, mask = _check(data, mask)
    mask = mask & (data != 0)  # exact zeros carry no measurement (an earlier skull strip removed them)
    if not mask.any():
        raise ValueError("the image is 0 everywhere in the brain mask")
    comp = {"min_volume_ml": p["min_volume_ml"], "inferior_fraction": p["inferior_fraction"],
            "min_depth_mm": p["min_depth_mm"]}
    drop, drop_ml = _inferior_components(
        dropout_map(data, mask, zooms, sigma_mm=p["sigma_mm"], ratio=p["dropout_ratio"]), mask, zooms, **comp)
    smooth, smooth_ml = _inferior_components(
        smooth_map(data, mask, zooms, sigma_mm=p["sigma_mm"], ratio=p["smooth_ratio"]) & ~drop, mask, zooms,
        **comp)
    bad = drop | smooth
    reasons = []
    if drop_ml:
        reasons.append(f"signal drop-out in the inferior brain ({drop_ml:.1f} mL)")
    if smooth_ml:
        reasons.append(f"abnormally smooth inferior region ({smooth_ml:.1f} mL)")
    min_slice = int(np.nonzero(bad.any(axis=(0, 1)))[0].max() + 1) if bad.any() else 0
    return CorruptionReport(min_slice, drop_ml, smooth_ml, reasons)


def line_spike_spectrum(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-axis spike score of the power spectrum (module doc); shape (3,).

    ``x = (I - mean_mask(I)) m``; for axis ``a``, ``P_a(k) = sum_other |FFT_a x|^2`` (a 1-D spectrum averaged over
    all lines along ``a``); the score is ``max_{k >= 4} [log P_a(k) - median_{|j - k| <= 4} log P_a(j)]``.
    """
    from scipy.ndimage import median_filter

    data, mask = _check(data, mask)
    box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(mask))
    m = mask[box]
    x = np.where(m, data[box] - data[box][m].mean(), 0.0).astype(np.float32)
    scores = np.zeros(3)
    for a in range(3):
        if x.shape[a] < 16:
            continue
        other = tuple(i for i in range(3) if i != a)
        power = (np.abs(np.fft.rfft(x, axis=a)) ** 2).sum(axis=other)
        logp = np.log(np.maximum(power, 1e-12 * power.max()))
        resid = logp - median_filter(logp, size=9, mode="nearest")
        scores[a] = float(resid[4:].max())
    return scores


def motion_score(data: np.ndarray, mask: np.ndarray, zooms=None) -> float:
    """Stripe/ghosting score ``max_a line_spike_spectrum`` in natural-log units (module doc)."""
    del zooms  # the spectrum is taken in voxel units; kept for a uniform signature
    return float(line_spike_spectrum(data, mask).max())


# ---------------------------------------------------------------------------------------------------------
# decision and figure


def decide(*, min_slice_detected: int, motion: float, ncc: float | None, n_slices: int,
           motion_threshold: float = MOTION_THRESHOLD, ncc_threshold: float = 0.8,
           min_slice_override: int | None = None, exclude: bool = False,
           reasons: list[str] | None = None, coverage: float | None = None,
           min_coverage: float = 0.95) -> dict:
    """The ``qc.json`` record: ``min_slice`` (manifest override wins), ``rejected`` (manifest exclusion or
    motion above threshold), ``flagged`` (NCC below threshold, a cut removing more than half the slices, or the
    3T covering less than ``min_coverage`` of the 7T brain mask)."""
    reasons = list(reasons or [])
    min_slice = min_slice_detected if min_slice_override is None else int(min_slice_override)
    if min_slice_override is not None:
        reasons.append(f"min_slice {min_slice_override} set in the manifest (detected {min_slice_detected})")
    rejected = bool(exclude)
    if exclude:
        reasons.append("excluded in the manifest")
    if motion > motion_threshold:
        rejected = True
        reasons.append(f"motion score {motion:.3f} above {motion_threshold:g}")
    flagged = False
    if ncc is not None and ncc < ncc_threshold:
        flagged = True
        reasons.append(f"registration NCC {ncc:.3f} below {ncc_threshold:g}")
    if coverage is not None and coverage < min_coverage:
        flagged = True
        reasons.append(f"the 3T field of view covers {100 * coverage:.0f} % of the 7T brain")
    if min_slice > n_slices // 2:
        flagged = True
        reasons.append(f"corruption cut keeps only slices >= {min_slice} of {n_slices}")
    return {"min_slice": int(min_slice), "motion_score": float(motion),
            "registration_ncc": None if ncc is None else float(ncc), "rejected": rejected,
            "flagged": flagged, "reasons": reasons}


def qc_figure(path, images: dict[str, np.ndarray], mask: np.ndarray, min_slice: int, title: str = "") -> None:
    """Write a PNG: for each image (e.g. ``{"3T": ..., "7T": ...}``, same grid) three orthogonal slices through
    the mask's centre, the mask outline (cyan) and the corruption cut level (red line; axial view shows the
    first kept slice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synth7t.io import atomic_path

    mask = np.asarray(mask) > 0
    c = [int(round(v)) for v in np.argwhere(mask).mean(axis=0)] if mask.any() else [s // 2 for s in mask.shape]
    zc = min(max(c[2], min_slice), mask.shape[2] - 1)
    fig, axes = plt.subplots(len(images), 3, figsize=(9, 3.1 * len(images)), squeeze=False)
    for row, (name, img) in enumerate(images.items()):
        hi = float(np.percentile(img[mask], 99)) if mask.any() else float(img.max())
        views = [(img[c[0]], mask[c[0]], "sagittal"), (img[:, c[1]], mask[:, c[1]], "coronal"),
                 (img[:, :, zc], mask[:, :, zc], f"axial z={zc}")]
        for col, (sl, ms, label) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(sl.T, cmap="gray", origin="lower", vmin=0, vmax=hi or 1)
            if ms.any():
                ax.contour(ms.T.astype(float), levels=[0.5], colors="c", linewidths=0.6)
            if col < 2 and min_slice > 0:
                ax.axhline(min_slice - 0.5, color="r", linewidth=1)
            ax.set_title(f"{name} {label}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
