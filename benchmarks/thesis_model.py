"""Speed and memory of the thesis authors' published network (``synth7t import-thesis``) at its published size.

The network is built at the published U-net's settings (``params_no_diag.txt``: 256 channels, multipliers
(1, 2, 2, 2), 3 residual blocks, attention at down-sampling factors 4 and 8, 64 groups; 244 M parameters after
folding the time embedding) with random weights, written as an imported model folder on a synthetic template grid
of the published shape (288 x 244 x 222, slices along axis 1: 288 x 222, padded to 288 x 224), and run through the
real prediction path (``synth7t.inference.template.run_windows``: windows, covariate tokens, padding, reassembly)
on a synthetic normalized brain.

Per precision, in a subprocess of its own (so that its peak RSS, ``ru_maxrss``, is its own):

* ``fp32``: float32 weights and activations;
* ``bf16-autocast``: float32 weights, bf16 autocast (what ``--precision auto`` picks where bf16 is faster);
* ``bf16-weights``: the weights themselves in bf16 (``--precision bf16`` on a CPU: half the weights' memory).

A brain is 242 windows (244 slices, 3 a window). On a CPU the script times ``--windows`` windows (default 4, in
batches of ``--batch``) and scales to the brain (every window costs the same: the network is fully convolutional
at a fixed size); ``--full`` runs the whole brain. Times are the median over the timed batches (after one
warm-up batch). FLOPs are counted (torch ``FlopCounterMode`` on the meta device), and this machine's dense matmul
rate at the same precision is measured in the same subprocess, right before: the "achieved fraction of peak" is
counted FLOPs / time / that rate. On CUDA (when present) the whole brain is timed in bf16 autocast, with the peak
VRAM.

    python benchmarks/thesis_model.py                       # CPU: fp32, bf16-autocast, bf16-weights; 4 windows
    python benchmarks/thesis_model.py --precisions fp32 --windows 8
    python benchmarks/thesis_model.py --full                # the whole brain on the CPU (hours on 2 cores)
    python benchmarks/thesis_model.py --cuda                # the whole brain on a GPU

Targets (issue 30, reported here, never asserted by a test): >= 70 % of the CPU's bf16 matmul peak over the whole
brain; peak RSS <= 6 GB; a GPU brain in <= 30 s.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE_SHAPE = (288, 244, 222)
SLICE_DIM = 1
PUBLISHED = {"n_channels": 256, "num_groups": 64, "use_mid_attention": True, "n_res_block": 3,
             "channel_mult": (1, 2, 2, 2), "attention_res": [4, 8], "n_in_slices": 3,
             "conditions": ["Sex", "Age", "position"], "c_dim": 1, "n_slices": 244, "slice_dim": 1,
             "slice_size": (288, 222), "use_initial_down": False, "use_ada": True, "use_spatial_transformer": True,
             "train_size": 123, "test_size": 13}


def _model_folder(tmp: Path) -> Path:
    """An imported-model folder of the published size with random weights (no authors' file is needed)."""
    import numpy as np
    import torch

    from synth7t.io import Volume, save_volume
    from synth7t.model_folder import save_model_folder
    from synth7t.nn.published import PublishedUNet
    from synth7t.thesis import TEMPLATE_FILES, TEMPLATE_SPACE, published_config, published_model_config

    cfg = published_config(PUBLISHED)
    torch.manual_seed(0)
    net = PublishedUNet(cfg)
    with torch.no_grad():  # the head and the transformers' outputs are not zero in trained weights
        for p in net.parameters():
            if p.ndim > 1 and float(p.abs().max()) == 0:
                p.normal_(0, 0.02)
    aff = np.diag([0.65, 0.65, 0.65, 1.0])
    template = save_volume(tmp / "t7.nii.gz", Volume(np.zeros(TEMPLATE_SHAPE, np.float32), aff))
    record = {"name": TEMPLATE_SPACE, "file": TEMPLATE_FILES["template_7t"], "shape": list(TEMPLATE_SHAPE),
              "affine": aff.tolist(), "slice_dim": SLICE_DIM, "voxel_size_mm": [0.65] * 3, "template_3t": None,
              "affine_file": None}
    source = {"file": "random", "sha256": "", "bytes": 0, "published": None, "params": PUBLISHED}
    config = published_model_config(cfg, record, source)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    return save_model_folder(tmp / "model", state, config, {}, "benchmark model\n",
                             extra_files={TEMPLATE_FILES["template_7t"]: template})


def _brain():
    """A synthetic brain on the template grid: an ellipsoid of smooth texture, normalized as prediction does."""
    import numpy as np

    from synth7t.dataset.template_store import normalize_published

    idx = np.ogrid[tuple(slice(0, s) for s in TEMPLATE_SHAPE)]
    c = [(s - 1) / 2 for s in TEMPLATE_SHAPE]
    d = sum(((i - ci) / (0.42 * s)) ** 2 for i, ci, s in zip(idx, c, TEMPLATE_SHAPE, strict=True))
    rng = np.random.default_rng(0)
    data = np.where(d < 1, 100 + 20 * rng.standard_normal(TEMPLATE_SHAPE), 0).astype(np.float32)
    normed, _ = normalize_published(data)
    return normed, data > 0


def run_one(precision: str, windows: int | None, batch: int, device: str) -> dict:
    """Time ``windows`` windows (None: the whole brain) at ``precision`` through the prediction path."""
    import numpy as np
    import torch

    from synth7t.inference import Predictor
    from synth7t.inference.template import run_windows
    from synth7t.nn.flops import matmul_rate, published_flops

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    peak = matmul_rate(dtype, device, seconds=1.5)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model_folder(Path(tmp))
        pred = Predictor(model, device, {"fp32": "32", "bf16-autocast": "auto", "bf16-weights": "bf16"}[precision])
        if precision == "bf16-autocast":  # force autocast whatever the probe in Predictor chose
            pred.dtype, pred.bf16_weights = torch.bfloat16, False
        vol, inside = _brain()
        n_windows = TEMPLATE_SHAPE[SLICE_DIM] - 2
        flops_window = published_flops(pred.net.cfg, (288, 222))
        cov = {"age": 70.0, "sex": "F", "diagnosis": None}
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        if windows is None:  # the whole brain, after a warm-up batch
            sub = np.moveaxis(vol, SLICE_DIM, 0)[: batch + 2]
            run_windows(pred, np.moveaxis(sub, 0, SLICE_DIM), np.moveaxis(np.ones_like(sub, bool), 0, SLICE_DIM),
                        cov, batch_size=batch)
            sync()
            t0 = time.perf_counter()
            out = run_windows(pred, vol, inside, cov, batch_size=batch, progress="windows")
            sync()
            brain_s = time.perf_counter() - t0
            per_window = brain_s / n_windows
            timed = n_windows
        else:  # batches of `batch` windows cut from the brain's middle: the first is the warm-up
            times = []
            mid = TEMPLATE_SHAPE[SLICE_DIM] // 2
            for k in range(windows // batch + 1):
                lo = mid - (windows // 2) + k * batch
                sub = np.moveaxis(vol, SLICE_DIM, 0)[lo:lo + batch + 2]
                msk = np.moveaxis(inside, SLICE_DIM, 0)[lo:lo + batch + 2]
                sync()
                t0 = time.perf_counter()
                out = run_windows(pred, np.moveaxis(sub, 0, SLICE_DIM), np.moveaxis(msk, 0, SLICE_DIM), cov,
                                  batch_size=batch)
                sync()
                if k:
                    times.append(time.perf_counter() - t0)
            per_window = statistics.median(times) / batch
            brain_s = per_window * n_windows
            timed = len(times) * batch
        assert np.isfinite(out).all()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vram = torch.cuda.max_memory_allocated() if device == "cuda" else None
    achieved = flops_window / per_window
    return {"precision": precision, "device": device, "windows_timed": timed, "batch": batch,
            "seconds_per_window": round(per_window, 3), "brain_seconds": round(brain_s, 1),
            "brain_minutes": round(brain_s / 60, 1), "brain_extrapolated": windows is not None,
            "tflop_per_window": round(flops_window / 1e12, 3),
            "pflop_per_brain": round(flops_window * n_windows / 1e15, 3),
            "achieved_gflops": round(achieved / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
            "fraction_of_peak": round(achieved / peak, 3), "peak_rss_gb": round(rss / 1e9, 2),
            "peak_vram_gb": None if vram is None else round(vram / 1e9, 2),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16-autocast", "bf16-weights"],
                    choices=["fp32", "bf16-autocast", "bf16-weights"])
    ap.add_argument("--windows", type=int, default=4, help="windows timed on the CPU (scaled to the brain)")
    ap.add_argument("--batch", type=int, default=2, help="windows per forward pass")
    ap.add_argument("--full", action="store_true", help="time the whole brain on the CPU")
    ap.add_argument("--cuda", action="store_true", help="time the whole brain on CUDA (bf16 autocast)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one precision in this process
    args = ap.parse_args()
    if args.one:
        device = "cuda" if args.cuda else "cpu"
        windows = None if (args.full or args.cuda) else args.windows
        print(json.dumps(run_one(args.one, windows, args.batch, device)))
        return
    import platform

    runs = [(p, False) for p in args.precisions] if not args.cuda else [("bf16-autocast", True)]
    results = []
    for precision, cuda in runs:
        cmd = [sys.executable, __file__, "--one", precision, "--windows", str(args.windows), "--batch",
               str(args.batch), *(["--full"] if args.full else []), *(["--cuda"] if cuda else [])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{precision}: failed\n{r.stderr[-2000:]}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"published thesis network, {TEMPLATE_SHAPE} template grid, {platform.processor() or platform.machine()}")
    head = ("precision", "device", "s/window", "brain min", "TFLOP/win", "GFLOP/s", "peak GFLOP/s", "of peak",
            "RSS GB", "VRAM GB")
    print(" | ".join(head))
    for r in results:
        print(" | ".join(str(x) for x in (r["precision"], r["device"], r["seconds_per_window"],
                                          f"{r['brain_minutes']}{' (scaled)' if r['brain_extrapolated'] else ''}",
                                          r["tflop_per_window"], r["achieved_gflops"], r["matmul_peak_gflops"],
                                          f"{100 * r['fraction_of_peak']:.0f} %", r["peak_rss_gb"], r["peak_vram_gb"])))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
