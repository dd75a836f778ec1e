"""Cohort QC: one HTML page with a row per prediction output (``synth7t qc OUT``).

:func:`build_qc` finds the outputs under a folder (:mod:`~synth7t.cohortqc.discover`: the plain
``OUT/<name>/syn7t.nii.gz`` layout and BIDS derivatives), summarises each one, reusing the cached summary and
thumbnails of unchanged outputs (:mod:`~synth7t.cohortqc.collect`), scores outliers across the cohort and writes
the page with its ``.csv`` and ``.json`` tables (:mod:`~synth7t.cohortqc.page`). ``synth7t predict`` saves
input-vs-output thumbnails while the preprocessed input is in memory (:mod:`~synth7t.cohortqc.thumbs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from synth7t.errors import ConfigError, InputError
from synth7t.parallel import resolve_cores

log = logging.getLogger(__name__)
MAX_AUTO_JOBS = 8
AUTO_JOBS_FROM = 16  # outputs from which the default is one process per core


@dataclass
class QcResult:
    page: Path
    tables: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    computed: int = 0
    cached: int = 0
    jobs: int = 1
    cores: str = ""

    def line(self) -> str:
        s = self.summary
        return (f"{s['total']} outputs: {s['ok']} ok, {s['suspicious']} suspicious, {s['failed']} failed "
                f"({self.computed} summarised, {self.cached} from cache; {self.jobs} process(es), {self.cores}) "
                f"-> {self.page}")


def build_qc(out: str | Path, page: str | Path | None = None, *, progress: bool = True, jobs: int | None = None,
             threads: int | None = None) -> QcResult:
    """Write the cohort QC page of the outputs under ``out`` (default ``out/qc.html``) and its tables.

    ``jobs`` processes summarise the outputs (default: from :data:`AUTO_JOBS_FROM` outputs on, the run's cores,
    :func:`synth7t.parallel.resolve_cores` with ``threads``, at most :data:`MAX_AUTO_JOBS`; 1: all in this
    process); the records come back in the outputs' order, so the page is the same whatever ``jobs``."""
    from synth7t.cohortqc.collect import add_outlier_scores
    from synth7t.cohortqc.discover import LAYOUTS, discover
    from synth7t.cohortqc.page import summary, write_page
    from synth7t.progress import progress_bar

    root = Path(out)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found" if not root.exists() else f"{root}: not a folder")
    outputs = discover(root)
    if not outputs:
        raise InputError(f"{root}: no prediction outputs found (layouts: {', '.join(LAYOUTS)}; e.g. "
                         "<name>/syn7t.nii.gz or sub-*/anat/*_desc-synth7T_T1w.nii.gz)")
    cores = resolve_cores(threads)
    if jobs is None:  # a worker's start-up (numpy, nibabel, matplotlib) pays from a few dozen outputs on
        jobs = min(MAX_AUTO_JOBS, cores.n) if len(outputs) >= AUTO_JOBS_FROM else 1
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: expected 1 or more")
    jobs = min(jobs, len(outputs))
    log.info("%s: %d outputs, %d process(es), %s", root, len(outputs), jobs, cores.describe())
    records, computed = [], 0
    for rec, fresh in progress_bar(_summaries(outputs, root, jobs, cores.n), "qc",
                                   enabled=progress and len(outputs) > 1, total=len(outputs)):
        output = outputs[len(records)]
        records.append(rec)
        computed += fresh
        if fresh and rec["failed"]:
            log.warning("%s: %s", output.id, "; ".join(rec["failed"]))
    add_outlier_scores(records)
    page = Path(page) if page is not None else root / "qc.html"
    paths = write_page(records, page, root=root)
    result = QcResult(paths.pop("page"), paths, summary(records), computed, len(records) - computed, jobs,
                      cores.describe())
    log.info("%s", result.line())
    return result


def _summaries(outputs: list, root: Path, jobs: int, cores: int):
    """``(record, recomputed)`` of each output, in order: in this process (``jobs`` 1) or in ``jobs`` worker
    processes sharing the ``cores``."""
    from synth7t.cohortqc.collect import summarise
    from synth7t.parallel import apply_threads, spawn_pool

    if jobs <= 1:
        apply_threads(cores)
        for output in outputs:
            yield summarise(output, root)
        return
    with spawn_pool(jobs, max(1, cores // jobs), torch=False) as pool:
        yield from pool.map(summarise, outputs, [root] * len(outputs), chunksize=1)


__all__ = ["QcResult", "build_qc"]
