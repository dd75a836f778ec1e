"""Preprocessing benchmark: seconds and peak RAM per step for one 3T/7T pair.

Target (DESIGN.md): a full-brain pair at 0.65 mm in <= 3 min on 2 cores with <= 6 GB RAM.

Data: the deepmriprep 0.5 mm skull-stripped template (MIT), resampled to 0.65 mm, times a smooth 7T-like bias
field, plus Rician noise ("7T"); blurred (FWHM 1.2 mm), sampled at 1 mm, with a milder bias, noise, and a
known rigid pose change (5 degrees about z, (4, -3, 5) mm) ("3T"). The ``small`` case is a 40 mm axial slab of
the same images (the demo cohort's size). Steps, in pipeline order: N4 7T pass 1 (``3t`` preset, the
pipeline's default first pass), skull strip 7T (deepbet), N4 7T preset inside the brain+CSF mask (pass 2),
N4 3T preset, skull strip 3T, SyN at 1 mm, apply the transforms at 0.65 mm. Reference measured in the same
run: antspyx's ``n4_bias_field_correction`` on the 7T image with the same mask and iteration counts (it
cannot set the thesis' FWHM/Wiener values); on the full case only with ``--full-reference``.

``--options`` also measures, on the same pair, what else could be cut (each against the pipeline's choice): the
cheap ``demo`` N4 preset for the first 7T pass (time, and the Dice of the masks stripped after it), the second
7T pass on the mask's bounding box instead of the whole field of view (time, and the bias left against the
simulated field), and N4's speed-up from 1 to ``--threads`` threads.

Peak RAM is the process's resident set size sampled every 10 ms during each step (the data of earlier steps
included). Run: ``python benchmarks/preprocess.py [--case small|full|both] [--repeats N] [--threads 2] [--options]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time


def _rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


class PeakRss:
    """Samples the resident set size in a thread; ``peak`` in GB."""

    def __enter__(self):
        self.peak = _rss_gb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_gb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_gb())


def make_pair(case: str, with_bias: bool = False):
    """(7T-like Volume at 0.65 mm, 3T-like Volume at 1 mm) as described in the module doc; with ``with_bias`` also
    the 7T's simulated bias field (the truth N4 should remove)."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from synth7t.demo import load_template
    from synth7t.io import Volume
    from synth7t.preprocess.register import resample_to

    rng = np.random.default_rng(0)
    tpl = load_template()
    t7 = resample_to(tpl, 0.65, order=1)
    if case == "small":
        z0 = int(round((-28.0 - t7.affine[2, 3]) / 0.65))
        n = int(round(40 / 0.65))
        aff = t7.affine.copy()
        aff[:3, 3] = aff[:3, :3] @ np.array([0, 0, z0]) + aff[:3, 3]
        t7 = Volume(np.ascontiguousarray(t7.data[:, :, z0 : z0 + n]), aff)
    ijk = np.indices(t7.shape, dtype=np.float32).reshape(3, -1).T
    xyz = (ijk @ t7.affine[:3, :3].T + t7.affine[:3, 3]).reshape(*t7.shape, 3)
    r2 = ((xyz - np.array([0, -18, 10])) ** 2).sum(-1) / 70.0**2
    bias7 = 1 + 0.6 * (np.exp(-r2) - 0.5) + 0.2 * xyz[..., 0] / 70
    sig = 0.015
    img7 = np.hypot(t7.data * bias7 + rng.normal(0, sig, t7.shape), rng.normal(0, sig, t7.shape))
    t7 = Volume(img7.astype(np.float32) * 1000, t7.affine)
    # 3T: blur, 1 mm, known pose: the 3T shows at world x the anatomy at T @ x
    blurred = Volume(gaussian_filter(tpl.data, 1.2 / 2.3548 / 0.5), tpl.affine)
    t3 = resample_to(blurred, 1.0, order=1, antialias=False)
    a = np.deg2rad(5.0)
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    pose[:3, 3] = [4.0, -3.0, 5.0]
    img3 = np.hypot(t3.data * (1 + 0.15 * xyz_ramp(t3)) + rng.normal(0, 0.03, t3.shape), rng.normal(0, 0.03, t3.shape))
    t3 = Volume(img3.astype(np.float32) * 1000, np.linalg.inv(pose) @ t3.affine)
    return (t7, t3, bias7.astype(np.float32)) if with_bias else (t7, t3)


