"""Device and precision choices, without Lightning: the accelerator (training and prediction), the training precision.

``auto`` is decided at run time, never at import: a GPU is used when one is usable.
"""

from __future__ import annotations

import torch

from synth7t.errors import ConfigError


def resolve_accelerator(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu`` (decided at run time, never at import)."""
    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return "cuda" if device == "gpu" else device


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning's precision for training. ``auto``: bf16 mixed precision on a GPU that supports it, fp32
    elsewhere."""
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    if accelerator == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"
