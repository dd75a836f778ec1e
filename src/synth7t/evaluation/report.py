"""The report folder of an evaluation: ``index.html`` plus the numbers behind it as CSV.

:func:`write_report` turns the records of :func:`~synth7t.evaluation.evaluate.evaluate_subject` (and, when
given, each subject's images) into

* ``metrics.csv`` (one row per subject and method), ``summary.csv`` (:func:`~synth7t.evaluation.stats.summarize`)
  and ``comparison.csv`` (:func:`~synth7t.evaluation.stats.paired_comparison`, every baseline x metric row);
* ``index.html``: the results table (mean ± sd, thesis table 1 layout) overall and per diagnosis group, the
  paired comparison as one table (rows = baselines, columns = metrics), boxplots, histograms and montages
  (:mod:`~synth7t.evaluation.figures`, embedded as base64 PNG: no external resource, it opens offline);
* ``viewer.html`` (:mod:`~synth7t.evaluation.viewer`) for the first subject when the NiiVue bundle ships.

This module prepares plain rows of strings; the page is the Jinja2 template
``evaluation/templates/report.html`` (its CSS in ``report.css``), rendered with autoescaping.
Images are read one subject at a time, so RAM does not grow with the cohort.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synth7t.evaluation.baselines import METHOD_LABELS, MODEL
from synth7t.evaluation.figures import MAX_SUBJECTS, boxplots, dice_label_boxplot, subject_figures
from synth7t.evaluation.images import load_subject
from synth7t.evaluation.metrics import TABLE_COLUMNS
from synth7t.evaluation.stats import MIN_WILCOXON_N, SUMMARY_KEYS, describe, methods_of, paired_comparison, summarize
from synth7t.evaluation.viewer import bundle_available, write_viewer
from synth7t.io import write_text
from synth7t.templating import render

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("method", "group", "metric", "n", "mean", "sd", "median", "min", "max")


def write_report(
    out_dir: str | os.PathLike,
    records: Sequence[Mapping],
    images: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    segmentation_method: str | None = None,
    title: str = "synth7t evaluation",
    extra_info: Mapping[str, Any] | None = None,
    viewer: bool = True,
    lower_pct: float = 1,
    upper_pct: float = 99,
) -> Path:
    """Write the report folder and return the path of its ``index.html``.

    ``records``: output of :func:`~synth7t.evaluation.evaluate.evaluate_subject` for every subject.
    ``images``: subject -> {"t3", "pred", "t7", "mask"} as NIfTI paths (preferred: loaded one subject at a
    time), Volumes or arrays on one grid; the 3T and 7T are shown in their own clipped min-max units, the
    prediction as is. ``segmentation_method`` is stated next to the DICE. ``extra_info``: key -> value lines
    shown under the title; ``simulated`` or ``demo`` true adds a "simulated demo data" banner. ``viewer``:
    also write ``viewer.html`` (NiiVue) for the first subject when the bundle ships with the package.
    """
    if not records:
        raise ValueError("no records to report")
    for r in records:
        if "subject" not in r or "method" not in r:
            raise ValueError("every record needs 'subject' and 'method'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = dict(images or {})
    seg = segmentation_method or next(
        (r.get("segmentation_method") for r in records if r.get("segmentation_method")), None
    )
    write_csv(out / "metrics.csv", records, record_columns(records))
    write_csv(out / "summary.csv", summarize(records), SUMMARY_COLUMNS)
    comparison = paired_comparison(records) if any(r["method"] == MODEL for r in records) else []
    if comparison:
        write_csv(out / "comparison.csv", comparison)
    shown = list(images)[:MAX_SUBJECTS]  # loaded one at a time, as the figures draw them
    montages, hist = subject_figures(((s, *load_subject(images[s], lower_pct, upper_pct)) for s in shown), len(shown))
    viewer_name = _maybe_viewer(out, images, lower_pct, upper_pct) if viewer and images else None
    groups = sorted({str(r["group"]) for r in records if r.get("group")})
    extra = {k: v for k, v in (extra_info or {}).items() if k not in ("simulated", "demo")}
    info = {"subjects": len({r["subject"] for r in records}), "segmentation (DICE)": seg or "not run", **extra}
    page = render(
        "report.html",
        title=title,
        simulated=any(bool((extra_info or {}).get(k)) for k in ("simulated", "demo")),
        info=[(str(k), str(v)) for k, v in info.items()],
        segmentation=seg,
        results=results_table(records),
        group_results=[(g, results_table(records, g)) for g in groups],
        comparison=comparison_table(comparison) if comparison else None,
        boxplots=boxplots(records),
        dice_boxplot=dice_label_boxplot(records),
        histograms=hist,
        viewer=viewer_name,
        montages=montages,
        files=["metrics.csv (per subject)", "summary.csv", *(["comparison.csv"] if comparison else [])],
    )
    return write_text(out / "index.html", page)


def _maybe_viewer(out: Path, images, lower_pct: float, upper_pct: float) -> str | None:
    if not bundle_available():
        log.info("NiiVue bundle not shipped: no viewer.html")
        return None
    subject = next(iter(images))
    write_viewer(out / "viewer.html", subject, images[subject], lower_pct=lower_pct, upper_pct=upper_pct)
    return "viewer.html"


# ---------------------------------------------------------------------------------------------------------
# tables of the page: plain strings, escaped by the template


def _digits(key: str) -> int:
    return 2 if key.startswith("psnr") else 3


def _heading(column: tuple[str, str, bool]) -> str:
    """Column heading of a :data:`~synth7t.evaluation.metrics.TABLE_COLUMNS` entry: title and direction."""
    _, title, higher_is_better = column
    return f"{title} {'↑' if higher_is_better else '↓'}"


def results_table(records: Sequence[Mapping], group: str | None = None) -> dict:
    """Thesis table 1 layout: rows = baselines then the model, cells = mean ± sd, best per column marked.

    Returns ``{"columns": [title], "rows": [{"label", "n", "cells": [{"mean", "sd", "best"}]}]}``; only metrics with
    a value in ``records`` (of ``group`` when given) are columns.
    """
    sel = [r for r in records if group is None or r.get("group") == group]
    cols = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in sel)]
    methods = methods_of(sel)
    stats = {(m, k): describe(r.get(k) for r in sel if r["method"] == m) for m in methods for k, _, _ in cols}
    best = {}
    for k, _, hib in cols:
        means = {m: stats[(m, k)]["mean"] for m in methods if not math.isnan(stats[(m, k)]["mean"])}
        if means:
            best[k] = (max if hib else min)(means, key=means.get)
    rows = []
    for m in methods:
        n = len({r["subject"] for r in sel if r["method"] == m})
        cells = [_mean_sd(stats[(m, k)], k, best.get(k) == m) for k, _, _ in cols]
        rows.append({"label": METHOD_LABELS.get(m, m), "n": n, "cells": cells})
    return {"columns": [_heading(c) for c in cols], "rows": rows}


def _mean_sd(stat: Mapping[str, float], key: str, is_best: bool) -> dict:
    """A results cell: ``{"mean", "sd", "best"}`` as text ("–" for no value, "" for no sd)."""
    mean, sd, digits = stat["mean"], stat["sd"], _digits(key)
    return {
        "mean": "–" if math.isnan(mean) else f"{mean:.{digits}f}",
        "sd": "" if math.isnan(mean) or math.isnan(sd) else f"{sd:.{digits}f}",
        "best": is_best,
    }


def comparison_table(rows: Sequence[Mapping]) -> dict:
    """:func:`~synth7t.evaluation.stats.paired_comparison` as one table: rows = baselines, columns = metrics.

    A cell holds the mean difference (model − baseline), its Wilcoxon p (when informative) and a tone:
    ``"better"`` where the model is better on average, ``"worse"`` where it is worse. Baselines and metrics
    without any paired value are left out; a cell without one reads "–". ``n`` is the number of paired
    subjects of the row (a cell with fewer says so). ``notes``: why p-values are missing, if they are.
    """
    cells = {(r["baseline"], r["metric"]): r for r in rows if r["n"] > 0}
    columns = [c for c in TABLE_COLUMNS if any(key == c[0] for _, key in cells)]
    baselines = list(dict.fromkeys(b for b, _ in cells))
    table_rows, notes = [], []
    for base in baselines:
        n = max(r["n"] for (b, _), r in cells.items() if b == base)
        out = []
        for key, _, hib in columns:
            r = cells.get((base, key))
            if r is None:
                out.append({"diff": "–", "p": "", "tone": ""})
                continue
            d, p = r["mean_diff"], r["p_wilcoxon"]
            p_text = "" if math.isnan(p) else f"p = {p:.2g}"
            if math.isnan(p) and r["n"] < MIN_WILCOXON_N:
                notes.append(
                    f"No p-value where fewer than {MIN_WILCOXON_N} subjects are paired: the smallest p the test"
                    " can give is then 0.0625 or more."
                )
            if r["n"] != n:
                p_text = f"{p_text} (n={r['n']})".strip()
            tone = "" if d == 0 else ("better" if (d > 0) == hib else "worse")
            out.append({"diff": f"{d:+.{_digits(key)}f}", "p": p_text, "tone": tone})
        table_rows.append({"label": METHOD_LABELS.get(base, base), "n": n, "cells": out})
    return {"columns": [_heading(c) for c in columns], "rows": table_rows, "notes": list(dict.fromkeys(notes))}


# ---------------------------------------------------------------------------------------------------------
# CSV


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV atomically; ``columns`` default to the union of keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_value(r.get(k)) for k in columns})
    return write_text(path, buf.getvalue())


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else f"{float(v):.6g}"
    return v


def record_columns(records: Sequence[Mapping]) -> list[str]:
    """Columns of ``metrics.csv``: subject, method, group, the summary metrics, the rest, then DICE per label."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    head = ["subject", "method", "group", *[k for k in SUMMARY_KEYS if k in keys]]
    dice = sorted((k for k in keys if k.startswith("dice_") and k != "dice_mean"), key=_dice_sort)
    rest = [k for k in keys if k not in head and k not in dice]
    return [*head, *rest, *dice]


def _dice_sort(key: str) -> tuple[int, str]:
    tail = key.removeprefix("dice_")
    return (int(tail), "") if tail.isdigit() else (10**6, tail)
