"""Pack a preprocessed work folder into a slice store (thesis 3.1.2-3.1.5).

For every finished, non-rejected subject of ``WORK`` (see ``docs/data-layout.md``):

1. **Crop and pad** (thesis 3.1.3): each subject is cropped to its own brain bounding box, then centre-padded
   in-plane to the cohort's largest box, rounded up to a multiple of ``multiple`` (the thesis used 288 x 224).
   The axial axis is not padded: each subject keeps its own ``Z = z1 - z0``. Arrays are stored as ``(Z, H, W)``
   = ``(z, x, y)`` of the canonical volume, axial slices first so that a sample reads contiguous memory (the
   exact layout: :mod:`synth7t.dataset.cropnorm`); :func:`unpack` puts a stack back on its subject's grid.
2. **Clipped min-max** (thesis 1.3.1, 3.1.2; :mod:`synth7t.dataset.cropnorm`), per image, with the brain's 1st /
   99th percentiles ``(lo, hi)``, stored per subject and image (``denormalize`` inverts it up to float16
   rounding).
3. **Valid slices** (thesis 3.1.4): axial slices whose mask area exceeds ``min_area_frac`` (1 %) of the
   subject's largest slice area, at or above QC's ``min_slice`` (converted to the cropped index).
4. **GMM** for the intensity augmentation: a 3-component Gaussian mixture of the normalized 3T brain
   intensities, sorted by mean (CSF, GM, WM), is fitted once here and stored in ``store.json``.
5. **Splits** by subject (train / val / test), seeded, stratified by diagnosis group
   (:mod:`synth7t.dataset.splits`). Subjects without a 7T are packed without a target and listed under the
   extra split ``"predict"``, never in train/val/test. A person with several 3T scans (``WORK/<p>/scans/<code>``)
   gives one store entry per pair, ``<p>_<code>`` (its own t3/t7/mask arrays, so readers see ordinary
   subjects), tagged ``"person": <p>``; splits are drawn over persons, so all pairs of one person share a split.
6. **Recipe**: the preprocessing the subjects share, read from their ``provenance.json``
   (:mod:`synth7t.dataset.recipe`), is recorded in ``store.json``.

Storage: float16 ``.npy`` files written slice by slice with :func:`numpy.lib.format.open_memmap` (one
normalized volume is never held in memory) and read with ``np.load(mmap_mode="r")``. We chose ``.npy``
memmaps over zarr: no extra dependency; reading one slice of a ``(Z, H, W)`` C-ordered array is O(1) and
touches only that slice's pages (zarr would decompress a whole chunk); a memmap is opened lazily in each
DataLoader worker, so workers share the OS page cache and no array is pickled. Compression would save disk
but the store is already half the size of float32 and brain-cropped.

Atomicity: every array is written under a temporary name in its folder and renamed; ``store.json`` is
written last (a store without it is incomplete). Re-running with the same inputs and parameters is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synth7t.dataset import context as ctx
from synth7t.dataset.cropnorm import (
    Box,
    CropGeometry,
    brain_limits,
    crop_box,
    iter_crop_pad,
    make_geometry,
    normalize,
    round_up,
    uncrop,
)
from synth7t.dataset.recipe import normalization_record, preprocessing_record, subject_recipe
from synth7t.dataset.splits import assign_splits
from synth7t.errors import ConfigError, InputError
from synth7t.io import atomic_path, load_volume, read_json, write_json
from synth7t.manifest import diagnosis_group

log = logging.getLogger(__name__)

STORE_FORMAT = "synth7t-slice-store"
STORE_VERSION = 1
KINDS = ("t3", "t7", "mask")
SPLITS = ("train", "val", "test")
PREDICT_SPLIT = "predict"
MIN_AREA_FRAC = 0.01
GMM_MAX_SAMPLES = 100_000


def valid_slices(
    mask_stack: np.ndarray, min_slice: int = 0, min_area_frac: float = MIN_AREA_FRAC
) -> np.ndarray:
    """Indices k of a ``(Z, H, W)`` mask stack with area > ``min_area_frac * max area``, ``k >= min_slice``."""
    areas = (np.asarray(mask_stack) > 0).reshape(mask_stack.shape[0], -1).sum(axis=1)  # (Z,)
    keep = (areas > min_area_frac * areas.max()) & (areas > 0)
    keep &= np.arange(areas.size) >= min_slice
    return np.flatnonzero(keep)


# ---------------------------------------------------------------------------------------------------------
# work folder -> store


@dataclass
class _Candidate:
    name: str
    folder: Path
    subject: dict
    qc: dict
    has_t7: bool
    provenance: dict | None = None
    base: Path | None = None  # the person's folder (t7, masks) for one of several 3T scans; None: ``folder``
    scan: dict | None = None  # {"person", "scan", "gap_days"} for one of several 3T scans

    def path(self, name: str) -> Path:
        """``t3.nii.gz`` from the pair's own folder, the 7T and masks from the person's."""
        return self.folder / name if name == "t3.nii.gz" or self.base is None else self.base / name


def _scan(work: Path) -> tuple[list[_Candidate], dict[str, str], list[str]]:
    """Usable subject folders, skipped ones with their reason, and fingerprints of everything read."""
    usable, skipped, prints = [], {}, []
    for folder in sorted(p for p in work.iterdir() if p.is_dir() and not p.name.startswith(".")):
        scans = folder / "scans"
        pairs = [(folder.name, folder, None)] if not scans.is_dir() else [
            (f"{folder.name}_{d.name}", d, folder)
            for d in sorted(scans.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        for name, pair, base in pairs:
            reason, cand = _check_folder(pair, base)
            stamp = "|".join(_stamp(f / ".done") for f in (pair, base) if f is not None)
            prints.append(f"{name}|{stamp}|{reason or 'ok'}")
            if cand is None:
                skipped[name] = reason
                log.info("skipping %s: %s", name, reason)
            else:
                usable.append(cand)
    return usable, skipped, prints


def _stamp(done: Path) -> str:
    return f"{done.stat().st_mtime_ns}:{done.read_text(errors='replace')}" if done.is_file() else "-"


def _check_folder(folder: Path, base: Path | None = None) -> tuple[str, _Candidate | None]:
    """A work folder, or with ``base`` (the person's folder) one of its 3T scans in ``base/scans/<code>``."""
    if not (folder / ".done").is_file() or (base is not None and not (base / ".done").is_file()):
        return "not finished (no .done)", None
    try:
        qc = read_json(folder / "qc.json")
        subject = read_json((base or folder) / "subject.json")
    except InputError as exc:
        return str(exc), None
    scan = None
    if base is not None:
        facts = (subject.get("scans") or {}).get(folder.name) or {}
        scan = {"person": base.name, "scan": folder.name, "gap_days": facts.get("gap_days"),
                **({"age": facts["age"]} if "age" in facts else {})}  # the age at that scan (BIDS sessions.tsv)
    if qc.get("rejected", False):
        return "rejected by QC: " + "; ".join(str(r) for r in qc.get("reasons", [])), None
    for name in ("t3.nii.gz", "mask.nii.gz"):
        if not ((base or folder) if name != "t3.nii.gz" else folder).joinpath(name).is_file():
            return f"{name} missing", None
    has_t7 = ((base or folder) / "t7.nii.gz").is_file()
    try:
        prov = read_json(folder / "provenance.json") if (folder / "provenance.json").is_file() else None
    except InputError as exc:
        log.warning("%s: unreadable provenance.json (%s); its preprocessing is recorded as unknown", folder.name, exc)
        prov = None
    name = folder.name if base is None else f"{base.name}_{folder.name}"
    return "", _Candidate(name, folder, subject, qc, has_t7, prov, base, scan)


def _params_hash(params: dict, prints: list[str]) -> str:
    blob = json.dumps({"params": params, "inputs": prints, "version": STORE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_mask(cand: _Candidate) -> np.ndarray:
    return load_volume(cand.path("mask.nii.gz")).data > 0.5  # (X, Y, Z) bool


def _write_stack(path: Path, volume: np.ndarray, mask: np.ndarray, geom: CropGeometry, limits, dtype) -> None:
    """Write ``volume`` cropped, padded and (with ``limits``) normalized, slice by slice into a memmap."""
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=geom.stack_shape)  # (Z, H, W)
        for (k, sl), (_, m) in zip(iter_crop_pad(volume, geom), iter_crop_pad(mask, geom), strict=True):
            arr[k] = normalize(sl, m, limits) if limits is not None else (m > 0)
        arr.flush()
        del arr


def _fit_t3_gmm(brain: np.ndarray, name: str, seed: int) -> dict | None:
    """GMM of the normalized 3T brain intensities for the GMM augmentation; None (logged) if it cannot fit."""
    from synth7t.dataset.gmm import fit_gmm

    try:
        return fit_gmm(brain, seed=seed).to_dict()
    except ValueError as exc:
        log.warning("%s: no intensity GMM (%s); the GMM augmentation will skip this subject", name, exc)
        return None


def _pack_subject(cand: _Candidate, box: Box, hw: tuple[int, int], out: Path, opts: dict) -> dict:
    """Pack one subject's arrays; return its ``store.json`` entry."""
    mask = _load_mask(cand)
    geom = make_geometry(mask.shape, box, hw, opts["multiple"])
    entry: dict = {"geometry": geom.to_dict(), "shape": list(geom.stack_shape), "limits": {}}
    kinds = ("t3", "t7") if cand.has_t7 else ("t3",)
    for kind in kinds:
        vol = load_volume(cand.path(f"{kind}.nii.gz"))
        if vol.shape != mask.shape:
            raise InputError(f"{vol.source}: shape {vol.shape} differs from the mask's {mask.shape}")
        if kind == "t3":
            entry["affine"] = vol.affine.tolist()
        try:
            limits = brain_limits(vol.data, mask, opts["lower_pct"], opts["upper_pct"])
        except ValueError as exc:
            raise InputError(f"{vol.source}: {exc}") from None
        entry["limits"][kind] = list(limits)
        _write_stack(out / cand.name / f"{kind}.npy", vol.data, mask, geom, limits, np.float16)
        if kind == "t3":
            entry["gmm_t3"] = _fit_t3_gmm(normalize(vol.data[mask], None, limits), cand.name, opts["seed"])
        del vol
    _write_stack(out / cand.name / "mask.npy", mask, mask, geom, None, np.uint8)
    z0 = box[2][0]
    min_slice = max(0, int(cand.qc.get("min_slice") or 0) - z0)
    mstack = np.load(out / cand.name / "mask.npy", mmap_mode="r")
    Z = geom.stack_shape[0]
    entry.update(
        has_t7=cand.has_t7,
        min_slice=min_slice,
        valid_slices=valid_slices(mstack, min_slice).tolist(),
        z_mid=ctx.middle_slice(Z),
        age=cand.subject.get("age"),
        sex=cand.subject.get("sex"),
        group=cand.subject.get("group") or diagnosis_group(cand.subject.get("diagnosis")),
        diagnosis=cand.subject.get("diagnosis"),
        flagged=bool(cand.qc.get("flagged", False)),
    )
    entry.update(cand.scan or {})
    return entry


def _check_existing(out: Path, phash: str, overwrite: bool) -> bool:
    """True when ``out`` already holds a complete store made from the same inputs and parameters."""
    meta_path = out / "store.json"
    if not meta_path.exists():
        return False
    try:
        meta = read_json(meta_path)
    except InputError:
        meta = {}
    same = meta.get("params_hash") == phash and all(
        (out / name / f"{kind}.npy").is_file()
        for name, s in meta.get("subjects", {}).items()
        for kind in (KINDS if s.get("has_t7") else ("t3", "mask"))
    )
    if same:
        return True
    if not overwrite:
        raise ConfigError(
            f"{meta_path}: a different slice store is already there; pass overwrite=True to replace it"
        )
    meta_path.unlink()  # the old store is invalid from now on
    for name in meta.get("subjects", {}):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    return False


def pack(
    work: str | Path,
    out: str | Path,
    *,
    multiple: int = 32,
    split: Sequence[float] | Sequence[int] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: bool = True,
    lower_pct: float = 1.0,
    upper_pct: float = 99.0,
    overwrite: bool = False,
    progress: bool = True,
    allow_mixed: bool = False,
) -> Path:
    """Pack the preprocessed work folder ``work`` into a slice store at ``out``; return ``out/store.json``.

    See the module docstring for what is written. ``split`` is (train, val, test) fractions or counts of the
    persons that have a 7T (a person with several 3T scans counts once).
    """
    work, out = Path(work), Path(out)
    if not work.is_dir():
        raise InputError(f"{work}: work folder not found")
    if multiple < 1 or multiple & (multiple - 1):
        raise ConfigError(f"multiple must be a power of two, got {multiple}")
    if not 0.0 <= lower_pct < upper_pct <= 100.0:
        raise ConfigError(f"need 0 <= lower_pct < upper_pct <= 100, got {lower_pct}, {upper_pct}")
    cands, skipped, prints = _scan(work)
    opts = {"multiple": multiple, "split": list(split), "seed": seed, "stratify": stratify,
            "lower_pct": lower_pct, "upper_pct": upper_pct}
    phash = _params_hash(opts, prints)
    if _check_existing(out, phash, overwrite):
        log.info("%s is up to date; nothing to do", out / "store.json")
        return out / "store.json"
    boxes = _boxes(cands, skipped)
    cands = [c for c in cands if c.name in boxes]
    if not cands:
        raise InputError(f"{work}: no usable subject (finished, not rejected, with t3 and mask)")
    prep = preprocessing_record(
        {c.name: subject_recipe(c, _voxel_size(c)) for c in cands},
        {c.name: [m for k, m in (c.qc.get("details") or {}).items() if k.startswith("mask_method")] for c in cands},
        normalization_record(lower_pct, upper_pct), allow_mixed=allow_mixed)
    hh = max(b[0][1] - b[0][0] for b in boxes.values())
    ww = max(b[1][1] - b[1][0] for b in boxes.values())
    hw = (round_up(hh, multiple), round_up(ww, multiple))
    log.info("packing %d subject(s) into %s, in-plane size %d x %d", len(cands), out, *hw)
    subjects = {}
    for i, cand in enumerate(cands):
        try:
            subjects[cand.name] = _pack_subject(cand, boxes[cand.name], hw, out, opts)
        except InputError as exc:
            skipped[cand.name] = str(exc)
            log.warning("skipping %s: %s", cand.name, exc)
            continue
        log.log(logging.INFO if progress else logging.DEBUG, "packed %d/%d %s", i + 1, len(cands), cand.name)
    return _write_meta(out, subjects, skipped, hw, opts, phash, prep)


def _voxel_size(cand: _Candidate) -> list[float]:
    """Voxel size (mm) of a subject's preprocessed grid, from its mask's header."""
    import nibabel as nib

    zooms = nib.load(cand.path("mask.nii.gz")).header.get_zooms()[:3]
    return [round(float(z), 4) for z in zooms]


def _boxes(cands: list[_Candidate], skipped: dict[str, str]) -> dict[str, Box]:
    """First pass: each subject's brain bounding box (only masks are read)."""
    boxes = {}
    for cand in cands:
        try:
            boxes[cand.name] = crop_box(_load_mask(cand))
        except (InputError, ValueError) as exc:
            skipped[cand.name] = f"unusable mask: {exc}"
            log.warning("skipping %s: unusable mask (%s)", cand.name, exc)
    return boxes


def person_splits(subjects: dict, opts: dict) -> dict[str, list[str]]:
    """train / val / test drawn over persons (an entry's ``"person"``, else its own name), then each person's
    pairs listed in its split: no person is in two splits."""
    pairs: dict[str, list[str]] = {}
    for n, s in subjects.items():
        if s["has_t7"]:
            pairs.setdefault(s.get("person", n), []).append(n)
    persons = sorted(pairs)
    by_person = assign_splits(
        persons, [subjects[pairs[p][0]]["group"] for p in persons], opts["split"], seed=opts["seed"],
        stratify=opts["stratify"],
    )
    return {k: sorted(n for p in v for n in pairs[p]) for k, v in by_person.items()}


def _write_meta(out: Path, subjects: dict, skipped: dict, hw, opts: dict, phash: str,
                preprocessing: dict | None = None) -> Path:
    splits = person_splits(subjects, opts)
    splits[PREDICT_SPLIT] = sorted(n for n, s in subjects.items() if not s["has_t7"])
    meta = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "params_hash": phash,
        "params": opts,
        "hw": list(hw),
        "axes": "arrays are (Z, H, W) = (z, x, y) of the canonical RAS+ grid; stack[k, bh+i, bw+j] = "
        "volume[x0+i, y0+j, z0+k] with ((bh, _), (bw, _)) = pad",
        "dtypes": {"t3": "float16", "t7": "float16", "mask": "uint8"},
        "normalization": normalization_record(opts["lower_pct"], opts["upper_pct"]),
        "preprocessing": preprocessing if preprocessing is not None else {},
        "context": ctx.describe(),
        "splits": splits,
        "subjects": subjects,
        "skipped": skipped,
    }
    return write_json(out / "store.json", meta)


# ---------------------------------------------------------------------------------------------------------
# store -> subject grid


def read_store_meta(store_dir: str | Path) -> dict:
    """Read and check ``store.json`` (``store_dir`` may be the folder or the file)."""
    path = Path(store_dir)
    path = path / "store.json" if path.is_dir() or path.suffix != ".json" else path
    meta = read_json(path)
    if meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
        raise InputError(
            f"{path}: not a synth7t slice store of version {STORE_VERSION} "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
        )
    return meta


def subject_geometry(meta: dict, subject: str) -> CropGeometry:
    if subject not in meta["subjects"]:
        raise InputError(f"subject {subject!r} is not in the slice store")
    return CropGeometry.from_dict(meta["subjects"][subject]["geometry"])


def unpack(store_dir: str | Path, subject: str, stack: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Put a ``(Z, H, W)`` stack of ``subject`` back on its preprocessed ``(X, Y, Z)`` grid.

    Exact inverse of the crop and padding; ``fill`` outside the brain box.

    Intensities are unchanged: use :func:`denormalize` with ``store.json``'s limits to undo the normalization.
    """
    return uncrop(np.asarray(stack), subject_geometry(read_store_meta(store_dir), subject), fill)
