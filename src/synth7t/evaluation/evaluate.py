"""Scoring synthetic 7T images against the real 7T: one subject, a whole split (``synth7t evaluate``), and
the benchmark's quality table.

* :func:`evaluate_subject` scores the model and the baselines of one subject -> records (one ``dict`` per
  method: ``subject``, ``method``, every key of :data:`~synth7t.evaluation.metrics.METRIC_KEYS`, ``dice_mean``
  and ``dice_<label>`` when segmentation was run, ``segmentation_method``, ``group``).
* :func:`evaluate` (``synth7t evaluate``): for every subject of the chosen split, the model predicts the whole
  stack of its packed (preprocessed, normalized) 3T slices; prediction, 3T, real 7T and mask are put back on
  the subject's preprocessed 7T grid (:func:`synth7t.dataset.cropnorm.uncrop`) and scored with
  :func:`evaluate_subject` against the baselines (:mod:`~synth7t.evaluation.baselines`). Extra models (e.g.
  the GAN variant) are scored on the same subjects without segmentation. Volumes are written to
  ``OUT/volumes/`` for the report's montages and viewer, then :func:`~synth7t.evaluation.report.write_report`
  writes ``OUT/index.html``. One subject is in memory at a time.
* :func:`quality_table`: mean brain PSNR / SSIM / HFEN / DICE per method from ``metrics.csv``
  (``quality.json``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synth7t.errors import InputError
from synth7t.evaluation.baselines import BASELINES, MODEL, ORACLES, REALIZABLE
from synth7t.evaluation.images import as_array
from synth7t.evaluation.metrics import clipped_minmax, compute_metrics_many
from synth7t.io import Volume, save_volume, write_json

log = logging.getLogger(__name__)

QUALITY_KEYS = {"brain_psnr": "psnr_brain", "brain_ssim": "ssim_brain", "hfen": "hfen", "dice": "dice_mean",
                "brain_psnr_valid": "psnr_brain_valid", "brain_ssim_valid": "ssim_brain_valid",
                "slice_consistency_axial": "slice_consistency_axial",
                "slice_consistency_coronal": "slice_consistency_coronal",
                "slice_consistency_sagittal": "slice_consistency_sagittal"}
"""Key in ``quality.json`` (the spelling of the benchmark issue) -> column of ``metrics.csv``. The ``_valid``
keys leave out the slices QC marked corrupted in the real 7T (thesis table 1's "no corrupt." columns): there the
target itself is wrong, so every method is scored against signal drop-out it cannot and should not predict."""


# ---------------------------------------------------------------------------------------------------------
# one subject: loading and scoring


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

    m, zooms = as_array(mask)
    m = m > 0
    t3_arr, zooms = as_array(t3)
    t7_arr, _ = as_array(t7)
    p_arr, _ = as_array(pred)
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
# a split of a slice store: `synth7t evaluate`


def _open_store(data: Path):
    from synth7t.dataset.slices import SliceStore

    data = Path(data)
    if (data / "store.json").exists():
        return SliceStore(data)
    nested = sorted(data.glob("*/store.json"))
    if len(nested) == 1:
        return SliceStore(nested[0].parent)
    raise InputError(f"{data}: no slice store (store.json) here; run `synth7t pack {data} -o STORE` first")


def _subject_affine(store, subject: str) -> np.ndarray:
    info = store.info(subject)
    if "affine" in info:
        return np.asarray(info["affine"], float)
    zooms = store.meta.get("voxel_size_mm", [0.65, 0.65, 0.65])
    return np.diag([*np.broadcast_to(zooms, (3,)), 1.0])


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    segmentation: str = "auto",
    device: str = "auto",
    progress: bool = True,
    extra_models: dict[str, Path] | None = None,
    reference: str | Path | None = None,
    tta: bool = False,
    fusion: str | None = None,
) -> Path:
    """Evaluate ``model_dir`` on the ``split`` subjects of the store ``data``; returns ``OUT/index.html``.

    ``tta``: every model predicts each stack as ``synth7t predict --tta`` does (the mean of the prediction of the
    stack and of its left-right mirror image, mirrored back); the report says so.

    ``reference``: the slice store (or work folder holding one) whose *training split* defines the population
    7T histogram of the ``histmatch_population`` baseline; by default ``data`` itself. Give the model's training
    store when ``data`` holds only test subjects (another site, the transfer set).

    ``fusion``: how a multi-view model's views are fused (mean, median, learned; default the model folder's).
    """
    from synth7t.dataset.cropnorm import uncrop
    from synth7t.evaluation.metrics import compute_metrics
    from synth7t.evaluation.report import write_report
    from synth7t.inference import Predictor
    from synth7t.progress import progress_bar

    if segmentation not in ("auto", "synthseg", "atropos", "none"):
        raise InputError(f"--segmentation {segmentation!r}: expected auto, synthseg, atropos or none")
    store = _open_store(Path(data))
    ref_store = _open_store(Path(reference)) if reference is not None else store
    pop_q = ref_store.target_quantiles("train")
    if pop_q is None:
        log.warning("%s: no training subject with a 7T; the histmatch_population baseline is skipped", ref_store.root)
    subjects = store.split_subjects(split)
    subjects = [s for s in subjects if store.info(s).get("has_t7")]
    if not subjects:
        raise InputError(f"{store.root}: split {split!r} has no subject with a 7T to compare with")
    predictor = Predictor(model_dir, device)
    extras = {name: Predictor(p, device) for name, p in (extra_models or {}).items()}
    for p in (predictor, *extras.values()):
        if p.template is not None or store.on_template:  # the published thesis models' grid and units
            raise InputError(f"{p.model_dir if p.template is not None else store.root}: `synth7t evaluate` compares "
                             "models on a store of brain-cropped clipped min-max stacks; a model on a template grid "
                             "(import-thesis, pack --like) is not supported by it yet: predict the held-out 3T "
                             "scans with `synth7t predict` and compare the outputs on the template grid")
    for label, p in (("model", predictor), *extras.items()):
        if p.config.get("target_matched_to_input"):  # data.match_target_to_input: the real 7T stays the reference
            log.warning("%s %s was trained on 7T targets histogram-matched to their 3T input: its output has the "
                        "input's contrast and is compared with the real 7T, so intensity metrics (PSNR) count that "
                        "contrast against it", label, p.model_dir)
    out = Path(out)
    records, images = [], {}
    for s in progress_bar(subjects, "evaluate", enabled=progress):
        info = store.info(s)
        geom = store.geometry(s)
        affine = _subject_affine(store, s)
        stacks = {k: np.asarray(store.array(s, k), np.float32) for k in ("t3", "t7", "mask")}
        cov = {"age": info.get("age"), "sex": info.get("sex"), "group": info.get("group")}
        full = {k: uncrop(v, geom) for k, v in stacks.items()}
        full["pred"] = _predict_full(predictor, stacks, cov, geom, tta, fusion)
        min_slice = int(info.get("min_slice", 0)) + geom.box[2][0]
        recs = evaluate_subject(
            s,
            Volume(full["t3"], affine),
            Volume(full["pred"], affine),
            Volume(full["t7"], affine),
            Volume(full["mask"], affine),
            min_slice=min_slice,
            group=info.get("group"),
            segmentation=None if segmentation == "none" else segmentation,
            zooms_lowres=(1.0, 1.0, 1.0),
            population_quantiles=pop_q,
        )
        for name, extra in extras.items():
            rec = {"subject": s, "method": name, "group": info.get("group")}
            pred_extra = _predict_full(extra, stacks, cov, geom, tta)
            rec.update(compute_metrics(full["t7"], pred_extra, full["mask"] > 0, min_slice=min_slice))
            recs.append(rec)
        records += recs
        images[s] = _save_subject(out / "volumes", s, full, affine)
        log.info(
            "%s: brain PSNR model %.2f dB vs 3T %.2f dB",
            s,
            *(next(r["psnr_brain"] for r in recs if r["method"] == m) for m in ("model", "t3_input")),
        )
        del stacks, full
    cfg = predictor.config
    extra_info = {
        "model": f"{Path(model_dir).name} (preset {cfg.get('preset')}, {cfg.get('parameters', '?')} parameters)",
        "split": f"{split} ({len(subjects)} subjects)",
        "simulated": bool(cfg.get("training_data", {}).get("simulated") or store.meta.get("simulated")),
        "intensity units": "clipped min-max of each subject's real 7T (1st/99th brain percentiles)",
        "test-time augmentation": "left-right flip, mean of 2 predictions" if tta else "none",
    }
    if len(predictor.views) > 1:
        extra_info["views"] = (f"{', '.join(predictor.views)} ({cfg.get('view_design', 'shared')}), fused by "
                               f"{fusion or predictor.fusion}")
    index = write_report(out, records, images, title="synth7t evaluation", extra_info=extra_info)
    log.info("report: %s", index)
    return index


def _predict_full(predictor, stacks: dict, cov: dict, geom, tta: bool = False, fusion: str | None = None
                  ) -> np.ndarray:
    """A model's prediction of one subject's packed 3T stack, inside the brain, on the subject's full grid."""
    from synth7t.dataset.cropnorm import uncrop

    pred, _ = predictor.predict_stack(stacks["t3"], tta=tta, fusion=fusion, **cov)
    return uncrop((pred * (stacks["mask"] > 0)).astype(np.float32), geom)


