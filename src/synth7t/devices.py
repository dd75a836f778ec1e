"""Device and precision choices, without Lightning: the accelerator (training and prediction), the training precision.

``auto`` is decided at run time, never at import: a GPU is used when one is usable.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from synth7t.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_accelerator(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu`` (decided at run time, never at import)."""
    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return "cuda" if device == "gpu" else device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX): there bf16 GEMMs run at about
    twice the fp32 rate; elsewhere oneDNN emulates them, slower than fp32. ``SYNTH7T_CPU_BF16=0`` (or ``1``)
    overrides the detection."""
    import os

    forced = os.environ.get("SYNTH7T_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume emulation
        return False


def matmul_rate(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, n: int = 2048,
                seconds: float = 0.5) -> float:
    """FLOP/s of square ``n x n`` matmuls at ``dtype`` on ``device``: the best of repeated timed runs within
    ``seconds`` (after a warm-up), as the machine's dense matmul peak at that precision."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 is worth using on this CPU: it multiplies bf16 in hardware (:func:`cpu_has_native_bf16`) *and*
    a matmul probe (about 0.6 s, once per process) finds bf16 more than 10 % faster than fp32. Hardware bf16 is not
    always faster: measured on this project's machines, 0.5x (AVX512-BF16 without AMX) to 3x (AMX) the fp32 rate.
    ``SYNTH7T_CPU_BF16=0`` (or ``1``) overrides both the detection and the probe."""
    import os

    forced = os.environ.get("SYNTH7T_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_has_native_bf16() and _bf16_matmul_faster()


@functools.lru_cache(maxsize=1)
def _bf16_matmul_faster() -> bool:
    bf16, fp32 = matmul_rate(torch.bfloat16, seconds=0.3), matmul_rate(torch.float32, seconds=0.3)
    faster = bf16 > 1.1 * fp32
    log.info("CPU matmul: bf16 %.0f, fp32 %.0f GFLOP/s: %s", bf16 / 1e9, fp32 / 1e9,
             "bf16 is faster" if faster else "fp32 is as fast or faster, bf16 not used")
    return faster


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning's precision for training. ``auto``: bf16 mixed precision on a GPU that supports it and on a CPU
    with native bf16 (:func:`cpu_has_native_bf16`), fp32 elsewhere.

    Not the matmul probe of :func:`cpu_bf16_is_faster`: on the project's machine C (AVX512-BF16 without AMX, where a
    2048² bf16 matmul runs at half the fp32 rate) the probe chose fp32; the demo's ``tiny`` then trained 532 steps
    in its 6 minutes and scored 19.86 dB held-out, and in bf16, from a clean clone right after, 505 steps and
    20.55 dB (``histmatch_population`` 19.89): a small network's step is not GEMM-bound, and bf16 did not cost it
    steps. A probe for training would have to time the model's own step (and its quality is another matter)."""
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    if accelerator == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if accelerator == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems


def keep_freed_memory(top_pad_mb: int = 256) -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse, instead of returning them to the system.

    A CPU training step allocates and frees the same activation-sized buffers every step; by default glibc gives
    blocks over its (adaptive) mmap threshold back at once, and every new one is paid for again in page faults (on
    this project's 2-core machine: 0.84 M faults and 1.4 s of system time per thesis-network bf16 step;
    ``benchmarks/train_step.py`` measures the step with and without). This sets the mmap threshold to its maximum
    (32 MiB), the trim threshold to 2 GiB and the top pad to ``top_pad_mb``. Peak memory is unchanged (the blocks
    are the same; they are kept, not added). Blocks over 32 MiB are still mapped and unmapped each time.

    Process-wide and idempotent; returns whether it applied (glibc on Linux only; elsewhere, or with
    ``SYNTH7T_MALLOC=default`` in the environment, a no-op).
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("SYNTH7T_MALLOC", "").strip().lower() == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, top_pad_mb * 2**20)))
