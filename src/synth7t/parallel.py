"""Processes and threads shared by preprocessing and prediction: the cores this process may use, a cohort's
shard, and the initializer that caps a worker process's threads before ITK, OpenMP or torch start their pools.

A foundation module (docs/architecture.md, layer 1): the preprocessing pool (:mod:`synth7t.preprocess.pipeline`)
and the prediction's preprocessing workers (:mod:`synth7t.inference.prefetch`) both use it; it imports nothing of
synth7t but :mod:`synth7t.errors`.
"""

from __future__ import annotations

import os
from typing import Protocol, TypeVar

from synth7t.errors import ConfigError

THREAD_VARIABLES = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


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


def worker_init(threads: int) -> None:
    """Process-pool initializer: thread limits (ITK, OpenMP, MKL, torch) before ITK/torch start their pools."""
    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)
    set_itk_threads(threads)
    import torch

    torch.set_num_threads(threads)


def spawn_pool(workers: int, threads: int):
    """A ``spawn`` process pool (safe with torch and ITK) whose workers run :func:`worker_init` with ``threads``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=worker_init, initargs=(threads,))
