"""Time to build the simulated demo cohort, and peak RAM.

Reference (measured in the same run): loading the 0.5 mm template that every subject is made from — the floor
of what building a cohort costs. Prints the one-off set-up (template crop + shock-filter sharpening),
the median seconds per subject over ``--subjects`` subjects, their ratio to the reference, and peak RSS.

    python benchmarks/demo_cohort.py [--subjects 4]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    import numpy as np

    from synth7t.demo import Anatomy, DemoSpec, draw_covariates, load_template, simulate_subject
    from synth7t.io import save_volume

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=4)
    args = p.parse_args()
    spec = DemoSpec(n_subjects=args.subjects)
    ref = []
    for _ in range(3):
        t = time.perf_counter()
        load_template()
        ref.append(time.perf_counter() - t)
    t = time.perf_counter()
    anatomy = Anatomy.build(spec)
    setup = time.perf_counter() - t
    seeds = np.random.SeedSequence(spec.seed).spawn(args.subjects)
    per = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.subjects):
            t = time.perf_counter()
            rng = np.random.default_rng(seeds[i])
            age = draw_covariates(rng)[0]
            sim = simulate_subject(anatomy, spec, i, rng, age)
            save_volume(Path(tmp) / "t7.nii.gz", sim["t7"], dtype=np.int16)
            save_volume(Path(tmp) / "t3.nii.gz", sim["t3"], dtype=np.int16)
            per.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    ref_s = statistics.median(ref)
    print(f"reference: load the 0.5 mm template        {ref_s:6.2f} s (median of 3)")
    print(f"set-up: crop + sharpened template           {setup:6.2f} s (once per cohort)")
    print(f"per subject (simulate + write both images)  {statistics.median(per):6.2f} s "
          f"(median of {args.subjects}; {statistics.median(per) / ref_s:.1f}x the reference)")
    print(f"10-subject demo cohort, estimated            {setup + ref_s + 10 * statistics.median(per):6.1f} s")
    print(f"peak RSS                                    {rss:6.2f} GB")


if __name__ == "__main__":
    main()
