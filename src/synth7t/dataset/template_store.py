"""A slice store on a template grid (``synth7t pack WORK --like MODEL_DIR``): pairs laid out as the thesis authors'
published models were trained, so that ``synth7t train STORE --init MODEL_DIR`` fine-tunes those weights on a lab's
own pairs.

For every finished, non-rejected pair of the work folder (3T and 7T brains on the 7T grid, ``docs/data-layout.md``):

1. **Onto the template grid**: the 7T brain is registered rigidly (ANTs, mutual information, 1 mm) to the model's
   7T template (not moved when it is on the template grid already: same shape and affine); the 7T and the 3T
   brains are resampled once through that transform onto the template grid (linear), the mask is the 3T's support
   there. The transform is recorded per subject.
2. **The authors' normalization** (their ``pickling.py`` and training loader): the 7T is masked by the 3T's
   support (``7T * (3T > 0)``); each image becomes ``(x - p1) / (p99 - p1)`` with the percentiles of its voxels
   > 0, not clipped (the background keeps its negative value); the 7T target is capped at 1.5 as their loader
   capped it.
3. **Slices along the model's axis** of the template's voxel order, padded in-plane with zeros to the model's
   multiple (half before, the rest after), float16, ``(N, H, W)`` arrays as in every store; a sample is the
   window of slices ``j .. j+S-1`` and the 7T slice ``j`` (:class:`~synth7t.dataset.slices.SliceDataset` reads
   ``store.json``'s ``layout: template``), with the covariate tokens of the model (age, sex, [diagnosis],
   position ``2 (j - mid) / n_slices_position``, ``mid`` the centre of the brain's extent along the axis).
4. **Valid windows**: those whose 7T slice holds more than 1 % of the largest slice's brain area.
5. **Splits** by person, as :func:`synth7t.dataset.pack.pack` draws them; the template files are copied into
   ``STORE/template/`` so that a model trained on the store carries them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from synth7t.dataset.pack import (
    MIN_AREA_FRAC,
    STORE_FORMAT,
    STORE_VERSION,
    _check_existing,
    _scan,
    _voxel_size,
    person_splits,
    valid_slices,
)
from synth7t.dataset.recipe import preprocessing_record, subject_recipe
from synth7t.errors import InputError
from synth7t.io import Volume, atomic_path, load_volume, write_json
from synth7t.manifest import diagnosis_group

log = logging.getLogger(__name__)

TARGET_CAP = 1.5  # the authors' training loader: y[y > 1.5] = 1.5
LAYOUT = "template"


def normalize_published(data: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> tuple[np.ndarray, list[float]]:
    """``(x - p_lower) / (p_upper - p_lower)`` with the percentiles of the voxels > 0, not clipped; and the limits."""
    v = data[data > 0]
    if v.size < 2:
        raise ValueError("no voxel > 0")
    lo, hi = (float(q) for q in np.percentile(v, [lower, upper]))
    if not hi > lo:
        raise ValueError(f"constant image ({lo:g})")
    return ((data - lo) / (hi - lo)).astype(np.float32), [lo, hi]


def pad_amounts(n: int, multiple: int) -> tuple[int, int]:
    """The authors' in-plane padding of a side of ``n`` to a multiple: (before, after) = (r // 2, r - r // 2)."""
    r = (-n) % multiple
    return r // 2, r - r // 2


def to_slices(volume: np.ndarray, slice_dim: int, multiple: int) -> np.ndarray:
    """A template-grid volume -> its ``(N, H, W)`` slice stack along ``slice_dim``, zero-padded in-plane."""
    stack = np.moveaxis(volume, slice_dim, 0)
    (a0, a1), (b0, b1) = pad_amounts(stack.shape[1], multiple), pad_amounts(stack.shape[2], multiple)
    return np.pad(stack, ((0, 0), (a0, a1), (b0, b1)))


def extent_mid(mask: np.ndarray, axis: int) -> float:
    """``(first + last) / 2`` of the indices along ``axis`` holding a non-zero voxel."""
    other = tuple(i for i in range(mask.ndim) if i != axis)
    idx = np.flatnonzero(np.asarray(mask).any(axis=other))
    if idx.size == 0:
        raise ValueError("empty mask")
    return (float(idx[0]) + float(idx[-1])) / 2


