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

from synth7t.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class QcResult:
    page: Path
    tables: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    computed: int = 0
    cached: int = 0

    def line(self) -> str:
        s = self.summary
        return (f"{s['total']} outputs: {s['ok']} ok, {s['suspicious']} suspicious, {s['failed']} failed "
                f"({self.computed} summarised, {self.cached} from cache) -> {self.page}")


def build_qc(out: str | Path, page: str | Path | None = None, *, progress: bool = True) -> QcResult:
    """Write the cohort QC page of the outputs under ``out`` (default ``out/qc.html``) and its tables."""
    from synth7t.cohortqc.collect import add_outlier_scores, summarise
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
    log.info("%s: %d outputs", root, len(outputs))
    records, computed = [], 0
    for output in progress_bar(outputs, "qc", enabled=progress and len(outputs) > 1):
        rec, fresh = summarise(output, root)
        records.append(rec)
        computed += fresh
        if fresh and rec["failed"]:
            log.warning("%s: %s", output.id, "; ".join(rec["failed"]))
    add_outlier_scores(records)
    page = Path(page) if page is not None else root / "qc.html"
    paths = write_page(records, page, root=root)
    result = QcResult(paths.pop("page"), paths, summary(records), computed, len(records) - computed)
    log.info("%s", result.line())
    return result


__all__ = ["QcResult", "build_qc"]
