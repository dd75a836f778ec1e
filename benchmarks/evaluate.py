"""Benchmark of the evaluation stage at 0.65 mm (one subject ~ 288 x 244 x 222 voxels).

Prints, as medians of ``--repeats`` runs:
* ``compute_metrics`` (all 9 metrics, no segmentation): seconds per call; target <= 10 s per subject and
  method on 2 cores. Reference measured in the same run: one float32 ``scipy.ndimage.gaussian_filter`` of the
  volume (sigma 1.5), to express the metric cost in filter passes.
* ``compute_metrics_many`` for the 4 methods of one subject (the truth's filters are computed once).
* ``baseline_interpolations`` (1 mm simulation + trilinear + cubic B-spline back to 0.65 mm).
* Atropos segmentation of one brain (``--atropos-repeats`` runs, default 1: it is slow), on the MNI152 0.8 mm
  brain of ``../shared/data`` resampled to 0.65 mm when present, else on a synthetic three-tissue phantom.
* Peak resident memory of the process after each stage.

Usage: ``python benchmarks/evaluate.py [--repeats 3] [--atropos-repeats 1] [--no-atropos]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from synth7t.evaluation.baselines import baseline_interpolations
from synth7t.evaluation.metrics import compute_metrics, compute_metrics_many
from synth7t.evaluation.segmentation import segment_atropos
from synth7t.io import Volume, load_volume

SHAPE = (288, 244, 222)
ZOOM = 0.65
TARGET_S = 10.0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return (field - field.mean()) / field.std()


def synthetic_subject(seed: int = 0):
    """A 7T-like brain in raw units, a prediction in [0, 1] units (truth + smooth error), an ellipsoid mask."""
    rng = np.random.default_rng(seed)
    g = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    mask = sum(((gi - n / 2) / (0.42 * n)) ** 2 for gi, n in zip(g, SHAPE, strict=True)) < 1
    tissue = 300 + 60 * smooth_field(rng, SHAPE, 3) + 20 * smooth_field(rng, SHAPE, 1)
    truth = np.where(mask, tissue, 0).astype(np.float32)
    lo, hi = np.percentile(truth[mask], [1, 99])
    pred = np.clip((truth - lo) / (hi - lo) + 0.05 * smooth_field(rng, SHAPE, 1.5), 0, 1)
    return truth, np.where(mask, pred, 0).astype(np.float32), mask


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def brain_for_atropos() -> tuple[Volume, np.ndarray, str]:
    root = Path(os.environ.get("SYNTH7T_SHARED_DATA", Path(__file__).resolve().parents[1] / "../shared/data"))
    src = root / "highres" / "hcp_MNI152_T1_0.8mm_brain.nii.gz"
    if src.exists():
        vol = load_volume(src)
        data = ndimage.zoom(vol.data, vol.zooms / ZOOM, order=1)
        mask = data > 0.05 * data.max()
        return Volume(data, np.diag([ZOOM, ZOOM, ZOOM, 1.0])), mask, f"MNI152 0.8 mm brain -> {data.shape} at 0.65 mm"
    rng = np.random.default_rng(1)
    g = np.indices(SHAPE, dtype=np.float32)
    r = np.sqrt(sum(((gi - n / 2) / (0.42 * n)) ** 2 for gi, n in zip(g, SHAPE, strict=True)))
    labels = np.select([r < 0.5, r < 0.85, r < 1], [3, 2, 1], 0)
    data = np.array([0, 0.15, 0.5, 0.9], np.float32)[labels] + 0.03 * rng.standard_normal(SHAPE, dtype=np.float32)
    return Volume(data, np.diag([ZOOM, ZOOM, ZOOM, 1.0])), labels > 0, f"synthetic phantom {SHAPE}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--atropos-repeats", type=int, default=1)
    ap.add_argument("--no-atropos", action="store_true")
    args = ap.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}, volume {SHAPE} at {ZOOM} mm")
    truth, pred, mask = synthetic_subject()

    ref, _ = median_time(lambda: ndimage.gaussian_filter(pred, 1.5, truncate=3.5), args.repeats)
    print(f"reference: one float32 gaussian_filter(sigma 1.5): {ref:.2f} s (median of {args.repeats})")

    metrics = {}
    t, times = median_time(lambda: metrics.update(compute_metrics(truth, pred, mask, min_slice=30)), args.repeats)
    print(
        f"compute_metrics: {t:.2f} s per call (median of {args.repeats}: {', '.join(f'{x:.2f}' for x in times)}); "
        f"{t / ref:.1f} filter passes; target <= {TARGET_S:.0f} s: {'met' if t <= TARGET_S else 'NOT met'}"
    )
    print("  values:", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    print(f"  peak RSS so far: {peak_rss_gb():.2f} GB")

    preds = {"model": pred, "t3_input": np.clip(pred * 0.9, 0, 1), "trilinear": pred * 0.95, "bspline": pred * 1.02}
    t_many, _ = median_time(lambda: compute_metrics_many(truth, preds, mask, min_slice=30), args.repeats)
    print(
        f"compute_metrics_many (4 methods of one subject, truth filtered once): {t_many:.2f} s "
        f"(median of {args.repeats}) = {t_many / 4:.2f} s per method; vs 4 x compute_metrics: {t_many / (4 * t):.2f}x"
    )
    t, _ = median_time(lambda: baseline_interpolations(pred, (ZOOM,) * 3, (1, 1, 1), mask=mask), args.repeats)
    print(f"baseline_interpolations (1 mm -> trilinear + B-spline): {t:.2f} s (median of {args.repeats})")
    print(f"  one subject without segmentation (compute_metrics_many + baselines): ~{t_many + t:.1f} s")
    print(f"  peak RSS so far: {peak_rss_gb():.2f} GB")

    if not args.no_atropos:
        vol, bmask, what = brain_for_atropos()
        t, times = median_time(lambda: segment_atropos(vol, bmask), args.atropos_repeats)
        print(
            f"Atropos 3-class (Otsu init, 1 EM step, no MRF) on {what}, {int(bmask.sum())} brain voxels: "
            f"{t:.1f} s (median of {args.atropos_repeats}); a subject needs 5 segmentations "
            f"(7T, model, 3 baselines) -> ~{5 * t:.0f} s"
        )
        print(f"  peak RSS so far: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
