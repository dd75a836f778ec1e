"""Seconds per training step (forward + backward + Adam) and peak RAM: synth7t's U-nets vs the thesis network in MONAI.

Networks, all at one preset's settings (channels, multipliers, groups, residual blocks, attention stages):

* ``ours``: synth7t's U-net as the preset builds it (``unc``/``biofinder``/``gan``: the thesis attention blocks,
  one head, Ho's up path), channels-last;
* ``light``: the same preset with synth7t's light attention blocks (``model.attention_block=light``,
  ``attention_heads=null`` i.e. 32-channel heads, ``up_path=stage``), channels-last;
* ``MONAI thesis``: MONAI's ``DiffusionModelUNet`` built to the thesis network's structure (the thesis code's
  network: Ho et al.'s U-net, one attention head, conditioned on the 7 covariates as one context token, a fixed
  timestep 0) and run as the thesis code ran it: its own attention (no ``scaled_dot_product_attention``),
  contiguous memory;
* ``MONAI tuned``: the same network with ``use_flash_attention=True`` (PyTorch's fused SDPA) and channels-last;
* ``ours NCHW`` (opt-in, ``--impls ours ours-nchw``): ``ours`` in PyTorch's default contiguous layout, the layout
  ``synth7t train`` used on CPU before ``trainer.channels_last`` (printed as ``nchw/ours``).

``ours`` and the MONAI networks have the same structure (parameter counts in the last column; MONAI's include its
timestep embedding and its strided-convolution down-sampling / convolution after up-sampling, where the thesis
and synth7t max-pool and upsample by nearest neighbour: tests/nn/test_monai_parity.py). Every row runs each
network in its own subprocess (so peak RSS, ``ru_maxrss``, is its own), at the same precision (fp32, or bf16
autocast), with the same Adam (``fused=True``), and reports the median of ``--repeats`` steps after one warm-up.

    python benchmarks/train_step.py                 # biofinder and unc; fp32 and bf16; 3 repeats
    python benchmarks/train_step.py --quick         # biofinder only, 2 repeats
    python benchmarks/train_step.py --device cuda

Batch 4 x 3 slices x 288 x 224 by default, torch limited to 2 threads (the project's CPU machine). Run it on an
otherwise idle machine: with more runnable threads than cores, OpenMP barriers stall and times grow several-fold;
ratios measured in one run are comparable.
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

IMPLS = ("ours", "light", "monai-thesis", "monai-tuned")
# opt-in (--impls ... ours-nchw): ours in PyTorch's default (contiguous) layout, as `synth7t train` ran it on CPU
# before trainer.channels_last
EXTRA_IMPLS = ("ours-nchw",)
LABELS = {"ours": "ours", "light": "light", "monai-thesis": "MONAI thesis", "monai-tuned": "MONAI tuned",
          "ours-nchw": "ours NCHW"}


def unet_config(preset: str, impl: str):
    """The UNetConfig of ``preset`` (a synth7t preset name); ``light`` swaps in the light attention blocks."""
    from synth7t.config import load_config

    over = {}
    if impl == "light":
        over = {"model.attention_block": "light", "model.attention_heads": "null", "model.up_path": "stage"}
    return load_config(preset, over).model


def monai_network(cfg, tuned: bool):
    """MONAI's DiffusionModelUNet at the settings of ``cfg`` (one head per attention layer, as the thesis)."""
    from monai.networks.nets import DiffusionModelUNet

    from synth7t.nn import CONTEXT_DIM

    chs = cfg.stage_channels
    ca = set(cfg.cross_attention_stages)
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=cfg.in_slices, out_channels=1, num_res_blocks=cfg.n_res, channels=chs,
        attention_levels=[(i + 1) in ca for i in range(len(chs))], norm_num_groups=cfg.n_groups,
        num_head_channels=[c // cfg.n_heads(c) for c in chs], with_conditioning=True,
        cross_attention_dim=CONTEXT_DIM if ca else chs[-1], use_flash_attention=tuned,
    )


def build(impl: str, preset: str):
    """Return ``(model, forward(x, ctx) -> y, channels_last)`` for one of :data:`IMPLS`."""
    import torch

    cfg = unet_config(preset, impl)
    if impl in ("ours", "light", "ours-nchw"):
        from synth7t.nn import UNet

        model = UNet(cfg)
        return model, (lambda x, c: model(x, c)), impl != "ours-nchw"
    tuned = impl == "monai-tuned"
    model = monai_network(cfg, tuned)
    conditioned = bool(cfg.cross_attention_stages)

    def forward(x, c):
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # fixed timestep, as the thesis code
        return model(x, t, context=c[:, None, :] if conditioned else None)

    return model, forward, tuned


