"""``synth7t preprocess``: raw 3T/7T pairs -> bias-corrected, skull-stripped, coregistered, QC'd work folder.

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
own canonical frame. Subjects run in a process pool (``jobs``; spawn-safe), ITK/torch threads are the jobs'
share of the CPU cores. A failing subject is recorded in ``cohort.json`` with its reason (subject ID and file
paths replaced by the pseudonym) and does not stop the others. Reruns skip subjects whose ``.done`` carries the
same parameter hash and redo the others. ``shard=(k, n)`` (``0 <= k < n``) processes every n-th subject of the
ID-sorted cohort starting at the k-th, so a SLURM array (``--array=0-<n-1>``) splits a cohort across nodes.

Several 3T scans of one subject (manifest ``session`` column) are run by ``multiscan.py`` through
:func:`process_unit`: the 7T steps (:func:`process_7t`) once, then :func:`register_3t` per scan.

Why one module of ~550 lines: the steps of one subject and the resumable cohort runner share the partial-folder
and ``.done`` contract; keeping them together keeps that contract in one place. The steps themselves live in
``bias.py``, ``skullstrip.py``, ``register.py``, ``qc.py`` and ``anonymize.py``; the multi-scan subjects in
``multiscan.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synth7t.errors import ConfigError, InputError, Synth7tError
from synth7t.io import Volume, load_canonical, read_json, save_volume, write_json
from synth7t.manifest import Subject, load_cohort
from synth7t.prefetch import usable_cores
from synth7t.preprocess import anonymize, qc
from synth7t.preprocess.bias import N4Params, n4, n4_preset
from synth7t.preprocess.register import apply_transforms, masked_ncc, register, resample_to, set_threads
from synth7t.preprocess.skullstrip import strip_with_info

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when a change alters outputs for identical parameters
FAST_SYN_ITERATIONS = (20, 10, 0)
FAST_AFFINE_ITERATIONS = (500, 250, 100, 0)


class PreprocessConfig(BaseModel):
    """Every setting of :func:`preprocess`. The fields that change outputs are hashed into each ``.done``
    (:meth:`params_hash`); run-time options (jobs, shard, progress, key/mapping/private paths) are not."""

    model_config = ConfigDict(extra="forbid")

    jobs: int = Field(1, ge=1)
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
        return d

    def params_hash(self) -> str:
        """SHA-256 (16 hex digits) of :meth:`method_params` as sorted JSON."""
        blob = json.dumps(self.method_params(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class PreprocessResult:
    """What :func:`preprocess` did, keyed by the manifest's subject IDs (kept in memory, never written)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    pseudonyms: dict[str, str] = field(default_factory=dict)
    work: Path | None = None
    cuts: dict[str, dict] = field(default_factory=dict)  # subject -> {"slices", "mm", "by"} when QC cut slices

    def summary(self) -> str:
        """The run's totals, the inferior slices cut per subject (drop-out or manifest) and the failures."""
        lines = [f"preprocessed {len(self.done)}, skipped {len(self.skipped)} (already done), "
                 f"rejected by QC {len(self.rejected)}, failed {len(self.failed)}"]
        kept = [sid for sid in (*self.done, *self.skipped) if sid in self.cuts]
        lines.append(f"inferior slices cut: {len(kept)} of {len(self.done) + len(self.skipped)} subject(s)"
                     + (":" if kept else ""))
        lines += [f"  {sid}: {describe_cut(self.cuts[sid])}" for sid in sorted(kept)]
        lines += [f"  failed: {sid}: {reason}" for sid, reason in self.failed.items()]
        return "\n".join(lines)


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


# ---------------------------------------------------------------------------------------------------------
# per-subject processing


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


def _worker_init(threads: int) -> None:
    """Process-pool initializer: thread limits before ITK/torch start their pools."""
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    set_threads(threads)
    import torch

    torch.set_num_threads(threads)


def process_unit(rows: list[Subject], pseudo: str, work: Path, cfg: PreprocessConfig, key: bytes,
                 threads: int | None = None) -> list[tuple[Subject, str, str, dict | None]]:
    """One subject's rows: a single pair or prediction-only scan (:func:`process_subject`), or several 3T
    scans with one 7T (:mod:`synth7t.preprocess.multiscan`). Returns ``(row, status, reason, cut)`` per row."""
    from synth7t.preprocess import multiscan  # imports this module

    if not multiscan.is_multi(rows):
        return [(rows[0], *process_subject(rows[0], pseudo, work, cfg, threads))]
    return multiscan.process_scans(rows, pseudo, work, cfg, key, threads)


def _worker(rows: list[Subject], pseudo: str, work: Path, cfg_json: str, key: bytes,
            threads: int) -> tuple[list, float]:
    t0 = time.perf_counter()
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    return process_unit(rows, pseudo, work, cfg, key, threads), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# cohort


def select_shard(subjects: list[Subject], shard: tuple[int, int] | None) -> list[Subject]:
    """Rows sorted by subject ID (then session); with ``shard=(k, n)`` the rows of every n-th subject ID starting
    at index k: all 3T scans of one subject land in one shard, so its 7T is processed by one task."""
    ordered = sorted(subjects, key=lambda s: (s.subject, s.session or ""))
    if shard is None:
        return ordered
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"shard {k}/{n}: need 0 <= k < n")
    ids = set(sorted({s.subject for s in ordered})[k::n])
    return [s for s in ordered if s.subject in ids]


