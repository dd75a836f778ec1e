"""Issue 16 and 32 options side by side on the proxy quality benchmark: ``python benchmarks/quality.py --variants``.

Each variant is the ``tiny`` preset (or another preset) plus override dicts, trained for the same wall-clock budget
(``--minutes``, as ``--ablation`` does) on the benchmark's demo cohort, then scored on the held-out subjects and
the transfer set. One table, printed and written as ``OUT/variants.md`` and ``OUT/variants.json`` (rewritten
after every variant, so an interrupted run leaves a partial table; rerunning skips trained models):

* brain PSNR and brain SSIM (3-D) of the model on each set, and its margin over ``histmatch_population``
  (B-spline + histogram matching to the training split's mean 7T histogram, the realizable baseline);
* training speed: steps in the budget and steps per second (the model folder's ``metrics.json``; its epoch count
  is kept in the JSON only: a run stopped by the clock mid-epoch makes "seconds per epoch" misleading);
* prediction seconds per held-out brain (``Predictor.predict_stack`` on its slice stack, model loaded once).

Issue 32's multi-view variants: ``multiview_shared`` (one network, three views) and ``multiview_three`` (one network
per view, each a third of the minutes), fused by the mean; ``<variant>_median`` and ``<variant>_learned`` score the
same trained networks with the median or a learned fusion (``synth7t train-fusion`` on the validation split; its
seconds are reported beside the training's); ``tiny_learned``, the control, trains the same 3-D CNN the same way on
``tiny``'s one view (a learned 3-D refinement, no views to fuse), separating what the views add from what the
fusion network's 3-D convolutions add. The table adds the transfer set's margin over ``histmatch_oracle``
(the detail margin; per brain in the JSON), its HFEN and the through-plane consistency along each axis
(``slice_consistency_*``, lower is better). ``NAME@sN`` trains a variant with ``trainer.seed`` N in its own folder:
two seeds of ``tiny`` and of a multi-view variant give the run-to-run spread a difference must exceed.

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
    # issue 32: multi-view synthesis at the same training minutes as tiny (per_view: a third of them per network)
    "multiview_shared": ("tiny", {"data.views": ["axial", "coronal", "sagittal"], "data.view_design": "shared"}),
    "multiview_three": ("tiny", {"data.views": ["axial", "coronal", "sagittal"], "data.view_design": "per_view"}),
}
GAN_VARIANTS = {"gan_residual"}
# name -> (the multi-view variant whose trained model it reuses, fusion): scored with another fusion of the same
# networks; "learned" first trains the fusion (synth7t train-fusion, the store's validation split) on a copy
FUSION_VARIANTS: dict[str, tuple[str, str]] = {
    f"{base}_{fusion}": (base, fusion)
    for base in ("multiview_shared", "multiview_three") for fusion in ("median", "learned")
}
# the control of the learned fusion: the same 3-D CNN, trained the same way on the validation split, refining the
# one view of tiny (train_fusion(..., single_view=True)): what the 3-D refinement gives without the views
FUSION_VARIANTS["tiny_learned"] = ("tiny", "learned")


def known_variants() -> list[str]:
    return [*VARIANTS, *FUSION_VARIANTS]


def split_seed(name: str) -> tuple[str, int | None]:
    """``"multiview_shared@s1"`` -> ``("multiview_shared", 1)``: the variant trained with ``trainer.seed`` 1 (its
    own folder), for the run-to-run spread; a name without ``@s`` -> ``(name, None)``."""
    base, sep, seed = name.partition("@s")
    return (base, int(seed)) if sep and seed.isdigit() else (name, None)


def variant_config(name: str, budget: dict) -> tuple[str, dict]:
    """(preset, overrides) of variant ``name`` (``NAME@sN``: with ``trainer.seed`` N) with the training ``budget``;
    raises if it does not validate."""
    from synth7t.config import load_config
    from synth7t.pipeline_demo import GAN_OVERRIDES

    name, seed = split_seed(name)
    preset, over = VARIANTS[name]
    overrides = {**budget, **(GAN_OVERRIDES if name in GAN_VARIANTS else {}), **over,
                 **({"trainer.seed": seed} if seed is not None else {})}
    load_config(preset, overrides)
    return preset, overrides


def _base(name: str) -> str:
    """The trained variant a name scores: itself, or a fusion variant's base (``@sN`` kept)."""
    plain, seed = split_seed(name)
    base = FUSION_VARIANTS[plain][0] if plain in FUSION_VARIANTS else plain
    return base if seed is None else f"{base}@s{seed}"