def same_grid(vol: Volume, shape: tuple[int, ...], affine: np.ndarray) -> bool:
    """Whether ``vol`` lies on the grid ``(shape, affine)`` (affines equal to 1e-3 mm)."""
    return tuple(vol.shape) == tuple(shape) and np.allclose(vol.affine, affine, atol=1e-3)


def _save(path: Path, arr: np.ndarray, dtype) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, np.ascontiguousarray(arr, dtype=dtype))


def _register_7t(t7_brain: Volume, template: Volume, seed: int) -> np.ndarray:
    """The 4x4 map of RAS+ mm points template -> subject 7T, by a rigid registration of the 7T brain (the
    identity for a 7T already on the template grid: same shape and affine)."""
    from synth7t.preprocess.register import read_itk_affine, register

    if same_grid(t7_brain, template.shape, template.affine):
        return np.eye(4)

    with tempfile.TemporaryDirectory(prefix="synth7t-like-") as tmp:
        res = register(t7_brain, template, transform="Rigid", resolution_mm=1.0, transforms_dir=Path(tmp), seed=seed)
        return read_itk_affine(res.forward[0])


def _pack_pair(cand, template: Volume, spec: dict, out: Path, seed: int) -> dict:
    from synth7t.preprocess.register import resample_to

    mask = load_volume(cand.path("mask.nii.gz"))
    t3 = load_volume(cand.path("t3.nii.gz"))
    t7 = load_volume(cand.path("t7.nii.gz")) if cand.has_t7 else None
    brain = mask.data > 0
    ref = t7 if t7 is not None else t3  # the 7T brain gives the transform; a 3T-only entry uses its own
    world = _register_7t(ref.with_data(ref.data * brain), template, seed)
    on = {k: resample_to(v, template, order=1, world=world, antialias=False).data for k, v in
          (("t3", t3.with_data(t3.data * brain)), *((("t7", t7.with_data(t7.data * brain)),) if t7 else ()))}
    inside = on["t3"] > 0
    if not inside.any():
        raise InputError(f"{cand.folder}: no brain on the template grid after registration")
    entry: dict = {"limits": {}, "template_to_subject": world.tolist()}
    axis, mult = spec["slice_dim"], spec["multiple"]
    for kind in on:
        data = on[kind] * inside if kind == "t7" else on[kind]  # the authors' 7T * (3T > 0)
        try:
            normed, limits = normalize_published(data, spec["lower_pct"], spec["upper_pct"])
        except ValueError as exc:
            raise InputError(f"{cand.path(f'{kind}.nii.gz')}: {exc} on the template grid") from None
        if kind == "t7":
            normed = np.minimum(normed, TARGET_CAP)
        entry["limits"][kind] = limits
        _save(out / cand.name / f"{kind}.npy", to_slices(normed, axis, mult), np.float16)
    mstack = to_slices(inside.astype(np.uint8), axis, mult)
    _save(out / cand.name / "mask.npy", mstack, np.uint8)
    n = mstack.shape[0]
    windows = valid_slices(mstack, 0, MIN_AREA_FRAC)
    entry.update(shape=list(mstack.shape), has_t7=cand.has_t7, min_slice=0,
                 valid_slices=[int(j) for j in windows if j <= n - spec["in_slices"]],
                 z_mid=extent_mid(inside, axis), age=cand.subject.get("age"), sex=cand.subject.get("sex"),
                 group=cand.subject.get("group") or diagnosis_group(cand.subject.get("diagnosis")),
                 diagnosis=cand.subject.get("diagnosis"), flagged=bool(cand.qc.get("flagged", False)),
                 gmm_t3=None, geometry=None, affine=template.affine.tolist())
    entry.update(cand.scan or {})
    return entry


