"""Preprocessing ahead of the network: the CPU half of a prediction of the next scans runs in worker processes.

While the network predicts scan *i* in the main process, ``workers`` processes (``spawn`` context, safe with torch)
load, reorient, bias-correct, skull-strip and resample scans *i+1, i+2, ...* with
:func:`synth7t.inference.volume.prepare_scan`, the very function the main process runs itself with ``workers=0``:
one code path, so a pipelined prediction equals a sequential one bit for bit where preprocessing does not depend on the
thread count (ITK's N4 does, at float rounding: 3e-7 relative between 1 and 2 threads). At most ``workers + 1``
scans are in flight, so memory stays bounded however long the cohort. Results come back in job order. A scan whose
preprocessing fails (in a worker or inline) is reported with its one-line reason and the others go on; a worker
that dies (out of memory, killed) fails the scan it was given first and a fresh pool takes over the rest.

Worker threads: each worker gets ``(the run's cores - threads of the main process) / workers`` threads (at least
one; the run's cores: :func:`synth7t.parallel.resolve_cores`) for torch, OpenMP and ITK, set in the pool's
initializer (:func:`synth7t.parallel.worker_init`), so that workers do not fight the network for cores; one with
``--deterministic``.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from synth7t.errors import Synth7tError
from synth7t.inference.volume import prepare_scan
from synth7t.parallel import resolve_cores, spawn_pool

log = logging.getLogger(__name__)
MAX_AUTO_WORKERS = 4


def default_workers(n_jobs: int, device_type: str, cores: int | None = None) -> int:
    """Workers when the user does not say: none for fewer than two scans (a worker's start-up would not pay);
    one on a CPU (the network already uses the cores; one worker hides the preprocessing's serial parts); on a
    GPU, where the network waits for the CPU, up to one per two spare ``cores`` (default: the run's,
    :func:`synth7t.parallel.resolve_cores`), at most ``MAX_AUTO_WORKERS``."""
    if n_jobs < 2:
        return 0
    if device_type == "cpu":
        return 1
    cores = cores or resolve_cores().n
    return max(1, min(MAX_AUTO_WORKERS, (cores - 1) // 2, n_jobs))


def worker_threads(workers: int, device_type: str, cores: int | None = None) -> int:
    """Threads per worker: the ``cores`` (default: the run's) the main process leaves free, shared out; at least
    one."""
    if workers <= 0:
        return 0
    if device_type == "cpu":
        import torch

        main = torch.get_num_threads()
    else:
        main = 1
    return max(1, ((cores or resolve_cores().n) - main) // workers)


def failure_message(exc: BaseException) -> str:
    """One line for a failed scan: a user error's message, else the exception's type and first line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, Synth7tError) else f"{type(exc).__name__}: {text}"


def _prepare(path: Path, spec, steps: dict, preprocessed: bool, keep_input: bool) -> tuple[dict | None, str | None]:
    """Run :func:`synth7t.inference.volume.prepare_scan`; never raises: ``(prep, None)`` or ``(None, reason)``."""
    from synth7t.parallel import thread_counts

    try:
        prep = prepare_scan(path, spec, steps, preprocessed=preprocessed, keep_input=keep_input)
        prep["threads"] = thread_counts()  # what this scan's preprocessing ran with (the run record keeps it)
        return prep, None
    except Exception as exc:  # reported per scan; a worker's exception need not be picklable this way
        if not isinstance(exc, Synth7tError):
            log.debug("%s: preprocessing failed\n%s", path, traceback.format_exc())
        return None, failure_message(exc)


def prefetched(jobs: list, spec, steps: dict, *, preprocessed: bool, keep_input: bool, workers: int,
               device_type: str = "cpu", threads: int | None = None
               ) -> Iterator[tuple[object, dict | None, str | None]]:
    """``(job, prep, None)`` or ``(job, None, reason)`` per job (a :class:`synth7t.manifest.Subject`), in order.

    ``spec``: the model's :class:`synth7t.inference.PrepSpec`; ``steps``: the resolved preprocessing steps;
    ``device_type``: where the network runs (sets the workers' threads unless ``threads`` does). ``workers=0``:
    each scan is prepared in this process when the caller asks for it, as before pipelining.
    """
    args = (spec, steps, preprocessed, keep_input)
    if workers <= 0 or not jobs:
        for job in jobs:
            yield (job, *_prepare(job.t3, *args))
        return
    threads = threads or worker_threads(workers, device_type)
    log.info("preprocessing in %d worker process(es), %d thread(s) each, ahead of the network", workers, threads)
    pending = deque(jobs)
    while pending:
        yield from _run_pool(pending, args, workers, threads)


def _run_pool(pending: deque, args: tuple, workers: int, threads: int) -> Iterator[tuple]:
    """Drain ``pending`` through one pool; returns early (leaving the rest in ``pending``) when the pool breaks."""
    from concurrent.futures.process import BrokenProcessPool

    pool = spawn_pool(workers, threads)
    in_flight: deque = deque()
    try:
        while pending or in_flight:
            while pending and len(in_flight) < workers + 1:  # bounded read-ahead: RAM stays bounded
                job = pending.popleft()
                try:
                    future = pool.submit(_prepare, job.t3, *args)
                except BrokenProcessPool:  # a worker died since the last result: the pool takes no more work
                    pending.appendleft(job)
                    break
                in_flight.append((job, future))
            if not in_flight:  # broken with nothing in flight: nothing lost, a fresh pool takes over
                return
            job, future = in_flight.popleft()
            try:
                prep, error = future.result()
            except BrokenProcessPool:
                pending.extendleft(reversed([j for j, _ in in_flight]))
                yield job, None, "worker process died while preparing this scan (out of memory or killed)"
                return
            yield job, prep, error
    finally:
        for _, future in in_flight:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
