"""``synth7t demo``: the whole chain on the simulated demo cohort, sized for a 2-core laptop.

cohort (simulated) -> preprocess (demo N4 preset, deepbet, SyN at 1 mm) -> pack -> train ``tiny``
-> evaluate held-out subjects (report) -> predict one raw held-out 3T scan in its native space.

Every stage resumes: rerunning the command skips what is finished. ``benchmark=True`` builds a bigger cohort
(18 subjects: 12 train, 1 validation, 4 test after QC rejects the motion-corrupted one), trains longer, also
trains the GAN variant for the same budget, and writes ``quality.json`` (the proxy benchmark of
``benchmarks/quality.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from synth7t.errors import Synth7tError

log = logging.getLogger(__name__)

DEMO_TRAIN = {"trainer.max_minutes": 6.0, "trainer.max_epochs": 200}
BENCH_TRAIN = {"trainer.max_minutes": 10.0, "trainer.max_epochs": 200}


def run_demo(out: str | Path, *, n_subjects: int = 10, seed: int = 0, jobs: int = 2, cohort_only: bool = False,
             benchmark: bool = False, train_overrides: dict | None = None, progress: bool = True) -> dict:
    """Run the demo chain under ``out``; returns the paths it produced (and the quality table in benchmark mode)."""
    from synth7t.demo import DemoSpec, build_demo_cohort

    out = Path(out)
    timings: dict[str, float] = {}
    if benchmark:
        n_subjects = max(n_subjects, 18)
    if n_subjects < 8 and not cohort_only:
        raise Synth7tError(f"--subjects {n_subjects}: the whole chain needs at least 8 subjects")
    t = time.perf_counter()
    manifest = build_demo_cohort(out / "cohort", DemoSpec(n_subjects=n_subjects, seed=seed), progress=progress)
    timings["cohort"] = time.perf_counter() - t
    log.info("demo cohort (SIMULATED): %s", manifest)
    if cohort_only:
        return {"manifest": manifest}

    work, store, model = out / "work", out / "slices", out / "model"
    t = time.perf_counter()
    _preprocess(manifest, work, out / "private", jobs, progress)
    timings["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    from synth7t.dataset.pack import pack

    n_test = 4 if benchmark else 2
    pack(work, store, multiple=8, seed=seed, split=_split_counts(work, n_test), progress=progress)
    timings["pack"] = time.perf_counter() - t

    t = time.perf_counter()
    from synth7t.training import train

    overrides = dict(BENCH_TRAIN if benchmark else DEMO_TRAIN)
    overrides.update(train_overrides or {})
    if not (model / "model.safetensors").exists():
        train(store, model, preset="tiny", overrides=overrides, resume=(model / "train_config.json").exists(),
              progress=progress, data_notes={"simulated": True})
    timings["train"] = time.perf_counter() - t

    results = {"manifest": manifest, "work": work, "store": store, "model": model}
    if benchmark:
        t = time.perf_counter()
        gan = out / "model_gan"
        if not (gan / "model.safetensors").exists():
            gan_over = {**overrides, "critic": {"channels": 16, "n_layers": 3}, "loss.gan_weight": 0.2}
            train(store, gan, preset="tiny", overrides=gan_over, resume=(gan / "train_config.json").exists(),
                  progress=progress, data_notes={"simulated": True})
        results["model_gan"] = gan
        timings["train_gan"] = time.perf_counter() - t

    t = time.perf_counter()
    from synth7t.evaluation.evaluate import evaluate

    results["report"] = evaluate(model, store, out / "report", split="test", progress=progress,
                                 extra_models={"gan": results["model_gan"]} if benchmark else None)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    results["native_prediction"] = _predict_one_raw(model, manifest, work, out, progress)
    timings["predict_raw"] = time.perf_counter() - t
    if benchmark:
        from synth7t.evaluation.evaluate import quality_table

        results["quality"] = quality_table(out / "report", out / "quality.json")
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    from synth7t.io import write_json

    write_json(out / "demo_summary.json", {k: str(v) if isinstance(v, Path) else v for k, v in results.items()})
    log.info("demo finished in %.1f min: report %s", sum(timings.values()) / 60, results["report"])
    return results


def _preprocess(manifest: Path, work: Path, private: Path, jobs: int, progress: bool) -> None:
    from synth7t.preprocess.pipeline import preprocess

    # the demo's images are brains without skull (the template is skull-stripped): an intensity mask strips them
    res = preprocess(manifest, work, jobs=jobs, fast=True, skullstrip="threshold", key_file=private / "pseudonym.key",
                     mapping_file=private / "mapping.json", progress=progress)
    if res.failed:
        log.warning("preprocessing failed for %d subject(s): %s", len(res.failed), res.failed)


def _split_counts(work: Path, n_test: int) -> tuple[int, int, int]:
    """(train, val, test) subject counts for the usable subjects of a work folder (one validation subject)."""
    from synth7t.io import read_json

    usable = 0
    for d in sorted(p for p in work.iterdir() if p.is_dir() and (p / ".done").exists()):
        qc = read_json(d / "qc.json") if (d / "qc.json").exists() else {}
        usable += not qc.get("rejected", False)
    if usable < n_test + 2:
        raise Synth7tError(f"{work}: only {usable} usable subjects; the demo needs at least {n_test + 2}")
    return usable - n_test - 1, 1, n_test


def _predict_one_raw(model: Path, manifest: Path, work: Path, out: Path, progress: bool) -> Path | None:
    """Predict the raw 3T scan of the first test subject in its own space (the users' everyday command)."""
    import csv

    from synth7t.dataset.slices import SliceStore
    from synth7t.inference import PredictOptions, predict

    test = SliceStore(out / "slices").split_subjects("test")
    mapping = out / "private" / "mapping.json"
    if not test or not mapping.exists():
        return None
    from synth7t.io import read_json

    pseudo_to_id = {v: k for k, v in read_json(mapping).items()}
    rows = {r["subject"]: r for r in csv.DictReader(manifest.open())}
    row = rows.get(pseudo_to_id.get(test[0], ""))
    if row is None:
        return None
    raw = manifest.parent / row["t3"]
    res = predict(model, [raw], out / "predictions",
                  PredictOptions(age=float(row["age"]), sex=row["sex"], diagnosis=row["diagnosis"], tta=True,
                                 resample_to_input=True, skullstrip="threshold"), progress=progress)
    return res.done[0] if res.done else None
