"""Per-subject evaluation, statistics and the self-contained HTML report.

* :func:`evaluate_subject` scores the model and the three baselines of one subject -> records
  (one ``dict`` per method: ``subject``, ``method``, every key of :data:`~synth7t.evaluation.metrics.METRIC_KEYS`,
  ``dice_mean`` and ``dice_<label>`` when segmentation was run, ``segmentation_method``, ``group``).
* :func:`summarize` (mean, sd, median per method, and per method x diagnosis group) and :func:`paired_comparison`
  (model minus each baseline, Wilcoxon signed-rank test) turn records into tables.
* :func:`write_report` writes ``index.html`` (figures embedded as base64 PNG, no external resource: it opens
  offline), ``metrics.csv``, ``summary.csv``, ``comparison.csv`` and, when the NiiVue bundle is present,
  ``viewer.html``. Images are read one subject at a time, so RAM does not grow with the cohort.

Montage zoom boxes (a heuristic, no atlas): with the brain's bounding box along each canonical RAS axis
scaled to [0, 1] (0 = left / posterior / inferior), the *hippocampus* view is the coronal slice at 45 % from
posterior, box x in [0.15, 0.47] (left hemisphere), z in [0.22, 0.52]; the *cerebellum* view is the sagittal
slice at x = 0.38 (left hemisphere, ~2 cm off the midline), box y in [0, 0.38], z in [0, 0.40]. These are the
MNI positions of the structures relative to the brain's extent; on a brain far from MNI proportions the boxes
show the neighbourhood, not the structure exactly.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synth7t.evaluation.metrics import METRIC_KEYS, clipped_minmax, compute_metrics_many
from synth7t.io import Volume, load_volume, write_text

log = logging.getLogger(__name__)

MODEL = "model"
ORACLES = ("histmatch_oracle",)  # upper bounds that use the subject's own 7T: never "the best baseline"
BASELINES = ("t3_input", "trilinear", "bspline", "histmatch_population", *ORACLES)
REALIZABLE = tuple(b for b in BASELINES if b not in ORACLES)
METHODS = (*BASELINES, MODEL)
METHOD_LABELS = {
    "t3_input": "3T input",
    "trilinear": "trilinear (1 mm 3T)",
    "bspline": "cubic B-spline (1 mm 3T)",
    "histmatch_population": "B-spline + histogram matched to the training 7T",
    "histmatch_oracle": "B-spline + histogram matched to its own 7T (oracle)",
    "model": "synth7t model",
}
# (key, column title, higher is better) in the layout of thesis table 1, then the extra metrics
TABLE_COLUMNS = (
    ("psnr", "PSNR", True),
    ("ssim", "SSIM", True),
    ("psnr_brain", "brain PSNR", True),
    ("ssim_brain", "brain SSIM", True),
    ("psnr_brain_valid", "brain PSNR no corrupt.", True),
    ("ssim_brain_valid", "brain SSIM no corrupt.", True),
    ("dice_mean", "Mean DICE", True),
    ("ssim_thesis_1d_full", "SSIM (thesis 1-D)", True),
    ("ssim_thesis_1d", "brain SSIM (thesis 1-D)", True),
    ("hfen", "HFEN", False),
    ("hfen_brain", "brain HFEN", False),
    ("mae_brain", "brain MAE", False),
)
SUMMARY_KEYS = (*METRIC_KEYS, "dice_mean")
MIN_WILCOXON_N = 6
HIPPOCAMPUS_BOX = {"slice_y": 0.45, "x": (0.15, 0.47), "z": (0.22, 0.52)}
CEREBELLUM_BOX = {"slice_x": 0.38, "y": (0.0, 0.38), "z": (0.0, 0.40)}
MAX_MONTAGES = 12
MAX_HISTOGRAMS = 12


# ---------------------------------------------------------------------------------------------------------
# loading


def _as_array(item: Any, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A path, :class:`Volume` or array -> ``(data, zooms)`` (zooms 1 mm for a bare array)."""
    if isinstance(item, (str, os.PathLike)):
        item = load_volume(item, check_finite=False)
    if isinstance(item, Volume):
        return np.asarray(item.data, dtype=dtype), np.asarray(item.zooms, dtype=np.float64)
    arr = np.asarray(item, dtype=dtype)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {arr.shape}")
    return arr, np.ones(3)


