"""synth7t: synthetic 7T-quality brain MRI from 3T T1-weighted scans.

The package's stages are plain functions (``synth7t.preprocess``, ``synth7t.pack``, ``synth7t.train``,
``synth7t.predict``, ``synth7t.evaluate``, ``synth7t.tune``); the ``synth7t`` command line is a thin wrapper over
them. They are imported lazily so that ``import synth7t`` stays cheap.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_API = {
    "preprocess": ("synth7t.preprocess.pipeline", "preprocess"),
    "pack": ("synth7t.dataset.pack", "pack"),
    "train": ("synth7t.training", "train"),
    "predict": ("synth7t.inference", "predict"),
    "evaluate": ("synth7t.evaluation.evaluate", "evaluate"),
    "tune": ("synth7t.tuning", "tune"),
    "build_demo_cohort": ("synth7t.demo", "build_demo_cohort"),
}


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'synth7t' has no attribute {name!r}")


__all__ = ["__version__", *_API]
