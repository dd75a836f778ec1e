"""Faults survived, nothing lost: ``synth7t predict --bids --workers 2`` over a synthetic BIDS cohort, broken in the
middle in every way a long cluster run breaks, then rerun until nothing is missing.

The cohort: ``--scans`` T1w scans (at least 20) of synthetic heads with zero background, in a BIDS dataset (two
sessions per participant); three of them are bad inputs that must fail with one line each and never stop the
others: one truncated (half its gzip stream), one unreadable (no read permission; random bytes when running as
root, where permissions do not bite), one whose header must be refused (sform and qform codes 0). The model is an
untrained ``tiny`` network (its output is meaningless; its cost and files are a trained one's). Each run is the
real command line in a subprocess:

1. ``kill``: SIGKILL to the main process once a few scans are finished (its workers are orphaned);
2. ``disk-full``: the rerun under a file-size limit (``RLIMIT_FSIZE``) that lets the small JSON files through and
   stops the first volume: the run stops, naming the full disk, and lists the scans it did not start;
3. ``worker``: the rerun, one preprocessing worker killed (SIGKILL) while it works;
4. ``rerun``: the rerun that finishes what is missing (timed);
5. ``nothing-left``: one more rerun, which skips every finished scan (timed).

After each run the outputs are checked: no partial or temporary file among them (every file under ``sub-*``
belongs to a scan whose record is written; the staging folder gone after a run that ended), every finished scan
valid (its volumes load and are finite, its sidecar is present, every file's sha256 equals the record's), the exit
status (0 all done, 1 some failed) and the run record ``logs/predict.json`` (one entry per failure, the same as
the summary's ``failed:`` lines). Printed: the figures of docs/benchmarks.md (scans, faults injected, outputs
lost, rerun times).

    python benchmarks/cohort_faults.py                     # 24 scans, 2 workers
    python benchmarks/cohort_faults.py --scans 40 --keep /tmp/faults
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BAD = {"truncated": "sub-02_ses-2", "unreadable": "sub-04_ses-1", "bad_header": "sub-06_ses-2"}
SHAPE = (40, 48, 36)
VOXEL_MM = 1.2
FSIZE_LIMIT = 16 * 1024  # bytes: the run record and sidecars pass, a compressed volume does not


# ---------------------------------------------------------------------------------------------------------
# the cohort and the model


def _head(seed: int) -> np.ndarray:
    """A head-like volume: brain shells inside a skull-like rim, zero background (threshold strip finds it)."""
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(np.float32)
    c = (np.asarray(SHAPE, np.float32) / 2 + rng.uniform(-2, 2, 3))[:, None, None, None]
    r = (np.asarray([15, 18, 13], np.float32) * rng.uniform(0.9, 1.1, 3))[:, None, None, None]
    d = np.sqrt((((idx - c) / r) ** 2).sum(0))
    data = np.where(d < 0.45, 900, np.where(d < 0.8, 600, 300)) * (d < 1.0)
    bias = 1 + 0.2 * (idx[0] / SHAPE[0] - 0.5)
    return ((data + rng.normal(0, 20, SHAPE) * (d < 1)) * bias).clip(0).astype(np.float32)


def make_cohort(root: Path, n_scans: int) -> Path:
    """A BIDS raw dataset of ``n_scans`` T1w scans (two sessions per participant), three of them bad (``BAD``)."""
    import nibabel as nib

    if n_scans < 20:
        raise SystemExit("--scans: at least 20")
    raw = root / "bids"
    raw.mkdir(parents=True)
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "synthetic faults cohort",
                                                              "BIDSVersion": "1.10.0"}))
    rows = ["participant_id\tage\tsex"]
    aff = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    for i in range(n_scans):
        sub, ses = f"{i // 2 + 1:02d}", f"{i % 2 + 1}"
        folder = raw / f"sub-{sub}" / f"ses-{ses}" / "anat"
        folder.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(_head(i), aff).to_filename(folder / f"sub-{sub}_ses-{ses}_T1w.nii.gz")
        if ses == "1":
            rows.append(f"sub-{sub}\t{60 + i % 20}\t{'FM'[i % 2]}")
    (raw / "participants.tsv").write_text("\n".join(rows) + "\n")
    paths = {k: next(raw.glob(f"sub-*/ses-*/anat/{v}_T1w.nii.gz")) for k, v in BAD.items()}
    blob = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(blob[: len(blob) // 2])
    if os.geteuid() == 0:  # root reads anything: an unreadable file is then one that is no NIfTI at all
        paths["unreadable"].write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        paths["unreadable"].chmod(0)
    img = nib.Nifti1Image(np.asarray(nib.load(paths["bad_header"]).dataobj), None)  # no affine: both codes 0
    img.header.set_zooms((VOXEL_MM,) * 3)
    img.to_filename(paths["bad_header"])
    return raw


def make_model(folder: Path) -> Path:
    """An untrained ``tiny`` model folder (8 channels), as benchmarks/predict.py builds one."""
    import torch

    from synth7t.config import load_config
    from synth7t.model_folder import save_model_folder
    from synth7t.nn import UNet
    from synth7t.training import model_config

    cfg = load_config("tiny")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"channels": 8, "n_groups": 4,
                                                                         "head_dim": 8})})
    torch.manual_seed(0)
    net = UNet(cfg.model)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_model_folder(folder, state, model_config(cfg, None, net), {}, "benchmark model (untrained)\n")
    return folder


# ---------------------------------------------------------------------------------------------------------
# running and breaking


def command(model: Path, raw: Path, deriv: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "synth7t.cli", "-q", "predict", str(model), "--bids", str(raw), "-o", str(deriv),
            "--workers", str(workers), "--skullstrip", "threshold", "--n4", "demo", "--device", "cpu"]


def finished(deriv: Path) -> int:
    return sum(1 for _ in deriv.glob("sub-*/ses-*/anat/*_desc-synth7T_T1w.json"))


def children(pid: int) -> list[int]:
    """The process IDs whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def workers_of(pid: int) -> list[int]:
    """The spawn pool's worker processes of ``pid`` (not its resource tracker)."""
    out = []
    for child in children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "spawn_main" in cmd:
            out.append(child)
    return out


