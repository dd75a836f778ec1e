"""Many scans: collect the inputs (files, folders, manifests, BIDS), shard them, prefetch their preprocessing in
workers (:mod:`synth7t.inference.prefetch`), predict each, stage its outputs and install them whole in the plain or
BIDS layout with provenance last (:mod:`synth7t.inference.outputs`), keep going when one scan fails (stop when the
output disk is full), and write the run record ``OUT/logs/predict*.json`` with one entry per failure."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from synth7t import __version__
from synth7t.errors import InputError, Synth7tError
from synth7t.inference.predictor import OUTPUT_NAME, RUN_TIME_OPTIONS, PredictOptions, Predictor, PredictResult
from synth7t.inference.prefetch import default_workers, failure_message, prefetched, worker_threads
from synth7t.inference.volume import finish_prediction, on_input_grid, resolve_steps
from synth7t.io import is_nifti_path, nifti_stem, save_volume, write_json
from synth7t.manifest import Subject, option_covariates

log = logging.getLogger(__name__)


def collect_inputs(inputs: list[str | Path], opts: PredictOptions) -> list[Subject]:
    """Files, folders of NIfTI files, or manifests (CSV/TSV with per-scan covariates) -> jobs."""
    from synth7t.manifest import read_manifest

    age, sex, diagnosis = option_covariates(opts).values()
    jobs: list[Subject] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if is_nifti_path(f))
            if not files:
                raise InputError(f"{p}: folder holds no .nii/.nii.gz/.mgz file")
            jobs += [Subject(nifti_stem(f), f, age=age, sex=sex, diagnosis=diagnosis) for f in files]
        elif p.suffix.lower() in (".csv", ".tsv"):
            for s in read_manifest(p):  # several 3T scans of one subject: one output per session
                name = s.subject if s.session is None else f"{s.subject}_{s.session}"
                jobs.append(Subject(name, s.t3, age=s.age if s.age is not None else age, sex=s.sex or sex,
                                    diagnosis=s.diagnosis or diagnosis))
        else:
            jobs.append(Subject(nifti_stem(p), p, age=age, sex=sex, diagnosis=diagnosis))
    names = [j.subject for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"several inputs share the output name(s) {', '.join(dupes)}; predict them separately")
    return jobs


class PlainLayout:
    """Outputs of plain inputs: ``OUT/<name>/syn7t.nii.gz``, ``mask.nii.gz``, ...; ``provenance.json`` last.

    A model on a template grid also writes ``syn7t_space-<template>.nii.gz`` (and ``mask_``, ``uncertainty_``)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.space: str | None = None

    def begin(self, predictor: Predictor, opts: PredictOptions) -> None:
        """Nothing to write before the first scan; a template model's space name is noted."""
        self.space = predictor.template["name"] if predictor.template else None

    def paths(self, job: Subject) -> dict[str, Path]:
        dest = self.out / job.subject
        paths = {"folder": dest, "syn7t": dest / OUTPUT_NAME, "mask": dest / "mask.nii.gz",
                 "uncertainty": dest / "uncertainty.nii.gz", "on_input_grid": dest / "syn7t_on_input_grid.nii.gz",
                 "record": dest / "provenance.json"}
        if self.space:
            paths |= {f"{k}_template": dest / f"{k}_space-{self.space}.nii.gz" for k in ("syn7t", "mask",
                                                                                          "uncertainty")}
        return paths

    def complete(self, job: Subject) -> bool:
        paths = self.paths(job)
        return paths["syn7t"].exists() and paths["record"].exists()

    def record(self, job: Subject, prov: dict, written: dict[str, Path]) -> None:
        """provenance.json beside the written (staged) image."""
        write_json(Path(written["syn7t"]).parent / self.paths(job)["record"].name, prov)


