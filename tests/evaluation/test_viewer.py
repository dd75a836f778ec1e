"""The NiiVue viewer page is self-contained and linked from the report (rendering: test_pages.py)."""

from __future__ import annotations

import base64
import gzip
import re

import numpy as np
import pytest

from synth7t.evaluation.evaluate import evaluate_subject
from synth7t.evaluation.report import write_report
from synth7t.evaluation.viewer import bundle_available, write_viewer
from synth7t.io import Volume, save_volume

from .test_report import _subject

pytestmark = pytest.mark.skipif(not bundle_available(), reason="NiiVue bundle not shipped")


@pytest.fixture
def viewer(tmp_path):
    t3, pred, t7, mask = _subject(0, n=40)
    aff = np.diag([0.8, 0.8, 0.8, 1.0])
    paths = {k: save_volume(tmp_path / f"{k}.nii.gz", Volume(a, aff)) for k, a in
             (("t3", t3), ("pred", pred), ("t7", t7), ("mask", mask))}  # fmt: skip
    return write_viewer(tmp_path / "viewer.html", "sub-00", paths)


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


def test_write_report_links_the_viewer(tmp_path):
    t3, pred, t7, mask = _subject(1)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = {k: save_volume(tmp_path / f"{k}.nii.gz", Volume(a, aff)) for k, a in
             (("t3", t3), ("pred", pred), ("t7", t7), ("mask", mask))}  # fmt: skip
    records = evaluate_subject("sub-01", **paths, segmentation=None)
    index = write_report(tmp_path / "rep", records, {"sub-01": paths})
    assert (tmp_path / "rep" / "viewer.html").exists()
    assert 'href="viewer.html"' in index.read_text()
