"""FLOPs of a network, counted (not estimated), and the matmul rate of this machine, measured.

:func:`count_flops` runs a network once on the ``meta`` device under torch's ``FlopCounterMode``: every
convolution, matrix product and attention is counted from its shapes (2 FLOPs a multiply-add), with no memory and
no arithmetic. :func:`matmul_rate` measures this machine's dense matmul rate at a precision, the "peak" that
benchmarks report fractions of; :func:`expected_seconds` turns the two into the time a prediction will take.
"""

from __future__ import annotations

import torch
from torch import nn

from synth7t.devices import matmul_rate  # noqa: F401 - re-exported: benchmarks report fractions of it

#: The fraction of the CPU's matmul rate (at the run's precision) that the published network's prediction reached
#: (benchmarks/thesis_model.py on the project's 2-core machine C, alone: 0.84 in fp32, 0.87-1.0 in bf16); used to say
#: the expected time before a long run.
MEASURED_CPU_FRACTION = 0.8


def count_flops(build, *inputs_shapes: tuple[int, ...]) -> int:
    """FLOPs of one forward of ``build()`` (a network constructor, run on the meta device) on inputs of the given
    shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net: nn.Module = build()
        inputs = [torch.empty(s) for s in inputs_shapes]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(*inputs)
    return int(counter.get_total_flops())


def published_flops(cfg, in_plane: tuple[int, int]) -> int:
    """FLOPs of the published thesis network on one window of an ``in_plane`` slice (padded as prediction pads it)."""
    from synth7t.nn.published import PublishedUNet

    f = cfg.downsample_factor
    h, w = (-(-s // f) * f for s in in_plane)
    return count_flops(lambda: PublishedUNet(cfg), (1, cfg.in_slices, h, w), (1, cfg.context_tokens, cfg.context_dim))


def expected_seconds(flops: float, dtype: torch.dtype, fraction: float = MEASURED_CPU_FRACTION) -> tuple[float, float]:
    """(expected seconds, measured matmul FLOP/s) of ``flops`` on this CPU at ``dtype``, at ``fraction`` of the
    matmul rate."""
    rate = matmul_rate(dtype, seconds=0.3)
    return flops / (rate * fraction), rate
