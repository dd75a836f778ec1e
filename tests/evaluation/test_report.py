"""Per-subject evaluation (evaluate.py), statistics (stats.py), figures and the offline HTML report."""

from __future__ import annotations

import base64
import csv
import math
import re

import numpy as np
import pytest
from scipy import ndimage

from synth7t.evaluation.baselines import METHODS
from synth7t.evaluation.evaluate import evaluate_subject
from synth7t.evaluation.figures import montage_views
from synth7t.evaluation.metrics import METRIC_KEYS, clipped_minmax
from synth7t.evaluation.report import comparison_table, write_report
from synth7t.evaluation.stats import describe, paired_comparison, summarize
from synth7t.intensity import quantiles
from synth7t.io import Volume, save_volume


def _subject(seed: int, n: int = 28):
    """Ellipsoid 'brain' with smooth texture: 7T, a blurrier 3T in other units, a prediction in [0, 1]."""
    rng = np.random.default_rng(seed)
    g = np.indices((n, n, n)) - (n - 1) / 2
    mask = ((g / np.array([11, 12, 10])[:, None, None, None]) ** 2).sum(0) < 1
    tex = ndimage.gaussian_filter(rng.random((n, n, n)), 1.2)
    t7 = np.where(mask, 100 + 400 * (tex - tex.min()) / np.ptp(tex), 0).astype(np.float32)
    t3 = np.where(mask, 3 * ndimage.gaussian_filter(t7, 1.0) + 20, 0).astype(np.float32)
    lo, hi = np.percentile(t7[mask], [1, 99])
    pred = np.where(mask, np.clip((ndimage.gaussian_filter(t7, 0.5) - lo) / (hi - lo), 0, 1), 0).astype(np.float32)
    return t3, pred, t7, mask.astype(np.uint8)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cohort")
    images, records = {}, []
    aff = np.diag([0.8, 0.8, 0.8, 1.0])
    # a "training population" 7T distribution: another subject's normalized 7T
    t7_pop, mask_pop = _subject(9)[2:]
    population = quantiles(clipped_minmax(t7_pop, mask_pop)[mask_pop > 0])
    for i in range(3):
        t3, pred, t7, mask = _subject(i)
        paths = {}
        for key, arr in (("t3", t3), ("pred", pred), ("t7", t7), ("mask", mask)):
            paths[key] = save_volume(tmp_path / f"s{i}" / f"{key}.nii.gz", Volume(arr, aff))
        subject = f"sub-{i:02d}"
        images[subject] = paths
        seg = "atropos" if i == 0 else None
        records += evaluate_subject(
            subject, **{k: paths[k] for k in ("t3", "pred", "t7", "mask")}, group=("healthy", "ill")[i % 2],
            segmentation=seg, zooms_lowres=(1.6, 1.6, 1.6), min_slice=4,
            population_quantiles=population if i < 2 else None,
        )  # fmt: skip
    return records, images


def test_evaluate_subject_records(cohort):
    records, _ = cohort
    assert len(records) == 6 + 6 + 5  # without population quantiles there is no histmatch_population record
    first = [r for r in records if r["subject"] == "sub-00"]
    assert [r["method"] for r in first] == list(METHODS)
    assert "histmatch_population" not in {r["method"] for r in records if r["subject"] == "sub-02"}
    for r in first:
        assert set(METRIC_KEYS) <= set(r)
        if r["method"] == "histmatch_oracle":  # not a method: not segmented
            assert "dice_mean" not in r
            continue
        assert r["segmentation_method"] == "atropos"
        assert 0 <= r["dice_mean"] <= 1 and {"dice_1", "dice_2", "dice_3"} <= set(r)
    by = {r["method"]: r for r in first}
    # the prediction is a light blur of the truth: it must beat the heavily blurred, differently scaled 3T
    assert by["model"]["psnr_brain"] > by["t3_input"]["psnr_brain"]
    assert by["model"]["ssim_brain"] > by["trilinear"]["ssim_brain"]
    # matching the B-spline baseline's histogram to the subject's own 7T can only help it (an upper bound of any
    # global intensity map); the new metric columns are there
    assert by["histmatch_oracle"]["psnr_brain"] > by["bspline"]["psnr_brain"]
    assert by["histmatch_oracle"]["psnr_brain"] >= by["histmatch_population"]["psnr_brain"] - 0.1
    assert 0 < by["model"]["hfen_brain"] < by["t3_input"]["hfen_brain"]
    assert 0 < by["model"]["ssim_thesis_1d_full"] <= 1
    assert "dice_mean" not in [r for r in records if r["subject"] == "sub-01"][0]


def test_describe_and_summary():
    d = describe([1.0, 2.0, 3.0, float("nan"), None])
    assert d["n"] == 3 and d["mean"] == 2 and d["sd"] == pytest.approx(1.0) and d["median"] == 2
    assert math.isnan(describe([5.0])["sd"])
    recs = [
        {"subject": "a", "method": "model", "group": "ill", "psnr": 20.0},
        {"subject": "b", "method": "model", "group": "healthy", "psnr": 22.0},
    ]
    rows = summarize(recs)
    groups = {(r["group"], r["metric"]): r for r in rows}
    assert groups[("all", "psnr")]["mean"] == 21 and groups[("ill", "psnr")]["n"] == 1


