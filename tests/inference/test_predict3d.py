"""Prediction and evaluation with a 3-D patch model folder: sliding window, TTA, the input's geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synth7t.evaluation.evaluate import evaluate
from synth7t.inference import PredictOptions, predict
from synth7t.inference.predictor import Predictor
from synth7t.io import load_volume


def test_predict_keeps_the_input_geometry(tiny3d_model, write_brain, tmp_path):
    src = write_brain(tmp_path)
    opts = PredictOptions(preprocessed=True, tta=True, resample_to_input=True, device="cpu")
    res = predict(tiny3d_model, [src], tmp_path / "out", opts, progress=False)
    assert not res.failed, res.failed
    out = tmp_path / "out" / "brain"
    vin, on_input = load_volume(src), load_volume(out / "syn7t_on_input_grid.nii.gz")
    assert on_input.shape == vin.shape
    np.testing.assert_allclose(on_input.affine, vin.affine, atol=1e-5)
    pred, mask = load_volume(out / "syn7t.nii.gz"), load_volume(out / "mask.nii.gz")
    assert np.isfinite(pred.data).all() and 0 <= pred.data.min() and pred.data.max() <= 1
    assert (pred.data[mask.data == 0] == 0).all() and (pred.data[mask.data > 0] > 0).mean() > 0.9
    assert load_volume(out / "uncertainty.nii.gz").data.min() >= 0


def test_sliding_window_equals_a_forward_pass_below_one_patch(tiny3d_model):
    p = Predictor(tiny3d_model, "cpu")
    assert p.kind == "unet3d" and p.patch3d == 16
    p.standardization = None  # compare the networks alone
    stack = np.random.default_rng(0).random((12, 16, 8), np.float32)  # every side a multiple of 4, under 16
    pred, unc = p.predict_stack(stack)
    with torch.no_grad():
        direct = p.net(torch.from_numpy(stack)[None, None])[0, 0].numpy()
    assert unc is None and pred.shape == stack.shape
    np.testing.assert_allclose(pred, direct, atol=1e-5)
    # larger than a patch: several windows, blended, the same shape
    big = np.random.default_rng(1).random((40, 24, 36), np.float32)
    assert p.predict_stack(big)[0].shape == big.shape


@pytest.mark.parametrize("split", ["test"])
def test_evaluate_runs_a_3d_model(tiny3d_model, tiny_store, tmp_path, split):
    index = evaluate(tiny3d_model, tiny_store[1], tmp_path / "report", split=split, segmentation="none",
                     progress=False)
    assert index.exists() and (tmp_path / "report" / "metrics.csv").exists()


def test_predict_raw_scan_with_a_3d_model(tiny3d_model, write_brain, tmp_path):
    """A raw (not preprocessed) scan through the 3-D model: N4, skull strip, resampling, sliding window, the input's
    world space, exactly as for the 2.5D model (the preprocessing code is shared)."""
    src = write_brain(tmp_path, name="raw.nii.gz")
    opts = PredictOptions(preprocessed=False, n4="3t", skullstrip="threshold", resample_to_input=True, device="cpu")
    res = predict(tiny3d_model, [src], tmp_path / "out", opts, progress=False)
    assert not res.failed, res.failed
    out = tmp_path / "out" / "raw"
    vin, on_input = load_volume(src), load_volume(out / "syn7t_on_input_grid.nii.gz")
    np.testing.assert_allclose(on_input.affine, vin.affine, atol=1e-5)
    pred, mask = load_volume(out / "syn7t.nii.gz"), load_volume(out / "mask.nii.gz")
    assert mask.data.sum() > 0 and np.isfinite(pred.data).all() and (pred.data[mask.data == 0] == 0).all()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["preprocessing"]["n4"]["value"] == "3t" and prov["model"]["sha256"]
