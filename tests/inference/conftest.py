"""Fixtures of the prediction tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def write_brain():
    """test_predict.py's synthetic oblique brain writer, ``(folder, name, shape) -> path`` (one source for all)."""
    spec = importlib.util.spec_from_file_location("synth7t_test_predict", Path(__file__).with_name("test_predict.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._oblique_brain
