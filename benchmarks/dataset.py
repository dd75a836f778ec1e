"""Slice store benchmark: packing cost, sample throughput and memory against store size.

Builds synthetic preprocessed work folders of 10 and 60 subjects with a realistic in-plane brain size (packed to
288 x 224) but few slices, packs them, then measures in separate processes (so that peak RSS is per
configuration):

* pack: seconds per subject and peak RSS;
* samples/s of ``SliceDataset`` through a ``DataLoader`` (batch 4, shuffled) with 0 and 2 workers, without and
  with all augmentations (median of repeats);
* samples/s with input standardization (``histmatch``, as ``tiny`` trains), 0 workers: the float16 table look-up
  training uses against the reference it replaced, ``standardize_input`` per sample (``np.interp`` over the map's
  knots, the path of commits before 6e7df54), measured in the same process after checking both give equal arrays;
* peak RSS of the main process and of the workers, and the growth of anonymous memory over a full epoch
  (memmap pages are file-backed and not counted there);
* reference: one training step (forward + backward + Adam) of the tiny U-net at batch 4 x 3 x 288 x 224
  (``synth7t.nn.UNet`` when importable, else a plain 3-stage conv net of 16/32/64 channels), so the loader's
  samples/s can be compared with what training consumes.

Run: ``.venv/bin/python benchmarks/dataset.py [--subjects 10 60] [--slices 12] [--repeats 3]``.
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

import numpy as np

AFFINE = np.diag([0.65, 0.65, 0.65, 1.0])
SHAPE = (300, 240, 12)  # brain box about 262 x 202 in-plane -> packed to 288 x 224
FULL_SHAPE = (352, 352, 272)  # the thesis' 7T grid (0.65 mm), for one pack-cost measurement
ALL_AUG = {k: {"enabled": True} for k in ("gmm", "elastic", "bias", "scale", "noise")}


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak RSS of this process since its exec (VmHWM; ru_maxrss would include the forking parent's RSS)."""
    return _status_mib("VmHWM")


