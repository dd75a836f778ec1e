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


def test_nyul_landmarks_standard_scale_and_map_by_hand():
    from synth7t.intensity import nyul_landmarks, nyul_standard, nyul_table, standardize

    # 0.00, 0.01, ..., 1.00: its 10th, 50th and 90th percentiles are 0.1, 0.5 and 0.9 exactly
    np.testing.assert_allclose(nyul_landmarks(np.linspace(0, 1, 101), (10, 50, 90)), [0.1, 0.5, 0.9], atol=1e-12)
    # two subjects: the ends go to the scale (0, 1), the middle landmarks to 0.25 and 0.75, mean 0.5
    a, b = np.array([0.1, 0.2, 0.5]), np.array([0.2, 0.8, 1.0])
    np.testing.assert_allclose(nyul_standard([a, b]), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(nyul_standard([a], scale=(0.2, 0.6)), [0.2, 0.3, 0.6])
    standard = np.array([0.1, 0.5, 0.9])
    xs, ys = nyul_table(a, standard)
    # each landmark lands exactly on its standard landmark; the end segments are extended to 0 and 1
    np.testing.assert_allclose(np.interp(a, xs, ys), standard, atol=1e-6)
    np.testing.assert_allclose([xs[0], xs[-1]], [0.0, 1.0])
    np.testing.assert_allclose(np.interp([0.0, 1.0], xs, ys), [0.1 - 0.1 * 4, 0.9 + 0.5 * 4 / 3], atol=1e-6)
    v = np.linspace(0.001, 1, 500, dtype=np.float32)
    out = standardize(v, table=(xs, ys))
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1  # monotone, clipped to [0, 1]
    # tied landmarks (a clipped image) map to the mean of their standard landmarks
    xs, ys = nyul_table(np.array([0.0, 0.0, 0.5]), standard)
    np.testing.assert_allclose(np.interp([0.0, 0.5], xs, ys), [0.3, 0.9], atol=1e-6)
    with pytest.raises(ValueError, match="degenerate"):
        nyul_standard([np.array([0.3, 0.3])])
    with pytest.raises(ValueError, match="non-decreasing"):
        nyul_table(a, standard[::-1])


def test_standardize_input_is_one_path_for_every_method():
    from synth7t.intensity import nyul_landmarks, standardization_table, standardize_input

    rng = np.random.default_rng(1)
    stack = np.zeros((2, 30, 30), np.float32)
    stack[:, 5:25, 5:25] = rng.beta(2, 5, (2, 20, 20)) * 0.98 + 0.01
    brain = stack > 0
    record = {"method": "nyul", "percentiles": [1, 50, 99], "standard_landmarks": [0.0, 0.3, 1.0]}
    out = standardize_input(stack, record)
    np.testing.assert_allclose(nyul_landmarks(out[brain], [50]), [0.3], atol=2e-3)  # median onto 0.3
    assert np.all(out[~brain] == 0)
    assert np.array_equal(standardize_input(stack, {"method": "none"}), stack)
    assert np.array_equal(standardize_input(stack, None), stack)
    assert standardization_table(record, np.zeros(0)) is None
    ref = quantiles(rng.uniform(0.2, 0.4, 1000))
    hm = standardize_input(stack, {"method": "histmatch", "reference_quantiles": ref})
    assert np.array_equal(hm, standardize(stack, ref))
    with pytest.raises(ValueError, match="unknown input standardization"):
        standardize_input(stack, {"method": "zscore"})


def test_float16_lookup_equals_standardize_on_every_float16_value():
    """Training's table look-up (the store keeps float16) is exactly the map predict applies in float32."""
    from synth7t.intensity import float16_lookup, quantile_table

    rng = np.random.default_rng(2)
    table = quantile_table(quantiles(rng.beta(2, 5, 5000)), quantiles(rng.uniform(0.1, 0.9, 5000)))
    codes = np.arange(1 << 16, dtype=np.uint16)
    values = codes.view(np.float16).astype(np.float32)  # every float16: 0, negatives, subnormals, inf, NaN
    lookup = float16_lookup(table)
    assert lookup.shape == (65536,) and lookup.dtype == np.float32
    finite = np.isfinite(values)
    assert np.array_equal(lookup[codes][finite], standardize(values[finite], table=table))
    assert lookup[np.float16(np.inf).view(np.uint16)] == pytest.approx(table[1][-1])
    assert np.all(lookup[np.isnan(values)] == 0) and np.all(lookup[values <= 0] == 0)
    assert float16_lookup(None) is None