def predict(model_dir: str | Path, inputs: list[str | Path] | str | Path | None, out: str | Path,
            opts: PredictOptions | None = None, *, progress: bool = True, bids=None) -> PredictResult:
    """Predict every input into ``out/<name>/`` (or, with ``bids``, a :class:`synth7t.inference.bids.BidsQuery`,
    every T1w of a BIDS dataset into the BIDS derivatives dataset ``out``); one failing input does not stop the
    others.

    With ``opts.shard = (k, n)`` only every n-th job (sorted by name) from the k-th is predicted. Scans are
    preprocessed ahead of the network in ``opts.workers`` processes (:mod:`synth7t.inference.prefetch`).
    """
    from synth7t.parallel import select_shard
    from synth7t.progress import progress_bar

    opts = opts or PredictOptions()
    if bids is not None:
        from synth7t.inference.bids import BidsLayout, collect_bids

        jobs, layout = collect_bids(bids, opts), BidsLayout(bids.root, out)
    else:
        inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs or [])
        jobs, layout = collect_inputs(inputs, opts), PlainLayout(out)
    if opts.shard is not None:
        jobs = select_shard(jobs, opts.shard)
        log.info("shard %d/%d: %d scan(s)", opts.shard[0] + 1, opts.shard[1], len(jobs))
    predictor = Predictor(model_dir, opts.device, opts.precision)
    steps, warnings = resolve_steps(predictor, opts)
    if opts.n4 is not None and opts.n4 != "none":
        from synth7t.preprocess.bias import n4_preset

        n4_preset(opts.n4)  # an unknown preset fails here, once, not once per input
    for w in warnings:
        log.warning("%s", w)
    log.info("preprocessing: %s", ", ".join(f"{k} {v['value']} ({v['source']})" for k, v in steps.items()))
    layout.begin(predictor, opts)
    result, todo = PredictResult(), []
    from synth7t.inference import outputs
    from synth7t.inference.template import missing_covariates
    from synth7t.parallel import apply_threads, resolve_cores

    cores = resolve_cores(opts.threads)
    apply_threads(cores.n)  # the network's threads (and those of inline preprocessing)
    stage_root = outputs.clear_staging(Path(out), opts.shard)
    settings = outputs.settings_sha256(predictor.checksum, _parameters(opts), steps)
    fingerprints: dict[str, str] = {}
    for job in jobs:
        paths = layout.paths(job)
        if outputs.remove_partial(paths):
            log.info("%s: removed the partial outputs of an interrupted run", job.subject)
        missing = missing_covariates(predictor.config, {k: getattr(job, k) for k in ("age", "sex", "diagnosis")})
        if missing:  # refused before any preprocessing: this model cannot run without them
            result.failed[str(job.t3)] = (f"{job.t3}: the model needs {' and '.join(missing)}, which this scan "
                                          "lacks (give --age/--sex or a manifest/participants.tsv with them)")
            log.error("%s", result.failed[str(job.t3)])
            continue
        try:
            fingerprints[job.subject] = outputs.file_sha256(job.t3)
        except OSError as exc:
            fingerprints[job.subject] = f"unreadable: {exc.strerror}"  # reported by the scan's loading
        if layout.complete(job) and not opts.overwrite:
            if outputs.up_to_date(outputs.read_record(paths["record"]), fingerprints[job.subject], settings):
                result.skipped.append(paths.get("folder", paths["syn7t"]))
                log.info("%s: output exists, skipped (use --overwrite to redo)", job.subject)
                continue
            log.info("%s: input or settings changed since its output was made: redone", job.subject)
        todo.append(job)
    predictor.show_progress = progress and len(todo) == 1 and predictor.template is not None
    if predictor.template is not None and todo:
        _announce_cost(predictor, opts, len(todo))
    workers = default_workers(len(todo), predictor.device.type, cores.n) if opts.workers is None else opts.workers
    if opts.deterministic and todo:  # preprocessing at one thread in a worker: the same bits on any core count
        workers = max(1, workers)
    threads = 1 if opts.deterministic else worker_threads(workers, predictor.device.type, cores.n)
    result.cores = f"{cores.describe()}; network {torch.get_num_threads()} thread(s), " + (
        f"{workers} preprocessing worker(s) x {threads} thread(s)" if workers else "preprocessing inline")
    ahead = prefetched(todo, predictor.prep_spec, steps, preprocessed=opts.preprocessed,
                       keep_input=opts.resample_to_input, workers=workers, device_type=predictor.device.type,
                       threads=threads)
    run = {"fingerprints": fingerprints, "settings": settings, "stage_root": stage_root}
    stopped = None
    for job, prep, error in progress_bar(ahead, "predict", enabled=progress and len(todo) > 1, total=len(todo)):
        if stopped is not None:
            result.failed[str(job.t3)] = f"{job.t3}: not started: {stopped}"
            continue
        t0 = time.perf_counter()
        try:
            if error is not None:
                raise _PreparationFailed(error)
            main = _predict_job(predictor, job, layout, opts, prep, run)
        except Exception as exc:  # one bad scan must not stop a cohort; the reason is kept
            result.failed[str(job.t3)] = failure_message(exc)
            if outputs.is_disk_full(exc):  # every later scan would fail the same way: stop, say so
                stopped = f"the output disk is full ({failure_message(exc)})"
                result.failed[str(job.t3)] = f"{job.t3}: {stopped}"
                log.error("%s: %s; stopping (rerun when there is space: finished scans are kept)", job.t3, stopped)
            elif isinstance(exc, Synth7tError):
                log.error("%s", exc)
            else:
                log.exception("%s: failed", job.t3)
            shutil.rmtree(stage_root / job.subject, ignore_errors=True)
            continue
        result.done.append(main)
        result.threads_seen.add(json.dumps(prep.get("threads", {}), sort_keys=True))
        result.seconds[job.subject] = sum(prep["timings"].values()) - prep["timings"]["network"] \
            + time.perf_counter() - t0
        log.info("%s: done in %.1f s -> %s", job.subject, result.seconds[job.subject], main)
    shutil.rmtree(stage_root, ignore_errors=True)
    _record_run(Path(out), opts, result, jobs, bids)
    return result