def _zooms_of(item: Any) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        import nibabel as nib

        return np.asarray(nib.load(str(item)).header.get_zooms()[:3], dtype=np.float64)
    if isinstance(item, Volume):
        return np.asarray(item.zooms, dtype=np.float64)
    return np.ones(3)


# ---------------------------------------------------------------------------------------------------------
# per-subject evaluation


def evaluate_subject(
    subject: str,
    t3: Any,
    pred: Any,
    t7: Any,
    mask: Any,
    *,
    min_slice: int = 0,
    group: str | None = None,
    segmentation: str | None = "auto",
    zooms_lowres: Sequence[float] = (1.0, 1.0, 1.0),
    normalize_pred: bool = False,
    lower_pct: float = 1,
    upper_pct: float = 99,
    population_quantiles: np.ndarray | None = None,
) -> list[dict]:
    """Score the model and the baselines of one subject; returns one record per method (module docstring).

    ``t3`` is the preprocessed 3T on the 7T grid (raw units: it is clipped-min-max normalised with its own
    brain percentiles, as the model's input is), ``pred`` the synthetic 7T in [0, 1] units
    (``normalize_pred=True`` normalises it like the 3T), ``t7`` the real 7T and ``mask`` the brain mask, each
    a path, :class:`~synth7t.io.Volume` or array on the same grid. ``segmentation``: ``"auto"`` (SynthSeg when
    on PATH, else Atropos), ``"synthseg"``, ``"atropos"`` or None (no DICE). ``population_quantiles`` (the
    training split's 7T brain quantiles, :func:`~synth7t.evaluation.baselines.population_quantiles`) adds the
    ``histmatch_population`` baseline; ``histmatch_oracle`` (matched to this subject's 7T) is always scored.
    """
    from synth7t.evaluation.baselines import baseline_interpolations, histogram_match, quantiles

    m, zooms = _as_array(mask)
    m = m > 0
    t3_arr, zooms = _as_array(t3)
    t7_arr, _ = _as_array(t7)
    p_arr, _ = _as_array(pred)
    for name, arr in (("t3", t3_arr), ("t7", t7_arr), ("pred", p_arr)):
        if arr.shape != m.shape:
            raise ValueError(f"{subject}: {name} shape {arr.shape} differs from the mask's {m.shape}")
    t3n = clipped_minmax(t3_arr, m, lower_pct, upper_pct)
    t3n[~m] = 0
    if normalize_pred:
        p_arr = clipped_minmax(p_arr, m, lower_pct, upper_pct)
    interp = baseline_interpolations(t3n, zooms, zooms_lowres, mask=m)
    candidates = {"t3_input": t3n, **interp}
    if population_quantiles is not None:
        candidates["histmatch_population"] = histogram_match(interp["bspline"], m, population_quantiles)
    own = quantiles(clipped_minmax(t7_arr, m, lower_pct, upper_pct)[m])
    candidates["histmatch_oracle"] = histogram_match(interp["bspline"], m, own)
    candidates[MODEL] = p_arr
    scores = compute_metrics_many(t7_arr, candidates, m, min_slice=min_slice, lower_pct=lower_pct, upper_pct=upper_pct)
    records = [{"subject": subject, "method": k, "group": group, **v} for k, v in scores.items()]
    if segmentation is not None:
        _add_dice(records, candidates, t7_arr, m, zooms, segmentation)
    return records


def _add_dice(records, candidates, t7_arr, m, zooms, segmentation: str) -> None:
    from synth7t.evaluation.segmentation import dice_labels, dice_per_label, mean_dice, segment

    affine = np.diag([*zooms, 1.0])
    method = None if segmentation == "auto" else segmentation
    ref, seg_method = segment(Volume(t7_arr, affine), m, method=method)
    labels = dice_labels(seg_method)
    for rec in records:
        if rec["method"] in ORACLES:  # an upper bound of intensity mapping, not a method: no segmentation for it
            continue
        lab, _ = segment(Volume(candidates[rec["method"]], affine), m, method=seg_method)
        per = dice_per_label(ref, lab, labels)
        rec["dice_mean"] = mean_dice(per)
        rec.update({f"dice_{k}": v for k, v in per.items()})
        rec["segmentation_method"] = seg_method


# ---------------------------------------------------------------------------------------------------------
# statistics


def _finite(values) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def describe(values) -> dict[str, float]:
    """``n``, ``mean``, ``sd`` (sample, ddof 1; NaN for n < 2), ``median``, ``min``, ``max`` of finite values."""
    v = _finite(values)
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