def test_paired_comparison_wilcoxon():
    rng = np.random.default_rng(0)
    recs = []
    for i in range(8):
        base = 20 + rng.normal()
        recs.append({"subject": f"s{i}", "method": "t3_input", "psnr": base})
        recs.append({"subject": f"s{i}", "method": "model", "psnr": base + 1 + 0.1 * i})
    rows = paired_comparison(recs)
    (row,) = rows
    assert row["n"] == 8 and row["mean_diff"] == pytest.approx(1.35)
    from scipy.stats import wilcoxon

    assert row["p_wilcoxon"] == pytest.approx(wilcoxon(1 + 0.1 * np.arange(8)).pvalue)
    assert row["p_wilcoxon"] < 0.01 and row["note"] == ""
    few = paired_comparison(recs[:6])
    assert math.isnan(few[0]["p_wilcoxon"]) and "uninformative" in few[0]["note"]


def test_comparison_table_is_compact():
    """One row per baseline with data, one column per metric with data; no NaN is shown."""
    recs = []
    for i in range(8):
        recs.append({"subject": f"s{i}", "method": "model", "psnr": 25.0 + i, "hfen": 0.3, "dice_mean": 0.8})
        recs.append({"subject": f"s{i}", "method": "t3_input", "psnr": 20.0 + 0.5 * i, "hfen": 0.5, "dice_mean": 0.7})
        recs.append({"subject": f"s{i}", "method": "histmatch_oracle", "psnr": 26.0 + i, "hfen": 0.2})
        recs.append({"subject": f"s{i}", "method": "trilinear", "ssim": 0.9})  # nothing paired with the model
    table = comparison_table(paired_comparison(recs))
    assert table["columns"] == ["PSNR ↑", "Mean DICE ↑", "HFEN ↓"]
    assert [r["label"] for r in table["rows"]] == ["3T input", "B-spline + histogram matched to its own 7T (oracle)"]
    t3, oracle = table["rows"]
    assert t3["n"] == 8 and [c["diff"] for c in t3["cells"]] == ["+6.75", "+0.100", "-0.200"]
    assert [c["tone"] for c in t3["cells"]] == ["better", "better", "better"]
    assert t3["cells"][0]["p"].startswith("p = ") and table["notes"] == []
    assert oracle["cells"][1] == {"diff": "–", "p": "", "tone": ""} and oracle["cells"][0]["tone"] == "worse"
    assert "nan" not in repr(table).lower()
    few = comparison_table(paired_comparison(recs[:12]))  # 3 subjects: no p-value, said once
    assert all(c["p"] == "" for r in few["rows"] for c in r["cells"]) and len(few["notes"]) == 1


def test_montage_zoom_boxes_inside_brain_bbox():
    mask = np.zeros((50, 60, 40), bool)
    mask[10:40, 5:55, 4:36] = True
    views = montage_views(mask)
    assert [v[0].split()[0] for v in views] == ["axial", "coronal", "sagittal", "hippocampus", "cerebellum"]
    _, axis, index, (rows, cols) = views[3]
    assert axis == 1 and index == round(5 + 0.45 * 49)
    assert 4 <= rows.start < rows.stop <= 36 and 10 <= cols.start < cols.stop <= 25  # left half, mid-low
    _, axis, index, (rows, cols) = views[4]
    assert axis == 0 and cols.start == 5 and rows.start == 4  # posterior-inferior corner


def test_write_report(cohort, tmp_path):
    records, images = cohort
    out = tmp_path / "report"
    index = write_report(
        out, records, images, title="unit test report", extra_info={"simulated": True, "model": "tiny"}, viewer=False
    )
    assert index == out / "index.html" and index.exists()
    page = index.read_text()
    assert "Simulated demo data" in page and "unit test report" in page
    assert "brain PSNR no corrupt." in page and "Mean DICE" in page and "HFEN" in page
    assert "atropos" in page.lower()
    for label in ("3T input", "trilinear", "B-spline", "synth7t model"):
        assert label in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "http://" not in page and "https://" not in page
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) >= 2 + 3  # boxplots, histograms, one montage per subject (DICE boxplot too)
    for b64 in pngs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 17 and rows[0]["subject"] == "sub-00" and "psnr_brain_valid" in rows[0]
    comp = list(csv.DictReader((out / "comparison.csv").open()))
    assert {r["baseline"] for r in comp} == {"t3_input", "trilinear", "bspline", "histmatch_population",
                                             "histmatch_oracle"}
    assert all("uninformative" in r["note"] for r in comp)
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["group"] for r in summary} == {"all", "healthy", "ill"}


def test_write_report_without_images_or_banner(cohort, tmp_path):
    records, _ = cohort
    page = write_report(tmp_path / "r2", records, None, viewer=False).read_text()
    assert "Simulated demo data" not in page and "<table" in page
    with pytest.raises(ValueError, match="no records"):
        write_report(tmp_path / "r3", [])
