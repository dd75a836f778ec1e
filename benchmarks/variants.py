"""Issue 16 options side by side on the proxy quality benchmark: ``python benchmarks/quality.py --variants``.

Each variant is the ``tiny`` preset (or another preset) plus override dicts, trained for the same wall-clock budget
(``--minutes``, as ``--ablation`` does) on the benchmark's demo cohort, then scored on the held-out subjects and
the transfer set. One table, printed and written as ``OUT/variants.md`` and ``OUT/variants.json`` (rewritten
after every variant, so an interrupted run leaves a partial table; rerunning skips trained models):

* brain PSNR and brain SSIM (3-D) of the model on each set, and its margin over ``histmatch_population``
  (B-spline + histogram matching to the training split's mean 7T histogram, the realizable baseline);
* training speed: steps in the budget and steps per second (the model folder's ``metrics.json``; its epoch count
  is kept in the JSON only: a run stopped by the clock mid-epoch makes "seconds per epoch" misleading);
* prediction seconds per held-out brain (``Predictor.predict_stack`` on its slice stack, model loaded once).

The variant list is data: a variant whose preset or overrides do not validate in this checkout (an option added by
another change that is not merged yet) is reported as "not available" with the reason, and the others still run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# name -> (preset, overrides); "gan_residual" is the benchmark's GAN settings (pipeline_demo.GAN_OVERRIDES) with the
# residual critic of thesis 5.2, merged in at run time, trained from random weights for the variants' budget (the
# benchmark's own GAN fine-tunes its U-net instead: pipeline_demo.BENCH_GAN_TRAIN)
VARIANTS: dict[str, tuple[str, dict]] = {
    "tiny": ("tiny", {}),
    "wavelet": ("tiny", {"model.wavelet": True}),
    "nyul": ("tiny", {"data.standardize": "nyul"}),
    "match7t": ("tiny", {"data.match_target_to_input": True}),
    "tiny3d": ("tiny3d", {}),
    "gan_residual": ("tiny", {"critic.residual": True}),
}
GAN_VARIANTS = {"gan_residual"}


def variant_config(name: str, budget: dict) -> tuple[str, dict]:
    """(preset, overrides) of variant ``name`` with the training ``budget``; raises if it does not validate."""
    from synth7t.config import load_config
    from synth7t.pipeline_demo import GAN_OVERRIDES

    preset, over = VARIANTS[name]
    overrides = {**budget, **(GAN_OVERRIDES if name in GAN_VARIANTS else {}), **over}
    load_config(preset, overrides)
    return preset, overrides


def set_scores(table: dict) -> dict:
    """Model brain PSNR/SSIM of one quality table and its margins over ``histmatch_population``."""
    if "skipped" in table:
        return {"skipped": table["skipped"]}
    m, b = table["model"], table["baselines"].get("histmatch_population", {})
    out = {"psnr": m.get("brain_psnr"), "ssim": m.get("brain_ssim")}
    for k in ("psnr", "ssim"):
        ref = b.get(f"brain_{k}")
        out[f"{k}_vs_histmatch"] = None if ref is None or out[k] is None else out[k] - ref
    return out


def predict_seconds(model: Path, store: Path) -> float:
    """Mean seconds to predict one held-out brain's slice stack (the model loaded once, not counted)."""
    import numpy as np

    from synth7t.dataset.slices import SliceStore
    from synth7t.inference import Predictor

    st, predictor = SliceStore(store), Predictor(model)
    subjects = st.split_subjects("test")
    t = time.perf_counter()
    for s in subjects:
        info = st.info(s)
        predictor.predict_stack(np.asarray(st.array(s, "t3"), np.float32), age=info.get("age"), sex=info.get("sex"),
                                group=info.get("group"))
    return (time.perf_counter() - t) / max(len(subjects), 1)


def run_variant(name: str, out: Path, store: Path, budget: dict, *, jobs: int, transfer: bool) -> dict:
    """Train, evaluate and time one variant; ``{"status": "not available" | "failed", "reason": ...}`` otherwise."""
    from synth7t.evaluation.evaluate import evaluate, quality_table
    from synth7t.pipeline_demo import SCORE_TTA, train_model, transfer_scores

    try:
        preset, overrides = variant_config(name, budget)
    except Exception as exc:  # noqa: BLE001 - an option or preset this checkout does not have yet
        return {"status": "not available", "reason": str(exc).splitlines()[0]}
    folder = out / "variants" / name
    t = time.perf_counter()
    try:
        model = train_model(store, folder, overrides, progress=True, preset=preset)
        evaluate(model, store, folder / "report", segmentation="none", progress=True, tta=SCORE_TTA)
        held = set_scores(quality_table(folder / "report"))
        far = (set_scores(transfer_scores(out / "transfer", model, store, jobs=jobs, segmentation="none",
                                          progress=True)) if transfer else {"skipped": "--no-transfer"})
        pred_s = predict_seconds(model, store)
    except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the others' rows
        return {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    metrics = json.loads((model / "metrics.json").read_text())
    secs, steps, epochs = metrics.get("train_seconds"), metrics.get("steps"), metrics.get("epochs")
    return {"status": "ok", "preset": preset, "overrides": VARIANTS[name][1],
            "parameters": json.loads((model / "config.json").read_text()).get("parameters"),
            "held_out": held, "transfer": far, "steps": steps, "epochs": epochs, "train_seconds": secs,
            "steps_per_s": steps / secs if steps and secs else None,
            "predict_s_per_brain": pred_s, "minutes": round((time.perf_counter() - t) / 60, 1)}


def run_variants(out: Path, store: Path, names: list[str], minutes: float, *, jobs: int, transfer: bool) -> dict:
    """Run ``names`` one after the other; writes ``variants.json`` and ``variants.md`` after each."""
    budget = {"trainer.max_minutes": minutes, "trainer.max_epochs": 200}
    results: dict[str, dict] = {}
    for name in names:
        results[name] = run_variant(name, out, store, budget, jobs=jobs, transfer=transfer)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        (out / "variants.json").write_text(json.dumps({"minutes_per_variant": minutes, "variants": results},
                                                      indent=1))
        (out / "variants.md").write_text(markdown_table(results, minutes))
    return results


def _f(v, d: int = 2, sign: bool = False) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def _set_cells(s: dict) -> list[str]:
    if "skipped" in s:
        return ["skipped", "–"]
    return [f"{_f(s.get('psnr'))} / {_f(s.get('ssim'), 3)}",
            f"{_f(s.get('psnr_vs_histmatch'), sign=True)} / {_f(s.get('ssim_vs_histmatch'), 3, sign=True)}"]


def markdown_table(results: dict, minutes: float) -> str:
    """The comparison as one Markdown table (PSNR in dB; margins = model − ``histmatch_population``)."""
    head = ["variant", "parameters", "held-out PSNR / SSIM", "held-out − histmatch_population",
            "transfer PSNR / SSIM", "transfer − histmatch_population", "steps", "steps/s", "predict s/brain"]
    lines = [f"Variants, {minutes:g} min of training each (brain PSNR in dB / brain SSIM; margins over "
             "`histmatch_population`).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if r["status"] != "ok":
            cells = [f"`{name}`", f"{r['status']}: {r['reason']}"] + [""] * (len(head) - 2)
        else:
            params = f"{r['parameters'] / 1e6:.2f} M" if r.get("parameters") else "–"
            cells = [f"`{name}`", params, *_set_cells(r["held_out"]), *_set_cells(r["transfer"]),
                     str(r.get("steps", "–")), _f(r["steps_per_s"]), _f(r["predict_s_per_brain"])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"
