"""``synth7t preprocess``: the resumable cohort runner over raw 3T/7T pairs (the steps of one subject are in
:mod:`synth7t.preprocess.subject`; several 3T scans with one 7T in :mod:`synth7t.preprocess.multiscan`).

Subjects run in a process pool (``jobs``; spawn-safe), ITK/torch threads are the jobs' share of the run's cores
(:func:`synth7t.parallel.resolve_cores`: ``threads``, else ``SLURM_CPUS_PER_TASK``, else the CPU affinity);
with ``deterministic`` every subject runs at one thread in a fresh worker process (N4, skull stripping and ANTs then
repeat bit for bit whatever the cores; ANTs reads its thread count once per process), and ``jobs`` is what uses
the cores. Each subject's rows go to one unit of work
(:func:`process_unit`): a single pair or prediction-only scan to :func:`~synth7t.preprocess.subject.process_subject`,
several 3T scans of one person to :func:`~synth7t.preprocess.multiscan.process_scans`. A failing subject is recorded
in ``cohort.json`` with its reason (subject ID and file paths replaced by the pseudonym) and does not stop the
others. Reruns skip subjects whose ``.done`` carries the same parameter hash and redo the others.
``shard=(k, n)`` (``0 <= k < n``) processes every n-th subject of the ID-sorted cohort starting at the k-th
(:func:`synth7t.parallel.select_shard`), so a SLURM array (``--array=0-<n-1>``) splits a cohort across nodes.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from synth7t.errors import ConfigError
from synth7t.io import read_json, write_json
from synth7t.manifest import Subject, load_cohort
from synth7t.parallel import Cores, resolve_cores, select_shard, spawn_pool
from synth7t.preprocess import anonymize, multiscan
from synth7t.preprocess.subject import PreprocessConfig, describe_cut, process_subject

__all__ = ["PreprocessConfig", "PreprocessResult", "preprocess", "process_unit", "select_shard", "update_cohort"]

log = logging.getLogger(__name__)


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
    cores: Cores | None = None
    threads: int | None = None  # ITK/torch threads of each subject

    def summary(self) -> str:
        """The run's totals, its cores, the inferior slices cut per subject (drop-out or manifest) and the
        failures."""
        lines = [f"preprocessed {len(self.done)}, skipped {len(self.skipped)} (already done), "
                 f"rejected by QC {len(self.rejected)}, failed {len(self.failed)}"]
        if self.cores is not None:
            lines.append(f"{self.cores.describe()}; {self.threads} thread(s) per subject")
        kept = [sid for sid in (*self.done, *self.skipped) if sid in self.cuts]
        lines.append(f"inferior slices cut: {len(kept)} of {len(self.done) + len(self.skipped)} subject(s)"
                     + (":" if kept else ""))
        lines += [f"  {sid}: {describe_cut(self.cuts[sid])}" for sid in sorted(kept)]
        lines += [f"  failed: {sid}: {reason}" for sid, reason in self.failed.items()]
        return "\n".join(lines)


def process_unit(rows: list[Subject], pseudo: str, work: Path, cfg: PreprocessConfig, key: bytes,
                 threads: int | None = None) -> list[tuple[Subject, str, str, dict | None]]:
    """One subject's rows: a single pair or prediction-only scan (:func:`process_subject`), or several 3T
    scans with one 7T (:mod:`synth7t.preprocess.multiscan`). Returns ``(row, status, reason, cut)`` per row."""
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
    units = multiscan.group_rows(subjects)
    if cfg.mapping_file is not None:
        anonymize.write_mapping(Path(cfg.mapping_file), {**names, **multiscan.scan_names(units, names, key)},
                                work=work)
    h = cfg.params_hash()
    # the cores this run may use (--threads, a SLURM job's or taskset's CPU set), not the machine's: sizing from
    # os.cpu_count() oversubscribed a node shared with other jobs
    cores = resolve_cores(cfg.threads)
    if cfg.jobs > cores.n:
        log.warning("--jobs %d on %d core(s): subjects share cores", cfg.jobs, cores.n)
    threads = 1 if cfg.deterministic else max(1, cores.n // cfg.jobs)
    result = PreprocessResult(pseudonyms=dict(names), work=work, cores=cores, threads=threads)
    log.info("preprocessing %d subject(s) into %s (jobs %d, %s, %d thread(s) each%s, params %s)", len(units),
             work, cfg.jobs, cores.describe(), threads, ", deterministic" if cfg.deterministic else "", h)

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
        # --deterministic always runs subjects in fresh worker processes: ANTs reads its thread count once per
        # process, so one that registered before (at more threads) would ignore the one-thread setting
        if cfg.jobs == 1 and not cfg.deterministic:
            from synth7t.parallel import apply_threads

            apply_threads(threads)
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
    cfg_json = cfg.model_dump_json()
    with spawn_pool(cfg.jobs, threads) as pool:
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
