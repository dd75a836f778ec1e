"""The preprocessing of one subject: raw 3T/7T pair -> bias-corrected, skull-stripped, coregistered, QC'd folder.

Per subject (thesis 1.2; layout in docs/data-layout.md, "Preprocessed work folder"):

1. load and validate both scans (canonical RAS+);
2. 7T: N4 (``n4_7t_first``, default the cheap ``3t`` preset: this pass only has to make skull stripping
   work) -> skull strip keeping CSF -> N4 (``n4_7t``, thesis preset) on the raw image inside the brain+CSF mask;
   3T: N4 (``n4_3t``, skipped with ``t3_already_corrected``) -> skull strip;
3. SyN registration of the 3T brain to the 7T brain at ``registration_resolution_mm``; the N4-corrected 3T
   is resampled through it onto the 7T grid (linear) and both images are cut to the 7T brain+CSF mask;
4. QC: lowest usable slice (drop-out / smooth inferior region), motion score, registration NCC;
5. files written into ``WORK/.<pseudonym>.partial``; ``.done`` (with the parameter hash) last; the folder is
   then renamed to ``WORK/<pseudonym>``: a killed run never leaves half a subject under a subject's name.

Prediction-only subjects (no ``t7``) get N4, skull stripping and resampling to ``output_resolution_mm`` in their
own canonical frame. Every setting is a field of :class:`PreprocessConfig`; the fields that change outputs are
hashed into each ``.done``, so a rerun skips a subject whose ``.done`` carries the same hash and redoes the others.

The steps of a 7T (:func:`process_7t`) and of one 3T registered onto it (:func:`register_3t`) are used by
:func:`process_subject` (one pair or one prediction-only scan) and by :mod:`synth7t.preprocess.multiscan`
(several 3T scans with one 7T); the cohort runner that dispatches between them is
:mod:`synth7t.preprocess.pipeline`. The steps themselves live in ``bias.py``, ``skullstrip.py``,
``register.py``, ``qc.py`` and ``anonymize.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from synth7t.errors import InputError, Synth7tError
from synth7t.io import Volume, load_canonical, read_json, save_volume, write_json
from synth7t.manifest import Subject
from synth7t.preprocess import anonymize, qc
from synth7t.preprocess.bias import N4Params, n4, n4_preset
from synth7t.preprocess.register import apply_transforms, masked_ncc, register, resample_to
from synth7t.preprocess.skullstrip import strip_with_info

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when a change alters outputs for identical parameters
FAST_SYN_ITERATIONS = (20, 10, 0)
FAST_AFFINE_ITERATIONS = (500, 250, 100, 0)


class PreprocessConfig(BaseModel):
    """Every setting of :func:`preprocess`. The fields that change outputs are hashed into each ``.done``
    (:meth:`params_hash`), ``deterministic`` among them; run-time options (jobs, threads, shard, progress,
    key/mapping/private paths) are not."""

    model_config = ConfigDict(extra="forbid")

    jobs: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)  # cores of the run (None: SLURM_CPUS_PER_TASK, else the CPU affinity)
    # one ITK/torch thread per subject (ANTs' repeatable setting): work folders bit-identical whatever the cores
    deterministic: bool = False
    shard: tuple[int, int] | None = None
    skullstrip: Literal["deepbet", "synthstrip", "threshold"] = "deepbet"
    t3_already_corrected: bool = False
    n4_7t: N4Params = Field(default_factory=lambda: n4_preset("7t"))
    # first 7T pass only helps the skull stripping (thesis 1.2.1: "not so important"): 3x cheaper preset
    n4_7t_first: N4Params = Field(default_factory=lambda: n4_preset("3t"))
    n4_3t: N4Params = Field(default_factory=lambda: n4_preset("3t"))
    registration_resolution_mm: float = Field(1.0, gt=0)
    registration_transform: str = "SyN"  # any antspyx type_of_transform (thesis: SyN)
    output_resolution_mm: float = Field(0.65, gt=0)  # prediction-only subjects
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    affine_iterations: tuple[int, ...] = (2100, 1200, 1200, 10)
    ncc_threshold: float = 0.8
    motion_threshold: float = qc.MOTION_THRESHOLD
    fast: bool = False  # demo speed: N4 "demo" preset where left at the default, fewer SyN iterations
    seed: int = 0
    key_file: Path | None = None
    mapping_file: Path | None = None
    keep_head: bool = False
    private_dir: Path | None = None
    progress: bool = True

    @field_validator("n4_7t", "n4_7t_first", "n4_3t", mode="before")
    @classmethod
    def _preset(cls, v: object) -> object:
        return n4_preset(v) if isinstance(v, str) else v

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (v[1] >= 1 and 0 <= v[0] < v[1]):
            raise ValueError(f"shard (k, n) needs 0 <= k < n, got {v}")
        return v

    @model_validator(mode="after")
    def _fast_and_private(self) -> PreprocessConfig:
        if self.fast:
            if self.n4_7t == n4_preset("7t"):
                self.n4_7t = n4_preset("demo")
            if self.n4_7t_first == n4_preset("3t"):
                self.n4_7t_first = n4_preset("demo")
            if self.syn_iterations == (40, 20, 0):
                self.syn_iterations = FAST_SYN_ITERATIONS
            if self.affine_iterations == (2100, 1200, 1200, 10):
                self.affine_iterations = FAST_AFFINE_ITERATIONS
        if self.keep_head and self.private_dir is None:
            raise ValueError("keep_head needs private_dir (a folder outside the work folder for full heads)")
        return self

    def method_params(self) -> dict:
        """The output-affecting settings (what :meth:`params_hash` hashes and provenance.json records)."""
        keys = ("skullstrip", "t3_already_corrected", "n4_7t", "n4_7t_first", "n4_3t", "registration_resolution_mm",
                "registration_transform",
                "output_resolution_mm", "syn_iterations", "affine_iterations", "ncc_threshold",
                "motion_threshold", "seed", "keep_head")
        d = self.model_dump(mode="json", include=set(keys))
        d["pipeline_version"] = PIPELINE_VERSION
        if self.deterministic:  # only when on: the hash of every earlier work folder stays valid
            d["deterministic"] = True
        return d

    def params_hash(self) -> str:
        """SHA-256 (16 hex digits) of :meth:`method_params` as sorted JSON."""
        blob = json.dumps(self.method_params(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def describe_cut(cut: dict | None) -> str:
    """``"12 slices (7.8 mm) for drop-out"``, or ``"no slice cut"``."""
    if not cut or not cut.get("slices"):
        return "no slice cut"
    return f"{cut['slices']} slice(s) ({cut['mm']:.1f} mm) {'for drop-out' if cut['by'] == 'qc' else 'by the manifest'}"


def cut_record(min_slice: int, mask: np.ndarray, slice_mm: float, override: bool) -> dict:
    """The brain slices below ``min_slice`` (the cut QC or the manifest made), in slices and mm."""
    zs = np.nonzero(np.asarray(mask).any(axis=(0, 1)))[0]
    n = int(max(0, min_slice - zs[0])) if zs.size and min_slice > 0 else 0
    return {"slices": n, "mm": round(n * float(slice_mm), 2), "by": "manifest" if override else "qc"}


def _scrub(msg: str, subject: Subject, pseudo: str) -> str:
    """Replace the subject's ID and file paths in a message by the pseudonym / ``<t3>``, ``<t7>``."""
    for name, p in (("<t3>", subject.t3), ("<t7>", subject.t7)):
        if p is not None:
            msg = msg.replace(str(p), name).replace(str(Path(p).resolve()), name)
    return re.sub(re.escape(subject.subject), pseudo, msg)