def update_cohort(work: Path, entries: dict[str, dict], params_hash: str) -> Path:
    """Merge ``{pseudonym: {"status", "reason"}}`` into ``WORK/cohort.json`` under a lock (shards share it)."""
    path = Path(work) / "cohort.json"
    with anonymize.locked(path):
        old = read_json(path) if path.exists() else {}
        subjects = {**old.get("subjects", {}), **entries}
        write_json(path, {"subjects": subjects, "params_hash": params_hash,
                          "counts": {st: sum(1 for e in subjects.values() if e["status"] == st)
                                     for st in ("done", "failed", "rejected")}})
    return path


def _config(config: PreprocessConfig | None, overrides: dict) -> PreprocessConfig:
    try:
        if config is None:
            return PreprocessConfig(**overrides)
        return PreprocessConfig(**{**config.model_dump(), **overrides}) if overrides else config
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"preprocess setting {where}: {first['msg']}") from None


def _subjects(source: str | os.PathLike | list[Subject]) -> list[Subject]:
    if isinstance(source, list | tuple):
        if not all(isinstance(s, Subject) for s in source):
            raise ValueError("expected a manifest path or a list of Subject")
        return list(source)
    return load_cohort(source)


def _progress(enabled: bool, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)
    return prog, prog.add_task("preprocess", total=total)


def preprocess(manifest_or_subjects: str | os.PathLike | list[Subject], out: str | os.PathLike,
               config: PreprocessConfig | None = None, *, pseudonym_key: bytes | None = None,
               **overrides) -> PreprocessResult:
    """Preprocess a cohort into the work folder ``out`` (module doc); keyword ``overrides`` are
    :class:`PreprocessConfig` fields (``jobs=2``, ``skullstrip="threshold"``, ``n4_7t="demo"``, ...).

    ``pseudonym_key``: secret bytes for the pseudonyms; without it the key in ``key_file`` (created on first
    use; default ``<out>/../.<out name>.synth7t-key``) is used, so that reruns give the same pseudonyms.
    """
    cfg = _config(config, overrides)
    work = Path(out)
    work.mkdir(parents=True, exist_ok=True)
    for p, what in ((cfg.mapping_file, "mapping_file"), (cfg.private_dir, "private_dir")):
        if p is not None and anonymize._inside(Path(p), work):
            raise ConfigError(f"{p}: {what} must be outside the work folder {work}")
    subjects = select_shard(_subjects(manifest_or_subjects), cfg.shard)
    key = anonymize.resolve_key(work, pseudonym_key, cfg.key_file)
    names = anonymize.pseudonyms(subjects, key)
    from synth7t.preprocess import multiscan  # imports this module

    units = multiscan.group_rows(subjects)
    if cfg.mapping_file is not None:
        anonymize.write_mapping(Path(cfg.mapping_file), {**names, **multiscan.scan_names(units, names, key)},
                                work=work)
    result = PreprocessResult(pseudonyms=dict(names), work=work)
    h = cfg.params_hash()
    # the cores this process may use (a SLURM job's or taskset's CPU set), not the machine's: sizing from
    # os.cpu_count() oversubscribed a node shared with other jobs
    threads = max(1, usable_cores() // cfg.jobs)
    log.info("preprocessing %d subject(s) into %s (jobs %d, %d thread(s) each, params %s)", len(units),
             work, cfg.jobs, threads, h)

    def record(rows: list[Subject], results: list, seconds: float) -> None:
        pseudo = names[rows[0].subject]
        entries = {}
        for s, status, reason, cut in results:
            label = multiscan.row_label(s)
            {"done": result.done, "skipped": result.skipped, "rejected": result.rejected}.get(
                status, []).append(label)
            if status == "failed":
                result.failed[label] = reason
            if cut and cut.get("slices") and status in ("done", "skipped"):
                result.cuts[label] = cut
            cut_text = f"; {describe_cut(cut)}" if cut is not None and status != "failed" else ""
            log.info("%s -> %s: %s%s%s (%.1f s)", label, pseudo, status, f" ({reason})" if reason else "",
                     cut_text, seconds)
            entries[label] = {"status": "done" if status == "done" else status, "reason": reason}
        prev = read_json(work / "cohort.json").get("subjects", {}).get(pseudo) if (
            work / "cohort.json").exists() else None
        if multiscan.is_multi(rows):
            entry = multiscan.cohort_entry(rows, entries, prev, key)
        else:
            entry = next(iter(entries.values()))
            if entry["status"] == "skipped":
                entry = prev or {"status": "done", "reason": entry["reason"]}
        update_cohort(work, {pseudo: entry}, h)

    prog, task = _progress(cfg.progress, len(subjects))
    with prog:
        if cfg.jobs == 1:
            set_threads(threads)
            for rows in units:
                t0 = time.perf_counter()
                results = process_unit(rows, names[rows[0].subject], work, cfg, key, threads)
                record(rows, results, time.perf_counter() - t0)
                prog.advance(task, len(rows))
        else:
            _run_pool(units, names, work, cfg, key, threads, record, lambda n: prog.advance(task, n))
    if not subjects:
        update_cohort(work, {}, h)
    return result


def _run_pool(units, names, work, cfg, key, threads, record, advance) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cfg_json = cfg.model_dump_json()
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_worker, rows, names[rows[0].subject], work, cfg_json, key, threads): rows
                   for rows in units}
        for fut in as_completed(futures):
            rows = futures[fut]
            try:
                results, dt = fut.result()
            except BrokenProcessPool:
                results, dt = [(s, "failed", "worker process died (out of memory or killed)", None)
                               for s in rows], 0.0
            except Exception as exc:  # pickling or other pool-level errors
                results, dt = [(s, "failed", f"{type(exc).__name__}: {exc}", None) for s in rows], 0.0
            record(rows, results, dt)
            advance(len(rows))
