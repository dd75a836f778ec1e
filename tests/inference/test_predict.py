"""Prediction: geometry in the input's world space, TTA, many inputs, and clear errors for bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from synth7t.errors import InputError
from synth7t.inference import PredictOptions, predict
from synth7t.io import Volume, load_volume, save_volume, voxel_to_world


def _oblique_brain(tmp_path, name="brain.nii.gz", shape=(30, 36, 24)):
    """A preprocessed-looking brain (three tissue shells, zero outside) on an oblique LPS 1 mm grid."""
    idx = np.indices(shape).astype(np.float32)
    c = (np.asarray(shape, np.float32) / 2)[:, None, None, None]
    r = np.asarray([11, 13, 9], np.float32)[:, None, None, None]
    d = np.sqrt((((idx - c) / r) ** 2).sum(0))
    data = np.where(d < 0.45, 900, np.where(d < 0.8, 600, 300)) * (d < 1.0)
    data = (data + np.random.default_rng(0).normal(0, 20, shape) * (d < 1)).astype(np.float32)
    theta = np.deg2rad(15)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.1])
    aff[:3, 3] = [20, 30, -10]
    return save_volume(tmp_path / name, Volume(data, aff))


def _centre_of_mass_world(vol: Volume) -> np.ndarray:
    ijk = np.argwhere(vol.data > 0).mean(0)
    return voxel_to_world(vol.affine, ijk)[0]


@pytest.fixture(scope="module")
def predicted(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    src = _oblique_brain(tmp)
    res = predict(tiny_model, [src], tmp / "out", PredictOptions(preprocessed=True, tta=True, resample_to_input=True,
                                                                 age=71, sex="F", diagnosis="mci"), progress=False)
    assert not res.failed, res.failed
    return src, tmp / "out" / "brain"


def test_output_grid_and_world_alignment(predicted):
    src, out = predicted
    vin, vout = load_volume(src), load_volume(out / "syn7t.nii.gz")
    np.testing.assert_allclose(vout.zooms, 0.65, atol=1e-4)
    assert vout.orientation == "RAS"
    # the brain lands where it was: centres of mass agree within half an output voxel
    mask = load_volume(out / "mask.nii.gz")
    err = np.linalg.norm(_centre_of_mass_world(mask) - _centre_of_mass_world(vin))
    assert err < 0.65 / 2, err
    # prediction values live inside the brain only, in [0, 1] model units, finite
    assert np.isfinite(vout.data).all() and vout.data.min() >= 0 and vout.data.max() <= 1
    assert (vout.data[mask.data == 0] == 0).all() and (vout.data[mask.data > 0] > 0).mean() > 0.9


def test_resample_to_input_and_uncertainty(predicted):
    src, out = predicted
    vin = load_volume(src)
    on_input = load_volume(out / "syn7t_on_input_grid.nii.gz")
    assert on_input.shape == vin.shape
    np.testing.assert_allclose(on_input.affine, vin.affine, atol=1e-5)
    unc = load_volume(out / "uncertainty.nii.gz")
    assert unc.data.min() >= 0 and np.isfinite(unc.data).all()


def test_provenance_has_no_paths_or_covariate_values(predicted):
    src, out = predicted
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["input"] == src.name and len(prov["model"]["sha256"]) == 64
    text = json.dumps(prov)
    assert str(src.parent) not in text and "71" not in json.dumps(prov["covariates_given"])
    assert prov["covariates_given"] == {"age": True, "sex": True, "diagnosis": True}
    hdr = nib.load(str(out / "syn7t.nii.gz")).header
    assert bytes(hdr["descrip"]).strip(b"\x00") == b""


def test_many_inputs_skip_overwrite_and_failures(tiny_model, tmp_path):
    good = _oblique_brain(tmp_path, "good.nii.gz")
    nan = tmp_path / "nan.nii.gz"
    img = nib.load(str(good))
    arr = img.get_fdata().astype(np.float32)
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(nan))
    zero = tmp_path / "zero.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(zero))
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([arr] * 2, -1), img.affine), str(four))
    opts = PredictOptions(preprocessed=True)
    res = predict(tiny_model, [good, nan, zero, four], tmp_path / "out", opts, progress=False)
    assert [p.parent.name for p in res.done] == ["good"]
    assert "NaN/Inf" in res.failed[str(nan)] and "all zeros" in res.failed[str(zero)]
    assert "4-D image with 2 volumes" in res.failed[str(four)]
    assert all("\n" not in v for v in res.failed.values())
    again = predict(tiny_model, [good], tmp_path / "out", opts, progress=False)
    assert len(again.skipped) == 1 and not again.done
    forced = predict(tiny_model, [good], tmp_path / "out", PredictOptions(preprocessed=True, overwrite=True),
                     progress=False)
    assert len(forced.done) == 1


def test_model_folder_problems_are_one_line(tiny_model, tmp_path):
    import shutil

    src = _oblique_brain(tmp_path)
    bad = tmp_path / "model"
    shutil.copytree(tiny_model, bad, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    (bad / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match="metrics.json: checksum mismatch"):
        predict(bad, [src], tmp_path / "o", PredictOptions(preprocessed=True), progress=False)
    with pytest.raises(InputError, match="model folder not found"):
        predict(tmp_path / "nope", [src], tmp_path / "o", PredictOptions(preprocessed=True), progress=False)
    with pytest.raises(InputError, match="unknown sex code"):
        predict(tiny_model, [src], tmp_path / "o", PredictOptions(preprocessed=True, sex="Q"), progress=False)


def test_cli_predict_exit_codes(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from synth7t.cli import app

    good = _oblique_brain(tmp_path, "good.nii.gz")
    runner = CliRunner()
    ok = runner.invoke(app, ["predict", str(tiny_model), str(good), "-o", str(tmp_path / "o"), "--preprocessed"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "o" / "good" / "syn7t.nii.gz").exists()
    missing = runner.invoke(app, ["predict", str(tiny_model), str(tmp_path / "absent.nii.gz"), "-o",
                                  str(tmp_path / "o"), "--preprocessed"])
    assert missing.exit_code == 1 and "file not found" in missing.output


def test_input_standardization_is_applied_at_prediction(tmp_path):
    """A model trained with ``data.standardize: histmatch`` maps the stack onto its reference first: an untrained
    U-net returns its middle input slice, so its prediction is exactly the standardized stack."""
    import torch

    from synth7t.config import load_config
    from synth7t.inference import Predictor
    from synth7t.intensity import quantiles, standardize
    from synth7t.model_folder import save_model_folder
    from synth7t.nn import UNet
    from synth7t.training import model_config

    cfg = load_config("tiny", {"model.channels": 8, "model.n_groups": 4, "model.head_dim": 8})
    torch.manual_seed(0)
    net = UNet(cfg.model)
    config = model_config(cfg, None, net)
    rng = np.random.default_rng(1)
    reference = quantiles(np.clip(rng.normal(0.55, 0.15, 50_000), 0, 1))
    config["input_standardization"] = {"method": "histmatch", "reference_quantiles": reference.tolist()}
    folder = save_model_folder(tmp_path / "m", net.state_dict(), config, {}, "# untrained test model\n")
    stack = np.zeros((5, 16, 24), np.float32)
    stack[:, 2:14, 3:21] = rng.uniform(0.05, 1.0, (5, 12, 18))
    pred, _ = Predictor(folder, "cpu").predict_stack(stack)
    np.testing.assert_allclose(pred, np.clip(standardize(stack, reference), 0, 1), atol=1e-5)
    config["input_standardization"] = {"method": "wavelet"}
    bad = save_model_folder(tmp_path / "bad", net.state_dict(), config, {}, "# untrained test model\n")
    with pytest.raises(InputError, match="input_standardization"):
        Predictor(bad, "cpu")


def _model_with_recipe(tiny_model, dest, **recipe):
    """A copy of the tiny model folder whose config.json ``preprocessing`` is changed by ``recipe``."""
    import shutil

    from synth7t.model_folder import sha256_file

    shutil.copytree(tiny_model, dest, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    cfg = json.loads((dest / "config.json").read_text())
    cfg["preprocessing"] = {**cfg["preprocessing"], **recipe}
    (dest / "config.json").write_text(json.dumps(cfg))
    lines = (dest / "checksums.sha256").read_text().splitlines()
    (dest / "checksums.sha256").write_text("".join(
        f"{sha256_file(dest / 'config.json')}  config.json\n" if line.endswith(" config.json") else line + "\n"
        for line in lines))
    return dest


def test_predict_applies_the_training_recipe_and_warns_on_override(tiny_model, tmp_path, caplog):
    """A raw input is skull-stripped and bias-corrected as the model's training data were, unless told."""
    model = _model_with_recipe(tiny_model, tmp_path / "model", skullstrip="threshold",
                               n4_3t="none (already corrected)")
    src = _oblique_brain(tmp_path)
    with caplog.at_level("WARNING"):
        res = predict(model, [src], tmp_path / "a", PredictOptions(), progress=False)
    assert not res.failed and "differs from the model's training" not in caplog.text
    prov = json.loads((tmp_path / "a" / "brain" / "provenance.json").read_text())
    assert prov["preprocessing"]["skullstrip"] == {"value": "threshold", "source": "training"}
    assert prov["preprocessing"]["n4"] == {"value": "none", "source": "training"}
    assert prov["preprocessing"]["voxel_size_mm"]["source"] == "training"
    assert prov["training_preprocessing"]["skullstrip"] == "threshold"
    assert "n4" not in prov["timings_s"] or prov["timings_s"]["n4"] < 0.05  # no N4 ran
    caplog.clear()
    with caplog.at_level("WARNING"):
        res = predict(model, [src], tmp_path / "b", PredictOptions(n4="3t", skullstrip="threshold"), progress=False)
    assert not res.failed
    assert "n4 '3t' differs from the model's training data ('none')" in caplog.text
    assert "skullstrip" not in caplog.text  # the same method as the training: no warning
    prov = json.loads((tmp_path / "b" / "brain" / "provenance.json").read_text())
    assert prov["preprocessing"]["n4"] == {"value": "3t", "source": "option"}


