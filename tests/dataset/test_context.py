"""The context vector of docs/data-layout.md."""

from __future__ import annotations

import numpy as np
import pytest

from synth7t.dataset.context import CONTEXT_DIM, encode_context, middle_slice, slice_position


def test_full_context_values():
    v = encode_context(82, "F", "ill", 0.25)
    assert v.dtype == np.float32 and v.shape == (CONTEXT_DIM,) == (7,)
    assert v.tolist() == pytest.approx([1.2, 1.0, 1.0, 0.0, 0.0, 1.0, 0.25])


def test_missing_covariates_are_explicit():
    v = encode_context(None, None, None, -1.0)
    assert v.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    assert encode_context(70, "m", "healthy", 0.0).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert encode_context(float("nan"), None, None, 0.0)[:2].tolist() == [0.0, 0.0]


def test_slice_position():
    Z = 11
    z_mid = middle_slice(Z)
    assert z_mid == 5.0
    assert slice_position(5, z_mid, Z) == 0.0
    assert slice_position(0, z_mid, Z) == pytest.approx(-5 / 5.5)
    assert slice_position(10, z_mid, Z) == pytest.approx(5 / 5.5)


@pytest.mark.parametrize(
    ("args", "match"),
    [((70, "X", None, 0.0), "sex"), ((70, None, "mci", 0.0), "group"), ((-3, None, None, 0.0), "age"),
     ((70, None, None, float("inf")), "slice_position")],
)
def test_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        encode_context(*args)
