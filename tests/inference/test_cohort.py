"""Cohort scale: --shard K/N splits the sorted jobs into disjoint covering subsets; preprocessing in worker processes
(--workers 1) gives bit-identical outputs to preprocessing inline (--workers 0), and a scan failing in a worker is
reported while the others finish."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synth7t.inference import PredictOptions, predict
from synth7t.manifest import Subject
from synth7t.parallel import select_shard


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
def test_shards_are_disjoint_and_cover_the_jobs(n):
    jobs = [Subject(f"s{i:02d}", Path(f"s{i:02d}.nii.gz")) for i in (7, 3, 0, 5, 1, 2, 6, 4)]
    shards = [[s.subject for s in select_shard(jobs, (k, n))] for k in range(n)]
    flat = [name for shard in shards for name in shard]
    assert sorted(flat) == sorted(j.subject for j in jobs) and len(flat) == len(set(flat))
    assert shards == [[s.subject for s in select_shard(list(reversed(jobs)), (k, n))] for k in range(n)]  # order-free


def test_cli_shards_split_a_folder(tiny_model, tmp_path, write_brain):
    from typer.testing import CliRunner

    from synth7t.cli import app

    for name in ("c", "a", "b"):
        write_brain(tmp_path / "in", f"{name}.nii.gz", shape=(20, 24, 16))
    runner = CliRunner()
    outs = []
    for k in (1, 2):
        res = runner.invoke(app, ["predict", str(tiny_model), str(tmp_path / "in"), "-o", str(tmp_path / f"o{k}"),
                                  "--preprocessed", "--shard", f"{k}/2", "--workers", "0"])
        assert res.exit_code == 0, res.output
        outs.append(sorted(p.parent.name for p in (tmp_path / f"o{k}").glob("*/syn7t.nii.gz")))
    assert outs == [["a", "c"], ["b"]]
    bad = runner.invoke(app, ["predict", str(tiny_model), str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                              "--shard", "3/2"])
    assert bad.exit_code == 2 and "need 1 <= K <= N" in bad.output


def test_pipelined_outputs_equal_sequential_and_failures_stay_per_scan(tiny_model, tmp_path, caplog, write_brain):
    """Skull strip (threshold) and resampling run in a worker process for --workers 1; the outputs must be the
    same bytes as with everything in this process. A scan with a NaN fails in the worker; the others finish."""
    inputs = [write_brain(tmp_path / "in", f"b{i}.nii.gz", shape=(22 + 2 * i, 26, 18)) for i in range(3)]
    img = nib.load(str(inputs[0]))
    arr = img.get_fdata().astype(np.float32)
    arr[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(tmp_path / "in" / "b1bad.nii.gz"))
    inputs.insert(2, tmp_path / "in" / "b1bad.nii.gz")
    runs = {}
    for workers in (0, 1):
        opts = PredictOptions(skullstrip="threshold", n4="none", tta=True, resample_to_input=True, workers=workers)
        with caplog.at_level("INFO", logger="synth7t.inference.prefetch"):
            runs[workers] = predict(tiny_model, inputs, tmp_path / f"w{workers}", opts, progress=False)
        assert ("preprocessing in 1 worker process(es)" in caplog.text) == (workers == 1)
    for res in runs.values():
        assert [p.parent.name for p in res.done] == ["b0", "b1", "b2"]
        assert list(res.failed) == [str(inputs[2])] and "NaN/Inf" in res.failed[str(inputs[2])]
    for name in ("b0", "b1", "b2"):
        for out in ("syn7t.nii.gz", "mask.nii.gz", "uncertainty.nii.gz", "syn7t_on_input_grid.nii.gz"):
            a, b = (nib.load(str(tmp_path / f"w{w}" / name / out)) for w in (0, 1))
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), (name, out)
            assert a.header.binaryblock == b.header.binaryblock, (name, out)