def _masked(vol: Volume, mask: Volume) -> Volume:
    return vol.with_data(np.where(mask.data > 0, vol.data, 0).astype(np.float32))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("synth7t", "antspyx", "SimpleITK", "deepbet", "numpy", "nibabel", "scipy", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _mask_or_default(vol: Volume, method: str, threads: int | None) -> tuple[Volume, Volume, str]:
    res = strip_with_info(vol, method, threads=threads)
    return res.brain, res.csf, res.method


def _timer(timings: dict[str, float]):
    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        timings[name] = round(time.perf_counter() - t0, 2)
        return out

    return timed


def process_7t(path: Path, cfg: PreprocessConfig, threads: int | None, timings: dict[str, float]) -> dict:
    """The 7T steps: N4 -> strip -> N4 in the brain+CSF mask, and its QC (drop-out, motion)."""
    timed = _timer(timings)
    t7, _ = load_canonical(path)
    t7a = timed("n4_7t_pass1", n4, t7, cfg.n4_7t_first, None, threads=threads)
    brain7, csf7, method7 = timed("strip_7t", _mask_or_default, t7a, cfg.skullstrip, threads)
    t7b = timed("n4_7t_pass2", n4, t7, cfg.n4_7t, csf7, threads=threads)
    return {"t7": _masked(t7b, csf7), "head": t7b, "mask": brain7, "mask_csf": csf7, "method": method7,
            "corr": qc.corruption_min_slice(t7b.data, brain7.data, t7b.zooms), "motion": qc.motion_score(t7b.data,
                                                                                                     csf7.data)}


def register_3t(path: Path, ref: dict, cfg: PreprocessConfig, tmp: Path, threads: int | None,
                timings: dict[str, float]) -> dict:
    """One 3T onto a processed 7T ``ref`` (:func:`process_7t`): N4, strip, registration, resampling, QC facts.

    Only the 7T inside its brain+CSF mask is used, so a saved ``t7.nii.gz`` serves as well as the fresh one."""
    timed = _timer(timings)
    t7b, brain7, csf7 = ref["t7"], ref["mask"], ref["mask_csf"]
    t3, _ = load_canonical(path)
    t3a = t3 if cfg.t3_already_corrected else timed("n4_3t", n4, t3, cfg.n4_3t, None, threads=threads)
    brain3, csf3, method3 = timed("strip_3t", _mask_or_default, t3a, cfg.skullstrip, threads)
    reg = timed("register", register, _masked(t3a, brain3), _masked(t7b, brain7),
                resolution_mm=cfg.registration_resolution_mm, transform=cfg.registration_transform,
                transforms_dir=tmp / "transforms",
                fixed_mask=brain7, syn_iterations=cfg.syn_iterations, affine_iterations=cfg.affine_iterations,
                seed=cfg.seed, threads=threads)
    t3_head = timed("apply_transforms", apply_transforms, t3a, t7b, reg.forward, 1)
    fov = apply_transforms(t3a.with_data(np.ones(t3a.shape, np.float32)), t7b, reg.forward, 0).data > 0.5
    inside = (brain7.data > 0) & fov  # NCC only where the 3T has data
    coverage = float(inside.sum() / max(1, (brain7.data > 0).sum()))
    ncc = masked_ncc(t3_head.data, t7b.data, inside)
    corr, m7 = ref["corr"], ref["motion"]
    m3 = qc.motion_score(t3a.data, csf3.data)
    return {"t7": t7b, "t3": _masked(t3_head, csf7), "mask": brain7, "mask_csf": csf7,
            "heads": {"t3_head": t3_head}, "ncc": ncc, "corr": corr, "motion": max(m7, m3),
            "coverage": coverage,
            "details": {"motion_7t": m7, "motion_3t": m3, "dropout_ml": corr.dropout_ml, "coverage_3t": coverage,
                        "smooth_ml": corr.smooth_ml, "mask_method_7t": ref["method"], "mask_method_3t": method3},
            "timings": timings, "registration": reg.params}


def _process_pair(s: Subject, cfg: PreprocessConfig, tmp: Path, threads: int | None) -> dict:
    """7T + 3T: returns the arrays to save and the QC / provenance facts."""
    timings: dict[str, float] = {}
    ref = process_7t(s.t7, cfg, threads, timings)  # type: ignore[arg-type]
    out = register_3t(s.t3, ref, cfg, tmp, threads, timings)
    out["heads"] = {"t7_head": ref["head"], **out["heads"]}
    return out


def _process_single(s: Subject, cfg: PreprocessConfig, threads: int | None) -> dict:
    """Prediction-only subject: 3T N4 -> strip -> resample to ``output_resolution_mm`` (own canonical frame)."""
    t0 = time.perf_counter()
    t3, _ = load_canonical(s.t3)
    t3a = t3 if cfg.t3_already_corrected else n4(t3, cfg.n4_3t, None, threads=threads)
    brain3, csf3, method3 = _mask_or_default(t3a, cfg.skullstrip, threads)
    z = cfg.output_resolution_mm
    img = resample_to(t3a, z, order=1)
    brain = resample_to(brain3, img, order=0)
    csf = resample_to(csf3, img, order=0)
    corr = qc.corruption_min_slice(img.data, brain.data, img.zooms)
    m3 = qc.motion_score(t3a.data, csf3.data)
    return {"t3": _masked(img, csf), "mask": brain, "mask_csf": csf, "heads": {"t3_head": img}, "ncc": None,
            "corr": corr, "motion": m3,
            "details": {"motion_3t": m3, "dropout_ml": corr.dropout_ml, "smooth_ml": corr.smooth_ml,
                        "mask_method_3t": method3},
            "timings": {"total": round(time.perf_counter() - t0, 2)}, "registration": None}


def _write_subject(out: dict, s: Subject, pseudo: str, cfg: PreprocessConfig, tmp: Path) -> dict:
    """Write images, masks, subject/qc/provenance JSON and qc.png into ``tmp``; returns the qc record."""
    for name in ("t7", "t3"):
        if name in out:
            save_volume(tmp / f"{name}.nii.gz", out[name], dtype=np.float32)
    save_volume(tmp / "mask.nii.gz", out["mask"], dtype=np.uint8)
    save_volume(tmp / "mask_csf.nii.gz", out["mask_csf"], dtype=np.uint8)
    write_json(tmp / "subject.json", anonymize.subject_record(s, pseudo))
    record = write_qc(out, s, pseudo, cfg, tmp)
    if cfg.keep_head and cfg.private_dir is not None:
        for name, vol in out["heads"].items():
            save_volume(Path(cfg.private_dir) / pseudo / f"{name}.nii.gz", vol)
    return record


def write_qc(out: dict, s: Subject, name: str, cfg: PreprocessConfig, tmp: Path) -> dict:
    """qc.json, qc.png and provenance.json of one 3T (with its 7T) into ``tmp``; returns the qc record."""
    record = qc.decide(min_slice_detected=out["corr"].min_slice, motion=out["motion"], ncc=out["ncc"],
                       n_slices=out["mask"].shape[2], motion_threshold=cfg.motion_threshold,
                       ncc_threshold=cfg.ncc_threshold, min_slice_override=s.min_slice, exclude=s.exclude,
                       reasons=out["corr"].reasons, coverage=out.get("coverage"))
    record["details"] = out["details"]
    record["cut"] = cut_record(record["min_slice"], out["mask"].data, out["mask"].zooms[2], s.min_slice is not None)
    write_json(tmp / "qc.json", record)
    images = {k.upper(): out[k].data for k in ("t3", "t7") if k in out}
    status = "REJECTED" if record["rejected"] else "flagged" if record["flagged"] else "ok"
    qc.qc_figure(tmp / "qc.png", images, out["mask"].data, record["min_slice"],
                 title=f"{name}: {status}, motion {record['motion_score']:.2f}, min_slice {record['min_slice']}")
    write_json(tmp / "provenance.json", {"versions": versions(), "params": cfg.method_params(),
                                          "params_hash": cfg.params_hash(), "timings_s": out["timings"],
                                          "registration": out["registration"], "qc": out["details"]})
    return record


def install(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an older version of it."""
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def is_done(folder: Path, params_hash: str) -> bool:
    """True when ``folder/.done`` exists and records ``params_hash``."""
    done = folder / ".done"
    if not done.exists():
        return False
    try:
        return read_json(done).get("params_hash") == params_hash
    except InputError:
        return False


def process_subject(s: Subject, pseudo: str, work: Path, cfg: PreprocessConfig,
                    threads: int | None = None) -> tuple[str, str, dict | None]:
    """Preprocess one subject into ``work/<pseudo>``; returns ``(status, reason, cut)`` with status one of
    ``done``, ``skipped``, ``rejected``, ``failed`` and ``cut`` qc.json's record of the slices cut (None when
    there is no qc.json). Never raises for a bad subject."""
    final = Path(work) / pseudo
    tmp = Path(work) / f".{pseudo}.partial"
    h = cfg.params_hash()
    try:
        if s.exclude:
            return "rejected", "excluded in the manifest", None
        if is_done(final, h) and (final / "qc.json").is_file():  # no qc.json: a multi-scan folder, redone
            record = read_json(final / "qc.json")
            return "skipped", "; ".join(record.get("reasons", [])) if record.get("rejected") else "", \
                record.get("cut")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        out = _process_pair(s, cfg, tmp, threads) if s.t7 is not None else _process_single(s, cfg, threads)
        record = _write_subject(out, s, pseudo, cfg, tmp)
        write_json(tmp / ".done", {"params_hash": h})
        install(tmp, final)
        if record["rejected"]:
            return "rejected", "; ".join(record["reasons"]), record["cut"]
        return "done", "; ".join(record["reasons"]), record["cut"]
    except Exception as exc:  # one bad subject must not stop a cohort
        if not isinstance(exc, Synth7tError):
            log.debug("subject %s failed", pseudo, exc_info=True)
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, Synth7tError):
            msg = f"{type(exc).__name__}: {msg}"
        return "failed", _scrub(msg, s, pseudo), None