def _save_subject(folder: Path, subject: str, full: dict, affine: np.ndarray) -> dict[str, Path]:
    paths = {}
    for key in ("t3", "pred", "t7", "mask"):
        dtype = np.uint8 if key == "mask" else np.float32
        paths[key] = save_volume(
            folder / f"{subject}_{key}.nii.gz", Volume(full[key].astype(np.float32), affine), dtype=dtype
        )
    return paths


# ---------------------------------------------------------------------------------------------------------
# quality.json: the benchmark's table of means


def _means(rows: list[dict], subjects: set[str] | None = None) -> dict[str, dict[str, float | None]]:
    """Mean of each quality key per method over the rows (of ``subjects`` when given); missing -> None."""
    by_method: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if subjects is not None and row["subject"] not in subjects:
            continue
        m = by_method.setdefault(row["method"], {k: [] for k in QUALITY_KEYS})
        for key, column in QUALITY_KEYS.items():
            try:
                v = float(row.get(column) or "nan")
            except ValueError:
                v = float("nan")
            if np.isfinite(v):
                m[key].append(v)
    return {meth: {k: (float(np.mean(v)) if v else None) for k, v in vals.items()} for meth, vals in by_method.items()}


def _diff(a: dict, b: dict) -> dict[str, float | None]:
    return {k: (a[k] - b[k] if a.get(k) is not None and b.get(k) is not None else None) for k in QUALITY_KEYS}


