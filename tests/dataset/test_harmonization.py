"""Harmonization in the training data: Nyúl landmarks learned on the training split only, and 7T targets
histogram-matched to their own 3T input (``data.match_target_to_input``)."""

from __future__ import annotations

import shutil

import numpy as np

from synth7t.config import load_config
from synth7t.dataset.slices import SliceDataset, SliceStore
from synth7t.intensity import nyul_landmarks, nyul_standard, quantiles, standardize_input
from synth7t.training.data import input_standardization


def _distort(store_dir, subjects, fn):
    for s in subjects:
        path = store_dir / s / "t3.npy"
        arr = np.load(path).astype(np.float32)
        np.save(path, np.where(arr > 0, fn(arr), 0).astype(np.float16))


def test_nyul_is_learned_on_the_training_split_only(packed, tmp_path):
    cfg = load_config("tiny", {"data.standardize": "nyul"})
    store = SliceStore(packed[1])
    record = input_standardization(store, cfg)
    assert record["method"] == "nyul" and record["percentiles"] == list(cfg.data.nyul_percentiles)
    marks = [nyul_landmarks(store.brain_values(s, "t3", whole=True), cfg.data.nyul_percentiles)
             for s in store.split_subjects("train")]
    np.testing.assert_allclose(record["standard_landmarks"], nyul_standard(marks), atol=1e-6)
    # a copy whose validation and test subjects (and the prediction-only one) are wildly different
    other = tmp_path / "store"
    shutil.copytree(packed[1], other)
    held_out = [s for s in store.subjects if s not in store.split_subjects("train")]
    assert held_out
    _distort(other, held_out, lambda a: np.clip(a ** 4 + 0.001, 0, 1))
    changed = SliceStore(other)
    assert input_standardization(changed, cfg) == record
    split = "test" if store.split_subjects("test") else "val"
    assert not np.allclose(changed.standard_landmarks(split, cfg.data.nyul_percentiles),
                           store.standard_landmarks(split, cfg.data.nyul_percentiles), atol=1e-3)


def test_training_input_is_the_predict_time_map(packed):
    cfg = load_config("tiny", {"data.standardize": "nyul"})
    store = SliceStore(packed[1])
    record = input_standardization(store, cfg)
    ds = SliceDataset(store, "train", n_slices=1, standardize=record)
    name, z = ds.locate(3)
    whole = standardize_input(np.asarray(store.array(name, "t3"), np.float32), record)  # what predict does
    np.testing.assert_allclose(ds[3]["input"][0], whole[z], atol=1e-6)


def test_match_target_to_input_gives_the_target_its_inputs_histogram(packed):
    store = SliceStore(packed[1])
    for record in ({"method": "none"}, input_standardization(store, load_config("tiny", {"data.standardize": "nyul"}))):
        plain = SliceDataset(store, "train", n_slices=1, standardize=record)
        matched = SliceDataset(store, "train", n_slices=1, standardize=record, match_target=True)
        name = store.split_subjects("train")[0]
        idx = [i for i in range(len(plain)) if plain.locate(i)[0] == name]
        x = np.concatenate([plain[i]["input"] for i in idx])
        t_plain = np.concatenate([plain[i]["target"] for i in idx])
        t = np.concatenate([matched[i]["target"] for i in idx])
        m = np.concatenate([plain[i]["mask"] for i in idx]) > 0
        assert np.array_equal(np.concatenate([matched[i]["input"] for i in idx]), x)  # inputs untouched
        assert np.all(t[~m] == 0)
        qx, qt, q7 = quantiles(x[m & (x > 0)]), quantiles(t[m & (t > 0)]), quantiles(t_plain[m & (t_plain > 0)])
        inner = slice(10, -10)  # the 1st-99th percentiles: the ends are clipped intensities
        assert np.abs(qt - qx)[inner].max() < 0.02, np.abs(qt - qx)[inner].max()
        assert np.abs(q7 - qx)[inner].max() > 0.05  # it was not so before
        # monotone: the target's voxel order is kept
        order = np.argsort(t_plain[m], kind="stable")
        assert np.all(np.diff(t[m][order]) >= -1e-6)