def xyz_ramp(vol):
    import numpy as np

    i = np.indices(vol.shape, dtype=np.float32)[1]
    return (i - i.mean()) / vol.shape[1]


def run_case(case: str, repeats: int, threads: int, reference: bool = True) -> list[tuple[str, float, float]]:
    import tempfile
    from pathlib import Path

    import ants
    import numpy as np

    from synth7t.preprocess.bias import n4, n4_preset
    from synth7t.preprocess.register import apply_transforms, register, to_ants
    from synth7t.preprocess.skullstrip import strip_with_info

    t7, t3 = make_pair(case)
    print(
        f"\n{case}: 7T {t7.shape} at 0.65 mm ({np.prod(t7.shape) / 1e6:.1f} M voxels), 3T {t3.shape} at 1 mm",
        flush=True,
    )
    rows: dict[str, list[tuple[float, float]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="synth7t-bench-"))

    def step(name, fn, *a, **k):
        with PeakRss() as mem:
            t0 = time.perf_counter()
            out = fn(*a, **k)
            dt = time.perf_counter() - t0
        rows.setdefault(name, []).append((dt, mem.peak))
        print(f"  {name:34s} {dt:7.1f} s  {mem.peak:5.2f} GB", flush=True)
        return out

    for _ in range(repeats):
        a = step("N4 7T pass 1 (3t preset)", n4, t7, "3t", None, threads=threads)
        s7 = step("strip 7T (deepbet)", strip_with_info, a, "deepbet", threads=threads)
        b = step("N4 7T preset in mask (pass 2)", n4, t7, "7t", s7.csf, threads=threads)
        c = step("N4 3T preset", n4, t3, "3t", None, threads=threads)
        s3 = step("strip 3T (deepbet)", strip_with_info, c, "deepbet", threads=threads)
        m3 = c.with_data(c.data * s3.brain.data)
        m7 = b.with_data(b.data * s7.brain.data)
        reg = step(
            "SyN at 1 mm",
            register,
            m3,
            m7,
            resolution_mm=1.0,
            transforms_dir=tmp / "tx",
            fixed_mask=s7.brain,
            threads=threads,
        )
        step("apply transforms at 0.65 mm", apply_transforms, c, b, reg.forward, 1)
        print(f"  masks: {s7.method} / {s3.method}; NCC {reg.ncc:.3f}", flush=True)
        if not reference:
            continue
        ref_iters = list(n4_preset("7t").iterations)
        step(
            "ref: antspyx N4 (same iterations)",
            ants.n4_bias_field_correction,
            to_ants(t7),
            mask=to_ants(s7.csf.with_data(s7.csf.data.astype(np.float32))),
            shrink_factor=4,
            convergence={"iters": ref_iters, "tol": 1e-7},
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return [(name, statistics.median(v[0] for v in vals), max(v[1] for v in vals)) for name, vals in rows.items()]


def residual_bias(corrected, raw, bias, mask) -> float:
    """Std of the log bias left in ``corrected`` inside ``mask`` (0 = the simulated field fully removed, up to a
    global scale): ``corrected / raw * bias`` is constant when N4 recovered the field."""
    import numpy as np

    m = (mask > 0) & (raw > 0) & (corrected > 0)
    return float(np.std(np.log(corrected[m]) - np.log(raw[m]) + np.log(bias[m])))


def run_options(case: str, threads: int) -> None:
    """Options measured against the pipeline's choices on the same pair, in the same run (``--options``)."""
    import numpy as np

    from synth7t.io import Volume
    from synth7t.preprocess.bias import n4, n4_preset
    from synth7t.preprocess.skullstrip import strip_with_info

    t7, _, bias = make_pair(case, with_bias=True)
    print(f"\noptions on the {case} 7T {t7.shape} ({threads} threads)", flush=True)

    def timed(fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        return out, time.perf_counter() - t0

    def dice(a, b):
        a, b = a > 0, b > 0
        return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)

    # 1. the first 7T pass only has to make skull stripping work: the cheap demo preset instead of 3t
    p1, s_3t = timed(n4, t7, "3t", None, threads=threads)
    p1d, s_demo = timed(n4, t7, "demo", None, threads=threads)
    st, sd = strip_with_info(p1, "deepbet", threads=threads), strip_with_info(p1d, "deepbet", threads=threads)
    print(f"pass 1 preset 3t {s_3t:.1f} s vs demo {s_demo:.1f} s; masks after stripping: Dice brain "
          f"{dice(st.brain.data, sd.brain.data):.4f}, brain+CSF {dice(st.csf.data, sd.csf.data):.4f}", flush=True)
    mask = st.csf.data > 0
    # 2. pass 2 on the mask's bounding box (+4 voxels) instead of the whole field of view
    full, s_full = timed(n4, t7, "7t", st.csf, threads=threads)
    idx = np.argwhere(mask)
    lo, hi = np.maximum(idx.min(0) - 4, 0), np.minimum(idx.max(0) + 5, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    aff = t7.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]

    def n4_box():
        sub = n4(Volume(np.ascontiguousarray(t7.data[box]), aff), "7t", np.ascontiguousarray(mask[box]),
                 threads=threads)
        out = t7.data.copy()
        out[box] = sub.data
        return out

    boxed, s_box = timed(n4_box)
    frac = np.prod(hi - lo) / np.prod(mask.shape)
    print(f"pass 2 (7t preset) whole field of view {s_full:.1f} s vs mask box ({frac:.0%} of the voxels) "
          f"{s_box:.1f} s; residual log-bias std in the mask: none {residual_bias(t7.data, t7.data, bias, mask):.4f}, "
          f"whole FOV {residual_bias(full.data, t7.data, bias, mask):.4f}, box "
          f"{residual_bias(boxed, t7.data, bias, mask):.4f}", flush=True)
    # 3. thread scaling of N4 (30 x 4 iterations of the 7t preset)
    short = n4_preset("7t").model_copy(update={"iterations": (30, 30, 30, 30)})
    _, s1 = timed(n4, t7, short, st.csf, threads=1)
    _, s2 = timed(n4, t7, short, st.csf, threads=threads)
    print(f"N4 30x4 iterations: 1 thread {s1:.1f} s, {threads} threads {s2:.1f} s (speed-up {s1 / s2:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("small", "full", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--options", action="store_true",
                    help="also measure the speed options (cheap first 7T pass, pass 2 on the mask's box, N4 threads)")
    ap.add_argument("--full-reference", action="store_true",
                    help="also time antspyx N4 on the full-brain case (several minutes)")
    args = ap.parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    cases = ("small", "full") if args.case == "both" else (args.case,)
    for case in cases:
        rows = run_case(case, args.repeats, args.threads, reference=case == "small" or args.full_reference)
        pipeline = [r for r in rows if not r[0].startswith("ref:")]
        total = sum(r[1] for r in pipeline)
        peak = max(r[2] for r in pipeline)
        ours = dict((r[0], r[1]) for r in rows)
        print(f"\n{case} (median of {args.repeats}, {args.threads} threads, load avg {os.getloadavg()[0]:.1f})")
        print(f"| {'step':34s} | {'s':>7s} | {'peak GB':>7s} |")
        print(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|")
        for name, s, gb in rows:
            print(f"| {name:34s} | {s:7.1f} | {gb:7.2f} |")
        print(f"| {'pair total (pipeline steps)':34s} | {total:7.1f} | {peak:7.2f} |")
        if "ref: antspyx N4 (same iterations)" in ours:
            ratio = ours["N4 7T preset in mask (pass 2)"] / ours["ref: antspyx N4 (same iterations)"]
            print(f"SimpleITK N4 / antspyx N4 (same mask and iterations): {ratio:.2f}")
        if case == "full":
            verdict = "meets" if total <= 180 and peak <= 6 else "misses"
            print(f"target <= 180 s and <= 6 GB on 2 cores: {verdict} ({total:.0f} s, {peak:.1f} GB)")
        if args.options:
            run_options(case, args.threads)


if __name__ == "__main__":
    main()
