"""Pack a preprocessed work folder into a slice store (thesis 3.1.2-3.1.5).

For every finished, non-rejected subject of ``WORK`` (see ``docs/data-layout.md``):

1. **Crop and pad** (thesis 3.1.3). Each subject is cropped to its own brain bounding box (half-open
   ``((x0, x1), (y0, y1), (z0, z1))`` on its canonical RAS+ grid), then centre-padded in-plane to the cohort's
   largest box, rounded up to a multiple of ``multiple`` (``2**k`` for a U-net with ``k`` downsamplings; the
   thesis used 288 x 224). The axial axis is not padded: each subject keeps its own ``Z = z1 - z0``.
2. **Axes.** Arrays are stored as ``(Z, H, W)`` = ``(z, x, y)`` of the canonical volume: axial slices first
   so a sample reads contiguous memory; in-plane ``H`` runs along x (left -> Right) and ``W`` along y
   (posterior -> Anterior). Precisely, with ``(bh, _), (bw, _) = pad``::

       stack[k, bh + i, bw + j] = volume[x0 + i, y0 + j, z0 + k]    0 <= i < x1 - x0, 0 <= j < y1 - y0

   and every other in-plane position is 0. :func:`uncrop` / :func:`unpack` invert this exactly.
3. **Clipped min-max** (thesis 1.3.1, 3.1.2), per image: with ``lo, hi`` the brain's 1st / 99th
   percentiles, ``v' = clip((v - lo) / (hi - lo), 0, 1)`` inside the brain mask and 0 outside.
   ``(lo, hi)`` are stored per subject and image; :func:`denormalize` inverts ``v = v' (hi - lo) + lo``
   (exact for brain voxels inside ``[lo, hi]``, up to float16 rounding).
4. **Valid slices** (thesis 3.1.4): axial slices whose mask area exceeds ``min_area_frac`` (1 %) of the
   subject's largest slice area, at or above QC's ``min_slice`` (converted to the cropped index).
5. **GMM** for the intensity augmentation: a 3-component Gaussian mixture of the normalized 3T brain
   intensities, sorted by mean (CSF, GM, WM), is fitted once here and stored in ``store.json``.
6. **Splits** by subject (train / val / test), seeded, stratified by diagnosis group. Subjects without a 7T
   are packed without a target and listed under the extra split ``"predict"``, never in train/val/test.

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
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synth7t.dataset import context as ctx
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

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# ---------------------------------------------------------------------------------------------------------
# pure-array API (also used at predict time, without a store)


@dataclass(frozen=True)
class CropGeometry:
    """Where a ``(Z, H, W)`` stack sits in its subject's ``(X, Y, Z)`` grid (see the module docstring)."""

    full_shape: tuple[int, int, int]  # (X, Y, Z) of the subject's grid
    box: Box  # half-open brain bounding box ((x0, x1), (y0, y1), (z0, z1))
    pad: tuple[tuple[int, int], tuple[int, int]]  # ((before, after) along H, (before, after) along W)

    @property
    def hw(self) -> tuple[int, int]:
        """In-plane size (H, W) after padding."""
        (x0, x1), (y0, y1), _ = self.box
        (bh, ah), (bw, aw) = self.pad
        return (bh + x1 - x0 + ah, bw + y1 - y0 + aw)

    @property
    def stack_shape(self) -> tuple[int, int, int]:
        """Shape (Z, H, W) of the packed stack."""
        (z0, z1) = self.box[2]
        return (z1 - z0, *self.hw)

    def to_dict(self) -> dict:
        return {
            "full_shape": list(self.full_shape),
            "box": [list(b) for b in self.box],
            "pad": [list(p) for p in self.pad],
        }

    @classmethod
    def from_dict(cls, d: dict) -> CropGeometry:
        box = tuple((int(a), int(b)) for a, b in d["box"])
        pad = tuple((int(a), int(b)) for a, b in d["pad"])
        return cls(tuple(int(s) for s in d["full_shape"]), box, pad)  # type: ignore[arg-type]


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return int(math.ceil(n / multiple) * multiple)