def run(cmd: list[str], *, fault: str | None = None, after: int = 3, deriv: Path | None = None,
        timeout: float = 1800) -> dict:
    """Run ``cmd``; ``fault``: ``kill`` (SIGKILL the main process once ``after`` more scans are finished),
    ``worker`` (SIGKILL one preprocessing worker once one is busy), ``disk-full`` (RLIMIT_FSIZE)."""
    def limit():  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))

    start_count = finished(deriv) if deriv else 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit if fault == "disk-full" else None)
    injected, orphans = None, []
    if fault in ("kill", "worker"):
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
            time.sleep(0.05)
            if fault == "kill" and finished(deriv) >= start_count + after:
                orphans = workers_of(proc.pid)
                proc.send_signal(signal.SIGKILL)
                injected = f"SIGKILL to the main process after {finished(deriv) - start_count} finished scan(s)"
                break
            if fault == "worker" and finished(deriv) >= start_count + 1 and workers_of(proc.pid):
                victim = workers_of(proc.pid)[0]
                os.kill(victim, signal.SIGKILL)
                injected = f"SIGKILL to worker process {victim}"
                break
    left = []
    if orphans:  # workers of a killed main process must not live on (they hold its output pipes, memory, cores)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in orphans):
            time.sleep(0.2)
        left = [p for p in orphans if _alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
    out, err = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - t0
    if fault in ("kill", "worker") and injected is None:
        raise RuntimeError(f"the run ended before the fault ({fault}) could be injected: use more --scans")
    return {"fault": fault, "injected": injected or fault, "code": proc.returncode, "seconds": round(wall, 1),
            "stdout": out, "stderr": err, "orphaned_workers_left": len(left)}


# ---------------------------------------------------------------------------------------------------------
# checking


def check(raw: Path, deriv: Path, *, ended: bool) -> dict:
    """The state of the outputs: finished scans, and the problems found (empty when none)."""
    import nibabel as nib

    from synth7t.inference import PredictOptions
    from synth7t.inference.bids import BidsLayout, BidsQuery, collect_bids
    from synth7t.inference.outputs import STAGING, output_files, verify

    layout = BidsLayout(raw, deriv)
    problems, done, allowed = [], [], set()
    for job in collect_bids(BidsQuery(raw), PredictOptions()):
        paths = layout.paths(job)
        if not paths["record"].exists():
            continue
        done.append(job.subject)
        allowed |= set(output_files(paths))
        problems += [f"{job.subject}: {p}" for p in verify(paths)]
        for key in ("syn7t", "mask"):
            try:
                data = np.asanyarray(nib.load(paths[key]).dataobj)
                if not np.isfinite(data).all():
                    problems.append(f"{job.subject}: {key} has NaN/Inf")
            except Exception as exc:  # noqa: BLE001 - reported
                problems.append(f"{job.subject}: {key} does not load ({exc})")
    for f in deriv.rglob("*"):
        rel = f.relative_to(deriv)
        if not f.is_file() or rel.parts[0] == STAGING:
            continue
        if rel.parts[0].startswith("sub-") and f not in allowed:
            problems.append(f"partial or temporary file among the outputs: {rel}")
        elif f.name.startswith(".") and f.name != ".bidsignore":
            problems.append(f"temporary file: {rel}")
    if ended and (deriv / STAGING).exists() and any(p.is_file() for p in (deriv / STAGING).rglob("*")):
        problems.append("staged files left after a run that ended")
    return {"finished": len(done), "problems": problems}


def run_record(deriv: Path) -> dict | None:
    path = deriv / "logs" / "predict.json"
    return json.loads(path.read_text()) if path.exists() else None


def faults(root: Path, n_scans: int = 24, workers: int = 2, log=print) -> dict:
    """The whole scenario in ``root``; returns the figures and every check's result."""
    raw = make_cohort(root, n_scans)
    model = make_model(root / "model")
    deriv = raw / "derivatives" / "synth7t"
    cmd = command(model, raw, deriv, workers)
    good = n_scans - len(BAD)
    runs = []
    for name, fault in (("kill", "kill"), ("disk-full", "disk-full"), ("worker", "worker"), ("rerun", None),
                        ("nothing-left", None)):
        before = finished(deriv)
        res = run(cmd, fault=fault, deriv=deriv)
        state = check(raw, deriv, ended=fault != "kill")
        if "Traceback" in res["stderr"]:
            state["problems"].append("a traceback: " + res["stderr"].strip().splitlines()[-1])
        if res["orphaned_workers_left"]:
            state["problems"].append(f"{res['orphaned_workers_left']} worker(s) of the killed run alive after 30 s")
        rec = run_record(deriv) if fault != "kill" else None
        failed_lines = [ln for ln in res["stdout"].splitlines() if ln.startswith("  failed: ")]
        res.update(name=name, finished_before=before, finished_after=state["finished"], problems=state["problems"],
                   record_failures=None if rec is None else len(rec["failed"]), summary_failures=len(failed_lines),
                   record_counts=None if rec is None else rec["counts"])
        res["disk_full_named"] = fault != "disk-full" or "output disk is full" in res["stdout"]
        runs.append(res)
        log(f"{name:13s} exit {res['code']:>3}  {res['seconds']:6.1f} s  finished {before:>2} -> "
            f"{state['finished']:>2}  record failures {res['record_failures']}  problems {len(state['problems'])}"
            f"  ({res['injected']})")
        for p in state["problems"]:
            log(f"    {p}")
    final = runs[-1]
    return {"scans": n_scans, "good_scans": good, "bad_inputs": len(BAD), "workers": workers,
            "faults_injected": 3 + len(BAD),  # main killed, disk full, worker killed; + the bad inputs
            "outputs_lost": good - final["finished_after"], "runs": runs,
            "rerun_seconds": runs[3]["seconds"], "nothing_left_seconds": final["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="Build the cohort here and keep it (default: a temporary folder).")
    args = ap.parse_args()
    import platform

    root = args.keep or Path(tempfile.mkdtemp(prefix="synth7t-faults-"))
    print(f"cohort faults: {args.scans} scans, --workers {args.workers}, {platform.processor() or platform.machine()}"
          f", {len(os.sched_getaffinity(0))} usable cores, load average {os.getloadavg()[0]:.2f}")
    try:
        fig = faults(root, args.scans, args.workers)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    problems = sum(len(r["problems"]) for r in fig["runs"])
    print(f"\nscans {fig['scans']} ({fig['good_scans']} good, {fig['bad_inputs']} bad inputs), faults injected "
          f"{fig['faults_injected']}, outputs lost {fig['outputs_lost']}, problems found {problems}; rerun that "
          f"finished the cohort {fig['rerun_seconds']:.1f} s, rerun with nothing left "
          f"{fig['nothing_left_seconds']:.1f} s")
    print("exit codes: " + ", ".join(f"{r['name']} {r['code']}" for r in fig["runs"]))
    sys.exit(0 if fig["outputs_lost"] == 0 and problems == 0 else 1)


if __name__ == "__main__":
    main()
