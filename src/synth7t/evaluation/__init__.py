"""Evaluation of synthetic 7T images (thesis 3.3): metrics, baselines, segmentation DICE and the report.

* :mod:`~synth7t.evaluation.metrics`: ``compute_metrics(truth, pred, mask, *, min_slice=0)`` -> PSNR, SSIM
  (full image, brain, brain without corrupted slices), the thesis' 1-D brain SSIM, HFEN and brain MAE.
* :mod:`~synth7t.evaluation.baselines`: the 3T input and trilinear / cubic B-spline upsampling of a 1 mm 3T.
* :mod:`~synth7t.evaluation.segmentation`: SynthSeg (when FreeSurfer is on PATH) or Atropos, and DICE.
* :mod:`~synth7t.evaluation.evaluate`: ``evaluate_subject`` -> records (one per method) of one subject;
  ``evaluate`` scores a split of a slice store (``synth7t evaluate``); ``quality_table`` -> ``quality.json``.
* :mod:`~synth7t.evaluation.stats`: summaries and the paired Wilcoxon comparison of the records.
* :mod:`~synth7t.evaluation.figures`: boxplots, histograms and montages (matplotlib, base64 PNG).
* :mod:`~synth7t.evaluation.report`: ``write_report`` -> ``index.html`` (Jinja2 templates in ``templates/``)
  and the CSV files; :mod:`~synth7t.evaluation.viewer`: the NiiVue ``viewer.html``.

Submodules are imported on use so that ``import synth7t.evaluation`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compute_metrics": "metrics",
    "METRIC_KEYS": "metrics",
    "clipped_minmax": "metrics",
    "baseline_interpolations": "baselines",
    "baseline_from_lowres": "baselines",
    "segment": "segmentation",
    "dice_per_label": "segmentation",
    "mean_dice": "segmentation",
    "evaluate_subject": "evaluate",
    "write_report": "report",
    "write_viewer": "viewer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
