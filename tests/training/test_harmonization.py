"""Harmonization options end to end: ``synth7t train --set data.standardize=nyul --set
data.match_target_to_input=true`` on the tiny store, then the model folder's record applied by ``predict``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from synth7t.cli import app
from synth7t.config import load_config
from synth7t.dataset.slices import SliceStore
from synth7t.inference import Predictor
from synth7t.intensity import standardize_input
from synth7t.training.data import input_standardization


@pytest.fixture(scope="module")
def harmonized(tiny_store, tmp_path_factory, fast_training):
    overrides = {**fast_training, "trainer.max_epochs": 1, "trainer.limit_train_batches": 2,
                 "data.standardize": "nyul", "data.match_target_to_input": "true"}
    out = tmp_path_factory.mktemp("harmonized") / "run"
    args = ["train", str(tiny_store[1]), "-o", str(out), "--preset", "tiny", "--device", "cpu"]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = next(p.parent for p in out.rglob("config.json") if (p.parent / "model.safetensors").is_file())
    return model, overrides


def test_config_json_records_both_options(harmonized, tiny_store):
    model, overrides = harmonized
    cfg = json.loads((model / "config.json").read_text())
    expected = input_standardization(SliceStore(tiny_store[1]), load_config("tiny", overrides))
    assert cfg["input_standardization"] == expected
    assert cfg["input_standardization"]["method"] == "nyul" and len(expected["standard_landmarks"]) == 11
    assert cfg["target_matched_to_input"] is True and cfg["output_contrast"].startswith("the input's")
    assert cfg["train_config"]["data"]["match_target_to_input"] is True
    card = (model / "model_card.md").read_text()
    assert "Input standardization: nyul" in card and "histogram-matched to its 3T input" in card


def test_predict_applies_the_stored_map(harmonized, tiny_store):
    model, _ = harmonized
    store = SliceStore(tiny_store[1])
    stack = np.asarray(store.array(store.split_subjects("test")[0], "t3"), np.float32)
    predictor = Predictor(model, "cpu")
    record = predictor.config["input_standardization"]
    assert predictor.standardization == record
    pred, _ = predictor.predict_stack(stack, batch_size=4)
    predictor.standardization = None  # the network alone, on the stack standardized by a direct call
    direct, _ = predictor.predict_stack(standardize_input(stack, record), batch_size=4)
    np.testing.assert_array_equal(pred, direct)
    raw, _ = predictor.predict_stack(stack, batch_size=4)
    assert not np.array_equal(raw, pred)  # the map did change the network's input


def test_a_model_folder_with_an_incomplete_record_is_refused(tmp_path):
    from synth7t.errors import InputError
    from synth7t.inference.predictor import _standardization_record

    with pytest.raises(InputError, match="lacks standard_landmarks"):
        _standardization_record(tmp_path, {"input_standardization": {"method": "nyul", "percentiles": [1, 99]}})
    with pytest.raises(InputError, match="unknown input_standardization"):
        _standardization_record(tmp_path, {"input_standardization": {"method": "zscore"}})
    assert _standardization_record(tmp_path, {}) is None
