"""Seconds per training step (forward + backward + Adam) and peak RAM: synth7t's U-net vs MONAI's.

Reference: MONAI's ``DiffusionModelUNet`` (the network of the thesis code) configured to the same channels,
channel multipliers, groups, residual blocks and attention stages, with a fixed timestep 0 and the covariate
vector as a one-token cross-attention context, at the same precision. Each (preset, model, precision) runs in
its own subprocess so that its peak RSS (``resource.getrusage(...).ru_maxrss``) is its own.

    python benchmarks/train_step.py            # tiny, biofinder, unc; fp32 and bf16; 3 repeats
    python benchmarks/train_step.py --quick    # tiny and biofinder, 2 repeats
    python benchmarks/train_step.py --device cuda

Batch 4 x 3 slices x 288 x 224 by default, torch limited to 2 threads (the project's CPU machine). Ours runs
channels-last with fused attention (``scaled_dot_product_attention``); MONAI runs as the thesis used it
(``--monai-tuned`` gives it channels-last and its SDPA attention too).

Run it on an otherwise idle machine: with more runnable threads than cores, OpenMP barriers stall and step
times grow several-fold (measured here: a tiny step took 17x the CPU time at 2 threads under a load of 7).
Note that our cross-attention blocks have no spatial self-attention (MONAI's ``SpatialTransformer`` has),
so part of the gap at the CA stages is architectural, not only implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Appendix table 2 of the thesis (unc, biofinder) and a small preset for smoke runs. CA stages are 1-based.
PRESETS: dict[str, dict] = {
    "tiny": dict(channels=16, channel_mult=(1, 2, 2), n_groups=8, n_res=1, cross_attention_stages=(3,)),
    "biofinder": dict(
        channels=64, channel_mult=(1, 2, 2, 2, 2), n_groups=16, n_res=3, cross_attention_stages=(3, 4, 5)
    ),
    "unc": dict(channels=128, channel_mult=(1, 2, 2, 2), n_groups=32, n_res=3, cross_attention_stages=(3, 4)),
}
HEAD_DIM = 32


def build(impl: str, preset: str, slices: int, tuned: bool):
    """Return ``(model, forward(x, ctx) -> y, channels_last)`` for ``impl`` in {"ours", "monai"}."""
    import torch

    p = PRESETS[preset]
    if impl == "ours":
        from synth7t.nn import UNet, UNetConfig

        model = UNet(UNetConfig(in_slices=slices, head_dim=HEAD_DIM, **p))
        return model, (lambda x, c: model(x, c)), True
    from monai.networks.nets import DiffusionModelUNet

    n = len(p["channel_mult"])
    ca = p["cross_attention_stages"]
    model = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=slices,
        out_channels=1,
        num_res_blocks=p["n_res"],
        channels=[p["channels"] * m for m in p["channel_mult"]],
        attention_levels=[(i + 1) in ca for i in range(n)],
        norm_num_groups=p["n_groups"],
        num_head_channels=HEAD_DIM,
        with_conditioning=bool(ca),
        cross_attention_dim=7 if ca else None,
        use_flash_attention=tuned,
    )

    def forward(x, c):
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # fixed timestep, as the thesis code
        return model(x, t, context=c[:, None, :] if ca else None)

    return model, forward, tuned


def worker(args: argparse.Namespace) -> dict:
    """Build one model, time ``args.repeats`` steps after one warm-up, return the figures."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model, fwd, channels_last = build(args.impl, args.preset, args.slices, args.monai_tuned)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)
    x = torch.rand(args.batch, args.slices, args.height, args.width, device=dev).contiguous(memory_format=fmt)
    c = torch.randn(args.batch, 7, device=dev)
    target = torch.rand(args.batch, 1, args.height, args.width, device=dev)
    bf16 = args.precision == "bf16"
    if args.mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                y = fwd(x, c)
            loss = (y.float() - target).abs().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                fwd(x, c)

    times = []
    for i in range(args.repeats + 1):  # the first step is a warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    out = {
        "seconds": statistics.median(times),
        "times": times,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_one(args: argparse.Namespace, impl: str, preset: str, precision: str) -> dict:
    """Run :func:`worker` in a fresh interpreter and parse its JSON line."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--impl",
        impl,
        "--preset",
        preset,
        "--precision",
        precision,
        "--mode",
        args.mode,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--slices",
        str(args.slices),
        "--device",
        args.device,
    ] + (["--monai-tuned"] if args.monai_tuned else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None, what: str = "train") -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny + biofinder only, 2 repeats")
    ap.add_argument("--presets", nargs="+", default=None, choices=sorted(PRESETS))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--width", type=int, default=224)
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--monai-tuned", action="store_true", help="MONAI with channels-last and SDPA attention")
    ap.add_argument("--skip-monai", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write all figures to this file")
    # worker-only options
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=what, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.presets = args.presets or ["tiny", "biofinder"]
        args.repeats = min(args.repeats, 2)
    args.presets = args.presets or ["tiny", "biofinder", "unc"]
    return args


def main(argv=None, what: str = "train") -> None:
    args = parse_args(argv, what)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    unit = "s/step" if args.mode == "train" else "s/forward"
    print(
        f"{args.mode}: batch {args.batch} x {args.slices} x {args.height} x {args.width}, {args.device}, "
        f"{args.threads} threads, median of {args.repeats} after 1 warm-up; MONAI "
        f"{'tuned (channels-last, SDPA)' if args.monai_tuned else 'as in the thesis code'}",
        flush=True,
    )
    mem = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    header = (
        f"{'preset':10} {'prec':5} {'ours ' + unit:>15} {'MONAI ' + unit:>16} {'MONAI/ours':>10} "
        f"{'ours ' + mem:>17} {'MONAI ' + mem:>18} {'params M ours/MONAI':>20}"
    )
    print(header, flush=True)
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            ours = run_one(args, "ours", preset, precision)
            ref = {"error": "skipped"} if args.skip_monai else run_one(args, "monai", preset, precision)
            rows.append({"preset": preset, "precision": precision, "ours": ours, "monai": ref})
            print(format_row(preset, precision, ours, ref, mem), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def format_row(preset: str, precision: str, ours: dict, ref: dict, mem: str) -> str:
    key = "peak_gpu_mb" if mem.startswith("peak GPU") else "peak_rss_mb"

    def f(d: dict, k: str, fmt: str) -> str:
        return format(d[k], fmt) if k in d else "n/a"

    ratio = f"{ref['seconds'] / ours['seconds']:.2f}x" if "seconds" in ours and "seconds" in ref else "n/a"
    err = "".join(f"  [{n}: {d['error']}]" for n, d in (("ours", ours), ("MONAI", ref)) if "error" in d)
    params = f"{f(ours, 'params_m', '.2f')}/{f(ref, 'params_m', '.2f')}"
    return (
        f"{preset:10} {precision:5} {f(ours, 'seconds', '.3f'):>15} {f(ref, 'seconds', '.3f'):>16} {ratio:>10} "
        f"{f(ours, key, '.0f'):>17} {f(ref, key, '.0f'):>18} {params:>20}{err}"
    )


if __name__ == "__main__":
    main()
