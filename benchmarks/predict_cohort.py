"""Scans per hour and peak RAM of ``synth7t predict`` on a cohort of real heads: pipelined vs one after another.

The cohort is the real heads of ``../shared/data/heads`` (``$SYNTH7T_SHARED_DATA/heads``; see SOURCES.md there;
the benchmark says so and stops where the folder is absent or holds fewer than 8 heads). The model is an untrained
network of ``--preset`` built as ``benchmarks/predict.py`` builds it (its output is meaningless; its cost is a
trained one's). Both modes run in the same invocation, on the same heads, with the same model and settings, each in
its own subprocess (so that peak RSS is its own):

* ``sequential``: ``--workers 0``, every scan loaded, preprocessed and predicted in one process, one after another;
* ``pipelined``: ``--workers W``: the next scans are preprocessed in W worker processes while the network predicts
  the current one (:mod:`synth7t.inference.prefetch`).

Printed: wall seconds, scans/hour, the ratio pipelined / sequential, peak RSS of the main process and the largest
of its workers (``ru_maxrss`` of self and children; their sum bounds the total), and how far the two modes'
synthetic images differ (they need not be equal: N4's result depends on ITK's thread count at float rounding, and
a worker has fewer threads). Times are medians over ``--repeats``; modes alternate in order.

    python benchmarks/predict_cohort.py                              # all heads, N4 3t + deepbet, tiny network
    python benchmarks/predict_cohort.py --limit 8 --n4 demo          # quicker: the demo N4 preset (still N4)
    python benchmarks/predict_cohort.py --preset biofinder --workers 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MIN_HEADS = 8


def heads_folder() -> Path:
    env = os.environ.get("SYNTH7T_SHARED_DATA")
    return (Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data") / "heads"


def child(args) -> None:
    import torch

    from synth7t.inference import PredictOptions, predict

    torch.set_num_threads(args.threads)
    heads = json.loads(args.heads)
    opts = PredictOptions(n4=args.n4, skullstrip=args.skullstrip, workers=args.child_workers, device=args.device,
                          overwrite=True)
    t = time.perf_counter()
    res = predict(args.model, heads, args.out, opts, progress=False)
    wall = time.perf_counter() - t
    print("RESULT " + json.dumps({
        "seconds": wall, "done": len(res.done), "failed": res.failed,
        "self_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "children_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))


def run(args, mode: str, model: str, heads: list[str], out: Path) -> dict:
    workers = 0 if mode == "sequential" else args.workers
    cmd = [sys.executable, __file__, "--child", mode, "--model", model, "--heads", json.dumps(heads), "--out",
           str(out), "--child-workers", str(workers), "--threads", str(args.threads), "--n4", args.n4,
           "--skullstrip", args.skullstrip, "--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def differences(a: Path, b: Path) -> dict:
    """How far the two modes' synthetic images differ: max |difference|, fraction of brain voxels differing by
    more than 1e-3, and mask voxels that differ (over all scans)."""
    import numpy as np

    from synth7t.io import load_volume

    worst, over, total, mask_diff = 0.0, 0, 0, 0
    for f in sorted(a.glob("*/syn7t.nii.gz")):
        x, y = load_volume(f).data, load_volume(b / f.parent.name / f.name).data
        mx, my = (load_volume(d / f.parent.name / "mask.nii.gz").data > 0 for d in (a, b))
        if x.shape != y.shape:
            return {"max": float("inf"), "fraction_over_1e-3": 1.0, "mask_voxels": -1}
        worst = max(worst, float(np.abs(x - y).max()))
        over += int((np.abs(x - y) > 1e-3).sum())
        total += int((mx | my).sum())
        mask_diff += int((mx != my).sum())
    return {"max": worst, "fraction_over_1e-3": over / max(total, 1), "mask_voxels": mask_diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="Use the first N heads (sorted by name; at least 8).")
    p.add_argument("--preset", default="tiny", choices=["tiny", "biofinder", "unc", "gan"])
    p.add_argument("--workers", type=int, default=1, help="Workers of the pipelined mode.")
    p.add_argument("--n4", default="3t", help="N4 preset (3t, demo) or none.")
    p.add_argument("--skullstrip", default="deepbet")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for hidden in ("--model", "--heads", "--out"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    folder = heads_folder()
    heads = sorted(str(f) for f in folder.glob("*.nii*")) if folder.is_dir() else []
    heads = heads[: args.limit] if args.limit else heads
    if len(heads) < MIN_HEADS:
        print(f"skipped: needs >= {MIN_HEADS} real heads in {folder} (found {len(heads)}); see "
              "../shared/data/SOURCES.md, or set SYNTH7T_SHARED_DATA")
        return
    from predict import _model_folder

    print(f"loadavg at start: {os.getloadavg()[0]:.2f} (machine cores: {os.cpu_count()}, usable "
          f"{len(os.sched_getaffinity(0))}); main process {args.threads} torch threads; OMP_WAIT_POLICY=PASSIVE")
    print(f"{len(heads)} heads from {folder}; preprocessing: N4 {args.n4}, skull strip {args.skullstrip}; "
          f"network: untrained {args.preset} on {args.device}")
    rows: dict[str, list[dict]] = {"sequential": [], "pipelined": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = _model_folder(args.preset, "ours", str(Path(tmp) / "model"))
        from synth7t.inference import Predictor

        params = sum(p.numel() for p in Predictor(model, "cpu").net.parameters())
        print(f"network parameters: {params / 1e6:.2f} M")
        for r in range(args.repeats):
            order = ["sequential", "pipelined"] if r % 2 == 0 else ["pipelined", "sequential"]
            for mode in order:
                res = run(args, mode, model, heads, Path(tmp) / mode)
                rows[mode].append(res)
                print(f"  repeat {r + 1} {mode:10}: {res['seconds']:7.1f} s, {res['done']} done, "
                      f"{len(res['failed'])} failed", flush=True)
        diff = differences(Path(tmp) / "sequential", Path(tmp) / "pipelined")
    print(f"\n{'mode':10} {'workers':>7} {'wall s':>8} {'scans/h':>8} {'main GB':>8} {'worker GB':>9}")
    summary = {}
    for mode, res in rows.items():
        secs = statistics.median(r["seconds"] for r in res)
        done = res[0]["done"]
        summary[mode] = {"seconds": secs, "scans_per_hour": done * 3600 / secs, "done": done,
                         "main_gb": max(r["self_gb"] for r in res), "worker_gb": max(r["children_gb"] for r in res)}
        s = summary[mode]
        print(f"{mode:10} {0 if mode == 'sequential' else args.workers:7d} {secs:8.1f} {s['scans_per_hour']:8.1f} "
              f"{s['main_gb']:8.2f} {s['worker_gb']:9.2f}")
    ratio = summary["pipelined"]["scans_per_hour"] / summary["sequential"]["scans_per_hour"]
    print(f"pipelined / sequential throughput: {ratio:.2f}x")
    print(f"synthetic images, pipelined vs sequential: max |difference| {diff['max']:.3g}, "
          f"{100 * diff['fraction_over_1e-3']:.3f} % of brain voxels differ by > 1e-3, {diff['mask_voxels']} mask "
          "voxels differ (ITK's N4 sums per thread: a worker's thread count changes it at float rounding)")
    for mode, res in rows.items():
        for path, reason in res[0]["failed"].items():
            print(f"  failed ({mode}): {Path(path).name}: {reason}")
    print(f"loadavg at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "ratio": ratio, "max_difference": diff, "runs": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