def _parameters(opts: PredictOptions) -> dict:
    """The prediction settings an output records (and its fingerprint hashes): no covariates, no run-time
    options."""
    return {k: v for k, v in vars(opts).items() if k not in ("age", "sex", "diagnosis", *RUN_TIME_OPTIONS)}


def _record_run(out: Path, opts: PredictOptions, result: PredictResult, jobs: list[Subject], bids) -> None:
    """The machine-readable run record (:func:`synth7t.inference.outputs.write_run_record`): inputs named relative
    to the BIDS root (or by file name), reasons without the folders above them."""
    from synth7t.inference import outputs

    by_input = {str(j.t3): j for j in jobs}
    failed = []
    for key, reason in result.failed.items():
        job = by_input.get(key)
        name = job.extra.get("bids_path", job.t3.name) if job is not None else Path(key).name
        text = reason if not reason.startswith(f"{key}: ") else reason[len(key) + 2:]
        for above in {key, str(Path(key).resolve())}:
            text = text.replace(above, name)
        if bids is not None:
            for root in {str(bids.root), str(Path(bids.root).resolve())}:
                text = text.replace(root.rstrip("/") + "/", "")
        failed.append({"input": name, "reason": text})
    record = {"command": "predict", "synth7t_version": __version__,
              "shard": None if opts.shard is None else list(opts.shard),
              "exit_code": 1 if result.failed else 0,
              "counts": {"done": len(result.done), "skipped": len(result.skipped), "failed": len(result.failed)},
              "cores": result.cores, "preprocessing_threads": [json.loads(t) for t in sorted(result.threads_seen)],
              "failed": failed}
    result.record = outputs.write_run_record(out, opts.shard, record)


class _PreparationFailed(Synth7tError):
    """Loading or preprocessing a scan failed (inline or in a worker); the message is already formatted."""


def _predict_job(predictor: Predictor, job: Subject, layout, opts: PredictOptions, prep: dict, run: dict) -> Path:
    """Predict one scan, write its outputs into its staging folder and install them (record last)."""
    from synth7t.inference import outputs

    final = layout.paths(job)
    if final["syn7t"].resolve() == job.t3.resolve():
        raise InputError(f"{job.t3}: output would overwrite the input")
    res = finish_prediction(predictor, prep, opts, covariates={"age": job.age, "sex": job.sex,
                                                               "diagnosis": job.diagnosis})
    stage = run["stage_root"] / job.subject
    stage.mkdir(parents=True, exist_ok=True)
    paths = outputs.staged_paths(final, stage)
    written = {}
    inputs = (job.t3,)
    written["syn7t"] = save_volume(paths["syn7t"], res["syn7t"], inputs=inputs)
    written["mask"] = save_volume(paths["mask"], res["mask"], dtype=np.uint8, inputs=inputs)
    if "uncertainty" in res:
        written["uncertainty"] = save_volume(paths["uncertainty"], res["uncertainty"], inputs=inputs)
    for key in ("syn7t_template", "mask_template", "uncertainty_template"):  # a template model's own grid
        if key in res:
            written[key] = save_volume(paths[key], res[key], dtype=np.uint8 if key.startswith("mask") else np.float32,
                                       inputs=inputs)
    if opts.resample_to_input:
        written["on_input_grid"] = save_volume(paths["on_input_grid"],
                                               on_input_grid(res["syn7t"], res["canonical"], res["reorientation"]),
                                               inputs=inputs)
    from synth7t.cohortqc.thumbs import save_prediction_thumbnails  # for `synth7t qc`: input vs output

    save_prediction_thumbnails(written["syn7t"], res)
    prov = provenance(predictor, job, opts, res, written)
    prov |= {"input_sha256": run["fingerprints"].get(job.subject), "settings_sha256": run["settings"],
             "checksums": outputs.checksums(stage)}
    layout.record(job, prov, written)  # into the stage, beside the images
    outputs.install(stage, final)  # the record last: marks the scan done
    return final["syn7t"]


