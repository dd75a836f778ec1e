"""The cores of a run (synth7t.parallel.resolve_cores): --threads first, else SLURM_CPUS_PER_TASK, else the CPU
affinity mask, never more than the mask; and every stage, run in a subprocess restricted to one core, sizes its
threads and processes from it and says so in its run summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synth7t.errors import ConfigError
from synth7t.parallel import resolve_cores, usable_cores

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_threads_then_slurm_then_affinity_never_above_the_mask(monkeypatch, caplog):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    mask = usable_cores()
    assert resolve_cores() == resolve_cores(None) and resolve_cores().n == mask
    assert resolve_cores().source == "CPU affinity"
    assert (resolve_cores(1).n, resolve_cores(1).source) == (1, "--threads")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert (resolve_cores().n, resolve_cores().source) == (1, "SLURM_CPUS_PER_TASK")
    assert resolve_cores(1).source == "--threads"  # the explicit option wins
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(mask + 3))
    with caplog.at_level("WARNING"):
        assert resolve_cores().n == mask  # never more than this process may run on
    assert f"may run on {mask}" in caplog.text
    assert resolve_cores(mask + 5).n == mask
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "lots")
    assert resolve_cores().source == "CPU affinity"
    with pytest.raises(ConfigError, match="--threads 0"):
        resolve_cores(0)
    assert resolve_cores(1).describe() == "cores: 1 (--threads)"


def _one_core():
    cpu = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {cpu})


def _run(args: list[str], *, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``args`` (a synth7t command or ``-c CODE``) in a fresh Python restricted to one core, no thread variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    cmd = [sys.executable, *(args if args[0] == "-c" else ["-m", "synth7t.cli", *args])]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=_one_core, timeout=600)


def _pair_manifest(root: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pp_conftest_cores",
                                                  Path(__file__).resolve().parents[1] / "preprocess" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    p3, p7 = helpers.write_pair(root, "c1", helpers._template_small())
    (root / "m.csv").write_text(f"subject,t3,t7\nc1,{p3},{p7}\n")
    return root / "m.csv"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_every_stage_on_one_core_uses_one(tmp_path, tiny_store, tiny_model, blob_volume):
    # preprocess: one pair; its summary names the cores and the threads of each subject
    res = _run(["preprocess", str(_pair_manifest(tmp_path)), "-o", str(tmp_path / "work"), "--preset", "demo",
                "--skullstrip", "threshold", "--jobs", "2"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "cores: 1 (CPU affinity); 1 thread(s) per subject" in res.stdout
    # pack
    res = _run(["pack", str(tiny_store[0]), "-o", str(tmp_path / "store"), "--multiple", "8"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "cores: 1 (CPU affinity)" in res.stdout
    # train's loaders and threads (the loader processes a config asks for, cut to the cores; torch's threads)
    code = ("import torch; from synth7t.config import load_config; from synth7t.training.data import "
            "loader_workers; from synth7t.parallel import resolve_cores, apply_threads; cfg = load_config('tiny'); "
            "cfg.data.num_workers = 2; apply_threads(resolve_cores().n); print(cfg.data.num_workers, loader_workers(cfg), "
            "torch.get_num_threads())")
    res = _run(["-c", code], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    asked, used, torch_threads = map(int, res.stdout.split())
    assert (asked, used, torch_threads) == (2, 0, 1)
    # predict with a preprocessing worker: the network's threads, the worker's, in the summary and the run record
    from synth7t.io import save_volume

    scans = tmp_path / "scans"
    for name in ("a.nii.gz", "b.nii.gz"):
        save_volume(scans / name, blob_volume)
    res = _run(["predict", str(tiny_model), str(scans), "-o", str(tmp_path / "pred"), "--preprocessed",
                "--workers", "1", "--device", "cpu"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "cores: 1 (CPU affinity); network 1 thread(s), 1 preprocessing worker(s) x 1 thread(s)" in res.stdout
    record = json.loads((tmp_path / "pred" / "logs" / "predict.json").read_text())
    assert record["exit_code"] == 0 and record["counts"]["done"] == 2
    assert record["preprocessing_threads"] == [{"itk": 1, "itk_env": 1, "omp_env": 1, "torch": 1}]
    # qc: the processes summarising outputs
    res = _run(["qc", str(tmp_path / "pred"), "-j", "4"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "2 process(es), cores: 1 (CPU affinity)" in res.stdout  # -j asks for it; the cores are still 1
    # SLURM_CPUS_PER_TASK larger than the mask: cut to the mask
    res = _run(["qc", str(tmp_path / "pred")], cwd=tmp_path, extra_env={"SLURM_CPUS_PER_TASK": "8"})
    assert res.returncode == 0 and "1 process(es), cores: 1 (SLURM_CPUS_PER_TASK)" in res.stdout
