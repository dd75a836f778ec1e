"""`synth7t evaluate` end to end on the tiny store: records for model and baselines, report, quality table."""

from __future__ import annotations

import csv

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
    assert methods == {"model", "t3_input", "trilinear", "bspline"}
    assert len(rows) == 4 * 2  # two test subjects
    assert all(0 <= float(r["dice_mean"]) <= 1 for r in rows)
    table = quality_table(tmp_path / "report", tmp_path / "quality.json")
    assert set(table["model"]) == {"psnr_brain", "ssim_brain", "hfen", "dice"}
    assert table["best_baseline"]["name"] in ("t3_input", "trilinear", "bspline")
    best = max(table["baselines"].values(), key=lambda m: m["psnr_brain"])
    assert table["best_baseline"]["psnr_brain"] == best["psnr_brain"]
    assert (tmp_path / "quality.json").exists()


def test_evaluate_needs_a_store(tiny_model, tmp_path):
    with pytest.raises(InputError, match="no slice store"):
        evaluate(tiny_model, tmp_path, tmp_path / "r", progress=False)
