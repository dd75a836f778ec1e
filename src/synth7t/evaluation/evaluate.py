"""``synth7t evaluate``: predict the held-out subjects of a slice store and score model and baselines.

For every subject of the chosen split, the model predicts the whole stack of its packed (preprocessed,
normalized) 3T slices; prediction, 3T, real 7T and mask are put back on the subject's preprocessed 7T grid
(:func:`synth7t.dataset.pack.uncrop`) and scored with :func:`synth7t.evaluation.report.evaluate_subject`
against the baselines (3T input, trilinear and B-spline from 1 mm). Extra models (e.g. the GAN variant) are
scored on the same subjects without segmentation. Volumes are written to ``OUT/volumes/`` for the report's
montages and viewer, then ``OUT/index.html`` is written. One subject is in memory at a time.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from synth7t.errors import InputError
from synth7t.io import Volume, save_volume, write_json

log = logging.getLogger(__name__)

QUALITY_KEYS = ("psnr_brain", "ssim_brain", "hfen", "dice_mean")


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
) -> Path:
    """Evaluate ``model_dir`` on the ``split`` subjects of the store ``data``; returns ``OUT/index.html``."""
    from synth7t.dataset.pack import uncrop
    from synth7t.evaluation.metrics import compute_metrics
    from synth7t.evaluation.report import evaluate_subject, write_report
    from synth7t.inference import Predictor
    from synth7t.progress import progress_bar

    if segmentation not in ("auto", "synthseg", "atropos", "none"):
        raise InputError(f"--segmentation {segmentation!r}: expected auto, synthseg, atropos or none")
    store = _open_store(Path(data))
    subjects = store.split_subjects(split)
    subjects = [s for s in subjects if store.info(s).get("has_t7")]
    if not subjects:
        raise InputError(f"{store.root}: split {split!r} has no subject with a 7T to compare with")
    predictor = Predictor(model_dir, device)
    extras = {name: Predictor(p, device) for name, p in (extra_models or {}).items()}
    out = Path(out)
    records, images = [], {}
    for s in progress_bar(subjects, "evaluate", enabled=progress):
        info = store.info(s)
        geom = store.geometry(s)
        affine = _subject_affine(store, s)
        stacks = {k: np.asarray(store.array(s, k), np.float32) for k in ("t3", "t7", "mask")}
        cov = {"age": info.get("age"), "sex": info.get("sex"), "group": info.get("group")}
        full = {k: uncrop(v, geom) for k, v in stacks.items()}
        full["pred"] = _predict_full(predictor, stacks, cov, geom)
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
        )
        for name, extra in extras.items():
            rec = {"subject": s, "method": name, "group": info.get("group")}
            pred_extra = _predict_full(extra, stacks, cov, geom)
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
    }
    index = write_report(out, records, images, title="synth7t evaluation", extra_info=extra_info)
    log.info("report: %s", index)
    return index


def _predict_full(predictor, stacks: dict, cov: dict, geom) -> np.ndarray:
    """A model's prediction of one subject's packed 3T stack, inside the brain, on the subject's full grid."""
    from synth7t.dataset.pack import uncrop

    pred, _ = predictor.predict_stack(stacks["t3"], **cov)
    return uncrop((pred * (stacks["mask"] > 0)).astype(np.float32), geom)


def _save_subject(folder: Path, subject: str, full: dict, affine: np.ndarray) -> dict[str, Path]:
    paths = {}
    for key in ("t3", "pred", "t7", "mask"):
        dtype = np.uint8 if key == "mask" else np.float32
        paths[key] = save_volume(
            folder / f"{subject}_{key}.nii.gz", Volume(full[key].astype(np.float32), affine), dtype=dtype
        )
    return paths


def quality_table(report_dir: str | Path, dest: str | Path | None = None) -> dict:
    """Mean brain PSNR / brain SSIM / HFEN / DICE per method from ``metrics.csv``, in the benchmark layout.

    ``{"model": {...}, "baselines": {name: {...}}, "best_baseline": {"name": ..., ...}, "<extra>": {...}}``,
    best baseline = highest mean brain PSNR. Written to ``dest`` when given.
    """
    path = Path(report_dir) / "metrics.csv"
    if not path.exists():
        raise InputError(f"{path}: not found (run `synth7t evaluate` first)")
    by_method: dict[str, dict[str, list[float]]] = {}
    for row in csv.DictReader(path.open()):
        m = by_method.setdefault(row["method"], {k: [] for k in QUALITY_KEYS})
        for k in QUALITY_KEYS:
            try:
                v = float(row.get(k) or "nan")
            except ValueError:
                v = float("nan")
            if np.isfinite(v):
                m[k].append(v)
    means = {
        meth: {k.replace("_mean", ""): (float(np.mean(v)) if v else None) for k, v in vals.items()}
        for meth, vals in by_method.items()
    }
    from synth7t.evaluation.report import BASELINES

    baselines = {b: means[b] for b in BASELINES if b in means}
    best_name = max(baselines, key=lambda b: baselines[b]["psnr_brain"] or -np.inf)
    table = {
        "model": means.get("model"),
        "baselines": baselines,
        "best_baseline": {"name": best_name, **baselines[best_name]},
        "n_subjects": len(next(iter(by_method.values()))["psnr_brain"]),
    }
    for extra in set(means) - set(BASELINES) - {"model"}:
        table[extra] = means[extra]
    if dest is not None:
        write_json(dest, table)
    return table