def crop_box(mask: np.ndarray) -> Box:
    """Half-open bounding box ``((x0, x1), (y0, y1), (z0, z1))`` of the non-zero voxels of a 3-D mask."""
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {mask.shape}")
    nz = mask > 0
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(nz.any(axis=other))
        if idx.size == 0:
            raise ValueError("mask is empty: no bounding box")
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def make_geometry(
    full_shape: Sequence[int], box: Box, target_hw: Sequence[int] | None = None, multiple: int = 32
) -> CropGeometry:
    """Geometry that centre-pads ``box`` in-plane to ``target_hw`` rounded up to ``multiple``.

    ``target_hw=None`` pads the box itself up to the next multiple. Padding before = ``(H - h) // 2``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    full_shape = tuple(int(s) for s in full_shape)
    if len(full_shape) != 3:
        raise ValueError(f"full_shape must have 3 entries, got {full_shape}")
    for (a, b), n in zip(box, full_shape, strict=True):
        if not 0 <= a < b <= n:
            raise ValueError(f"box {box} does not fit in a grid of shape {full_shape}")
    h, w = box[0][1] - box[0][0], box[1][1] - box[1][0]
    th, tw = (h, w) if target_hw is None else (int(target_hw[0]), int(target_hw[1]))
    if th < h or tw < w:
        raise ValueError(f"brain box of in-plane size ({h}, {w}) does not fit in target ({th}, {tw})")
    big_h, big_w = round_up(th, multiple), round_up(tw, multiple)
    pad = (((big_h - h) // 2, big_h - h - (big_h - h) // 2), ((big_w - w) // 2, big_w - w - (big_w - w) // 2))
    return CropGeometry(full_shape, box, pad)  # type: ignore[arg-type]


def iter_crop_pad(volume: np.ndarray, geom: CropGeometry) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, slice (H, W))`` for every axial slice k of the packed stack (same dtype as ``volume``)."""
    if tuple(volume.shape) != geom.full_shape:
        raise ValueError(f"volume of shape {volume.shape} does not match the geometry's {geom.full_shape}")
    (x0, x1), (y0, y1), (z0, z1) = geom.box
    (bh, _), (bw, _) = geom.pad
    H, W = geom.hw
    for k, z in enumerate(range(z0, z1)):
        out = np.zeros((H, W), dtype=volume.dtype)
        out[bh : bh + x1 - x0, bw : bw + y1 - y0] = volume[x0:x1, y0:y1, z]
        yield k, out