def worker(args: argparse.Namespace) -> dict:
    """Build one model, time ``args.repeats`` steps after one warm-up, return the figures."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    if dev.type == "cpu" and not args.malloc_default:
        from synth7t.devices import keep_freed_memory

        keep_freed_memory()  # what synth7t train/predict do on CPU; here for every network alike
    model, fwd, channels_last = build(args.impl, args.preset)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)
    in_slices = unet_config(args.preset, args.impl).in_slices
    x = torch.rand(args.batch, in_slices, args.height, args.width, device=dev).contiguous(memory_format=fmt)
    c = torch.randn(args.batch, 7, device=dev)
    target = torch.rand(args.batch, 1, args.height, args.width, device=dev)
    bf16 = args.precision == "bf16"
    if args.mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

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

    times, cpu = [], []
    for i in range(args.repeats + 1):  # the first step is a warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    out = {
        "seconds": statistics.median(times),
        "times": times,
        "cpu_seconds": statistics.median(cpu),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_one(args: argparse.Namespace, impl: str, preset: str, precision: str) -> dict:
    """Run :func:`worker` in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", impl, "--preset", preset,
           "--precision", precision, "--mode", args.mode, "--repeats", str(args.repeats), "--threads",
           str(args.threads), "--batch", str(args.batch), "--height", str(args.height), "--width", str(args.width),
           "--device", args.device] + (["--malloc-default"] if args.malloc_default else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None, what: str = "train") -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="biofinder only, 2 repeats")
    ap.add_argument("--presets", nargs="+", default=None, choices=["tiny", "biofinder", "unc", "gan"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + EXTRA_IMPLS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--width", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write all figures to this file")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for every network: on a machine shared with other jobs, spinning "
                         "OpenMP threads stall each other (here: a 7x slower step at 2 threads)")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's malloc as it is (default: every network runs with synth7t's CPU setting, "
                         "synth7t.devices.keep_freed_memory, which keeps freed blocks <= 32 MiB for reuse)")
    # accepted for the older command line (predict_forward.py's docstring): both MONAI modes always run now
    ap.add_argument("--monai-tuned", action="store_true", help=argparse.SUPPRESS)
    # worker-only options
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="biofinder", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=what, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.presets = args.presets or ["biofinder"]
        args.repeats = min(args.repeats, 2)
    args.presets = args.presets or ["biofinder", "unc"]
    return args


def main(argv=None, what: str = "train") -> None:
    args = parse_args(argv, what)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    unit = "s/step" if args.mode == "train" else "s/forward"
    mem = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(f"{args.mode}: batch {args.batch} x 3 x {args.height} x {args.width}, {args.device}, {args.threads} threads, "
          f"median of {args.repeats} after 1 warm-up, {unit}; {mem}; ratio = MONAI / ours (> 1: ours faster)",
          flush=True)
    print(f"loadavg at start: {os.getloadavg()[0]:.2f} (machine cores: {os.cpu_count()})"
          f"{'; OMP_WAIT_POLICY=PASSIVE' if args.omp_passive else ''}; malloc: "
          f"{'glibc default' if args.malloc_default else 'keep_freed_memory() for every network'}", flush=True)
    cols = [LABELS[i] for i in args.impls]
    print(f"{'preset':10} {'prec':5} " + " ".join(f"{c:>13}" for c in cols)
          + f" {'tuned/ours':>10} {'thesis/ours':>11} | " + " ".join(f"{c + ' MB':>16}" for c in cols)
          + " | params M", flush=True)
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            res = {impl: run_one(args, impl, preset, precision) for impl in args.impls}
            rows.append({"preset": preset, "precision": precision, **res})
            print(format_row(preset, precision, res, mem), flush=True)
    print(f"loadavg at end: {os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def format_row(preset: str, precision: str, res: dict, mem: str) -> str:
    key = "peak_gpu_mb" if mem.startswith("peak GPU") else "peak_rss_mb"

    def f(d: dict, k: str, fmt: str) -> str:
        return format(d[k], fmt) if k in d else "n/a"

    def ratio(ref: str) -> str:
        a, b = res.get("ours", {}), res.get(ref, {})
        return f"{b['seconds'] / a['seconds']:.2f}x" if "seconds" in a and "seconds" in b else "n/a"

    layout = f" nchw/ours {ratio('ours-nchw')}" if "ours-nchw" in res else ""

    err = "".join(f"  [{LABELS[n]}: {d['error']}]" for n, d in res.items() if "error" in d)
    times = " ".join(f"{f(d, 'seconds', '.2f'):>13}" for d in res.values())
    rams = " ".join(f"{f(d, key, '.0f'):>16}" for d in res.values())
    params = "/".join(f(d, "params_m", ".1f") for d in res.values())
    return (f"{preset:10} {precision:5} {times} {ratio('monai-tuned'):>10} {ratio('monai-thesis'):>11} | {rams} | "
            f"{params}{layout}{err}")


if __name__ == "__main__":
    main()