def _metric_keys(records: Sequence[Mapping]) -> list[str]:
    present = {k for r in records for k in r}
    return [k for k in SUMMARY_KEYS if k in present]


def summarize(records: Sequence[Mapping]) -> list[dict]:
    """One row per (method, group, metric): group ``"all"`` and each known diagnosis group."""
    rows = []
    groups = sorted({r.get("group") for r in records if r.get("group")})
    for method in _methods(records):
        for group in ("all", *groups):
            sel = [r for r in records if r["method"] == method and (group == "all" or r.get("group") == group)]
            if not sel:
                continue
            for key in _metric_keys(records):
                rows.append({"method": method, "group": group, "metric": key, **describe(r.get(key) for r in sel)})
    return rows


def _methods(records: Sequence[Mapping]) -> list[str]:
    seen = {r["method"] for r in records}
    return [m for m in METHODS if m in seen] + sorted(seen - set(METHODS))


def wilcoxon_p(diffs) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences, and a note.

    With fewer than :data:`MIN_WILCOXON_N` pairs the p-value is NaN: the smallest attainable exact two-sided
    p is ``2 / 2^n`` (0.0625 for n = 5), so the test cannot show anything.
    """
    d = _finite(diffs)
    if d.size < MIN_WILCOXON_N:
        return math.nan, f"n={d.size} < {MIN_WILCOXON_N}: p-value uninformative"
    if np.all(d == 0):
        return 1.0, "all differences are zero"
    from scipy.stats import wilcoxon

    return float(wilcoxon(d).pvalue), ""


def paired_comparison(records: Sequence[Mapping], reference: str = MODEL) -> list[dict]:
    """Model minus each baseline, paired by subject: n, mean and median difference, Wilcoxon p, note."""
    by = {(r["subject"], r["method"]): r for r in records}
    subjects = sorted({r["subject"] for r in records})
    rows = []
    for base in [m for m in _methods(records) if m != reference]:
        for key in _metric_keys(records):
            diffs = []
            for s in subjects:
                a, b = by.get((s, reference)), by.get((s, base))
                if a is not None and b is not None and a.get(key) is not None and b.get(key) is not None:
                    diffs.append(float(a[key]) - float(b[key]))
            d = _finite(diffs)
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


def _record_columns(records: Sequence[Mapping]) -> list[str]:
    keys = list(dict.fromkeys(k for r in records for k in r))
    head = ["subject", "method", "group", *[k for k in SUMMARY_KEYS if k in keys]]
    dice = sorted((k for k in keys if k.startswith("dice_") and k != "dice_mean"), key=_dice_sort)
    rest = [k for k in keys if k not in head and k not in dice]
    return [*head, *rest, *dice]


def _dice_sort(key: str) -> tuple[int, str]:
    tail = key.removeprefix("dice_")
    return (int(tail), "") if tail.isdigit() else (10**6, tail)


# ---------------------------------------------------------------------------------------------------------
# figures


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def boxplots(records: Sequence[Mapping]) -> str:
    """One boxplot per metric (thesis figures 33-35), methods side by side; base64 PNG."""
    keys = [(k, t, hib) for k, t, hib in TABLE_COLUMNS if any(r.get(k) is not None for r in records)]
    methods = _methods(records)
    ncol = 4
    nrow = max(1, math.ceil(len(keys) / ncol))
    fig, axes = _figure(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), dpi=80, squeeze=False)
    for ax, (key, title, hib) in zip(axes.ravel(), keys, strict=False):
        data = [_finite(r.get(key) for r in records if r["method"] == m) for m in methods]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), [METHOD_LABELS.get(m, m).split(" (")[0] for m in methods])
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.set_title(f"{title} {'↑' if hib else '↓'}", fontsize=10)
    for ax in axes.ravel()[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def dice_label_boxplot(records: Sequence[Mapping]) -> str | None:
    """Boxplot of the per-label DICE values of every subject, per method (thesis figure 33)."""
    methods = _methods(records)
    data = []
    for m in methods:
        vals = [
            v for r in records if r["method"] == m for k, v in r.items() if k.startswith("dice_") and k[5:].isdigit()
        ]
        data.append(_finite(vals))
    if not any(d.size for d in data):
        return None
    fig, ax = _figure(figsize=(6, 3.5), dpi=80)
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(methods) + 1), [METHOD_LABELS.get(m, m).split(" (")[0] for m in methods])
    ax.set_ylabel("DICE per label vs real 7T")
    fig.tight_layout()
    return _png(fig)


def _brain_bbox(mask: np.ndarray) -> list[tuple[int, int]]:
    idx = np.nonzero(mask)
    return [(int(i.min()), int(i.max()) + 1) for i in idx]


def _frac(lo: int, hi: int, f: float) -> int:
    return int(round(lo + f * (hi - lo - 1)))


def montage_views(mask: np.ndarray) -> list[tuple[str, int, int, tuple[slice, slice] | None]]:
    """Views of the montage: ``(title, axis, index, crop)``; crop is ``(rows, cols)`` of the displayed slice.

    Displayed slices are transposed so that rows run along the second remaining axis (superior or anterior up
    after flipping) and columns along the first (left -> right, neurological convention).
    """
    bb = _brain_bbox(mask)
    centre = [(lo + hi) // 2 for lo, hi in bb]
    views: list[tuple[str, int, int, tuple[slice, slice] | None]] = [
        ("axial", 2, centre[2], None),
        ("coronal", 1, centre[1], None),
        ("sagittal", 0, centre[0], None),
    ]
    (x0, x1), (y0, y1), (z0, z1) = bb
    hb, cb = HIPPOCAMPUS_BOX, CEREBELLUM_BOX
    hip_crop = (
        slice(_frac(z0, z1, hb["z"][0]), _frac(z0, z1, hb["z"][1])),
        slice(_frac(x0, x1, hb["x"][0]), _frac(x0, x1, hb["x"][1])),
    )
    cer_crop = (
        slice(_frac(z0, z1, cb["z"][0]), _frac(z0, z1, cb["z"][1])),
        slice(_frac(y0, y1, cb["y"][0]), _frac(y0, y1, cb["y"][1])),
    )
    views.append(("hippocampus (coronal zoom)", 1, _frac(y0, y1, hb["slice_y"]), hip_crop))
    views.append(("cerebellum (sagittal zoom)", 0, _frac(x0, x1, cb["slice_x"]), cer_crop))
    return views


def _slice2d(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """(rows, cols) slice with rows = the higher remaining axis (to be drawn with origin='lower')."""
    return np.take(vol, index, axis=axis).T


def montage(subject: str, t3n: np.ndarray, pred: np.ndarray, t7n: np.ndarray, mask: np.ndarray, zooms) -> str:
    """3T | prediction | real 7T | |prediction - 7T| in three planes plus two zooms; base64 PNG."""
    views = montage_views(mask)
    cols = (("3T input", t3n), ("synthetic 7T", pred), ("real 7T", t7n), ("|synthetic - real|", None))
    fig, axes = _figure(len(views), 4, figsize=(11, 2.7 * len(views)), dpi=72, squeeze=False)
    for row, (title, axis, index, crop) in enumerate(views):
        other = [a for a in range(3) if a != axis]
        aspect = float(zooms[other[1]] / zooms[other[0]])
        for col, (name, img) in enumerate(cols):
            ax = axes[row, col]
            if img is None:
                sl = np.abs(_slice2d(pred, axis, index) - _slice2d(t7n, axis, index))
                kw = {"cmap": "magma", "vmin": 0, "vmax": 0.5}
            else:
                sl = _slice2d(img, axis, index)
                kw = {"cmap": "gray", "vmin": 0, "vmax": 1}
            if crop is not None:
                sl = sl[crop]
            ax.imshow(sl, origin="lower", aspect=aspect, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{title}\n{'xyz'[axis]}={index}", fontsize=9)
    fig.suptitle(subject, fontsize=11)
    fig.tight_layout()
    return _png(fig)


def histogram_panel(ax, subject: str, t3n: np.ndarray, pred: np.ndarray, t7n: np.ndarray, mask: np.ndarray) -> None:
    """Brain intensity histograms of 3T, prediction and 7T in [0, 1] units (thesis figures 39-40)."""
    bins = np.linspace(0, 1, 101)
    for name, img, colour in (
        ("3T", t3n, "tab:blue"),
        ("synthetic 7T", pred, "tab:green"),
        ("real 7T", t7n, "tab:red"),
    ):
        ax.hist(np.clip(img[mask], 0, 1), bins=bins, density=True, histtype="step", color=colour, label=name)
    ax.set_title(subject, fontsize=9)
    ax.set_xlabel("clipped min-max intensity", fontsize=8)


# ---------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #bbb;padding:.25em .55em;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}
.best{font-weight:bold;background:#e6f4e6}
.banner{background:#fff3cd;border:2px solid #e0a800;padding:.7em 1em;font-weight:bold;margin:1em 0}
.note{color:#555;font-size:.9em}
img{max-width:100%}
"""