CONSISTENCY = ("slice_consistency_axial", "slice_consistency_coronal", "slice_consistency_sagittal")


def set_scores(table: dict) -> dict:
    """Model brain PSNR/SSIM/HFEN and through-plane consistency of one quality table, its margins over
    ``histmatch_population`` and over ``histmatch_oracle`` (the detail margin: what the model adds beyond the best
    global intensity mapping of the interpolated 3T), the latter also per brain where the table has groups."""
    if "skipped" in table:
        return {"skipped": table["skipped"]}
    m, b = table["model"], table["baselines"].get("histmatch_population", {})
    out = {"psnr": m.get("brain_psnr"), "ssim": m.get("brain_ssim"), "hfen": m.get("hfen"),
           **{k: m.get(k) for k in CONSISTENCY}}
    for k in ("psnr", "ssim"):
        ref = b.get(f"brain_{k}")
        out[f"{k}_vs_histmatch"] = None if ref is None or out[k] is None else out[k] - ref
        out[f"{k}_vs_oracle"] = table.get("model_minus_oracle", {}).get(f"brain_{k}")
    if table.get("groups"):
        out["per_brain_psnr_vs_oracle"] = {g: t.get("model_minus_oracle", {}).get("brain_psnr")
                                           for g, t in table["groups"].items()}
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


def fused_model(name: str, out: Path, store: Path, budget: dict) -> Path:
    """The model folder of a fusion variant: a copy of its base variant's trained folder (trained here first if it
    is not yet) whose default fusion is the variant's; ``learned`` trains the fusion on the store's validation
    split (the seconds it took are in its ``config.json``)."""
    import shutil

    from synth7t.inference.fusion_fit import set_fusion, train_fusion
    from synth7t.pipeline_demo import train_model

    base, fusion = _base(name), FUSION_VARIANTS[split_seed(name)[0]][1]
    preset, overrides = variant_config(base, budget)
    trained = train_model(store, out / "variants" / base, overrides, progress=True, preset=preset)
    model = out / "variants" / name / f"model-{name}"  # its own name: transfer_scores names its report after it
    done = (model / "config.json").exists() and json.loads((model / "config.json").read_text()).get("fusion") == fusion
    if not done:  # not the copy's checksums: a run killed while the fusion trained has them, with the mean fusion
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(trained, model, ignore=shutil.ignore_patterns("checkpoints", "logs", "views", "report*"))
        if fusion == "learned":
            train_fusion(model, store, progress=True, single_view=True)
        else:
            set_fusion(model, fusion)
    return model


