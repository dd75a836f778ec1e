"""N4 lowers the white-matter coefficient of variation of an image with a known synthetic bias field."""

import numpy as np
import pytest

from synth7t.errors import ConfigError
from synth7t.preprocess.bias import N4_PRESETS, N4Params, coefficient_of_variation, n4, n4_preset


def test_presets_match_thesis():
    p = N4_PRESETS["7t"]
    assert (p.bias_fwhm, p.wiener_noise, p.convergence, p.iterations, p.shrink_factor) == (
        0.18, 0.1, 1e-7, (150, 150, 150, 150), 4)
    assert N4_PRESETS["3t"].bias_fwhm == 0.15 and N4_PRESETS["3t"].iterations == (50,) * 4
    with pytest.raises(ConfigError, match="unknown N4 preset"):
        n4_preset("9t")
    with pytest.raises(ValueError):
        N4Params(iterations=())


def test_cv_by_hand():
    assert coefficient_of_variation(np.array([1.0, 3.0]), np.array([True, True])) == pytest.approx(0.5)


@pytest.mark.parametrize("preset", ["3t", "demo"])
def test_n4_removes_bias(brain, preset, helpers):
    wm = brain.data > 0.75
    biased = brain.with_data(brain.data * helpers.bias_field(brain, 0.4))
    before = coefficient_of_variation(biased.data, wm)
    corrected = n4(biased, preset, mask=brain.data > 0)
    after = coefficient_of_variation(corrected.data, wm)
    clean = coefficient_of_variation(brain.data, wm)
    assert before > 2 * clean
    assert after < 0.5 * before, (before, after, clean)
    assert corrected.shape == brain.shape and np.allclose(corrected.affine, brain.affine)
    assert corrected.data.dtype == np.float32 and np.all(corrected.data[brain.data == 0] == 0)
