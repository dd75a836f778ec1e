"""Small C kernels for CPU training and prediction, compiled on first use: GroupNorm -> SiLU, forward and backward.

Why: on this project's CPU the backward of ``silu(group_norm(x))`` on the large channels-last maps of the U-net's
first stages was, after the convolutions and attention, the largest item of a thesis-network training step
(~1.5-2 s of 8 s in bf16): eager PyTorch needs ~8 passes over the map, and neither ``torch.compile`` (3-10x
slower than eager for this reduction here, measured) nor PyTorch's native channels-last kernel does better.
``csrc/group_norm_silu.c`` does it in two passes (4x faster on a 4 x 64 x 288 x 224 bf16 map), and the forward
(statistics, then normalization and SiLU written once: one pass less than ``native_group_norm`` + ``silu_``).
Numbers: ``benchmarks/train_step.py``; the kernels are checked against float64 in ``tests/nn/test_native.py``.

How: the C file ships with the package and is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``)
into ``$SYNTH7T_CACHE/kernels`` (default ``~/.cache/synth7t/kernels``), keyed by the source, the flags and this
CPU's instruction-set flags (``-march=native``: a cluster's shared home holds one build per CPU type). It is
written atomically and loaded with :mod:`ctypes`; the calls release the GIL, so a map is cut into chunks of pixels
handled by a small thread pool of ``torch.get_num_threads()`` threads. The chunking does not depend on the number
of threads, so neither does the result.

Without a C compiler, or with ``SYNTH7T_NATIVE=0``, :func:`library` returns ``None`` (one warning in the log) and
the caller keeps its PyTorch path: same result up to float rounding, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["group_norm_silu_backward", "group_norm_silu_forward", "library"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "group_norm_silu.c"
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c99")
ROWS = 2048  # pixels per chunk: the unit of work of one call (and of the summation order)

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cache_dir() -> Path:
    base = os.environ.get("SYNTH7T_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "synth7t")
    return Path(base) / "kernels"


def _build(cc: str) -> Path:
    """Compile the kernel (once per source, flags and CPU) and return the shared library's path."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(COMPILE_FLAGS).encode() + _cpu_flags().encode() + cc.encode()).hexdigest()[:16]
    out = _cache_dir() / f"group_norm_silu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        # -ffast-math only when compiling: linking with it would add crtfastmath.o, which sets flush-to-zero for
        # the whole process when the library loads.
        compile_cmd = [cc, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)]
        for cmd in (compile_cmd, [cc, "-shared", str(obj), "-o", str(lib), "-lm"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:2])}... failed: {(proc.stderr or proc.stdout).strip()[:300]}")
        os.replace(lib, out)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, n = ctypes.c_void_p, ctypes.c_long
    for suffix in ("f32", "bf16"):
        getattr(lib, f"gn_silu_bwd_sums_{suffix}").argtypes = [p, p, n, n, n, n, n, p, p, p, p, p]
        getattr(lib, f"gn_silu_bwd_dx_{suffix}").argtypes = [p, p, n, n, n, n, n, p, p, p, p, p, p]
        getattr(lib, f"gn_silu_fwd_stats_{suffix}").argtypes = [p, n, n, n, n, n, p, p, p]
        getattr(lib, f"gn_silu_fwd_apply_{suffix}").argtypes = [p, n, n, n, n, n, p, p, p]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, built on first call; ``None`` where it cannot be (or ``SYNTH7T_NATIVE=0``)."""
    if os.environ.get("SYNTH7T_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "lib" not in _state:
            lib, cc = None, _compiler()
            try:
                if cc is None:
                    raise RuntimeError("no C compiler (set $CC, or install gcc)")
                lib = _load(_build(cc))
            except (OSError, RuntimeError) as exc:
                log.warning("native CPU kernel unavailable, using the PyTorch path (slower training on CPU): %s", exc)
            _state["lib"] = lib
        return _state["lib"]


def _pool() -> ThreadPoolExecutor:
    """A thread pool of torch.get_num_threads() threads, made again after a fork or a change of thread count."""
    key = (os.getpid(), torch.get_num_threads())
    with _lock:
        if _state.get("pool_key") != key:
            _state["pool"] = ThreadPoolExecutor(max(1, key[1]), thread_name_prefix="synth7t-native")
            _state["pool_key"] = key
        return _state["pool"]


def _run(fn, n_chunks: int, make_args) -> None:
    """Call ``fn(*make_args(k0, k1))`` over the chunk range [0, n_chunks), split into one range per thread."""
    pool = _pool()
    workers = pool._max_workers
    bounds = [n_chunks * i // workers for i in range(workers + 1)]
    ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if len(ranges) == 1:
        fn(*make_args(*ranges[0]))
        return
    for fut in [pool.submit(fn, *make_args(a, b)) for a, b in ranges]:
        fut.result()


def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, str, int]:
    """``x`` as a channels-last map, the kernels' type suffix, and the number of chunks of :data:`ROWS` pixels."""
    suffix = {torch.float32: "f32", torch.bfloat16: "bf16"}[x.dtype]
    return x.contiguous(memory_format=torch.channels_last), suffix, x.shape[0] * -(-x[0, 0].numel() // ROWS)


def _ptr(t: torch.Tensor, offset: int = 0) -> int:
    """Address of ``t``'s first element, plus ``offset`` elements."""
    return t.data_ptr() + offset * t.element_size()


def group_norm_silu_backward(lib: ctypes.CDLL, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, groups: int,
                             std_coef: torch.Tensor | None = None, sample_mean: torch.Tensor | None = None):
    """``(dx, dweight, dbias)`` of ``silu(group_norm(x))`` for a channels-last float32/bfloat16 CPU map ``x``.

    ``mean``/``rstd`` (B, G) are the forward's group statistics. With ``std_coef`` k (B,) and ``sample_mean`` M
    (B,), ``k_b (x - M_b)`` is added to dx: the gradient of the per-sample std that AdaDM takes from the same map
    (:func:`synth7t.nn.kernels.group_norm_silu`), folded in so that x is read twice in all.
    """
    bsz, c, h, w = x.shape
    hw, cg = h * w, c // groups
    x, suffix, n_chunks = _chunks(x)
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    m = mean.float().repeat_interleave(cg, 1).contiguous()  # (B, C)
    r = rstd.float().repeat_interleave(cg, 1)  # (B, C)
    w32 = weight.float() if weight is not None else torch.ones(c)
    b32 = (bias.float() if bias is not None else torch.zeros(c)).contiguous()
    a = (r * w32).contiguous()
    s1 = torch.empty(n_chunks, c)
    s2 = torch.empty(n_chunks, c)
    fn = getattr(lib, f"gn_silu_bwd_sums_{suffix}")
    _run(fn, n_chunks, lambda k0, k1: (_ptr(x), _ptr(grad), hw, c, ROWS, k0, k1, _ptr(m), _ptr(a), _ptr(b32),
                                       _ptr(s1, k0 * c), _ptr(s2, k0 * c)))
    sum1 = s1.view(bsz, -1, c).sum(1)  # (B, C), fixed order: chunks of one sample
    sum2 = s2.view(bsz, -1, c).sum(1)
    n = hw * cg
    a_g = (w32 * sum1).view(bsz, groups, cg).sum(-1) / n  # (B, G): mean over the group of w * dz
    b_g = (w32 * sum2).view(bsz, groups, cg).sum(-1) / n * rstd.float()
    cxc = -(r**2) * b_g.repeat_interleave(cg, 1)
    c0 = -r * a_g.repeat_interleave(cg, 1)
    if std_coef is not None:
        k = std_coef.float().view(bsz, 1)
        cxc = cxc + k
        c0 = c0 + k * (m - sample_mean.float().view(bsz, 1))
    cxc, c0 = cxc.contiguous(), c0.contiguous()
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    fn = getattr(lib, f"gn_silu_bwd_dx_{suffix}")
    _run(fn, n_chunks, lambda k0, k1: (_ptr(x), _ptr(grad), hw, c, ROWS, k0, k1, _ptr(m), _ptr(a), _ptr(b32),
                                       _ptr(cxc), _ptr(c0), _ptr(dx)))
    dw = (r * sum2).sum(0).to(weight.dtype) if weight is not None else None
    db = sum1.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


def group_norm_silu_forward(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            groups: int, eps: float):
    """``(silu(group_norm(x)), mean, rstd)`` for a channels-last float32/bfloat16 CPU map ``x`` (B, C, H, W);
    ``mean`` and ``rstd`` (B, G) float32 as ``torch.native_group_norm`` gives them.

    Statistics: per-chunk sums around a per-(sample, channel) shift (the sample's first pixel), combined in
    float64 per channel and then per group (no cancellation for maps far from zero mean); the biased variance.
    """
    bsz, c, h, w = x.shape
    hw, cg = h * w, c // groups
    x, suffix, n_chunks = _chunks(x)
    shift = x.permute(0, 2, 3, 1)[:, 0, 0, :].float().contiguous()  # (B, C)
    t1 = torch.empty(n_chunks, c)
    t2 = torch.empty(n_chunks, c)
    _run(getattr(lib, f"gn_silu_fwd_stats_{suffix}"), n_chunks,
         lambda k0, k1: (_ptr(x), hw, c, ROWS, k0, k1, _ptr(shift), _ptr(t1, k0 * c), _ptr(t2, k0 * c)))
    s1 = t1.double().view(bsz, -1, c).sum(1)  # (B, C): sum of (x - k) over the sample's pixels
    s2 = t2.double().view(bsz, -1, c).sum(1)
    mean_c = shift.double() + s1 / hw  # per channel
    m2_c = (s2 - s1 * s1 / hw).clamp_min(0.0)  # sum of squared deviations from the channel mean
    mean_g = mean_c.view(bsz, groups, cg).mean(-1)  # (B, G)
    dev = (mean_c.view(bsz, groups, cg) - mean_g[..., None]).pow(2).sum(-1) * hw
    var_g = (m2_c.view(bsz, groups, cg).sum(-1) + dev) / (hw * cg)
    rstd_g = (var_g + eps).rsqrt()
    w64 = weight.double() if weight is not None else torch.ones(c, dtype=torch.float64)
    b64 = bias.double() if bias is not None else torch.zeros(c, dtype=torch.float64)
    a = rstd_g.repeat_interleave(cg, 1) * w64  # (B, C)
    d = b64 - mean_g.repeat_interleave(cg, 1) * a
    a, d = a.float().contiguous(), d.float().contiguous()
    y = torch.empty_like(x, memory_format=torch.channels_last)
    _run(getattr(lib, f"gn_silu_fwd_apply_{suffix}"), n_chunks,
         lambda k0, k1: (_ptr(x), hw, c, ROWS, k0, k1, _ptr(a), _ptr(d), _ptr(y)))
    return y, mean_g.float(), rstd_g.float()
