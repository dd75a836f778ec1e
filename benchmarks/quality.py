"""Proxy quality benchmark: held-out simulated subjects and a transfer set of unseen anatomy and 3T physics.

Builds the demo cohort with a fixed seed (34 subjects: 28 train, 1 validation, 4 held-out test after QC rejects
the motion-corrupted one; 3T physics drawn per subject from the ranges of ``synth7t.demo.DemoSpec``),
preprocesses, packs, trains the ``tiny`` preset for 13 minutes and its WGAN-GP variant (a 3-minute adversarial
fine-tune of it), and evaluates

* the 4 held-out demo subjects, and
* the *transfer set* (``synth7t.transfer``): two real high-resolution brains that nothing trains on (MNI152 at
  0.8 mm, Colin27 at 0.5 mm, from ``../shared/data/highres``; skipped with a note where absent), each degraded
  by three 3T recipes outside the training ranges,

against the baselines: 3T input, trilinear and cubic B-spline from 1 mm, B-spline + histogram matching to the
training split's mean 7T histogram (``histmatch_population``, realizable) and to the subject's own 7T
(``histmatch_oracle``, an upper bound of any global intensity mapping, never counted as "best baseline").
Prints brain PSNR, brain SSIM (3-D), HFEN and tissue DICE, and the model's margins. Same as
``synth7t demo --benchmark --out DIR`` (which writes ``DIR/quality.json``); everything resumes if interrupted.

``--ablation`` trains variants of the ``tiny`` preset on the same cohort, each for ``--minutes`` (augmentations
off / GMM only / blur+noise+bias only / all; without input standardization; architecture switches), and prints
one row per variant with its margins on both sets (no DICE, to keep the run short). Writes ``DIR/ablation.json``.

``--variants [NAMES]`` (without ``--ablation``) compares the issue 16 options (``benchmarks/variants.py``: tiny,
wavelet, nyul, match7t, tiny3d, gan_residual) and issue 32's multi-view synthesis (multiview_shared, multiview_three
and their _median and _learned fusions; ``NAME@sN`` trains with seed N), each trained for ``--minutes``, in one
table: ``DIR/variants.md`` and ``DIR/variants.json``. ``--subjects`` and ``--no-transfer`` make a quick smoke run.

    python benchmarks/quality.py [--out quality-run] [--jobs 2]
    python benchmarks/quality.py --ablation [--minutes 5 | --steps 300] [--variants "augment: none,no AdaDM"]
    python benchmarks/quality.py --variants [tiny wavelet tiny@s1 multiview_shared ...] [--minutes 5 | --steps 900]
        [--subjects 18] [--no-transfer]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

KEYS = ("brain_psnr", "brain_ssim", "hfen", "dice")
AUG_OFF = {f"data.augment.{k}.enabled": False for k in ("gmm", "blur", "bias", "noise", "scale", "elastic")}
ABLATIONS: dict[str, dict] = {  # covariate drop-out stays as in tiny (on) in every row
    "augment: none": AUG_OFF,
    "augment: GMM only (= tiny)": {**AUG_OFF, "data.augment.gmm.enabled": True},
    "augment: blur+noise+bias": {**AUG_OFF, **{f"data.augment.{k}.enabled": True for k in ("blur", "noise", "bias")}},
    "augment: GMM+blur+noise+bias": {**AUG_OFF, **{f"data.augment.{k}.enabled": True
                                                  for k in ("gmm", "blur", "noise", "bias")}},
    "no input standardization": {"data.standardize": "none"},
    "block: thesis (fig. 25-27; 1 head; Ho's up path)": {"model.attention_block": "thesis", "model.attention_heads": 1,
                                                        "model.up_path": "ho"},
    "no self-attention": {"model.self_attention": False},
    "no AdaDM": {"model.adadm": False},
    "no covariates": {"model.covariates": False},
}


def _fmt(v, w=8, d=3) -> str:
    return f"{v:{w}.{d}f}" if isinstance(v, (int, float)) else f"{'–':>{w}}"


def print_table(table: dict, title: str) -> None:
    if "skipped" in table:
        print(f"\n{title}: skipped ({table['skipped']})")
        return
    print(f"\n{title} ({table['n_subjects']} subjects)")
    rows = {**{f"baseline: {k}": v for k, v in table["baselines"].items()}, "model (U-net)": table["model"]}
    if table.get("gan"):
        rows["model (GAN)"] = table["gan"]
    print(f"{'method':36} {'brain PSNR':>11} {'brain SSIM':>11} {'HFEN':>8} {'DICE':>7}")
    for name, m in rows.items():
        print(f"{name:36} {_fmt(m.get('brain_psnr'), 11, 2)} {_fmt(m.get('brain_ssim'), 11)} "
              f"{_fmt(m.get('hfen'))} {_fmt(m.get('dice'), 7)}")
    best = table["best_baseline"]
    print(f"model - best realizable baseline ({best['name']}): "
          + ", ".join(f"{k} {v:+.3f}" for k, v in table["model_minus_best_baseline"].items() if v is not None))
    if "model_minus_oracle" in table:
        print("model - oracle histogram matching (the detail it adds): "
              + ", ".join(f"{k} {v:+.3f}" for k, v in table["model_minus_oracle"].items() if v is not None))
    for group, sub in table.get("groups", {}).items():
        interp = max(("trilinear", "bspline", "t3_input"), key=lambda b: sub["baselines"][b]["brain_psnr"])
        m, b = sub["model"], sub["baselines"]
        print(f"  {group:10} model - best interpolation ({interp}): brain PSNR "
              f"{m['brain_psnr'] - b[interp]['brain_psnr']:+.2f} dB, brain SSIM "
              f"{m['brain_ssim'] - b[interp]['brain_ssim']:+.3f}; model - histmatch_population: "
              f"{m['brain_psnr'] - b['histmatch_population']['brain_psnr']:+.2f} dB; model - oracle: "
              f"{m['brain_psnr'] - b['histmatch_oracle']['brain_psnr']:+.2f} dB")


def margins(table: dict) -> dict:
    """The figures an ablation row shows: margins over the best realizable baseline (and per transfer brain)."""
    if "skipped" in table:
        return {}
    out = {"psnr_vs_best": table["model_minus_best_baseline"]["brain_psnr"],
           "ssim_vs_best": table["model_minus_best_baseline"]["brain_ssim"],
           "psnr_vs_oracle": table.get("model_minus_oracle", {}).get("brain_psnr")}
    for group, sub in table.get("groups", {}).items():
        m, b = sub["model"], sub["baselines"]
        interp = max(("trilinear", "bspline", "t3_input"), key=lambda k: b[k]["brain_psnr"])
        out[f"{group}_psnr_vs_interp"] = m["brain_psnr"] - b[interp]["brain_psnr"]
        out[f"{group}_ssim_vs_interp"] = m["brain_ssim"] - b[interp]["brain_ssim"]
        out[f"{group}_psnr_vs_histmatch"] = m["brain_psnr"] - b["histmatch_population"]["brain_psnr"]
    return out


def prepare_cohort(out: Path, jobs: int, subjects: int = 18) -> Path:
    """The benchmark's demo cohort (seed 0), preprocessed and packed under ``out``; returns the slice store."""
    from synth7t.pipeline_demo import N_TEST, build_cohort, prepare_store

    manifest = build_cohort(out, subjects, 0, progress=True, jobs=jobs)
    store = out / "slices"
    prepare_store(manifest, out / "work", store, out / "private", jobs=jobs, seed=0,
                  n_test=N_TEST["benchmark" if subjects >= 18 else "demo"], progress=True)
    return store


