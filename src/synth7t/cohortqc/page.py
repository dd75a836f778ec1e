"""The cohort QC page (Jinja2, autoescaped) and its tables (``.csv``, ``.json``) from per-output records.

:func:`write_page` takes records (the dicts of :mod:`synth7t.cohortqc.collect`, or any with the same keys), so
a page can be built without touching a NIfTI. Thumbnails are separate files referenced with
``<img loading="lazy">`` by paths relative to the page, sorting and the "flagged only" filter are a few lines of
inline JavaScript: the page works offline from ``file://`` and stays light with thousands of rows.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from pathlib import Path

from synth7t import __version__
from synth7t.cohortqc.collect import Z_LIMIT

TABLE_COLUMNS = ["id", "status", "flags", "layout", "output", "brain_volume_ml", "brain_median", "brain_iqr",
                 "unc_mean", "unc_p95", "z_brain_volume_ml", "z_brain_median", "z_brain_iqr", "z_unc_mean",
                 "nonfinite_voxels", "shape", "voxel_mm", "model", "model_sha256", "synth7t_version", "tta",
                 "has_uncertainty", "planes", "compare"]
STATUS_RANK = {"failed": 0, "suspicious": 1, "ok": 2}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def _href(rel: str | None, root: Path, page_dir: Path) -> str | None:
    """A record path (relative to the outputs folder) as a URL path relative to the page."""
    if rel is None:
        return None
    return Path(os.path.relpath(root / rel, page_dir)).as_posix()


def _row(rec: dict, root: Path, page_dir: Path) -> dict:
    return {
        "id": rec["id"], "status": rec["status"], "rank": STATUS_RANK.get(rec["status"], 3),
        "flagged": rec["flagged"], "flags": rec["flags"], "output": _href(rec.get("output"), root, page_dir),
        "planes": _href(rec.get("planes"), root, page_dir), "compare": _href(rec.get("compare"), root, page_dir),
        "cells": [(rec.get(k), _fmt(rec.get(k), 4 if k == "brain_volume_ml" else 3), rec.get(f"z_{k}"))
                  for k in ("brain_volume_ml", "brain_median", "brain_iqr", "unc_mean")],
        "unc_p95": _fmt(rec.get("unc_p95")),
        "model": rec.get("model") or "", "sha": rec.get("model_sha256") or "",
        "version": rec.get("synth7t_version") or "",
    }


def summary(records: list[dict]) -> dict:
    """Counts by status and by flag kind (a flag's words before any number or parenthesis)."""
    by_status = Counter(r["status"] for r in records)
    kinds = Counter()
    for r in records:
        for flag in r["flags"]:
            kinds[flag.split(" (")[0].lstrip("0123456789 ")] += 1
    return {"total": len(records), "ok": by_status["ok"], "suspicious": by_status["suspicious"],
            "failed": by_status["failed"], "flagged": sum(r["flagged"] for r in records),
            "flag_kinds": kinds.most_common(), "layouts": Counter(r.get("layout") for r in records).most_common()}


def render_page(records: list[dict], page: str | Path, *, root: str | Path, title: str | None = None) -> str:
    """The page's HTML for ``records`` (paths in them relative to ``root``), for writing to ``page``."""
    from synth7t.templating import render

    page, root = Path(page).resolve(), Path(root).resolve()
    return render(
        "cohort_qc.html.j2", package="synth7t.cohortqc",
        title=title or f"Cohort QC: {root.name}", rows=[_row(r, root, page.parent) for r in records],
        summary=summary(records), z_limit=Z_LIMIT, version=__version__,
        generated=time.strftime("%Y-%m-%d %H:%M"))


def table_text(records: list[dict]) -> str:
    """The per-output table as CSV (flags joined by '; ')."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({**rec, "flags": "; ".join(rec["flags"])})
    return buf.getvalue()


def write_page(records: list[dict], page: str | Path, *, root: str | Path, title: str | None = None) -> dict:
    """Write ``page`` (HTML) and, next to it, the same table as ``.csv`` and ``.json``; returns their paths."""
    from synth7t.io import write_json, write_text

    page = Path(page)
    rows = [{k: r.get(k) for k in TABLE_COLUMNS} for r in records]
    return {"page": write_text(page, render_page(records, page, root=root, title=title)),
            "csv": write_text(page.with_suffix(".csv"), table_text(records)),
            "json": write_json(page.with_suffix(".json"), {"summary": summary(records), "outputs": rows})}
