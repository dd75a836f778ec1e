"""The cohort QC page in headless Chromium: loads offline without errors, sorts, filters, lazy-loads; and a
2,000-row page built from records alone (size and render time printed, not asserted)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from synth7t.cohortqc import build_qc
from synth7t.cohortqc.collect import add_outlier_scores
from synth7t.cohortqc.page import write_page


def _column(page, index: int) -> list[str]:
    return page.eval_on_selector_all("#qc tbody tr", f"rows => rows.map(r => r.cells[{index}].dataset.v)")


def test_page_sorts_filters_and_lazy_loads(fake_out, chromium, browser_helper):
    res = build_qc(fake_out, progress=False)
    html = res.page.read_text()
    assert "http://" not in html and "https://" not in html
    page, errors = chromium.open_page(res.page, width=1400, height=1000, wait_ms=300)
    assert errors == []
    assert page.locator("#qc tbody tr").count() == 11
    assert page.locator("#shown").inner_text() == "showing 11 of 11"
    # every thumbnail is a lazy <img> of a separate file
    srcs = page.eval_on_selector_all("#qc img", "imgs => imgs.map(i => [i.loading, i.getAttribute('src')])")
    assert len(srcs) == 11 and all(lazy == "lazy" and src.endswith(".png") for lazy, src in srcs)
    browser_helper.screenshot(page, "cohort_qc.png", full_page=True)
    # sort by brain volume: ascending; a second click: descending
    page.click("th:nth-child(5) button")
    numbers = [float(v) for v in _column(page, 4)]
    assert numbers == sorted(numbers) and numbers[0] == 0 and numbers[-1] == pytest.approx(0.25)
    page.click("th:nth-child(5) button")
    assert [float(v) for v in _column(page, 4)] == sorted(numbers, reverse=True)
    assert page.get_attribute("th:nth-child(5)", "aria-sort") == "descending"
    # uncertainty (two maps): rows without one last in either direction
    for _ in range(2):
        page.click("th:nth-child(8) button")
        values = _column(page, 7)
        assert values[2:] == [""] * 9 and len({float(v) for v in values[:2]}) == 2
    assert float(values[0]) > float(values[1])  # the second click sorts descending
    # sort by name
    page.click("th:nth-child(1) button")
    names = _column(page, 0)
    assert names == sorted(names, key=str.lower)
    # flagged only: failed (3) and suspicious (big, leak) rows stay
    page.check("#flagged-only")
    visible = page.eval_on_selector_all("#qc tbody tr", "rows => rows.filter(r => r.offsetParent !== null)"
                                        ".map(r => r.cells[0].dataset.v)")
    assert sorted(visible) == ["big", "empty", "leak", "nan", "noprov"]
    assert page.locator("#shown").inner_text() == "showing 5 of 11"
    browser_helper.screenshot(page, "cohort_qc_flagged.png", full_page=True)
    assert errors == []


def _synthetic_records(n: int, thumb: Path) -> list[dict]:
    """Summary records as collect makes them, for ``n`` outputs (no NIfTI), every 50th failed; each row's
    thumbnails are their own files (hard links to ``thumb``: one URL each, as in a real cohort)."""
    records = []
    (thumb.parent / "thumbs").mkdir()
    for i in range(n):
        for kind in ("planes", "compare"):
            os.link(thumb, thumb.parent / "thumbs" / f"{i}_{kind}.png")
        failed = ["provenance missing"] if i % 50 == 7 else []
        records.append({
            "id": f"sub-{i:04d}<&>", "layout": "plain", "output": f"sub-{i:04d}/syn7t.nii.gz",
            "brain_volume_ml": 1100 + (i * 37) % 400 + (900 if i == 1234 else 0), "brain_median": 0.5 + (i % 7) / 100,
            "brain_iqr": 0.2 + (i % 5) / 100, "unc_mean": 0.01 + (i % 3) / 1000, "unc_p95": 0.05,
            "failed": failed, "suspicious": [], "model": "run", "model_sha256": "0123456789ab",
            "synth7t_version": "0.1.0", "planes": f"thumbs/{i}_planes.png",
            "compare": f"thumbs/{i}_compare.png" if i % 2 else None,
        })
    add_outlier_scores(records)
    return records


def test_two_thousand_rows(fake_out, chromium, browser_helper, tmp_path):
    build_qc(fake_out, progress=False)
    shutil.copy(fake_out / "a/qc/syn7t_planes.png", tmp_path / "thumb.png")
    records = _synthetic_records(2000, tmp_path / "thumb.png")
    t0 = time.perf_counter()
    paths = write_page(records, tmp_path / "big.html", root=tmp_path)
    build_s = time.perf_counter() - t0
    html = paths["page"].read_text()
    assert "sub-0000&lt;&amp;&gt;" in html and "sub-0000<&>" not in html  # user data are escaped
    t0 = time.perf_counter()
    page, errors = chromium.open_page(paths["page"], width=1400, height=1000)
    load_s = time.perf_counter() - t0
    assert errors == [] and page.locator("#qc tbody tr").count() == 2000
    sort_ms = page.evaluate("""() => { const t = performance.now();
        document.querySelector('th:nth-child(5) button').click(); document.body.offsetHeight;
        return performance.now() - t; }""")  # sorting and the layout it forces
    page.wait_for_timeout(300)
    loaded = page.eval_on_selector_all("#qc img", "imgs => imgs.filter(i => i.complete && i.naturalWidth).length")
    total = page.locator("#qc img").count()
    assert total == 3000 and loaded < total / 4, loaded  # lazy: only images near the viewport are fetched
    flagged = sum(r["flagged"] for r in records)
    print(f"\n2000 rows: page {len(html) / 1e6:.2f} MB, built in {build_s:.2f} s, loaded in Chromium in "
          f"{load_s:.2f} s, sorted in {sort_ms:.0f} ms, {loaded}/{total} thumbnails fetched, {flagged} flagged")


def test_rows_without_thumbnails_say_so(fake_out):
    (fake_out / "c" / "syn7t.nii.gz").write_bytes(b"not a NIfTI")
    res = build_qc(fake_out, progress=False)
    html = res.page.read_text()
    assert html.count("no image") == 1 and html.count("not saved at predict time") == 11  # no predict here
    assert res.summary["failed"] == 4
