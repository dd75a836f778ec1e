"""Predict on every real head in ../shared/data (slow: N4 + deepbet per head); skipped without the folder.

The model is the tiny test model (its synthesis quality is irrelevant here): what is checked is that prediction
completes on scans from several scanners and head positions, gives finite values, and that its output overlays
the input (centre of mass of the output brain within 2 mm of the input brain mask's).
"""

from __future__ import annotations

import numpy as np
import pytest

from synth7t.inference import PredictOptions, Predictor, predict_volume
from synth7t.io import load_volume, to_canonical, voxel_to_world


def _com(vol) -> np.ndarray:
    return voxel_to_world(vol.affine, np.argwhere(vol.data > 0).mean(0))[0]


@pytest.mark.slow
def test_predict_real_head_overlays_input(real_head, tiny_model):
    from synth7t.preprocess.bias import n4
    from synth7t.preprocess.skullstrip import strip

    vol = load_volume(real_head)
    predictor = Predictor(tiny_model, "cpu")
    res = predict_volume(predictor, vol, PredictOptions(), covariates={})
    out = res["syn7t"]
    assert np.isfinite(out.data).all() and out.data.max() > 0
    can, _ = to_canonical(vol)
    input_mask, _ = strip(n4(can, "3t"), "deepbet")
    assert np.linalg.norm(_com(res["mask"]) - _com(input_mask)) < 2.0
    assert np.linalg.norm(_com(out) - _com(input_mask)) < 2.0