def test_predict_without_recipe_uses_defaults(tiny_model):
    from synth7t.inference import Predictor, resolve_steps

    predictor = Predictor(tiny_model, "cpu")
    predictor.config["preprocessing"] = {}
    steps, warnings = resolve_steps(predictor, PredictOptions(skullstrip="threshold", voxel_size_mm=1.0))
    assert steps["skullstrip"] == {"value": "threshold", "source": "option"} and steps["n4"]["source"] == "default"
    assert steps["voxel_size_mm"]["value"] == [1.0, 1.0, 1.0]
    assert len(warnings) == 1 and "voxel size 1 mm differs" in warnings[0]  # only the grid is known
    steps, _ = resolve_steps(predictor, PredictOptions(preprocessed=True))
    assert steps["skullstrip"]["source"].startswith("skipped")


_NO_LIGHTNING = ("assert not [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.') "
                 "or m.startswith('pytorch_lightning') or m.startswith('synth7t.training')], "
                 "sorted(m for m in sys.modules if 'lightning' in m or m.startswith('synth7t.training'))[:5]")


def test_importing_inference_does_not_import_lightning_or_training():
    import subprocess
    import sys

    code = "import synth7t.inference, sys; " + _NO_LIGHTNING
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_synth7t_predict_end_to_end_does_not_import_lightning(tiny_model, tmp_path):
    """``synth7t predict`` on a raw scan (N4, skull stripping, resampling, inference) never loads Lightning nor
    the training package: prediction needs only the model folder (:mod:`synth7t.model_folder`)."""
    import subprocess
    import sys

    model = _model_with_recipe(tiny_model, tmp_path / "model", skullstrip="threshold",
                               n4_3t="none (already corrected)")
    src = _oblique_brain(tmp_path)
    code = ("import sys; from synth7t.cli import main; sys.argv = ['synth7t', 'predict', sys.argv[1], sys.argv[2], "
            "'--out', sys.argv[3], '--n4', '3t', '--device', 'cpu']\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n" + _NO_LIGHTNING)
    run = subprocess.run([sys.executable, "-c", code, str(model), str(src), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "brain" / "syn7t.nii.gz").is_file()


def test_manifest_with_several_scans_per_subject_names_one_output_per_session(tmp_path):
    """A training manifest with several 3T sessions of one subject (issue 16) predicts one output per session."""
    from synth7t.inference import PredictOptions, collect_inputs

    scans = []
    for name in ("a1", "a2", "b", "a7"):
        f = tmp_path / f"{name}.nii.gz"
        f.write_bytes(b"")  # collect_inputs only lists the jobs; nothing is read here
        scans.append(f)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject,t3,t7,session,age\nA,{scans[0]},{scans[3]},1,70\nA,{scans[1]},{scans[3]},2,70\n"
                        f"B,{scans[2]},,,65\n")
    jobs = collect_inputs([manifest], PredictOptions())
    assert [(j.subject, j.t3.name, j.age) for j in jobs] == [("A_1", "a1.nii.gz", 70), ("A_2", "a2.nii.gz", 70),
                                                            ("B", "b.nii.gz", 65)]