def run_ablation(out: Path, variants: list[str], minutes: float, jobs: int, steps: int | None = None,
                 subjects: int = 18) -> dict:
    from synth7t.evaluation.evaluate import evaluate, quality_table
    from synth7t.pipeline_demo import SCORE_TTA, train_model, transfer_scores
    from variants import training_budget

    store = prepare_cohort(out, jobs, subjects)
    results = {}
    for name in variants:
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        folder = out / "ablation" / slug
        t = time.perf_counter()
        budget = training_budget(minutes, steps)  # steps: rows stay comparable when other jobs share the machine
        model = train_model(store, folder, {**budget, **ABLATIONS[name]}, progress=True)
        evaluate(model, store, folder / "report", segmentation="none", progress=True, tta=SCORE_TTA)
        held = quality_table(folder / "report")
        transfer = transfer_scores(out / "transfer", model, store, jobs=jobs, segmentation="none", progress=True)
        params = json.loads((model / "config.json").read_text()).get("parameters")
        results[name] = {"held_out": margins(held), "transfer": margins(transfer), "parameters": params,
                         "minutes": round((time.perf_counter() - t) / 60, 1)}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        (out / "ablation.json").write_text(json.dumps(results, indent=1))  # after every variant: a partial table
    return results


def print_ablation(results: dict) -> None:
    brains = sorted({k.split("_")[0] for r in results.values() for k in r["transfer"] if "_psnr" in k})
    head = f"{'variant':30} {'params':>8} {'held-out dPSNR':>14} {'dSSIM':>7}"
    for b in brains:
        head += f" {b + ' dPSNR interp/hist':>24}"
    print("\n" + head)
    for name, r in results.items():
        h, t = r["held_out"], r["transfer"]
        line = (f"{name:30} {r['parameters'] or 0:8d} {_fmt(h.get('psnr_vs_best'), 14, 2)} "
                f"{_fmt(h.get('ssim_vs_best'), 7)}")
        for b in brains:
            line += f" {_fmt(t.get(f'{b}_psnr_vs_interp'), 11, 2)} /{_fmt(t.get(f'{b}_psnr_vs_histmatch'), 11, 2)}"
        print(line)