def provenance(predictor: Predictor, job: Subject, opts: PredictOptions, res: dict, written: dict) -> dict:
    import nibabel
    import numpy

    return {
        "synth7t_version": __version__,
        "input": job.t3.name,  # the file name only: no folder paths (they often hold IDs)
        "model": {"folder": predictor.model_dir.name, "sha256": predictor.checksum,
                  "preset": predictor.config.get("preset"),
                  **({"views": predictor.views, "fusion": opts.fusion or predictor.fusion}
                     if len(predictor.views) > 1 else {})},
        "outputs": {k: Path(v).name for k, v in written.items()},
        "intensity_units": _intensity_units(predictor, opts),
        "normalization_limits": list(res["limits"]),
        "voxel_size_mm": list(res["steps"]["voxel_size_mm"]["value"]),
        "preprocessing": res["steps"],
        "training_preprocessing": predictor.config.get("preprocessing") or {},
        "parameters": _parameters(opts),
        "covariates_given": {k: getattr(job, k) is not None for k in ("age", "sex", "diagnosis")},
        "device": str(predictor.device),
        "timings_s": {k: round(v, 2) for k, v in res["timings"].items()},
        **({"template": {**{k: predictor.template[k] for k in ("name", "shape", "slice_dim", "voxel_size_mm")},
                         "file": Path(predictor.template["file"]).name},
            "transforms": res["registration"]} if "registration" in res else {}),
        "versions": {"torch": torch.__version__, "numpy": numpy.__version__, "nibabel": nibabel.__version__},
    }


def _intensity_units(predictor: Predictor, opts: PredictOptions) -> str:
    if predictor.template is not None:
        return predictor.config.get("output_contrast", "the model's normalized 7T units")
    if opts.rescale:
        return "input intensity units (clipped range of the input brain)"
    return "model units: 0 and 1 = the input brain's 1st and 99th percentiles"


def _announce_cost(predictor: Predictor, opts: PredictOptions, n_scans: int) -> None:
    """Log what a template model's run will cost before it starts: FLOPs per scan and, on a CPU, the expected time
    from this machine's measured matmul rate at the run's precision (:func:`synth7t.nn.flops.expected_seconds`)."""
    from synth7t.nn.flops import expected_seconds, published_flops

    t = predictor.template
    shape = t["shape"]
    windows = shape[t["slice_dim"]] - predictor.net.cfg.in_slices + 1
    in_plane = tuple(s for i, s in enumerate(shape) if i != t["slice_dim"])
    flops = published_flops(predictor.net.cfg, in_plane) * windows * (2 if opts.tta else 1)
    if predictor.device.type != "cpu":
        log.info("%d scan(s), %.2f PFLOP each on %s", n_scans, flops / 1e15, predictor.device)
        return
    seconds, rate = expected_seconds(flops, predictor.dtype or torch.float32)
    if seconds < 60:
        return
    log.warning("this model costs %.2f PFLOP a scan: on this CPU (%s matmul at %.0f GFLOP/s) expect about %.0f min "
                "a scan, %d scan(s); a GPU takes seconds", flops / 1e15,
                "bf16" if predictor.dtype == torch.bfloat16 else "fp32", rate / 1e9, seconds / 60, n_scans)
