"""Multi-view sample cost: coronal and sagittal windows read from the axial-first slice store (``data.views``).

Writes a synthetic slice store of realistic size (``--subjects`` subjects of Z x H x W = 208 x 224 x 288, float16
t3/t7 and a uint8 mask, as ``synth7t pack`` lays them out: axial slices first), then, per view:

* the time of one training sample (``SliceDataset.__getitem__`` with ``histmatch`` standardization as ``tiny``,
  plus its 96-pixel patch as ``tiny`` trains), median over ``--samples`` random samples;
* the loader's time for one ``tiny`` batch (16 such samples, 0 workers as the preset) against one ``tiny`` training
  step of the network (forward, L1, backward, Adam at 16 x 3 x 96 x 96; bf16 autocast where ``precision: auto``
  would train in bf16 on this CPU): the step-time increase of reading that view instead of axial slices;
* the anonymous memory (RssAnon) growth and the peak RSS over the samples: memmapped pages are file-backed page
  cache (RssFile), reclaimable, and not counted as growth.

The files are in the page cache after writing (warm reads); cold reads (first touch of a volume from disk) are not
measured: a coronal window touches every page of the subject's arrays (each row of the stack gives S values), an
axial one only its S slices.

Run: ``python benchmarks/views.py [--subjects 4] [--samples 200]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (208, 224, 288)  # (Z, H, W): a 0.65 mm brain box packed to the multiple 32 in-plane


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_store(root: Path, n: int) -> Path:
    from synth7t.dataset.cropnorm import make_geometry
    from synth7t.dataset.pack import _write_meta

    z, h, w = SHAPE
    zz, hh, ww = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in SHAPE], indexing="ij")
    brain = (zz**2 / 0.8 + hh**2 / 0.9 + ww**2 / 0.95) < 1
    subjects = {}
    for i in range(n):
        name = f"s{i:03d}"
        (root / name).mkdir(parents=True)
        rng = np.random.default_rng(i)
        for kind in ("t3", "t7", "mask"):
            dtype = np.uint8 if kind == "mask" else np.float16
            arr = np.lib.format.open_memmap(root / name / f"{kind}.npy", mode="w+", dtype=dtype, shape=SHAPE)
            for k in range(0, z, 16):
                b = brain[k:k + 16]
                arr[k:k + 16] = b if kind == "mask" else b * (0.3 + 0.6 * rng.random(b.shape, np.float32))
            arr.flush()
            del arr
        geom = make_geometry((h, w, z), ((0, h), (0, w), (0, z)), (h, w), 32)
        areas = brain.sum((1, 2))
        subjects[name] = {"geometry": geom.to_dict(), "shape": list(SHAPE), "has_t7": True,
                          "limits": {"t3": [0.0, 1.0], "t7": [0.0, 1.0]},
                          "valid_slices": np.flatnonzero(areas > 0.01 * areas.max()).tolist(),
                          "z_mid": (z - 1) / 2, "age": 70, "sex": "F", "group": None, "gmm_t3": None}
    opts = {"split": (n, 0, 0), "seed": 0, "stratify": False, "lower_pct": 1.0, "upper_pct": 99.0}
    _write_meta(root, subjects, {}, (h, w), opts, "synthetic")
    return root


def sample_times(store: Path, view: str, n: int, seed: int = 0) -> dict:
    """Median seconds of a sample and of its 96-pixel patch, and the memory over ``n`` samples."""
    from synth7t.dataset.slices import SliceDataset, SliceStore
    from synth7t.training.data import random_patch

    st = SliceStore(store)
    ds = SliceDataset(st, "train", views=(view,), standardize=st.target_quantiles("train"), multiple=32, min_size=96)
    rng = np.random.default_rng(seed)
    idx = rng.integers(len(ds), size=n)
    ds[int(idx[0])]  # builds the subject's look-up table once, as the first epoch does
    anon0 = _status_mib("RssAnon")
    times = []
    for i in idx:
        t = time.perf_counter()
        random_patch(ds[int(i)], 96, rng, 8)
        times.append(time.perf_counter() - t)
    return {"view": view, "samples": len(ds), "shape": list(ds.shape) if ds.shape else list(st.hw),
            "sample_ms": 1e3 * statistics.median(times), "sample_ms_p90": 1e3 * float(np.percentile(times, 90)),
            "anon_growth_mib": _status_mib("RssAnon") - anon0, "rss_file_mib": _status_mib("RssFile"),
            "peak_rss_mib": _status_mib("VmHWM")}


def step_seconds(repeats: int = 5) -> float:
    """Median seconds of one tiny training step at batch 16 x 3 x 96 x 96 (no perceptual loss)."""
    import torch

    from synth7t.config import load_config
    from synth7t.devices import cpu_has_native_bf16
    from synth7t.nn import build_generator

    cfg = load_config("tiny")
    net = build_generator(cfg.model.model_dump(mode="json"))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y, c = torch.rand(16, 3, 96, 96), torch.rand(16, 1, 96, 96), torch.zeros(16, 7)
    bf16 = cpu_has_native_bf16()  # the precision `trainer.precision: auto` trains in here
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (net(x, c) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="synth7t-views-") as tmp:
        store = write_store(Path(tmp) / "store", args.subjects)
        rows = [sample_times(store, v, args.samples) for v in ("axial", "coronal", "sagittal")]
    step = step_seconds()
    base = rows[0]["sample_ms"] * args.batch / 1e3
    for r in rows:
        batch = r["sample_ms"] * args.batch / 1e3
        r["batch_s"] = batch
        r["step_increase_pct"] = 100 * (batch - base) / (step + base)
    print(json.dumps({"store_shape": SHAPE, "subjects": args.subjects, "tiny_step_s": step, "views": rows}, indent=1))
    print(f"\ntiny training step (16 x 3 x 96 x 96): {step:.3f} s")
    print("| view | sample (ms, median / p90) | loader per batch of 16 (s) | step time vs axial | RssAnon growth (MiB) "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['view']} | {r['sample_ms']:.2f} / {r['sample_ms_p90']:.2f} | {r['batch_s']:.3f} | "
              f"{r['step_increase_pct']:+.1f} % | {r['anon_growth_mib']:.1f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