def crop_pad(
    volume: np.ndarray, box: Box, target_hw: Sequence[int] | None = None, multiple: int = 32
) -> tuple[np.ndarray, CropGeometry]:
    """Crop a canonical ``(X, Y, Z)`` volume to ``box`` and centre-pad it.

    Returns ``((Z, H, W) stack, geometry)``.

    ``target_hw`` is the in-plane size to pad to (e.g. the store's, at predict time); ``None`` pads the box to
    the next multiple of ``multiple``.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    geom = make_geometry(volume.shape, box, target_hw, multiple)
    stack = np.zeros(geom.stack_shape, dtype=volume.dtype)  # (Z, H, W)
    for k, sl in iter_crop_pad(volume, geom):
        stack[k] = sl
    return stack, geom


def uncrop(stack: np.ndarray, geom: CropGeometry, fill: float = 0.0) -> np.ndarray:
    """Inverse of :func:`crop_pad`: ``(Z, H, W)`` stack -> ``(X, Y, Z)`` volume, ``fill`` outside the box."""
    if tuple(stack.shape) != geom.stack_shape:
        raise ValueError(f"stack of shape {stack.shape} does not match the geometry's {geom.stack_shape}")
    (x0, x1), (y0, y1), (z0, z1) = geom.box
    (bh, _), (bw, _) = geom.pad
    out = np.full(geom.full_shape, fill, dtype=stack.dtype)  # (X, Y, Z)
    out[x0:x1, y0:y1, z0:z1] = np.transpose(stack[:, bh : bh + x1 - x0, bw : bw + y1 - y0], (1, 2, 0))
    return out


def normalize(values: np.ndarray, mask: np.ndarray | None, limits: Sequence[float]) -> np.ndarray:
    """``clip((v - lo) / (hi - lo), 0, 1)``, 0 where ``mask`` is 0 (float32)."""
    lo, hi = float(limits[0]), float(limits[1])
    if not hi > lo:
        raise ValueError(f"normalization limits must satisfy lo < hi, got ({lo}, {hi})")
    out = np.clip((np.asarray(values, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    if mask is not None:
        out = np.where(mask > 0, out, 0.0).astype(np.float32)
    return out.astype(np.float32, copy=False)


def brain_limits(volume: np.ndarray, mask: np.ndarray, lower_pct: float = 1.0, upper_pct: float = 99.0):
    """Percentiles ``(lo, hi)`` of the brain voxels (``mask > 0``)."""
    if not 0.0 <= lower_pct < upper_pct <= 100.0:
        raise ValueError(f"need 0 <= lower_pct < upper_pct <= 100, got {lower_pct}, {upper_pct}")
    if volume.shape != mask.shape:
        raise ValueError(f"volume {volume.shape} and mask {mask.shape} differ in shape")
    brain = volume[mask > 0]
    if brain.size == 0:
        raise ValueError("mask is empty: no brain voxel to normalize with")
    lo, hi = np.percentile(brain, [lower_pct, upper_pct])
    if not hi > lo:
        raise ValueError(f"brain intensities are constant between the percentiles ({lo:g}); cannot normalize")
    return float(lo), float(hi)


def clipped_minmax(
    volume: np.ndarray, mask: np.ndarray, lower_pct: float = 1.0, upper_pct: float = 99.0
) -> tuple[np.ndarray, tuple[float, float]]:
    """Clipped min-max normalization (thesis 1.3.1): returns ``(normed float32, (lo, hi))``.

    ``lo, hi`` = brain percentiles; ``normed = clip((v - lo) / (hi - lo), 0, 1)`` in the brain, 0 outside.
    """
    limits = brain_limits(volume, mask, lower_pct, upper_pct)
    return normalize(volume, mask, limits), limits


def denormalize(values: np.ndarray, limits: Sequence[float]) -> np.ndarray:
    """Inverse of the normalization: ``v = v' (hi - lo) + lo`` (float32)."""
    lo, hi = float(limits[0]), float(limits[1])
    return (np.asarray(values, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)).astype(np.float32)


def valid_slices(
    mask_stack: np.ndarray, min_slice: int = 0, min_area_frac: float = MIN_AREA_FRAC
) -> np.ndarray:
    """Indices k of a ``(Z, H, W)`` mask stack with area > ``min_area_frac * max area``, ``k >= min_slice``."""
    areas = (np.asarray(mask_stack) > 0).reshape(mask_stack.shape[0], -1).sum(axis=1)  # (Z,)
    keep = (areas > min_area_frac * areas.max()) & (areas > 0)
    keep &= np.arange(areas.size) >= min_slice
    return np.flatnonzero(keep)


# ---------------------------------------------------------------------------------------------------------
# splits


def split_counts(n: int, split: Sequence[float] | Sequence[int]) -> tuple[int, int, int]:
    """Number of subjects per split from fractions (largest remainder) or explicit counts.

    Fractions must be >= 0 and sum to 1; each non-zero fraction gets at least one subject when there are
    enough subjects. Counts (all ints) must sum to ``n``.
    """
    if len(split) != 3:
        raise ConfigError(f"split needs 3 values (train, val, test), got {list(split)}")
    if all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in split):
        counts = tuple(int(s) for s in split)
        if min(counts) < 0 or sum(counts) != n:
            raise ConfigError(f"split counts {list(counts)} must be >= 0 and sum to {n} (subjects with a 7T)")
        return counts  # type: ignore[return-value]
    fracs = [float(s) for s in split]
    if min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions {fracs} must be >= 0 and sum to 1")
    raw = [f * n for f in fracs]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i in range(3):  # give an empty but requested split one subject, taken from the largest
        if fracs[i] > 0 and counts[i] == 0:
            j = int(np.argmax(counts))
            if counts[j] > 1:
                counts[j] -= 1
                counts[i] += 1
    return tuple(counts)  # type: ignore[return-value]


