"""Seconds and peak RAM to predict one 0.65 mm brain, per preset and precision, beside MONAI's network.

Reference: MONAI's ``DiffusionModelUNet`` configured like each preset (fixed timestep, as the thesis code used
it), timed on forward passes of 4 slices of 3 x 288 x 256 in the same run and scaled to the volume's slice count
(its whole-volume run would take ~10 min at the biofinder config). Ours runs the real ``synth7t.inference``
path (``Predictor.predict_stack``: batching, context, reassembly) on a 222 x 288 x 256 stack (the thesis' brain
crop, 244 padded to 256). Each configuration runs in its own subprocess so that peak RAM (ru_maxrss) is its own.
Preprocessing (N4 3t preset + deepbet) of a 1 mm head is timed separately.

    python benchmarks/predict.py            # tiny + biofinder, fp32 and bf16, 2 threads
    python benchmarks/predict.py --full     # also unc
    python benchmarks/predict.py --quick    # tiny only

Targets: biofinder >= 3x faster than MONAI's network at equal precision; tiny <= 30 s per volume.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

STACK = (222, 288, 256)  # (Z, H, W)


def ours(preset: str, precision: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from synth7t.config import load_config
    from synth7t.inference import Predictor
    from synth7t.nn import UNet
    from synth7t.training import model_config, save_model_folder

    cfg = load_config(preset)
    torch.manual_seed(0)
    net = UNet(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_model_folder(Path(tmp), state, model_config(cfg, None, net), {}, "benchmark model\n")
        pred = Predictor(tmp, "cpu", "32" if precision == "fp32" else "bf16")
        stack = np.random.default_rng(0).random(STACK, dtype=np.float32)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            pred.predict_stack(stack, batch_size=8)
            times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "repeats": repeats}


def monai(preset: str, precision: str, repeats: int) -> dict:
    import torch

    from train_step import build

    model, forward, channels_last = build("monai", preset, 3, False)
    model.eval()
    x = torch.rand(4, 3, STACK[1], STACK[2])
    c = torch.zeros(4, 7)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        forward(x, c)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            forward(x, c)
            times.append(time.perf_counter() - t)
    per_batch = statistics.median(times)
    return {"seconds": per_batch * STACK[0] / 4, "per_batch": per_batch, "repeats": repeats}


def preprocessing() -> dict:
    from synth7t.demo import load_template
    from synth7t.preprocess.bias import n4
    from synth7t.preprocess.register import resample_to
    from synth7t.preprocess.skullstrip import strip

    head = resample_to(load_template(), 1.0)
    head = head.with_data(head.data * 1000 + 20)  # non-zero background, as in a head scan
    t = time.perf_counter()
    corrected = n4(head, "3t")
    t_n4 = time.perf_counter() - t
    t = time.perf_counter()
    strip(corrected, "deepbet")
    return {"n4_3t": t_n4, "deepbet": time.perf_counter() - t}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn = {"ours": ours, "monai": monai}.get(args.impl)
    res = preprocessing() if args.impl == "preprocess" else fn(args.preset, args.precision, args.repeats)
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps(res))


def run(impl: str, preset: str, precision: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--preset", preset, "--precision", precision,
           "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"{impl} {preset} {precision} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full", action="store_true")
    args = p.parse_args()
    if args.child:
        args.impl = args.child
        child(args)
        return
    presets = ["tiny"] if args.quick else ["tiny", "biofinder"] + (["unc"] if args.full else [])
    pre = run("preprocess", "tiny", "fp32", 1, args.threads)
    print(f"preprocessing of a 1 mm head (separate from the network): N4 3t {pre['n4_3t']:.1f} s, "
          f"deepbet {pre['deepbet']:.1f} s, peak RSS {pre['peak_rss_gb']:.2f} GB")
    print(f"\nper volume of {STACK[0]} slices {STACK[1]}x{STACK[2]}, {args.threads} threads, median of repeats")
    head = ("preset", "precision", "ours s", "MONAI s", "MONAI/ours", "ours GB", "MONAI GB")
    print("{:10} {:9} {:>8} {:>9} {:>10} {:>8} {:>9}".format(*head))
    for preset in presets:
        reps = 3 if preset == "tiny" else 1
        for precision in ("fp32", "bf16"):
            a = run("ours", preset, precision, reps, args.threads)
            b = run("monai", preset, precision, 2, args.threads)
            ratio = b["seconds"] / a["seconds"]
            print(f"{preset:10} {precision:9} {a['seconds']:8.1f} {b['seconds']:9.1f} {ratio:10.2f}"
                  f" {a['peak_rss_gb']:8.2f} {b['peak_rss_gb']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