def _table(means: dict[str, dict], n_subjects: int) -> dict:
    baselines = {b: means[b] for b in BASELINES if b in means}
    realizable = {b: v for b, v in baselines.items() if b in REALIZABLE}
    best_name = max(realizable, key=lambda b: realizable[b]["brain_psnr"] or -np.inf)
    model = means.get("model")
    table = {
        "model": model,
        "baselines": baselines,
        "best_baseline": {"name": best_name, **realizable[best_name]},
        "n_subjects": n_subjects,
    }
    if model is not None:
        table["model_minus_best_baseline"] = _diff(model, realizable[best_name])
    for oracle in ORACLES:
        if oracle in baselines:
            table["oracle"] = {"name": oracle, **baselines[oracle]}
            if model is not None:
                table["model_minus_oracle"] = _diff(model, baselines[oracle])
    for extra in sorted(set(means) - set(BASELINES) - {"model"}):
        table[extra] = means[extra]
    return table


def quality_table(report_dir: str | Path, dest: str | Path | None = None,
                  groups: dict[str, str] | None = None) -> dict:
    """Mean brain PSNR / brain SSIM / HFEN / DICE per method from ``metrics.csv``, in the benchmark layout.

    ``{"model": {...}, "baselines": {name: {...}}, "best_baseline": {"name": ..., ...}, "oracle": {...},
    "model_minus_best_baseline": {...}, "model_minus_oracle": {...}, "n_subjects": n, "<extra>": {...}}`` with
    the keys ``brain_psnr``, ``brain_ssim``, ``hfen``, ``dice``, ``brain_psnr_valid``, ``brain_ssim_valid``
    (:data:`QUALITY_KEYS`; None where not computed). The best baseline is
    the *realizable* one with the highest mean brain PSNR (never the oracle). ``groups`` (subject -> group name)
    adds ``"groups": {name: <the same table over that group's subjects>}``. Written to ``dest`` when given.
    """
    path = Path(report_dir) / "metrics.csv"
    if not path.exists():
        raise InputError(f"{path}: not found (run `synth7t evaluate` first)")
    rows = list(csv.DictReader(path.open()))
    subjects = {r["subject"] for r in rows}
    table = _table(_means(rows), len(subjects))
    if groups:
        table["groups"] = {}
        for g in sorted(set(groups.values())):
            members = {s for s, name in groups.items() if name == g} & subjects
            if members:
                table["groups"][g] = _table(_means(rows, members), len(members))
    if dest is not None:
        write_json(dest, table)
    return table
