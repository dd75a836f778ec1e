"""Statistics over evaluation records: descriptive summaries and the paired model-vs-baseline test.

A *record* is one ``dict`` per (subject, method), as :func:`synth7t.evaluation.evaluate.evaluate_subject`
returns them: ``subject``, ``method``, ``group`` and one value per metric key. Missing, None and non-finite
values are left out of every statistic.

* :func:`describe`: n, mean, sd, median, min, max of a list of values.
* :func:`summarize`: :func:`describe` per method and metric, over all subjects and per diagnosis group
  (``summary.csv``).
* :func:`paired_comparison`: model minus each baseline, paired by subject, with a two-sided Wilcoxon
  signed-rank test (``comparison.csv``); no correction for multiple comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from synth7t.evaluation.baselines import METHODS, MODEL
from synth7t.evaluation.metrics import METRIC_KEYS

SUMMARY_KEYS = (*METRIC_KEYS, "dice_mean")
MIN_WILCOXON_N = 6


def finite(values: Iterable) -> np.ndarray:
    """The finite values of ``values`` (None and NaN dropped) as a float64 array."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def describe(values: Iterable) -> dict[str, float]:
    """``n``, ``mean``, ``sd`` (sample, ddof 1; NaN for n < 2), ``median``, ``min``, ``max`` of finite values."""
    v = finite(values)
    if v.size == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
    sd = float(np.std(v, ddof=1)) if v.size > 1 else math.nan
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "sd": sd,
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def metric_keys(records: Sequence[Mapping]) -> list[str]:
    """The keys of :data:`SUMMARY_KEYS` that occur in any record, in that order."""
    present = {k for r in records for k in r}
    return [k for k in SUMMARY_KEYS if k in present]


def methods_of(records: Sequence[Mapping]) -> list[str]:
    """The methods of the records: the known ones in :data:`~synth7t.evaluation.baselines.METHODS` order, then
    any other (an extra model) alphabetically."""
    seen = {r["method"] for r in records}
    return [m for m in METHODS if m in seen] + sorted(seen - set(METHODS))


def summarize(records: Sequence[Mapping]) -> list[dict]:
    """One row per (method, group, metric): group ``"all"`` and each known diagnosis group."""
    rows = []
    groups = sorted({r.get("group") for r in records if r.get("group")})
    for method in methods_of(records):
        for group in ("all", *groups):
            sel = [r for r in records if r["method"] == method and (group == "all" or r.get("group") == group)]
            if not sel:
                continue
            for key in metric_keys(records):
                rows.append({"method": method, "group": group, "metric": key, **describe(r.get(key) for r in sel)})
    return rows


def wilcoxon_p(diffs: Iterable) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences, and a note.

    With fewer than :data:`MIN_WILCOXON_N` pairs the p-value is NaN: the smallest attainable exact two-sided
    p is ``2 / 2^n`` (0.0625 for n = 5), so the test cannot show anything.
    """
    d = finite(diffs)
    if d.size < MIN_WILCOXON_N:
        return math.nan, f"n={d.size} < {MIN_WILCOXON_N}: p-value uninformative"
    if np.all(d == 0):
        return 1.0, "all differences are zero"
    from scipy.stats import wilcoxon

    return float(wilcoxon(d).pvalue), ""


def paired_comparison(records: Sequence[Mapping], reference: str = MODEL) -> list[dict]:
    """Model minus each baseline, paired by subject: n, mean and median difference, Wilcoxon p, note.

    One row per (baseline, metric), NaN where no subject has both values (``comparison.csv`` keeps them).
    """
    by = {(r["subject"], r["method"]): r for r in records}
    subjects = sorted({r["subject"] for r in records})
    rows = []
    for base in [m for m in methods_of(records) if m != reference]:
        for key in metric_keys(records):
            diffs = []
            for s in subjects:
                a, b = by.get((s, reference)), by.get((s, base))
                if a is not None and b is not None and a.get(key) is not None and b.get(key) is not None:
                    diffs.append(float(a[key]) - float(b[key]))
            d = finite(diffs)
            p, note = wilcoxon_p(d)
            rows.append(
                {
                    "reference": reference,
                    "baseline": base,
                    "metric": key,
                    "n": int(d.size),
                    "mean_diff": float(d.mean()) if d.size else math.nan,
                    "median_diff": float(np.median(d)) if d.size else math.nan,
                    "p_wilcoxon": p,
                    "note": note,
                }
            )
    return rows