def assign_splits(
    names: Sequence[str],
    groups: Sequence[str | None],
    split: Sequence[float] | Sequence[int] = (0.7, 0.15, 0.15),
    *,
    seed: int = 0,
    stratify: bool = True,
) -> dict[str, list[str]]:
    """Seeded subject-level split into train / val / test.

    Stratified: each group (healthy / ill / unknown) is shuffled, every subject gets the key
    ``(rank + 0.5) / group size`` and the subjects sorted by key are cut into consecutive train / val / test
    runs, so each split receives about its fraction of every group.
    """
    if len(set(names)) != len(names):
        raise ValueError("subject names must be unique")
    n_train, n_val, _ = split_counts(len(names), split)
    rng = np.random.default_rng(seed)
    if stratify:
        keys: dict[str, tuple[float, float]] = {}
        strata: dict[str, list[str]] = {}
        for name, group in zip(names, groups, strict=True):
            strata.setdefault(group or "unknown", []).append(name)
        for label in sorted(strata):
            members = sorted(strata[label])
            perm = rng.permutation(len(members))
            for rank, idx in enumerate(perm):
                keys[members[idx]] = ((rank + 0.5) / len(members), float(rng.random()))
        order = sorted(keys, key=lambda s: keys[s])
    else:
        ordered = sorted(names)
        order = [ordered[i] for i in rng.permutation(len(ordered))]
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


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


def _scan(work: Path) -> tuple[list[_Candidate], dict[str, str], list[str]]:
    """Usable subject folders, skipped ones with their reason, and fingerprints of everything read."""
    usable, skipped, prints = [], {}, []
    for folder in sorted(p for p in work.iterdir() if p.is_dir() and not p.name.startswith(".")):
        reason, cand = _check_folder(folder)
        done = folder / ".done"
        stamp = f"{done.stat().st_mtime_ns}:{done.read_text(errors='replace')}" if done.is_file() else "-"
        prints.append(f"{folder.name}|{stamp}|{reason or 'ok'}")
        if cand is None:
            skipped[folder.name] = reason
            log.info("skipping %s: %s", folder.name, reason)
        else:
            usable.append(cand)
    return usable, skipped, prints


def _check_folder(folder: Path) -> tuple[str, _Candidate | None]:
    if not (folder / ".done").is_file():
        return "not finished (no .done)", None
    try:
        qc = read_json(folder / "qc.json")
        subject = read_json(folder / "subject.json")
    except InputError as exc:
        return str(exc), None
    if qc.get("rejected", False):
        return "rejected by QC: " + "; ".join(str(r) for r in qc.get("reasons", [])), None
    for name in ("t3.nii.gz", "mask.nii.gz"):
        if not (folder / name).is_file():
            return f"{name} missing", None
    has_t7 = (folder / "t7.nii.gz").is_file()
    try:
        prov = read_json(folder / "provenance.json") if (folder / "provenance.json").is_file() else None
    except InputError as exc:
        log.warning("%s: unreadable provenance.json (%s); its preprocessing is recorded as unknown", folder.name, exc)
        prov = None
    return "", _Candidate(folder.name, folder, subject, qc, has_t7, prov)