def workers_peak_rss_mib() -> float:
    """Largest ru_maxrss of the waited-for children (forked workers: includes pages shared with the parent)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def rss_anon_mib() -> float:
    return _status_mib("RssAnon")


def make_subject(work: Path, name: str, seed: int, shape: tuple[int, int, int], rz: float = 0.6) -> None:
    """One synthetic preprocessed subject folder (ellipsoidal brain with three tissue classes)."""
    from synth7t.io import Volume, save_volume, write_json

    rng = np.random.default_rng(seed)
    c = (shape[0] / 2 + rng.integers(-8, 8), shape[1] / 2 + rng.integers(-8, 8), shape[2] / 2)
    radii = (0.437 * shape[0] - rng.integers(0, 10), 0.42 * shape[1] - rng.integers(0, 10), shape[2] * rz)
    grid = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = np.sqrt(sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, radii, strict=True)))
    mask = (r < 1).astype(np.uint8)
    tissue = np.where(r < 0.45, 2, np.where(r < 0.8, 1, 0))
    t3 = (np.array([300.0, 600.0, 900.0])[tissue] + rng.normal(0, 40, shape)) * mask
    t7 = (np.array([150.0, 500.0, 700.0])[tissue] + rng.normal(0, 30, shape)) * mask
    folder = work / name
    folder.mkdir(parents=True)
    save_volume(folder / "t3.nii.gz", Volume(t3.astype(np.float32), AFFINE))
    save_volume(folder / "t7.nii.gz", Volume(t7.astype(np.float32), AFFINE))
    save_volume(folder / "mask.nii.gz", Volume(mask, AFFINE), dtype=np.uint8)
    write_json(
        folder / "subject.json",
        {
            "id": name,
            "age": int(60 + seed % 25),
            "sex": "FM"[seed % 2],
            "diagnosis": None,
            "group": ["healthy", "ill"][seed % 2],
        },
    )
    write_json(
        folder / "qc.json",
        {
            "min_slice": 0,
            "motion_score": 0.0,
            "registration_ncc": 0.9,
            "rejected": False,
            "flagged": False,
            "reasons": [],
        },
    )
    (folder / ".done").write_text('{"params_hash": "bench"}')


# ---------------------------------------------------------------------------------------------------------
# child processes


def child_pack(work: str, store: str) -> dict:
    from synth7t.dataset.pack import pack

    n = sum(1 for p in Path(work).iterdir() if p.is_dir())
    t0 = time.perf_counter()
    pack(work, store, progress=False)
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(store).rglob("*.npy"))
    return {"s_per_subject": dt / n, "peak_rss_mib": peak_rss_mib(), "store_mib": size / 2**20}


def _loader_rate(ds, workers: int, n_batches: int, repeats: int) -> float:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    rates = []
    for rep in range(repeats):
        g = torch.Generator().manual_seed(rep)
        sampler = RandomSampler(ds, replacement=True, num_samples=4 * (n_batches + 1), generator=g)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers)
        it = iter(loader)
        next(it)  # warm-up: worker start and first reads are excluded
        t0 = time.perf_counter()
        n = 0
        for _ in range(n_batches):
            n += next(it)["input"].shape[0]
        rates.append(n / (time.perf_counter() - t0))
        del it, loader
    return statistics.median(rates)


def _interp_dataset(slice_dataset):
    """The reference of the standardized rows: ``SliceDataset`` standardizing each sample's input with
    ``standardize_input`` (np.interp over the knots), as training did before the float16 look-up."""
    from synth7t.intensity import standardize_input

    class InterpSliceDataset(slice_dataset):
        def raw(self, index: int) -> dict:
            record, self.standardize = self.standardize, None
            try:
                sample = super().raw(index)
            finally:
                self.standardize = record
            sample["input"] = standardize_input(sample["input"], record, table=self._input_table(sample["subject"]))
            return sample

    return InterpSliceDataset


def child_load(store: str, n_batches: int, repeats: int) -> dict:
    import torch

    from synth7t.dataset.augment import AugmentConfig, Augmenter
    from synth7t.dataset.slices import SliceDataset

    # workers run torch with 1 thread; do the same in the main process, where collation is a memcpy that
    # costs ~60 ms per batch with 2 OpenMP threads on a loaded 2-core machine (0.1 ms with 1 thread)
    torch.set_num_threads(1)
    out: dict = {}
    plain = SliceDataset(store, "all", n_slices=3)
    anon0 = rss_anon_mib()
    for i in range(len(plain)):  # one full epoch, no workers
        plain[i]
    out["epoch_anon_growth_mib"] = rss_anon_mib() - anon0
    out["samples"] = len(plain)
    aug = SliceDataset(store, "all", n_slices=3, augment=Augmenter(AugmentConfig.model_validate(ALL_AUG)))
    for label, ds in (("plain", plain), ("aug", aug)):
        for workers in (0, 2):
            out[f"{label}_w{workers}"] = _loader_rate(ds, workers, n_batches, repeats)
    from synth7t.dataset.slices import SliceStore
    from synth7t.intensity import quantiles

    record = {"method": "histmatch", "reference_quantiles": quantiles(np.linspace(0.05, 0.95, 1000) ** 1.5)}
    lookup = SliceDataset(store, "all", n_slices=3, standardize=record)
    interp = _interp_dataset(SliceDataset)(store, "all", n_slices=3, standardize=record)
    for s in SliceStore(store).split_subjects("all"):  # per-subject maps built before timing, in both
        lookup._input_lookup(s), interp._input_table(s)
    for i in range(0, len(lookup), max(1, len(lookup) // 20)):
        if not np.array_equal(lookup[i]["input"], interp[i]["input"]):
            raise RuntimeError(f"standardized sample {i}: the look-up and np.interp differ")
    out["std_lookup_w0"] = _loader_rate(lookup, 0, n_batches, repeats)
    out["std_interp_w0"] = _loader_rate(interp, 0, n_batches, repeats)
    out["peak_rss_mib"] = peak_rss_mib()
    out["worker_peak_rss_mib"] = workers_peak_rss_mib()
    return out


def _tiny_model():
    import torch
    from torch import nn

    try:
        from synth7t.nn.config import UNetConfig
        from synth7t.nn.unet import UNet

        cfg = UNetConfig(
            channels=16, channel_mult=(1, 2, 4), n_groups=8, n_res=1, cross_attention_stages=(3,), head_dim=32
        )
        return UNet(cfg), "synth7t.nn.UNet(channels=16, mult=(1,2,4), n_res=1)"
    except Exception as exc:  # the network module may not exist yet: use a stand-in of the same size
        print(f"(synth7t.nn.UNet unavailable: {type(exc).__name__}: {exc}; using a plain conv net)", file=sys.stderr)

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(8, cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.GroupNorm(8, cout),
            nn.SiLU(),
        )

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.d1, self.d2, self.d3 = block(3, 16), block(16, 32), block(32, 64)
            self.u2, self.u1 = block(64 + 32, 32), block(32 + 16, 16)
            self.out = nn.Conv2d(16, 1, 1)

        def forward(self, x, context=None):
            a = self.d1(x)
            b = self.d2(nn.functional.avg_pool2d(a, 2))
            c = self.d3(nn.functional.avg_pool2d(b, 2))
            b = self.u2(torch.cat([nn.functional.interpolate(c, scale_factor=2), b], 1))
            a = self.u1(torch.cat([nn.functional.interpolate(b, scale_factor=2), a], 1))
            return torch.sigmoid(self.out(a))

    return Net(), "plain conv U-net 16/32/64, 3 stages"


def child_train(repeats: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, label = _tiny_model()
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.rand(4, 3, 288, 224, device=device), torch.rand(4, 1, 288, 224, device=device)
    ctx = torch.zeros(4, 7, device=device)
    times = []
    for _ in range(repeats + (3 if device == "cuda" else 1)):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.l1_loss(model(x, ctx), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[-repeats:])  # the first steps are warm-up
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {threads} thread(s)"
    return {"model": label, "device": name, "step_s": step, "samples_per_s": 4 / step}


# ---------------------------------------------------------------------------------------------------------
# driver


def run_child(*args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"child {args} failed:\n{res.stderr[-3000:]}")
    if res.stderr.strip():
        print(res.stderr.strip().splitlines()[-1], file=sys.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[10, 60])
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--batches", type=int, default=30, help="timed batches (of 4) per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--cuda", action="store_true", help="also time the training step on the GPU")
    ap.add_argument("--full-size", action="store_true", help=f"also pack one subject of shape {FULL_SHAPE}")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"pack": child_pack, "load": child_load, "train": child_train}[kind]
        typed = [int(a) if a.isdigit() else a for a in rest]
        print(json.dumps(fn(*typed)))
        return

    with tempfile.TemporaryDirectory(prefix="synth7t-bench-") as tmp:
        root = Path(tmp)
        biggest = max(args.subjects)
        t0 = time.perf_counter()
        for i in range(biggest):
            make_subject(root / "all", f"b{i:03d}", i, SHAPE[:2] + (args.slices,))
        print(
            f"made {biggest} synthetic subjects ({SHAPE[0]} x {SHAPE[1]} x {args.slices}) "
            f"in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        rows = []
        for n in args.subjects:
            work = root / f"work{n}"
            work.mkdir()
            for i in range(n):
                (work / f"b{i:03d}").symlink_to(root / "all" / f"b{i:03d}")
            store = root / f"store{n}"
            p = run_child("pack", str(work), str(store))
            ld = run_child("load", str(store), str(args.batches), str(args.repeats))
            rows.append((n, p, ld))
        full = None
        if args.full_size:
            make_subject(root / "full", "f000", 0, FULL_SHAPE, rz=0.4)
            full = run_child("pack", str(root / "full"), str(root / "storefull"))
        trains = [run_child("train", str(args.repeats), "cpu", str(t)) for t in sorted({1, os.cpu_count() or 1})]
        if args.cuda:
            trains.append(run_child("train", str(args.repeats), "cuda", "1"))
    report(rows, trains, full, args)


def report(rows, trains, full, args) -> None:
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\nslice store benchmark (2.5D, 3 slices, batch 4, {os.cpu_count()} CPUs, load average {load}; "
        f"medians of {args.repeats})"
    )
    print(
        f"{'subjects':>8} {'store MiB':>9} {'pack s/subj':>11} {'pack RSS':>8} | "
        f"{'w0':>7} {'w2':>7} {'w0+aug':>7} {'w2+aug':>7} samples/s | "
        f"{'main RSS':>8} {'wkr RSS':>7} {'epoch dAnon':>11}"
    )
    for n, p, ld in rows:
        print(
            f"{n:>8} {p['store_mib']:>9.1f} {p['s_per_subject']:>11.2f} {p['peak_rss_mib']:>8.0f} | "
            f"{ld['plain_w0']:>7.0f} {ld['plain_w2']:>7.0f} {ld['aug_w0']:>7.0f} {ld['aug_w2']:>7.0f}           | "
            f"{ld['peak_rss_mib']:>8.0f} {ld['worker_peak_rss_mib']:>7.0f} {ld['epoch_anon_growth_mib']:>11.1f}"
        )
    print("(RSS in MiB; 'epoch dAnon' = growth of anonymous memory over one full epoch with 0 workers)")
    print("\ninput standardization (histmatch), 0 workers, samples/s: float16 look-up vs np.interp per sample "
          "(reference: the path before 6e7df54; same arrays, checked)")
    for n, _, ld in rows:
        print(f"{n:>8} subjects: look-up {ld['std_lookup_w0']:.0f}, np.interp {ld['std_interp_w0']:.0f}: "
              f"{ld['std_lookup_w0'] / ld['std_interp_w0']:.2f}x")
    if full:
        print(
            f"full-size subject {FULL_SHAPE}: pack {full['s_per_subject']:.1f} s, peak RSS "
            f"{full['peak_rss_mib']:.0f} MiB, store {full['store_mib']:.1f} MiB"
        )
    print(f"\nreference: one training step of {trains[0]['model']}, batch 4 x 3 x 288 x 224")
    for tr in trains:
        print(f"  {tr['device']}: {tr['step_s']:.3f} s/step = {tr['samples_per_s']:.1f} samples/s")
        for n, _, ld in rows:
            print(
                f"    {n} subjects: loader / training = {ld['plain_w0'] / tr['samples_per_s']:.1f}x (w0), "
                f"{ld['aug_w0'] / tr['samples_per_s']:.1f}x (w0, all aug), "
                f"{ld['aug_w2'] / tr['samples_per_s']:.1f}x (w2, all aug)"
            )


if __name__ == "__main__":
    main()