def pack_on_template(work: str | Path, out: str | Path, template: dict, model: dict, *,
                     split=(0.7, 0.15, 0.15), seed: int = 0, stratify: bool = True, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Pack ``work`` onto a template model's grid (module docstring); returns ``out/store.json``.

    ``template``: the model's template record with its files as paths (``file``, ``template_3t``,
    ``affine_file``); ``model``: its ``config.json`` ``model`` section (slices, conditions, multiple) and
    ``normalization`` percentiles under ``lower_pct``/``upper_pct``."""
    from synth7t.progress import progress_bar

    work, out = Path(work), Path(out)
    if not work.is_dir():
        raise InputError(f"{work}: work folder not found")
    tmpl = load_volume(template["file"])
    mult = 2 ** (len(model["channel_mult"]) - 1 + int(model.get("initial_down", False)))
    spec = {"slice_dim": int(template["slice_dim"]), "multiple": mult, "in_slices": int(model["in_slices"]),
            "lower_pct": float(model.get("lower_pct", 1.0)), "upper_pct": float(model.get("upper_pct", 99.0))}
    cands, skipped, prints = _scan(work)
    opts = {"layout": LAYOUT, "split": list(split), "seed": seed, "stratify": stratify, **spec,
            "template_sha256": _sha(template["file"])}
    phash = hashlib.sha256(json.dumps({"params": opts, "inputs": prints, "version": STORE_VERSION},
                                      sort_keys=True).encode()).hexdigest()[:16]
    if _check_existing(out, phash, overwrite):
        log.info("%s is up to date; nothing to do", out / "store.json")
        return out / "store.json"
    if not cands:
        raise InputError(f"{work}: no usable subject (finished, not rejected, with t3 and mask)")
    norm = {"method": "published", "lower_pct": spec["lower_pct"], "upper_pct": spec["upper_pct"], "clipped": False,
            "target_cap": TARGET_CAP}
    prep = preprocessing_record(
        {c.name: subject_recipe(c, _voxel_size(c)) for c in cands},
        {c.name: [m for k, m in (c.qc.get("details") or {}).items() if k.startswith("mask_method")] for c in cands},
        norm, allow_mixed=False)
    subjects = {}
    for cand in progress_bar(cands, "pack onto the template", enabled=progress and len(cands) > 1):
        try:
            subjects[cand.name] = _pack_pair(cand, tmpl, spec, out, seed)
        except InputError as exc:
            skipped[cand.name] = str(exc)
            log.warning("skipping %s: %s", cand.name, exc)
    files = _copy_template(template, out / "template")
    hw = list(subjects[next(iter(subjects))]["shape"][1:]) if subjects else [0, 0]
    splits = person_splits(subjects, opts)
    splits["predict"] = sorted(n for n, s in subjects.items() if not s["has_t7"])
    meta = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "params_hash": phash, "params": opts, "hw": hw,
        "layout": LAYOUT,
        "axes": f"arrays are (N, H, W): slices along axis {spec['slice_dim']} of the template's voxel order, "
                "zero-padded in-plane (half before, the rest after); a window j..j+S-1 predicts 7T slice j",
        "dtypes": {"t3": "float16", "t7": "float16", "mask": "uint8"},
        "template": {**{k: v for k, v in template.items() if k not in ("file", "template_3t", "affine_file")},
                     **files},
        "normalization": norm,
        "preprocessing": prep,
        "context": {"tokens": list(model["conditions"]), "n_slices_position": int(model["n_slices_position"])},
        "splits": splits, "subjects": subjects, "skipped": skipped,
    }
    return write_json(out / "store.json", meta)


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_template(template: dict, dest: Path) -> dict:
    """Copy the template files into the store; their names there (the model folder's names)."""
    dest.mkdir(parents=True, exist_ok=True)
    names = {}
    for key in ("file", "template_3t", "affine_file"):
        src = template.get(key)
        if src:
            with atomic_path(dest / Path(src).name) as tmp:
                shutil.copyfile(src, tmp)
            names[key] = Path(src).name
        else:
            names[key] = None
    return names


def template_tokens(conditions, info: dict, positions: np.ndarray) -> np.ndarray:
    """(len(positions), T, 1) covariate tokens of a subject's windows (the published models' context)."""
    b = len(np.atleast_1d(positions))
    out = np.zeros((b, len(conditions), 1), np.float32)
    for t, name in enumerate(conditions):
        if name == "Age":
            out[:, t, 0] = float(info.get("age") or 0.0)
        elif name == "Sex":
            out[:, t, 0] = 1.0 if info.get("sex") == "F" else 0.0
        elif name == "Diagnostic":
            out[:, t, 0] = 1.0 if info.get("group") == "healthy" else 0.0
        elif name == "position":
            out[:, t, 0] = positions
    return out
