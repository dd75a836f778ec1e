"""Processes and threads of every stage: the cores this process may use, a cohort's shard, and the initializer
that caps a worker process's threads before ITK, OpenMP or torch start their pools.

The one place that knows the cores (:func:`resolve_cores`): an explicit ``--threads`` first, else a SLURM job's
``SLURM_CPUS_PER_TASK``, else the CPU affinity mask (taskset, cgroups' cpusets); never more than the mask allows.
:func:`apply_threads` gives ITK (ANTs, SimpleITK), OpenMP/torch and BLAS that same number. preprocess, pack,
train, predict (and its preprocessing workers) and qc size their threads and processes from it and print it in
their run summary.

A foundation module (docs/architecture.md, layer 1); it imports nothing of synth7t but :mod:`synth7t.errors`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Protocol, TypeVar

from synth7t.errors import ConfigError

log = logging.getLogger(__name__)
THREAD_VARIABLES = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS")


class _Row(Protocol):
    subject: str
    session: str | None


Row = TypeVar("Row", bound=_Row)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM job's CPU set, taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Cores:
    """The cores a run uses (``n``) and where that number came from (``source``: ``--threads``,
    ``SLURM_CPUS_PER_TASK`` or ``CPU affinity``)."""

    n: int
    source: str

    def describe(self) -> str:
        """``"cores: 4 (SLURM_CPUS_PER_TASK)"``: the run summary's line."""
        return f"cores: {self.n} ({self.source})"


def resolve_cores(threads: int | None = None) -> Cores:
    """The cores this run may use: ``threads`` (``--threads``) when given, else ``SLURM_CPUS_PER_TASK``, else the
    CPU affinity mask; never more than the mask allows (a larger request is cut to it, with a warning)."""
    mask = usable_cores()
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"--threads {threads}: expected 1 or more")
        n, source = int(threads), "--threads"
    else:
        slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
        if slurm:
            try:
                n, source = int(slurm), "SLURM_CPUS_PER_TASK"
            except ValueError:
                log.warning("SLURM_CPUS_PER_TASK=%r is not a number: ignored", slurm)
                n, source = mask, "CPU affinity"
        else:
            n, source = mask, "CPU affinity"
    if n > mask:
        log.warning("%s asks for %d cores but this process may run on %d: using %d", source, n, mask, mask)
        n = mask
    return Cores(max(1, n), source)


def apply_threads(threads: int) -> None:
    """Give ITK, OpenMP (torch's intra-op pool) and BLAS ``threads``: the environment for libraries and worker
    processes started later, and the pools already loaded in this process (torch, SimpleITK, BLAS through
    threadpoolctl where installed)."""
    threads = max(1, int(threads))
    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)
    set_itk_threads(threads)
    if "torch" in sys.modules:  # do not import torch only to size it: it reads OMP_NUM_THREADS when it starts
        import torch

        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - an optional helper
        return
    threadpool_limits(threads)


def thread_counts() -> dict[str, int | None]:
    """The thread counts in force in this process: torch's, ITK's (SimpleITK) and the environment's OpenMP/ITK.
    For the run record and for tests."""
    out: dict[str, int | None] = {"omp_env": _int_env("OMP_NUM_THREADS"),
                                  "itk_env": _int_env("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    if "SimpleITK" in sys.modules:
        out["itk"] = sys.modules["SimpleITK"].ProcessObject.GetGlobalDefaultNumberOfThreads()
    return out


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def select_shard(subjects: list[Row], shard: tuple[int, int] | None) -> list[Row]:
    """Rows sorted by subject ID (then session); with ``shard=(k, n)`` the rows of every n-th subject ID starting
    at index k: all 3T scans of one subject land in one shard, so its 7T is processed by one task."""
    ordered = sorted(subjects, key=lambda s: (s.subject, s.session or ""))
    if shard is None:
        return ordered
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"shard {k}/{n}: need 0 <= k < n")
    ids = set(sorted({s.subject for s in ordered})[k::n])
    return [s for s in ordered if s.subject in ids]


def set_itk_threads(threads: int | None) -> None:
    """Limit ITK's threads (ANTs and SimpleITK) to ``threads``; ANTs reads the environment variable, once per
    process (when its ITK first needs a thread count): later changes do not reach it. Preprocessing's workers
    call this before any ITK work; a registration repeats bit for bit only at one thread."""
    if not threads:
        return
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        pass


def worker_init(threads: int, torch: bool = True) -> None:
    """Process-pool initializer: thread limits (ITK, OpenMP, BLAS, and torch unless ``torch=False``) before
    ITK/torch start their pools; and a watchdog that ends the worker when its parent dies (a SIGKILLed run, an
    out-of-memory kill): an orphaned worker would otherwise live on, holding memory, cores and the job's output
    pipes (found by benchmarks/cohort_faults.py)."""
    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)
    _watch_parent(os.getppid())
    if torch:
        import torch as _torch  # noqa: F401 - loaded here so that apply_threads sizes its pool

    apply_threads(threads)


def _watch_parent(parent: int, every_s: float = 1.0) -> None:
    """A daemon thread that exits this process at once when its parent process is gone (reparented)."""
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="synth7t-parent-watch", daemon=True).start()


def spawn_pool(workers: int, threads: int, *, torch: bool = True):
    """A ``spawn`` process pool (safe with torch and ITK) whose workers run :func:`worker_init` with ``threads``
    (``torch=False``: workers that never use torch do not load it)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=worker_init, initargs=(threads, torch))
