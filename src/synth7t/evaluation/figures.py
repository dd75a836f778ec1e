"""The report's matplotlib figures, each returned as a base64 PNG for embedding in ``index.html``.

* :func:`boxplots`: one boxplot per metric, methods side by side (thesis figures 33-35);
  :func:`dice_label_boxplot`: the per-label DICE values per method.
* :func:`montage`: 3T | synthetic 7T | real 7T | absolute difference of one subject, in three planes and two
  zoom boxes; :func:`histogram_panel`: brain intensity histograms of one subject (thesis figures 39-40).
* :func:`subject_figures`: the montages and the histogram figure of a cohort, from its subjects' arrays (an
  iterable: the caller can load one subject at a time, as :mod:`~synth7t.evaluation.report` does).

Montage zoom boxes (a heuristic, no atlas): with the brain's bounding box along each canonical RAS axis
scaled to [0, 1] (0 = left / posterior / inferior), the *hippocampus* view is the coronal slice at 45 % from
posterior, box x in [0.15, 0.47] (left hemisphere), z in [0.22, 0.52]; the *cerebellum* view is the sagittal
slice at x = 0.38 (left hemisphere, ~2 cm off the midline), box y in [0, 0.38], z in [0, 0.40]. These are the
MNI positions of the structures relative to the brain's extent; on a brain far from MNI proportions the boxes
show the neighbourhood, not the structure exactly.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from synth7t.dataset.cropnorm import crop_box
from synth7t.evaluation.baselines import METHOD_LABELS
from synth7t.evaluation.metrics import TABLE_COLUMNS
from synth7t.evaluation.stats import finite, methods_of

HIPPOCAMPUS_BOX = {"slice_y": 0.45, "x": (0.15, 0.47), "z": (0.22, 0.52)}
CEREBELLUM_BOX = {"slice_x": 0.38, "y": (0.0, 0.38), "z": (0.0, 0.40)}
MAX_MONTAGES = 12
MAX_HISTOGRAMS = 12
MAX_SUBJECTS = max(MAX_MONTAGES, MAX_HISTOGRAMS)  # subjects drawn at most
SHORT_LABELS = {"histmatch_population": "hist. matched", "histmatch_oracle": "oracle", "model": "model"}
"""Tick labels of the boxplots where the method's label is too long (others: its label up to " (")."""


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


def _short_label(method: str) -> str:
    return SHORT_LABELS.get(method) or METHOD_LABELS.get(method, method).split(" (")[0]


def boxplots(records: Sequence[Mapping]) -> str:
    """One boxplot per metric (thesis figures 33-35), methods side by side; base64 PNG."""
    keys = [(k, t, hib) for k, t, hib in TABLE_COLUMNS if any(r.get(k) is not None for r in records)]
    methods = methods_of(records)
    ncol = 4
    nrow = max(1, math.ceil(len(keys) / ncol))
    fig, axes = _figure(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), dpi=80, squeeze=False)
    for ax, (key, title, hib) in zip(axes.ravel(), keys, strict=False):
        data = [finite(r.get(key) for r in records if r["method"] == m) for m in methods]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), [_short_label(m) for m in methods])
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.set_title(f"{title} {'↑' if hib else '↓'}", fontsize=10)
    for ax in axes.ravel()[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def dice_label_boxplot(records: Sequence[Mapping]) -> str | None:
    """Boxplot of the per-label DICE values of every subject, per method (thesis figure 33)."""
    methods = methods_of(records)
    data = []
    for m in methods:
        vals = [
            v for r in records if r["method"] == m for k, v in r.items() if k.startswith("dice_") and k[5:].isdigit()
        ]
        data.append(finite(vals))
    if not any(d.size for d in data):
        return None
    fig, ax = _figure(figsize=(6, 3.5), dpi=80)
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(methods) + 1), [_short_label(m) for m in methods])
    ax.set_ylabel("DICE per label vs real 7T")
    fig.tight_layout()
    return _png(fig)


def _frac(lo: int, hi: int, f: float) -> int:
    return int(round(lo + f * (hi - lo - 1)))


def montage_views(mask: np.ndarray) -> list[tuple[str, int, int, tuple[slice, slice] | None]]:
    """Views of the montage: ``(title, axis, index, crop)``; crop is ``(rows, cols)`` of the displayed slice.

    Displayed slices are transposed so that rows run along the second remaining axis (superior or anterior up
    after flipping) and columns along the first (left -> right, neurological convention).
    """
    bb = crop_box(mask)
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


def subject_figures(subjects: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                    n_subjects: int):
    """Montages (up to MAX_MONTAGES) and one histogram figure (up to MAX_HISTOGRAMS panels).

    ``subjects``: ``(subject, t3n, pred, t7n, mask, zooms)`` per subject, the images on one grid in clipped min-max
    units (:func:`synth7t.evaluation.images.load_subject`); only the first ``MAX_SUBJECTS`` are drawn, and each is
    let go before the next is taken, so a generator keeps one subject in memory. ``n_subjects``: how many it
    yields (the histogram figure's layout is made before the first arrives)."""
    montages: list[tuple[str, str]] = []
    hist = None
    n = min(n_subjects, MAX_SUBJECTS)
    if not n:
        return montages, hist
    nh = min(n, MAX_HISTOGRAMS)
    ncol = min(nh, 4)
    fig, axes = _figure(
        math.ceil(nh / ncol), ncol, figsize=(3.6 * ncol, 2.8 * math.ceil(nh / ncol)), dpi=80, squeeze=False
    )
    for i, (subject, t3n, pred, t7n, mask, zooms) in enumerate(subjects):
        if i >= n:
            break
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
