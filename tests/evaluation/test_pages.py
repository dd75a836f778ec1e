"""The report and viewer pages in headless Chromium (tests/browser.py via the ``chromium`` fixture).

A small synthetic cohort is reported; ``index.html`` must load without console errors, show its tables and
figures and escape user text; ``viewer.html`` must draw a brain in each of its three linked canvases.
Screenshots are kept in ``browser_helper.artifact_dir()`` (and, for the documentation site, see
``browser_helper.screenshot``).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from synth7t.evaluation.evaluate import evaluate_subject
from synth7t.evaluation.report import write_report
from synth7t.evaluation.viewer import bundle_available
from synth7t.io import Volume, save_volume

from .test_report import _subject

TITLE = "pages <test> & report"  # user text: must come out literally, not as markup


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """index.html (and viewer.html) of 3 subjects of 40^3 voxels at 0.8 mm, two groups, no segmentation."""
    tmp = tmp_path_factory.mktemp("pages")
    aff = np.diag([0.8, 0.8, 0.8, 1.0])
    records, images = [], {}
    for i in range(3):
        arrays = dict(zip(("t3", "pred", "t7", "mask"), _subject(i, n=40), strict=True))
        paths = {k: save_volume(tmp / f"s{i}" / f"{k}.nii.gz", Volume(a, aff)) for k, a in arrays.items()}
        subject = f"sub-{i:02d}"
        images[subject] = paths
        records += evaluate_subject(subject, **paths, group=("healthy", "ill")[i % 2], segmentation=None)
    return write_report(tmp / "report", records, images, title=TITLE, extra_info={"simulated": True})


def _png_array(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def test_report_page(report, chromium, browser_helper):
    page, errors = chromium.open_page(report, width=1440, height=900)
    browser_helper.screenshot(page, "report.png", full_page=True)
    assert errors == []
    assert page.locator("h1").inner_text() == TITLE and page.title() == TITLE
    assert page.locator(".banner").count() == 1
    # results overall and per group (healthy, ill), and the paired comparison: one row per baseline
    assert page.locator("table.results").count() == 3
    comparison = page.locator("table.comparison")
    assert comparison.count() == 1
    rows = comparison.locator("tr")
    assert rows.count() == 1 + 4  # header + t3_input, trilinear, bspline, histmatch_oracle (no population)
    header = rows.nth(0).inner_text()
    assert "brain PSNR" in header and "HFEN" in header and "DICE" not in header  # no segmentation: no column
    assert "nan" not in comparison.inner_text().lower()
    # every figure decoded: boxplots, histograms, one montage per subject
    images = page.locator("img")
    assert images.count() == 2 + 3
    assert all(images.nth(i).evaluate("img => img.complete && img.naturalWidth > 100") for i in range(5))
    assert page.locator('a[href="viewer.html"]').count() == (1 if bundle_available() else 0)
    page.close()


@pytest.mark.skipif(not bundle_available(), reason="NiiVue bundle not shipped")
def test_viewer_page_draws_the_brain(report, chromium, browser_helper):
    page, errors = chromium.open_page(report.with_name("viewer.html"), width=1200, height=500)
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    page.wait_for_timeout(500)  # let NiiVue draw the frame after the last volume loaded
    browser_helper.screenshot(page, "viewer.png")
    assert errors == []
    assert page.locator("#status").inner_text() == ""
    for i in range(3):  # 3T input, synthetic 7T, real 7T
        pixels = _png_array(page.locator(f"#gl{i}").screenshot())
        brain = pixels > 20  # the background is black
        assert 0.05 < brain.mean() < 0.95, f"canvas {i}: {brain.mean():.1%} of pixels non-background"
        assert pixels[brain].std() > 5, f"canvas {i}: flat brain"
    page.close()