def run_variant(name: str, out: Path, store: Path, budget: dict, *, jobs: int, transfer: bool) -> dict:
    """Train, evaluate and time one variant; ``{"status": "not available" | "failed", "reason": ...}`` otherwise."""
    from synth7t.evaluation.evaluate import evaluate, quality_table
    from synth7t.pipeline_demo import SCORE_TTA, train_model, transfer_scores

    try:
        preset, overrides = variant_config(_base(name), budget)
    except Exception as exc:  # noqa: BLE001 - an option or preset this checkout does not have yet
        return {"status": "not available", "reason": str(exc).splitlines()[0]}
    folder = out / "variants" / name
    t = time.perf_counter()
    try:
        if split_seed(name)[0] in FUSION_VARIANTS:
            model = fused_model(name, out, store, budget)
        else:
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
    fusion = json.loads((model / "config.json").read_text()).get("fusion_network")
    plain = split_seed(name)[0]
    return {"status": "ok", "preset": preset, "overrides": VARIANTS[split_seed(_base(name))[0]][1],
            "seed": split_seed(name)[1] or 0,
            **({"fusion": FUSION_VARIANTS[plain][1]} if plain in FUSION_VARIANTS else {}),
            **({"fusion_seconds": fusion["trained_on"]["seconds"]} if fusion else {}),
            "parameters": json.loads((model / "config.json").read_text()).get("parameters"),
            "held_out": held, "transfer": far, "steps": steps, "epochs": epochs, "train_seconds": secs,
            "steps_per_s": steps / secs if steps and secs else None,
            "predict_s_per_brain": pred_s, "minutes": round((time.perf_counter() - t) / 60, 1)}


def training_budget(minutes: float, steps: int | None = None) -> dict:
    """The trainer overrides of a variant's budget: ``minutes`` of wall clock, or ``steps`` (then a generous 20x
    ``minutes`` only as a safety stop), at most 200 epochs."""
    if steps:
        return {"trainer.max_minutes": 20 * minutes, "trainer.max_steps": steps, "trainer.max_epochs": 200}
    return {"trainer.max_minutes": minutes, "trainer.max_epochs": 200}


def budget_text(minutes: float, steps: int | None = None) -> str:
    return f"{steps} training steps (batch 16)" if steps else f"{minutes:g} min of training"


def run_variants(out: Path, store: Path, names: list[str], minutes: float, *, jobs: int, transfer: bool,
                 steps: int | None = None) -> dict:
    """Run ``names`` one after the other; writes ``variants.json`` and ``variants.md`` after each. ``steps``: a step
    budget per variant instead of ``minutes`` (the same network at the same batch size then gets the same compute
    whatever else runs on the machine; ``per_view`` splits it among its views as it splits minutes)."""
    budget = training_budget(minutes, steps)
    results: dict[str, dict] = {}
    for name in names:
        results[name] = run_variant(name, out, store, budget, jobs=jobs, transfer=transfer)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        (out / "variants.json").write_text(json.dumps({"minutes_per_variant": None if steps else minutes,
                                                       "steps_per_variant": steps, "variants": results}, indent=1))
        (out / "variants.md").write_text(markdown_table(results, minutes, steps))
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


def markdown_table(results: dict, minutes: float, steps: int | None = None) -> str:
    """The comparison as one Markdown table (PSNR in dB; margins = model − ``histmatch_population``)."""
    head = ["variant", "parameters", "held-out PSNR / SSIM", "held-out − histmatch_population",
            "transfer PSNR / SSIM", "transfer − histmatch_population", "transfer − oracle", "transfer HFEN",
            "transfer through-plane a / c / s", "steps", "steps/s", "predict s/brain"]
    lines = [f"Variants, {budget_text(minutes, steps)} each (brain PSNR in dB / brain SSIM; margins over "
             "`histmatch_population`).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if r["status"] != "ok":
            cells = [f"`{name}`", f"{r['status']}: {r['reason']}"] + [""] * (len(head) - 2)
        else:
            params = f"{r['parameters'] / 1e6:.2f} M" if r.get("parameters") else "–"
            t = r["transfer"]
            oracle = "skipped" if "skipped" in t else \
                f"{_f(t.get('psnr_vs_oracle'), sign=True)} / {_f(t.get('ssim_vs_oracle'), 3, sign=True)}"
            planes = "–" if "skipped" in t else " / ".join(_f(t.get(k), 3) for k in CONSISTENCY)
            cells = [f"`{name}`", params, *_set_cells(r["held_out"]), *_set_cells(t), oracle,
                     _f(t.get("hfen"), 3), planes, str(r.get("steps", "–")), _f(r["steps_per_s"]),
                     _f(r["predict_s_per_brain"])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"
