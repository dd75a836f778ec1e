"""Per-output QC summaries (cached) and the cohort's robust outlier scores.

:func:`summarise` turns one :class:`~synth7t.cohortqc.discover.Output` into a flat record: brain volume (mask
voxels x voxel volume, mL), the synthetic 7T's median and IQR inside the mask, the uncertainty map's mean and
95th percentile inside the mask, what the provenance says (model, version), and flags. A *failed* output lacks
its provenance, has an image or mask that cannot be read, NaN/Inf voxels, an empty mask or a mask on another
grid; a *suspicious* one has signal outside its mask, an all-zero brain, an unreadable uncertainty map, or
(added by :func:`add_outlier_scores` across the cohort) a robust z-score beyond :data:`Z_LIMIT`.

The record is cached in the output's ``*_summary.json`` with the size and modification time of every file it
was computed from, and the thumbnails are redrawn only when the output image is newer than them; so a rerun
reads only new or changed outputs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from synth7t.cohortqc.discover import Output
from synth7t.cohortqc.thumbs import qc_paths, write_thumbnails

log = logging.getLogger(__name__)
CACHE_VERSION = 1
Z_LIMIT = 3.5
METRICS = {"brain_median": "brain median", "brain_iqr": "brain IQR", "brain_volume_ml": "brain volume",
           "unc_mean": "mean uncertainty"}
FILES = ("syn7t", "mask", "uncertainty", "provenance")


def _signature(out: Output) -> dict:
    sig = {"cache_version": CACHE_VERSION}
    for key in FILES:
        try:
            st = getattr(out, key).stat()
            sig[key] = [st.st_size, st.st_mtime_ns]
        except OSError:
            sig[key] = None
    return sig


def _read(path: Path) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """(data on the canonical grid, its affine, None) or (None, None, why it cannot be read)."""
    import nibabel as nib

    from synth7t.io import Volume, to_canonical

    if not path.exists():
        return None, None, "missing"
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        data = data.reshape(data.shape[:3]) if data.ndim > 3 and data.size == np.prod(data.shape[:3]) else data
        if data.ndim != 3:
            return None, None, f"unreadable ({data.ndim}-D image)"
        vol, _ = to_canonical(Volume(data, np.asarray(img.affine, np.float64)))
        return vol.data, vol.affine, None
    except Exception as exc:  # nibabel raises many kinds for a broken file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, None, f"unreadable ({msg[:120]})"


def _provenance(path: Path, rec: dict, failed: list[str]) -> None:
    if not path.exists():
        failed.append("provenance missing")
        return
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(prov, dict)
    except (OSError, ValueError, AssertionError):
        failed.append("provenance unreadable")
        return
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    rec["model"] = model.get("folder")
    rec["model_sha256"] = (model.get("sha256") or "")[:12] or None
    rec["synth7t_version"] = prov.get("synth7t_version")
    params = prov.get("parameters") if isinstance(prov.get("parameters"), dict) else {}
    rec["tta"] = params.get("tta")


def _q(values: np.ndarray, q) -> list[float]:
    return [float(v) for v in np.atleast_1d(np.percentile(values, q))]


def _measure(out: Output, rec: dict, failed: list[str], suspicious: list[str]) -> tuple | None:
    """Image statistics into ``rec``; returns (syn7t, mask, zooms) for the thumbnails when the image is usable."""
    img, aff, why = _read(out.syn7t)
    if why:
        failed.append(f"image {why}")
        return None
    rec["shape"] = "x".join(str(s) for s in img.shape)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(0))
    rec["voxel_mm"] = "x".join(f"{z:.3g}" for z in zooms)
    bad = ~np.isfinite(img)
    rec["nonfinite_voxels"] = int(bad.sum())
    if rec["nonfinite_voxels"]:
        failed.append(f"{rec['nonfinite_voxels']} NaN/Inf voxels")
        img = np.where(bad, 0.0, img)
    mask_data, mask_aff, why = _read(out.mask)
    if why:
        failed.append(f"mask {why}")
        return img, img != 0, zooms
    if mask_data.shape != img.shape or not np.allclose(mask_aff, aff, atol=1e-3):
        failed.append("mask grid differs from the image's")
        return img, img != 0, zooms
    mask = mask_data > 0
    rec["brain_volume_ml"] = float(mask.sum() * abs(np.linalg.det(aff[:3, :3])) / 1000.0)
    if not mask.any():
        failed.append("empty mask")
        return img, mask, zooms
    brain = img[mask]
    q25, q50, q75 = _q(brain, [25, 50, 75])
    rec["brain_median"], rec["brain_iqr"] = q50, q75 - q25
    if not np.any(brain):
        suspicious.append("all-zero brain")
    outside = int(np.count_nonzero(img[~mask]))
    if outside:
        suspicious.append(f"signal outside the mask ({outside} voxels)")
    if out.uncertainty.exists():
        unc, unc_aff, why = _read(out.uncertainty)
        if why or unc.shape != img.shape:
            suspicious.append(f"uncertainty {why or 'on another grid'}")
        elif not np.isfinite(unc[mask]).all():
            suspicious.append("NaN/Inf in the uncertainty map")
        else:
            rec["unc_mean"] = float(unc[mask].mean())
            rec["unc_p95"] = _q(unc[mask], 95)[0]
    return img, mask, zooms


def _compute(out: Output, root: Path) -> tuple[dict, tuple | None]:
    rec = {"id": out.id, "layout": out.layout, "output": out.syn7t.relative_to(root).as_posix(),
           "has_uncertainty": out.uncertainty.exists()}
    for key in ("model", "model_sha256", "synth7t_version", "tta", "shape", "voxel_mm", "nonfinite_voxels",
                "brain_volume_ml", "brain_median", "brain_iqr", "unc_mean", "unc_p95"):
        rec[key] = None
    failed: list[str] = []
    suspicious: list[str] = []
    _provenance(out.provenance, rec, failed)
    arrays = _measure(out, rec, failed, suspicious)
    rec["failed"], rec["suspicious"] = failed, suspicious
    return rec, arrays


def _stale(thumb: Path, image_mtime: float) -> bool:
    try:
        return thumb.stat().st_mtime_ns < image_mtime
    except OSError:
        return True


def summarise(out: Output, root: str | Path) -> tuple[dict, bool]:
    """The output's record (from its cache when its files are unchanged) and whether it was recomputed.

    The record's ``planes``/``compare`` are its thumbnails' paths (None when absent or older than the image).
    """
    root = Path(root)
    paths = qc_paths(out.syn7t)
    sig = _signature(out)
    rec = None
    try:
        cached = json.loads(paths["summary"].read_text(encoding="utf-8"))
        if cached.get("signature") == sig:
            rec = cached["record"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    image_mtime = sig["syn7t"][1] if sig["syn7t"] else None
    need_planes = (image_mtime is not None and _stale(paths["planes"], image_mtime)
                   and (rec is None or rec.get("shape") is not None))  # no thumbnails of an unreadable image
    computed = rec is None or need_planes
    arrays = None
    if computed:
        rec, arrays = _compute(out, root)
    if need_planes and arrays is not None:
        try:
            write_thumbnails(out.syn7t, *arrays)
        except OSError as exc:
            log.warning("%s: thumbnails not written (%s)", out.id, exc)
    if computed:
        try:
            from synth7t.io import write_json

            write_json(paths["summary"], {"signature": sig, "record": rec})
        except OSError as exc:
            log.warning("%s: summary not cached (%s)", out.id, exc)
    rec = dict(rec)
    for kind in ("planes", "compare"):
        ok = image_mtime is not None and not _stale(paths[kind], image_mtime)
        rec[kind] = paths[kind].relative_to(root).as_posix() if ok else None
    return rec, computed


def robust_z(values: list[float | None]) -> list[float | None]:
    """Modified z-scores 0.6745 (x - median) / MAD (Iglewicz and Hoaglin) of the finite values; None elsewhere
    and when fewer than 3 values are finite. With MAD = 0 the mean absolute deviation (x 1.2533) stands in. The
    scale is at least 0.1 % of |median|, so that float rounding in a near-constant metric is no outlier; with a
    scale of 0 every score is 0."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if finite.size < 3:
        return [None] * len(values)
    med = float(np.median(finite))
    mad = float(np.median(np.abs(finite - med)))
    scale = mad / 0.6745 if mad > 0 else 1.2533 * float(np.mean(np.abs(finite - med)))
    scale = max(scale, 1e-3 * abs(med))
    return [None if v is None or not math.isfinite(v) else (0.0 if scale == 0 else (v - med) / scale)
            for v in values]


def add_outlier_scores(records: list[dict]) -> None:
    """Robust z of each :data:`METRICS` across the outputs that did not fail (``z_<metric>``), outlier flags
    (|z| > :data:`Z_LIMIT`) and each record's ``flags``, ``status`` (ok, suspicious or failed) and ``flagged``."""
    usable = [r for r in records if not r["failed"]]
    for key, label in METRICS.items():
        for rec in records:
            rec[f"z_{key}"] = None
        for rec, z in zip(usable, robust_z([r.get(key) for r in usable]), strict=True):
            rec[f"z_{key}"] = None if z is None else round(z, 2) + 0.0  # + 0.0: no -0.0
            if z is not None and abs(z) > Z_LIMIT:
                rec.setdefault("outliers", []).append(f"outlier {label} (z {z:+.1f})")
    for rec in records:
        rec["flags"] = rec["failed"] + rec["suspicious"] + rec.pop("outliers", [])
        rec["status"] = "failed" if rec["failed"] else "suspicious" if rec["flags"] else "ok"
        rec["flagged"] = bool(rec["flags"])