def _fmt(mean: float, sd: float, key: str) -> str:
    if math.isnan(mean):
        return "–"
    digits = 2 if key.startswith("psnr") else 3
    if math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def results_table(records: Sequence[Mapping], group: str | None = None) -> str:
    """HTML table in the layout of thesis table 1: rows = baselines then the model, cells = mean ± sd."""
    sel = [r for r in records if group is None or r.get("group") == group]
    cols = [(k, t, hib) for k, t, hib in TABLE_COLUMNS if any(r.get(k) is not None for r in sel)]
    methods = _methods(sel)
    stats = {(m, k): describe(r.get(k) for r in sel if r["method"] == m) for m in methods for k, _, _ in cols}
    best = {}
    for k, _, hib in cols:
        means = {m: stats[(m, k)]["mean"] for m in methods if not math.isnan(stats[(m, k)]["mean"])}
        if means:
            best[k] = (max if hib else min)(means, key=means.get)
    head = "".join(f"<th>{html.escape(t)} {'↑' if hib else '↓'}</th>" for _, t, hib in cols)
    n = {m: len({r["subject"] for r in sel if r["method"] == m}) for m in methods}
    rows = []
    for m in methods:
        cells = "".join(_cell(stats[(m, k)], k, best.get(k) == m) for k, _, _ in cols)
        rows.append(f"<tr><td>{html.escape(METHOD_LABELS.get(m, m))} (n={n[m]})</td>{cells}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


def _cell(stat: Mapping[str, float], key: str, is_best: bool) -> str:
    cls = ' class="best"' if is_best else ""
    return f"<td{cls}>{_fmt(stat['mean'], stat['sd'], key)}</td>"


def comparison_table(rows: Sequence[Mapping]) -> str:
    """HTML table of :func:`paired_comparison`."""
    titles = {k: t for k, t, _ in TABLE_COLUMNS}
    out = [
        "<table><tr><th>model vs</th><th>metric</th><th>n</th><th>mean diff</th><th>median diff</th>"
        "<th>Wilcoxon p</th><th>note</th></tr>"
    ]
    for r in rows:
        p = "–" if math.isnan(r["p_wilcoxon"]) else f"{r['p_wilcoxon']:.3g}"
        out.append(
            f"<tr><td>{html.escape(METHOD_LABELS.get(r['baseline'], r['baseline']))}</td>"
            f"<td>{html.escape(titles.get(r['metric'], r['metric']))}</td><td>{r['n']}</td>"
            f"<td>{r['mean_diff']:+.4g}</td><td>{r['median_diff']:+.4g}</td><td>{p}</td>"
            f"<td>{html.escape(r['note'])}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _is_simulated(extra_info: Mapping | None) -> bool:
    if not extra_info:
        return False
    return any(bool(extra_info.get(k)) for k in ("simulated", "demo"))


def _load_subject(paths: Mapping[str, Any], lower_pct: float, upper_pct: float):
    """Load one subject's images -> (t3n, pred, t7n, mask, zooms), each (X, Y, Z) float32 in [0, 1] units."""
    missing = [k for k in ("t3", "pred", "t7", "mask") if k not in paths]
    if missing:
        raise ValueError(f"images entry lacks {missing}")
    mask, _ = _as_array(paths["mask"])
    mask = mask > 0
    zooms = _zooms_of(paths["t7"])
    t3, _ = _as_array(paths["t3"])
    t3n = clipped_minmax(t3, mask, lower_pct, upper_pct)
    t3n[~mask] = 0
    del t3
    t7, _ = _as_array(paths["t7"])
    t7n = clipped_minmax(t7, mask, lower_pct, upper_pct)
    t7n[~mask] = 0
    del t7
    pred, _ = _as_array(paths["pred"])
    return t3n, pred, t7n, mask, zooms


def _subject_figures(images: Mapping[str, Mapping[str, Any]], lower_pct: float, upper_pct: float):
    """Montages (up to MAX_MONTAGES) and one histogram figure, loading one subject at a time."""
    subjects = list(images)[: max(MAX_MONTAGES, MAX_HISTOGRAMS)]
    montages: list[tuple[str, str]] = []
    hist = None
    if not subjects:
        return montages, hist
    nh = min(len(subjects), MAX_HISTOGRAMS)
    ncol = min(nh, 4)
    fig, axes = _figure(
        math.ceil(nh / ncol), ncol, figsize=(3.6 * ncol, 2.8 * math.ceil(nh / ncol)), dpi=80, squeeze=False
    )
    for i, subject in enumerate(subjects):
        t3n, pred, t7n, mask, zooms = _load_subject(images[subject], lower_pct, upper_pct)
        if pred.shape != mask.shape or t3n.shape != mask.shape:
            raise ValueError(f"{subject}: images are not on one grid ({t3n.shape}, {pred.shape}, {mask.shape})")
        if i < nh:
            histogram_panel(axes.ravel()[i], subject, t3n, pred, t7n, mask)
        if i < MAX_MONTAGES:
            montages.append((subject, montage(subject, t3n, pred, t7n, mask, zooms)))
        del t3n, pred, t7n, mask
    for ax in axes.ravel()[nh:]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=8)
    fig.tight_layout()
    hist = _png(fig)
    return montages, hist


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

    ``records``: output of :func:`evaluate_subject` for every subject. ``images``: subject -> {"t3", "pred",
    "t7", "mask"} as NIfTI paths (preferred: loaded one subject at a time), Volumes or arrays on one grid; the
    3T and 7T are shown in their own clipped min-max units, the prediction as is. ``segmentation_method`` is
    stated next to the DICE. ``extra_info``: key -> value lines shown under the title; ``simulated`` or
    ``demo`` true adds a "simulated demo data" banner. ``viewer``: also write ``viewer.html`` (NiiVue) for
    the first subject when the bundle ships with the package.
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
    write_csv(out / "metrics.csv", records, _record_columns(records))
    summary = summarize(records)
    write_csv(out / "summary.csv", summary, ["method", "group", "metric", "n", "mean", "sd", "median", "min", "max"])
    comparison = paired_comparison(records) if any(r["method"] == MODEL for r in records) else []
    if comparison:
        write_csv(out / "comparison.csv", comparison)
    montages, hist = _subject_figures(images, lower_pct, upper_pct)
    viewer_name = None
    if viewer and images:
        viewer_name = _maybe_viewer(out, images, lower_pct, upper_pct)
    page = _page(records, comparison, montages, hist, seg, title, extra_info, viewer_name)
    return write_text(out / "index.html", page)


def _maybe_viewer(out: Path, images, lower_pct: float, upper_pct: float) -> str | None:
    if not bundle_available():
        log.info("NiiVue bundle not shipped: no viewer.html")
        return None
    subject = next(iter(images))
    write_viewer(out / "viewer.html", subject, images[subject], lower_pct=lower_pct, upper_pct=upper_pct)
    return "viewer.html"


def _page(records, comparison, montages, hist, seg, title, extra_info, viewer_name) -> str:
    esc = html.escape
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
    ]
    if _is_simulated(extra_info):
        parts.append(
            '<div class="banner">Simulated demo data: these images are synthetic, not real 3T/7T '
            "scans. The numbers show that the pipeline runs, not how well it works.</div>"
        )
    info = {k: v for k, v in (extra_info or {}).items() if k not in ("simulated", "demo")}
    subjects = sorted({r["subject"] for r in records})
    info = {"subjects": len(subjects), "segmentation (DICE)": seg or "not run", **info}
    parts.append("<ul>" + "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in info.items()) + "</ul>")
    parts.append(
        '<h2>Results</h2><p class="note">Mean ± sd over subjects; best per column highlighted. '
        "Both images in the real 7T's clipped (1st/99th brain percentile) min-max units; PSNR range = "
        "that of the clipped 7T; SSIM: 3-D Gaussian window (σ 1.5 voxels), k1 0.01, k2 0.03; "
        '"no corrupt." excludes axial slices below the QC\'s min_slice; thesis 1-D SSIM: one SSIM of '
        "the flattened brain voxels (thesis 3.3); HFEN: LoG σ 1.5 voxels, whole image. DICE: "
        f"{esc(_dice_note(seg))}</p>"
    )
    parts.append(results_table(records))
    groups = sorted({r.get("group") for r in records if r.get("group")})
    for g in groups:
        parts.append(f"<h3>Group: {esc(str(g))}</h3>{results_table(records, g)}")
    if comparison:
        parts.append(
            '<h2>Model vs baselines (paired by subject)</h2><p class="note">Difference = model − '
            "baseline (positive is better for ↑ metrics, negative for HFEN and MAE); two-sided "
            "Wilcoxon signed-rank test, no correction for multiple comparisons.</p>"
        )
        parts.append(comparison_table(comparison))
    parts.append(f"<h2>Distributions</h2>{_img(boxplots(records), 'boxplots per metric')}")
    dice_fig = dice_label_boxplot(records)
    if dice_fig:
        parts.append(f"<h3>DICE per label</h3>{_img(dice_fig, 'DICE per label')}")
    if hist:
        parts.append(
            '<h2>Brain intensity histograms</h2><p class="note">3T and real 7T in their own clipped '
            f"min-max units, synthetic 7T as predicted.</p>{_img(hist, 'intensity histograms')}"
        )
    if viewer_name:
        parts.append(
            f'<h2>Interactive viewer</h2><p><a href="{esc(viewer_name)}">Open the linked 3T / synthetic '
            "7T / real 7T viewer</a> (NiiVue, works offline).</p>"
        )
    if montages:
        parts.append(
            '<h2>Subjects</h2><p class="note">Zoom boxes are positioned from the brain\'s bounding '
            "box (hippocampus: coronal slice 45 % from posterior, left medial temporal box; "
            "cerebellum: left sagittal slice, inferior-posterior box).</p>"
        )
        for subject, b64 in montages:
            parts.append(f"<h3>{esc(subject)}</h3>{_img(b64, 'montage ' + subject)}")
    parts.append('<p class="note">Files: metrics.csv (per subject), summary.csv, comparison.csv.</p></body></html>')
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# interactive viewer (NiiVue)

STATIC = Path(__file__).with_name("static")
NIIVUE_BUNDLE = STATIC / "niivue.umd.js.gz"
VIEWER_VOXEL_MM = 1.0


def bundle_available() -> bool:
    """True when the gzip-compressed NiiVue UMD bundle ships with the package."""
    return NIIVUE_BUNDLE.is_file()


def _viewer_nifti(img: np.ndarray, box: tuple[slice, ...], zooms: np.ndarray, voxel_mm: float) -> bytes:
    """Crop to ``box``, resample to ``voxel_mm`` (never finer than the input), quantise [0, 1] -> uint8, .nii.gz."""
    import gzip

    import nibabel as nib
    from scipy import ndimage

    crop = np.asarray(img[box], dtype=np.float32)  # (x, y, z)
    factor = np.minimum(1.0, zooms / voxel_mm)
    if np.any(factor < 1):
        crop = ndimage.zoom(crop, factor, order=1, grid_mode=True, mode="nearest")
    new_zooms = zooms * np.asarray([c / n for c, n in zip(img[box].shape, crop.shape, strict=True)])
    data = np.clip(np.rint(crop * 255), 0, 255).astype(np.uint8)
    nii = nib.Nifti1Image(data, np.diag([*new_zooms, 1.0]))
    nii.header.set_xyzt_units("mm", "sec")
    return gzip.compress(nii.to_bytes(), compresslevel=6, mtime=0)


def viewer_html(subject: str, volumes: Sequence[tuple[str, bytes]], *, title: str = "synth7t viewer") -> str:
    """A self-contained page: the gzip NiiVue bundle and the .nii.gz volumes inlined as base64.

    One canvas per volume, each showing the same slice: every instance broadcasts its crosshair and view to
    the others (NiiVue ``broadcastTo``). The bundle is unpacked in the browser with ``DecompressionStream``.
    """
    nv_b64 = base64.b64encode(NIIVUE_BUNDLE.read_bytes()).decode("ascii")
    vols = ",".join(
        f'{{"name": {_js_str(name)}, "b64": "{base64.b64encode(data).decode("ascii")}"}}' for name, data in volumes
    )
    n = len(volumes)
    canvases = "".join(
        f'<div class="cell"><div class="lbl">{html.escape(name)}</div><canvas id="gl{i}"></canvas></div>'
        for i, (name, _) in enumerate(volumes)
    )
    return VIEWER_TEMPLATE.format(
        title=html.escape(title), subject=html.escape(subject), canvases=canvases, n=n, nv_b64=nv_b64, vols=vols
    )


def _js_str(text: str) -> str:
    import json

    return json.dumps(text).replace("<", "\\u003c")


def write_viewer(
    path: str | os.PathLike,
    subject: str,
    images: Mapping[str, Any],
    *,
    voxel_mm: float = VIEWER_VOXEL_MM,
    lower_pct: float = 1,
    upper_pct: float = 99,
) -> Path:
    """Write ``viewer.html`` for one subject: 3T | synthetic 7T | real 7T, linked, cropped to the brain."""
    if not bundle_available():
        raise FileNotFoundError(f"{NIIVUE_BUNDLE}: NiiVue bundle missing from the package")
    t3n, pred, t7n, mask, zooms = _load_subject(images, lower_pct, upper_pct)
    box = tuple(
        slice(max(0, lo - 2), min(n, hi + 2)) for (lo, hi), n in zip(_brain_bbox(mask), mask.shape, strict=True)
    )
    vols = [
        ("3T input", _viewer_nifti(t3n, box, zooms, voxel_mm)),
        ("synthetic 7T", _viewer_nifti(np.where(mask, pred, 0), box, zooms, voxel_mm)),
        ("real 7T", _viewer_nifti(t7n, box, zooms, voxel_mm)),
    ]
    return write_text(path, viewer_html(subject, vols, title=f"synth7t viewer: {subject}"))


VIEWER_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{margin:0;background:#111;color:#ddd;font-family:system-ui,Helvetica,Arial,sans-serif}}
#bar{{padding:6px 10px;font-size:14px}} #bar select{{margin-left:1em}}
#grid{{display:flex;gap:4px;height:calc(100vh - 40px)}}
.cell{{flex:1;position:relative;min-width:0}} .cell canvas{{width:100%;height:100%;display:block}}
.lbl{{position:absolute;top:4px;left:8px;font-size:13px;z-index:2;pointer-events:none}}
#status{{color:#f88;margin-left:1em}}
</style></head><body>
<div id="bar"><b>{subject}</b>: 3T input | synthetic 7T | real 7T, linked (click to move the crosshair)
<select id="view"><option value="0">axial</option><option value="1">coronal</option>
<option value="2">sagittal</option><option value="3">multiplanar</option></select>
<span id="status">loading...</span></div>
<div id="grid">{canvases}</div>
<script>
const NV_GZ = "{nv_b64}";
const VOLUMES = [{vols}];
function bytes(b64) {{ const s = atob(b64); const u = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i); return u; }}
async function gunzipText(b64) {{
  const stream = new Blob([bytes(b64)]).stream().pipeThrough(new DecompressionStream("gzip"));
  return await new Response(stream).text(); }}
async function main() {{
  const status = document.getElementById("status");
  const code = await gunzipText(NV_GZ);
  const tag = document.createElement("script"); tag.textContent = code; document.head.appendChild(tag);
  const nvs = [];
  for (let i = 0; i < {n}; i++) {{
    const nv = new niivue.Niivue({{backColor: [0, 0, 0, 1], crosshairWidth: 1, crosshairColor: [1, 0, 0, 0.6]}});
    await nv.attachTo("gl" + i);
    await nv.loadFromArrayBuffer(bytes(VOLUMES[i].b64).buffer, "vol" + i + ".nii.gz");
    nv.setSliceType(nv.sliceTypeAxial);
    nvs.push(nv);
  }}
  nvs.forEach((nv, i) => nv.broadcastTo(nvs.filter((_, j) => j !== i), {{"2d": true, "3d": true}}));
  document.getElementById("view").addEventListener("change", (e) =>
    nvs.forEach((nv) => nv.setSliceType(parseInt(e.target.value))));
  status.textContent = ""; document.body.dataset.ready = "1";
}}
main().catch((err) => {{ document.getElementById("status").textContent = "viewer error: " + err; }});
</script></body></html>
"""


def _dice_note(seg: str | None) -> str:
    if seg == "synthseg":
        return (
            "FreeSurfer SynthSeg of each image vs that of the real 7T, mean over 27 labels (cerebellum and "
            "CSF excluded, as in the thesis)."
        )
    if seg == "atropos":
        return (
            "offline ANTs Atropos 3-tissue segmentation (CSF/GM/WM) of each image vs that of the real 7T; "
            "not comparable with the thesis' SynthSeg DICE."
        )
    return "not computed."
