"""Faults survived, nothing lost (slow): benchmarks/cohort_faults.py's scenario on a synthetic BIDS cohort of 24
scans: ``predict --bids --workers 2`` SIGKILLed in the middle, a full disk (RLIMIT_FSIZE), a preprocessing worker
SIGKILLed, three bad inputs (truncated, unreadable, refused header); after each run no partial or temporary file
among the outputs and every finished one valid (loads, finite, sidecar, checksums); reruns finish the cohort."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cohort_faults.py"


@pytest.mark.slow
def test_a_broken_cohort_run_loses_nothing(tmp_path):
    spec = importlib.util.spec_from_file_location("cohort_faults", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fig = bench.faults(tmp_path, n_scans=24, workers=2)
    runs = {r["name"]: r for r in fig["runs"]}
    for run in fig["runs"]:
        assert run["problems"] == [], (run["name"], run["problems"], run["stderr"][-2000:])
    assert fig["outputs_lost"] == 0 and runs["nothing-left"]["finished_after"] == fig["good_scans"] == 21
    assert runs["kill"]["code"] == -9 and 0 < runs["kill"]["finished_after"] < fig["good_scans"]
    # a full disk stops the run: exit 1, it says so, and the scans it did not start are listed, one line each
    disk = runs["disk-full"]
    assert disk["code"] == 1 and disk["disk_full_named"] and disk["finished_after"] == disk["finished_before"]
    assert disk["record_failures"] == disk["summary_failures"] == 24 - disk["finished_before"]
    # a dead worker fails at most the scan it held; the others go on in a fresh pool
    worker = runs["worker"]
    assert worker["code"] == 1 and worker["finished_after"] >= fig["good_scans"] - 1
    # the last reruns do only what is missing, and the bad inputs fail with their one line each
    for name in ("rerun", "nothing-left"):
        run = runs[name]
        assert run["code"] == 1 and run["record_failures"] == run["summary_failures"] == 3
        assert run["record_counts"]["skipped"] == run["finished_before"]
        assert run["record_counts"]["done"] == run["finished_after"] - run["finished_before"]
    assert runs["nothing-left"]["record_counts"]["done"] == 0
