"""`synth7t evaluate` end to end on the tiny store: records for model and baselines, report, quality table."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from synth7t.errors import InputError
from synth7t.evaluation.evaluate import evaluate, quality_table


def test_evaluate_writes_report_and_quality_table(tiny_model, tiny_store, tmp_path):
    _, store = tiny_store
    index = evaluate(tiny_model, store, tmp_path / "report", split="test", segmentation="atropos", progress=False)
    html = index.read_text()
    assert "synth7t model" in html and "3T input" in html and "data:image/png;base64" in html
    rows = list(csv.DictReader((tmp_path / "report" / "metrics.csv").open()))
    methods = {r["method"] for r in rows}
    assert methods == {"model", "t3_input", "trilinear", "bspline", "histmatch_population", "histmatch_oracle"}
    assert len(rows) == 6 * 2  # two test subjects
    assert all(0 <= float(r["dice_mean"]) <= 1 for r in rows if r["method"] != "histmatch_oracle")
    assert all(r["dice_mean"] == "" for r in rows if r["method"] == "histmatch_oracle")
    table = quality_table(tmp_path / "report", tmp_path / "quality.json")
    keys = {"brain_psnr", "brain_ssim", "hfen", "dice", "brain_psnr_valid", "brain_ssim_valid",
            "slice_consistency_axial", "slice_consistency_coronal", "slice_consistency_sagittal"}
    assert set(table["model"]) == keys and all(set(v) == keys for v in table["baselines"].values())
    for view in ("axial", "coronal", "sagittal"):  # through-plane consistency: lower is better, 0 only for the 7T
        assert 0 < table["model"][f"slice_consistency_{view}"] < 10
        assert {f"slice_consistency_{view}"} <= set(rows[0])
    # "no corrupt." columns: the mean of metrics.csv's column over the subjects, per method
    for key, column in (("brain_psnr_valid", "psnr_brain_valid"), ("brain_ssim_valid", "ssim_brain_valid")):
        for method in ("model", "bspline"):
            values = [float(r[column]) for r in rows if r["method"] == method]
            entry = table["model"] if method == "model" else table["baselines"][method]
            assert entry[key] == pytest.approx(sum(values) / len(values))
    assert table["oracle"]["dice"] is None and table["model"]["dice"] is not None
    # the best baseline is the best *realizable* one, never the oracle, which is reported beside it
    assert table["best_baseline"]["name"] in ("t3_input", "trilinear", "bspline", "histmatch_population")
    realizable = {k: v for k, v in table["baselines"].items() if k != "histmatch_oracle"}
    assert table["best_baseline"]["brain_psnr"] == max(v["brain_psnr"] for v in realizable.values())
    assert table["oracle"]["name"] == "histmatch_oracle"
    assert table["model_minus_oracle"]["brain_psnr"] == pytest.approx(
        table["model"]["brain_psnr"] - table["oracle"]["brain_psnr"])
    assert table["model_minus_best_baseline"]["brain_ssim"] == pytest.approx(
        table["model"]["brain_ssim"] - table["best_baseline"]["brain_ssim"])
    # the oracle matches each subject's own 7T histogram: no realizable global mapping does better in PSNR
    assert table["oracle"]["brain_psnr"] >= table["baselines"]["histmatch_population"]["brain_psnr"] - 0.05
    assert (tmp_path / "quality.json").exists()
    subjects = sorted({r["subject"] for r in rows})
    grouped = quality_table(tmp_path / "report", groups={subjects[0]: "a", subjects[1]: "b", "absent": "c"})
    assert set(grouped["groups"]) == {"a", "b"} and grouped["groups"]["a"]["n_subjects"] == 1


def test_evaluate_needs_a_store(tiny_model, tmp_path):
    with pytest.raises(InputError, match="no slice store"):
        evaluate(tiny_model, tmp_path, tmp_path / "r", progress=False)


def test_target_quantiles_follow_the_train_split(tiny_store):
    from synth7t.dataset.slices import SliceStore
    from synth7t.intensity import QUANTILE_LEVELS

    store = SliceStore(tiny_store[1])
    q = store.target_quantiles("train")
    assert q.shape == QUANTILE_LEVELS.shape and np.all(np.diff(q) >= 0)
    assert 0 <= q[0] <= q[-1] <= 1  # clipped min-max units of the 7T
    assert store.target_quantiles("predict") is None  # no subject with a 7T there: the baseline is skipped


def test_evaluate_tta_scores_the_flip_mean_prediction(tiny_model, tiny_store, tmp_path):
    """--tta: the model's volume is the mean of the stack's prediction and its mirror's (as predict --tta);
    the baselines are unchanged, and the report says which."""
    from synth7t.dataset.slices import SliceStore
    from synth7t.inference import Predictor

    _, store = tiny_store
    plain = evaluate(tiny_model, store, tmp_path / "plain", segmentation="none", progress=False)
    flip = evaluate(tiny_model, store, tmp_path / "tta", segmentation="none", progress=False, tta=True)
    assert "left-right flip" in flip.read_text() and "left-right flip" not in plain.read_text()
    rows = {name: {(r["subject"], r["method"]): r for r in csv.DictReader((tmp_path / name / "metrics.csv").open())}
            for name in ("plain", "tta")}
    assert rows["plain"].keys() == rows["tta"].keys()
    for key, row in rows["plain"].items():
        same = row["psnr_brain"] == rows["tta"][key]["psnr_brain"]
        assert same == (key[1] != "model"), key  # only the model's scores move
    s = SliceStore(store).split_subjects("test")[0]
    t3 = np.asarray(SliceStore(store).array(s, "t3"), np.float32)
    predictor = Predictor(tiny_model, "cpu")
    a, _ = predictor.predict_stack(t3)
    b, _ = predictor.predict_stack(np.ascontiguousarray(t3[:, ::-1]))
    mean, spread = predictor.predict_stack(t3, tta=True)
    np.testing.assert_allclose(mean, (a + b[:, ::-1]) / 2, atol=1e-6)
    assert spread is not None and float(spread.max()) > 0