def main() -> None:
    from synth7t.progress import setup_logging

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quality-run")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--ablation", action="store_true", help="train the ablation variants instead")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget of each (ablation) variant")
    p.add_argument("--steps", type=int, default=None, help="a step budget per (ablation) variant instead of --minutes")
    p.add_argument("--variants", nargs="*", default=None,
                   help="compare the issue 16 and 32 variants (optional names, space- or comma-separated; NAME@sN "
                        "trains variant NAME with trainer.seed N, for the run-to-run spread); with --ablation: "
                        "ablation names")
    from synth7t.pipeline_demo import BENCH_SUBJECTS

    p.add_argument("--subjects", type=int, default=18,
                   help=f"demo cohort size of --ablation/--variants (the main benchmark uses {BENCH_SUBJECTS})")
    p.add_argument("--no-transfer", action="store_true", help="--variants: skip the transfer set (smoke runs)")
    args = p.parse_args()
    setup_logging(0)
    t = time.perf_counter()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.ablation or args.variants is not None:
        import variants as issue16

        known = list(ABLATIONS) if args.ablation else issue16.known_variants()
        asked = ",".join(args.variants or [])
        variants = [v.strip() for v in (asked or ",".join(known)).split(",") if v.strip()]
        unknown = [v for v in variants if (v if args.ablation else issue16.split_seed(v)[0]) not in known]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {known}")
    if not args.ablation and args.variants is not None:
        out = Path(args.out)
        store = prepare_cohort(out, args.jobs, args.subjects)
        res = issue16.run_variants(out, store, variants, args.minutes, jobs=args.jobs, transfer=not args.no_transfer,
                                   steps=args.steps)
        print(f"\nmachine: {machine}; total {(time.perf_counter() - t) / 60:.1f} min\n")
        print(issue16.markdown_table(res, args.minutes, args.steps))
        return
    if args.ablation:
        res = run_ablation(Path(args.out), variants, args.minutes, args.jobs, args.steps, args.subjects)
        budget = f"{args.steps} steps" if args.steps else f"{args.minutes} min"
        print(f"\nmachine: {machine}; total {(time.perf_counter() - t) / 60:.1f} min; {budget} per variant")
        print_ablation(res)
        return
    from synth7t.pipeline_demo import run_demo

    res = run_demo(args.out, seed=0, jobs=args.jobs, benchmark=True)
    print(f"\nmachine: {machine}; total {(time.perf_counter() - t) / 60:.1f} min; stages (s): {res['timings_s']}")
    print_table(res["quality"], "held-out demo subjects")
    print_table(res["quality"]["transfer"], "transfer set (unseen anatomy and 3T physics)")


if __name__ == "__main__":
    main()
