"""Proxy quality benchmark (issue: "synthesis quality you can trust").

Builds the demo cohort with a fixed seed (18 subjects: 12 train, 1 validation, 4 held-out test after QC rejects
the motion-corrupted one), preprocesses, packs, trains the ``tiny`` preset and its WGAN-GP variant for the same
fixed budget, predicts and evaluates the held-out subjects, and prints, for the model, the GAN and each baseline
(3T input, trilinear, B-spline from 1 mm), the brain PSNR, brain SSIM (3-D), HFEN and tissue DICE, with the
model - best-baseline differences. Same as ``synth7t demo --benchmark --out DIR`` (which also writes
``DIR/quality.json``); everything resumes if interrupted.

    python benchmarks/quality.py [--out quality-run] [--jobs 2]
"""

from __future__ import annotations

import argparse
import platform
import time


def print_table(table: dict) -> None:
    rows = {**{f"baseline: {k}": v for k, v in table["baselines"].items()}, "model (U-net)": table["model"]}
    if table.get("gan"):
        rows["model (GAN)"] = table["gan"]
    keys = ("psnr_brain", "ssim_brain", "hfen", "dice")
    print(f"{'method':26} {'brain PSNR':>11} {'brain SSIM':>11} {'HFEN':>8} {'DICE':>7}")
    for name, m in rows.items():
        print(f"{name:26} " + " ".join(f"{(m.get(k) if m.get(k) is not None else float('nan')):{w}.4f}"
                                      for k, w in zip(keys, (11, 11, 8, 7), strict=True)))
    best = table["best_baseline"]
    print(f"\nmodel - best baseline ({best['name']}): "
          + ", ".join(f"{k} {table['model'][k] - best[k]:+.4f}" for k in keys if table['model'].get(k) is not None))
    print(f"held-out subjects: {table['n_subjects']}")


def main() -> None:
    from synth7t.pipeline_demo import run_demo
    from synth7t.progress import setup_logging

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quality-run")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    setup_logging(0)
    t = time.perf_counter()
    res = run_demo(args.out, seed=0, jobs=args.jobs, benchmark=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
          f"total {(time.perf_counter() - t) / 60:.1f} min; stages (s): {res['timings_s']}")
    print_table(res["quality"])


if __name__ == "__main__":
    main()
