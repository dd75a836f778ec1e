"""Intensity maps: quantiles, population histograms and input standardization (hand-checked values)."""

from __future__ import annotations

import numpy as np
import pytest

from synth7t.intensity import QUANTILE_LEVELS, quantile_map, quantiles, standardize


def test_quantile_map_hand_values_and_ties():
    src = QUANTILE_LEVELS.copy()  # uniform on [0, 1]
    ref = 2 * QUANTILE_LEVELS + 1  # uniform on [1, 3]
    np.testing.assert_allclose(quantile_map(np.array([0.0, 0.25, 1.0]), src, ref), [1.0, 1.5, 3.0], atol=1e-6)
    # the top 10 % of the source is one clipped value (1.0): it maps to the mean of the reference's top 10 %
    tied = np.minimum(QUANTILE_LEVELS / 0.9, 1.0)
    top = quantile_map(np.array([1.0]), tied, ref)[0]
    assert top == pytest.approx(ref[QUANTILE_LEVELS >= 0.9 - 1e-9].mean(), abs=1e-6)
    with pytest.raises(ValueError, match="1001 values"):
        quantile_map(np.zeros(3), src[:10], ref)


def test_standardize_maps_a_brain_onto_the_reference_and_keeps_the_background():
    rng = np.random.default_rng(0)
    stack = np.zeros((3, 40, 50), np.float32)
    stack[:, 5:35, 5:45] = rng.uniform(0.05, 1.0, (3, 30, 40))  # a "brain" with a uniform histogram
    reference = quantiles(np.clip(rng.normal(0.6, 0.1, 100_000), 0, 1))
    out = standardize(stack, reference)
    brain = stack > 0
    assert np.all(out[~brain] == 0)
    assert abs(out[brain].mean() - 0.6) < 0.01 and abs(out[brain].std() - 0.1) < 0.01
    order = np.argsort(stack[brain])
    assert np.all(np.diff(out[brain][order]) >= 0)  # monotone: no contrast inversion
    # against its own distribution it is (nearly) the identity
    same = standardize(stack, quantiles(stack[brain]))
    assert np.abs(same - stack).max() < 0.01
    assert np.all(standardize(np.zeros((2, 4, 4)), reference) == 0)
