"""`synth7t predict` saves the input-vs-output thumbnails while the preprocessed input is in memory, and
`predict --qc` writes the cohort page at the end."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from synth7t.cli import app
from synth7t.cohortqc import build_qc
from synth7t.io import save_volume


def test_predict_saves_thumbnails_and_writes_the_page(tiny_model, blob_volume, tmp_path):
    from PIL import Image

    scans = [save_volume(tmp_path / f"scan{i}.nii.gz", blob_volume) for i in range(2)]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(tiny_model), *map(str, scans), "-o", str(out), "--preprocessed",
                                      "--tta", "--device", "cpu", "--qc"])
    assert result.exit_code == 0, result.output
    assert "2 outputs: 2 ok" in result.output and (out / "qc.html").exists()
    for name in ("scan0", "scan1"):
        qc = out / name / "qc"
        image = (out / name / "syn7t.nii.gz").stat().st_mtime_ns
        for kind in ("planes", "compare"):
            png = qc / f"syn7t_{kind}.png"
            assert png.stat().st_mtime_ns >= image
            with Image.open(png) as im:
                assert im.mode == "L" and im.height in (96, 128) and im.getextrema()[1] > 0
    page = build_qc(out, progress=False)
    assert page.computed == 0 and page.cached == 2  # `predict --qc` did the work
    html = page.page.read_text()
    assert 'src="scan0/qc/syn7t_compare.png"' in html and "not saved at predict time" not in html
    rows = json.loads((out / "qc.json").read_text())["outputs"]
    assert all(r["model"] == Path(tiny_model).name and r["unc_mean"] is not None for r in rows)