def _params_hash(params: dict, prints: list[str]) -> str:
    blob = json.dumps({"params": params, "inputs": prints, "version": STORE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_mask(cand: _Candidate) -> np.ndarray:
    return load_volume(cand.folder / "mask.nii.gz").data > 0.5  # (X, Y, Z) bool


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
    from synth7t.dataset.augment import fit_gmm

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
        vol = load_volume(cand.folder / f"{kind}.nii.gz")
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
    subjects that have a 7T.
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
        _normalization(lower_pct, upper_pct), allow_mixed=allow_mixed)
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

    zooms = nib.load(cand.folder / "mask.nii.gz").header.get_zooms()[:3]
    return [round(float(z), 4) for z in zooms]


def _normalization(lower_pct: float, upper_pct: float) -> dict:
    return {"method": "clipped_minmax", "lower_pct": lower_pct, "upper_pct": upper_pct}


# the preprocessing settings that describe what a model's inputs look like: subjects packed together must share
# them (the other settings of provenance.json, e.g. QC thresholds or the seed, do not change the images' kind)
RECIPE_KEYS = ("pipeline_version", "skullstrip", "t3_already_corrected", "n4_3t", "n4_7t_first", "n4_7t",
               "registration_resolution_mm", "registration_transform", "voxel_size_mm")
CSF_HANDLING = ("t3/t7.nii.gz keep the CSF (cut to the brain+CSF mask); the store zeroes everything outside the "
                "brain mask (mask.nii.gz)")


def _n4_label(params: dict | None) -> str | dict | None:
    from synth7t.preprocess.bias import preset_name

    return preset_name(params) or params


def subject_recipe(cand: _Candidate, voxel_size_mm: list[float]) -> dict | None:
    """The preprocessing recipe of one subject from its ``provenance.json`` (None when it has none)."""
    params = (cand.provenance or {}).get("params")
    if not isinstance(params, dict):
        return None
    n4_3t = "none (already corrected)" if params.get("t3_already_corrected") else _n4_label(params.get("n4_3t"))
    rec = {"pipeline_version": params.get("pipeline_version"), "skullstrip": params.get("skullstrip"),
           "t3_already_corrected": params.get("t3_already_corrected"), "n4_3t": n4_3t,
           "n4_7t_first": _n4_label(params.get("n4_7t_first")) if cand.has_t7 else None,
           "n4_7t": _n4_label(params.get("n4_7t")) if cand.has_t7 else None,
           "registration_resolution_mm": params.get("registration_resolution_mm") if cand.has_t7 else None,
           "registration_transform": params.get("registration_transform") if cand.has_t7 else None,
           "voxel_size_mm": voxel_size_mm}
    return rec


def preprocessing_record(recipes: dict[str, dict | None], methods: dict[str, list[str]], normalization: dict,
                         *, allow_mixed: bool) -> dict:
    """``store.json``'s ``preprocessing``: the recipe the packed subjects share (see docs/data-layout.md).

    Settings that differ between subjects raise a :class:`ConfigError` naming them, or with ``allow_mixed`` are
    recorded as ``{"mixed": {value: [subjects]}}`` with a warning. Subjects without ``provenance.json`` are
    listed under ``unknown`` (with a warning).
    """
    known = {n: r for n, r in recipes.items() if r is not None}
    unknown = sorted(n for n, r in recipes.items() if r is None)
    rec: dict = {}
    mixed: dict[str, dict[str, list[str]]] = {}
    for key in RECIPE_KEYS:
        values: dict[str, list[str]] = {}
        for name, r in known.items():
            if r.get(key) is None and key in ("n4_7t_first", "n4_7t", "registration_resolution_mm",
                                              "registration_transform"):
                continue  # prediction-only subjects have no 7T steps
            values.setdefault(json.dumps(r.get(key), sort_keys=True), []).append(name)
        if len(values) == 1:
            rec[key] = json.loads(next(iter(values)))
        elif len(values) > 1:  # keys: the value as written (strings unquoted)
            mixed[key] = {(json.loads(k) if k.startswith('"') else k): sorted(v) for k, v in values.items()}
            rec[key] = {"mixed": mixed[key]}
    if mixed:
        lines = "; ".join(f"{k}: " + ", ".join(f"{v} ({len(n)} subject(s), e.g. {n[0]})" for v, n in d.items())
                          for k, d in mixed.items())
        if not allow_mixed:
            raise ConfigError(f"subjects were preprocessed with different settings ({lines}); re-run "
                              "`synth7t preprocess` on them with one setting, or pack with "
                              "--allow-mixed-preprocessing to accept a mixed store")
        log.warning("packing subjects preprocessed with different settings: %s", lines)
    if unknown:
        log.warning("%d subject(s) have no provenance.json (preprocessing unknown): %s", len(unknown),
                    ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
        rec["unknown"] = unknown
    if known:
        rec["csf"] = CSF_HANDLING
        used: dict[str, int] = {}
        for ms in methods.values():
            for m in ms:
                used[m] = used.get(m, 0) + 1
        rec["skullstrip_used"] = dict(sorted(used.items()))  # masks per method actually used (fallbacks show)
    rec["normalization"] = normalization
    return rec


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


def _write_meta(out: Path, subjects: dict, skipped: dict, hw, opts: dict, phash: str,
                preprocessing: dict | None = None) -> Path:
    trainable = [n for n, s in subjects.items() if s["has_t7"]]
    splits = assign_splits(
        trainable, [subjects[n]["group"] for n in trainable], opts["split"], seed=opts["seed"],
        stratify=opts["stratify"],
    )
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
        "normalization": _normalization(opts["lower_pct"], opts["upper_pct"]),
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
