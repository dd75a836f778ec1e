"""The NiiVue viewer page: self-contained, and it renders in headless Chromium (skipped without Chromium)."""

from __future__ import annotations

import base64
import gzip
import io
import re
import shutil
import subprocess

import numpy as np
import pytest

from synth7t.evaluation import report as R
from synth7t.io import Volume, save_volume

from .test_report import _subject

pytestmark = pytest.mark.skipif(not R.bundle_available(), reason="NiiVue bundle not shipped")


@pytest.fixture
def viewer(tmp_path):
    t3, pred, t7, mask = _subject(0, n=40)
    aff = np.diag([0.8, 0.8, 0.8, 1.0])
    paths = {k: save_volume(tmp_path / f"{k}.nii.gz", Volume(a, aff)) for k, a in
             (("t3", t3), ("pred", pred), ("t7", t7), ("mask", mask))}  # fmt: skip
    return R.write_viewer(tmp_path / "viewer.html", "sub-00", paths)


def test_viewer_is_self_contained(viewer):
    page = viewer.read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script[^>]+src=", page)
    vols = re.findall(r'"b64": "([A-Za-z0-9+/=]+)"', page)
    assert len(vols) == 3
    import nibabel as nib

    raw = gzip.decompress(base64.b64decode(vols[0]))
    img = nib.Nifti1Image.from_bytes(raw)
    assert img.get_data_dtype() == np.uint8 and np.allclose(img.header.get_zooms(), 1.0, atol=0.05)
    assert 0 < np.asarray(img.dataobj).max() <= 255


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed")
def test_viewer_renders_in_headless_chromium(viewer, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,500",
        "--virtual-time-budget=10000", viewer.as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=np.float64)  # (500, 1200)
    canvas = img[60:, :]  # below the title bar
    assert canvas.var() > 100, "viewer canvas is blank"
    thirds = np.array_split(canvas, 3, axis=1)  # one per linked canvas: each shows an image
    assert all(t.var() > 100 for t in thirds)


def test_write_report_links_the_viewer(tmp_path):
    t3, pred, t7, mask = _subject(1)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = {k: save_volume(tmp_path / f"{k}.nii.gz", Volume(a, aff)) for k, a in
             (("t3", t3), ("pred", pred), ("t7", t7), ("mask", mask))}  # fmt: skip
    records = R.evaluate_subject("sub-01", **paths, segmentation=None)
    index = R.write_report(tmp_path / "rep", records, {"sub-01": paths})
    assert (tmp_path / "rep" / "viewer.html").exists()
    assert 'href="viewer.html"' in index.read_text()
