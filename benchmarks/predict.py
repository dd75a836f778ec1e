"""Seconds and peak RAM to predict one 0.65 mm brain: synth7t's U-nets vs the thesis network in MONAI.

One brain is the thesis' crop at 0.65 mm, 222 axial slices of 288 x 224 (thesis 3.1.3-3.1.4). Networks (see
``train_step.py``; all at the preset's settings, default ``biofinder``):

* ``ours``: the preset's network (thesis attention blocks, one head) through the real prediction path
  (``synth7t.inference.Predictor.predict_stack``: batching of 8 slices, context, reassembly), whole volume;
* ``light``: the same preset with synth7t's light attention blocks, same path, whole volume;
* ``MONAI thesis`` / ``MONAI tuned``: MONAI's ``DiffusionModelUNet`` built to the same structure, run as the thesis
  code ran it (its own attention, contiguous memory) / with fused SDPA attention and channels-last; timed on
  forward passes of 8 slices and scaled to the volume's 222 slices (a whole-volume run of ``MONAI thesis`` takes
  tens of minutes here).

Each (network, precision) runs in its own subprocess, so that peak RSS (``ru_maxrss``) is its own: for ours it
includes the volume, its prediction and the prediction path; for MONAI one batch. Precisions: fp32 and bf16
autocast. Times are medians of ``--repeats``. The script also measures this CPU's bf16 matmul throughput and
counts the network's FLOPs per slice, to say how far ``ours`` is from the 150 s aim (about 50 % of that peak).

    python benchmarks/predict.py                     # biofinder; fp32 and bf16; 2 repeats
    python benchmarks/predict.py --presets biofinder unc
    python benchmarks/predict.py --profile           # also: where the time of one bf16 batch goes (ours)
    python benchmarks/predict.py --preprocess        # also: N4 + deepbet of a 1 mm head (separate from the net)

Targets (issue 13): biofinder ``ours`` >= 2x ``MONAI tuned`` at equal precision, <= 300 s in bf16, less RAM.
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

STACK = (222, 288, 224)  # (Z, H, W): one 0.65 mm brain, the thesis' crop
BATCH = 8


def _model_folder(preset: str, impl: str, tmp: str) -> str:
    import torch

    from synth7t.config import load_config
    from synth7t.model_folder import save_model_folder
    from synth7t.nn import UNet
    from synth7t.training import model_config
    from train_step import unet_config

    cfg = load_config(preset)
    cfg = cfg.model_copy(update={"model": unet_config(preset, impl)})
    torch.manual_seed(0)
    net = UNet(cfg.model)
    for m in net.modules():  # untrained output projections are zero: give the benchmark a non-trivial network
        for name in ("proj_out", "proj", "out_conv"):
            layer = getattr(m, name, None)
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.normal_(layer.weight, std=0.02)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_model_folder(Path(tmp), state, model_config(cfg, None, net), {}, "benchmark model\n")
    return tmp


def ours(preset: str, impl: str, precision: str, repeats: int) -> dict:
    import numpy as np

    from synth7t.inference import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        pred = Predictor(_model_folder(preset, impl, tmp), "cpu", "32" if precision == "fp32" else "bf16")
        stack = np.random.default_rng(0).random(STACK, dtype=np.float32)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            pred.predict_stack(stack, batch_size=BATCH)
            times.append(time.perf_counter() - t)
        params = sum(p.numel() for p in pred.net.parameters())
    return {"seconds": statistics.median(times), "times": times, "params_m": params / 1e6}


def monai(preset: str, impl: str, precision: str, repeats: int) -> dict:
    import torch

    from synth7t.devices import keep_freed_memory
    from train_step import build

    keep_freed_memory()  # as synth7t's Predictor does on CPU: like with like
    model, forward, channels_last = build(impl, preset)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(memory_format=fmt)
    x = torch.rand(BATCH, 3, STACK[1], STACK[2]).contiguous(memory_format=fmt)
    c = torch.zeros(BATCH, 7)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        forward(x, c)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            forward(x, c)
            times.append(time.perf_counter() - t)
    per_batch = statistics.median(times)
    return {"seconds": per_batch * STACK[0] / BATCH, "per_batch": per_batch, "times": times,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def flops_per_slice(preset: str) -> float:
    """FLOPs of one bf16 forward of one slice of ``ours`` (matmuls and convolutions, as PyTorch counts them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from synth7t.nn import UNet
    from train_step import unet_config

    net = UNet(unet_config(preset, "ours")).eval()
    x = torch.rand(1, 3, STACK[1], STACK[2])
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        net(x, torch.zeros(1, 7))
    return float(counter.get_total_flops())


def matmul_peak() -> float:
    """This CPU's bf16 matmul throughput (FLOP/s) at the benchmark's thread count: 2048^3 products, best of 5."""
    import torch

    a, b = torch.randn(2048, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def profile(preset: str) -> str:
    """Where the time of one bf16 forward of a batch of 8 slices of ``ours`` goes (torch.profiler, by op)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from synth7t.nn import UNet
    from train_step import unet_config

    net = UNet(unet_config(preset, "ours")).eval().to(memory_format=torch.channels_last)
    x = torch.rand(BATCH, 3, STACK[1], STACK[2]).contiguous(memory_format=torch.channels_last)
    c = torch.zeros(BATCH, 7)

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(x, c)

    run()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


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
    if args.child == "preprocess":
        res = preprocessing()
    elif args.child == "facts":
        res = {"flops_per_slice": flops_per_slice(args.preset), "matmul_peak": matmul_peak()}
    elif args.child == "profile":
        print(profile(args.preset))
        res = {}
    elif args.child in ("ours", "light"):
        res = ours(args.preset, args.child, args.precision, args.repeats)
    else:
        res = monai(args.preset, args.child, args.precision, max(args.repeats, 2))
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(res))


def run(what: str, preset: str, precision: str, repeats: int, threads: int, passive: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--presets", preset, "--precision", precision,
           "--repeats", str(repeats), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if what == "profile":
        print(out.stdout.split("RESULT ")[0])
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        return {"error": (out.stderr.strip().splitlines() or [f"rc {out.returncode}"])[-1]}
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["biofinder"], choices=["tiny", "biofinder", "unc", "gan"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--impls", nargs="+", default=["ours", "light", "monai-thesis", "monai-tuned"],
                   choices=["ours", "light", "monai-thesis", "monai-tuned"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--preprocess", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (see train_step.py)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.preset = args.presets[0]
        child(args)
        return
    print(f"loadavg at start: {os.getloadavg()[0]:.2f} (machine cores: {os.cpu_count()}); {args.threads} threads"
          f"{'; OMP_WAIT_POLICY=PASSIVE' if args.omp_passive else ''}")
    if args.preprocess:
        pre = run("preprocess", "tiny", "fp32", 1, args.threads)
        print(f"preprocessing of a 1 mm head (separate from the network): N4 3t {pre.get('n4_3t', 0):.1f} s, "
              f"deepbet {pre.get('deepbet', 0):.1f} s, peak RSS {pre.get('peak_rss_gb', 0):.2f} GB")
    labels = {"ours": "ours", "light": "light", "monai-thesis": "MONAI thesis", "monai-tuned": "MONAI tuned"}
    print(f"\nper volume of {STACK[0]} slices {STACK[1]}x{STACK[2]}, batches of {BATCH}, median of {args.repeats}; "
          "ratio = MONAI / ours")
    print(f"{'preset':10} {'prec':5} " + " ".join(f"{labels[i] + ' s':>14}" for i in args.impls)
          + f" {'tuned/ours':>10} {'thesis/ours':>11} | " + " ".join(f"{labels[i] + ' GB':>15}" for i in args.impls))
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            res = {i: run(i, preset, precision, args.repeats, args.threads, args.omp_passive) for i in args.impls}
            rows.append({"preset": preset, "precision": precision, **res})

            def ratio(ref, res=res):
                a, b = res.get("ours", {}), res.get(ref, {})
                return f"{b['seconds'] / a['seconds']:.2f}x" if "seconds" in a and "seconds" in b else "n/a"

            secs = " ".join(f"{res[i].get('seconds', float('nan')):14.1f}" for i in args.impls)
            rams = " ".join(f"{res[i].get('peak_rss_gb', float('nan')):15.2f}" for i in args.impls)
            errs = "".join(f"  [{labels[i]}: {res[i]['error']}]" for i in args.impls if "error" in res[i])
            print(f"{preset:10} {precision:5} {secs} {ratio('monai-tuned'):>10} {ratio('monai-thesis'):>11} | {rams}"
                  f"{errs}", flush=True)
        facts = run("facts", preset, "bf16", 1, args.threads, args.omp_passive)
        bf16 = next((r["ours"] for r in rows if r["preset"] == preset and r["precision"] == "bf16"), {})
        if "flops_per_slice" in facts and "seconds" in bf16:
            rate = facts["flops_per_slice"] * STACK[0] / bf16["seconds"]
            print(f"{preset}: {facts['flops_per_slice'] / 1e9:.0f} GFLOP per slice; ours bf16 runs at "
                  f"{rate / 1e9:.0f} GFLOP/s = {100 * rate / facts['matmul_peak']:.0f} % of this CPU's bf16 matmul "
                  f"peak ({facts['matmul_peak'] / 1e9:.0f} GFLOP/s at {args.threads} threads); at 50 % of that peak "
                  f"a brain would take {facts['flops_per_slice'] * STACK[0] / (0.5 * facts['matmul_peak']):.0f} s")
        if args.profile:
            print(f"\nwhere the time goes: {preset}, ours, one bf16 forward of {BATCH} slices")
            run("profile", preset, "bf16", 1, args.threads, args.omp_passive)
    print(f"loadavg at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
