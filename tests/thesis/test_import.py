"""synth7t import-thesis: the checkpoint is read without running pickled code, bad inputs get one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from synth7t.errors import InputError
from synth7t.model_folder import verify_model_folder


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synth7t.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_import_writes_a_verified_model_folder(authors_files, imported_model):
    cfg = verify_model_folder(imported_model)  # checksums of every file, templates included
    listed = (imported_model / "checksums.sha256").read_text()
    for name in ("model.safetensors", "config.json", "model_card.md", "template_7T.nii.gz", "template_3T.nii.gz",
                 "template_3T_to_7T.mat"):
        assert name in listed and (imported_model / name).is_file()
    assert cfg["model"]["kind"] == "thesis_published"
    assert cfg["template"]["slice_dim"] == 1 and cfg["template"]["shape"] == [24, 14, 22]
    assert cfg["model"]["n_slices_position"] == 14 and cfg["requires_covariates"] == ["sex", "age"]
    from synth7t.model_folder import sha256_file

    digest = sha256_file(authors_files["checkpoint"])
    assert cfg["source"]["sha256"] == digest and cfg["source"]["published"] is None
    card = (imported_model / "model_card.md").read_text()
    assert digest in card and "CC BY-NC 4.0" in card and "arXiv:2507.13782" in card
    assert "NOT one of the published checkpoints" in card and "Differences from the authors' pipeline" in card
    assert cfg["source"]["epoch"] == 4


def test_a_pickle_payload_is_neither_run_nor_a_crash(thesis, tmp_path):
    from synth7t.torchfile import read_state_dict

    marker = tmp_path / "payload-ran"
    net = thesis.reference_net()
    ckpt = thesis.save_authors_checkpoint(net, tmp_path / "evil.pt", payload_marker=marker)
    sd, info = read_state_dict(ckpt)
    assert not marker.exists()
    assert "posix.system" in info.skipped or "os.system" in info.skipped
    assert "pandas.DataFrame" in info.skipped or any(s.startswith("pandas") for s in info.skipped)
    want = net.state_dict()
    assert set(sd) == set(want)  # DataParallel's "module." is gone
    assert all(torch.equal(sd[k], want[k]) for k in want)
    # the real checkpoints need this: torch's own safe loader refuses them
    with pytest.raises(Exception):  # noqa: B017 - torch's UnpicklingError type varies between versions
        torch.load(ckpt, weights_only=True)
    (tmp_path / "p.txt").write_text(str(thesis.SMALL))
    from synth7t.io import save_volume

    t7 = save_volume(tmp_path / "t7.nii.gz", thesis.template_volume())
    r = _cli("import-thesis", ckpt, "--params", tmp_path / "p.txt", "--template", t7, "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert not marker.exists() and "Traceback" not in r.stderr


def test_git_lfs_pointer_is_named(tmp_path, authors_files):
    ptr = tmp_path / "my_unet_no_diag.pt"
    ptr.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:edf579c48dbee460db36b34d0c44dd488903a8c80915"
                   "388584d5942028f135eb\nsize 1036772295\n")
    r = _cli("import-thesis", ptr, "--params", authors_files["params"], "--template", authors_files["template_7t"],
             "-o", tmp_path / "m")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    out = r.stdout + r.stderr
    assert "Git LFS pointer" in out and "git lfs pull" in out
    assert not (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncated", "not_zip"])
def test_damaged_checkpoints_get_one_line(tmp_path, authors_files, damage):
    from synth7t.torchfile import read_state_dict

    data = authors_files["checkpoint"].read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80\x02not a zip" + data[:100])
    with pytest.raises(InputError) as err:
        read_state_dict(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def _params(thesis, tmp_path, **changes):
    p = tmp_path / "params.txt"
    p.write_text(str({**thesis.SMALL, **changes}))
    return p


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_channels": 32}, "has shape"),
    ({"n_res_block": 2}, "lacks"),
    ({"attention_res": [4]}, "lacks"),
    ({"num_groups": 5}, "not divisible by num_groups"),
    ({"use_spatial_transformer": False}, "not supported"),
    ({"conditions": ["Sex", "Weight"]}, "conditions must be"),
])
def test_a_checkpoint_that_does_not_fit_its_params_names_the_first_mismatch(thesis, tmp_path, authors_files, changes,
                                                                            message):
    from synth7t.thesis import import_thesis

    with pytest.raises(InputError, match=message) as err:
        import_thesis(authors_files["checkpoint"], _params(thesis, tmp_path, **changes), authors_files["template_7t"],
                      tmp_path / "m")
    assert "\n" not in str(err.value)


def test_params_are_a_literal_never_evaluated(thesis, tmp_path, authors_files):
    from synth7t.thesis import import_thesis, read_params

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.txt"
    evil.write_text(f"{{'n_channels': __import__('os').system('touch {marker}')}}")
    with pytest.raises(InputError, match="not a Python dict literal"):
        import_thesis(authors_files["checkpoint"], evil, authors_files["template_7t"], tmp_path / "m")
    assert not marker.exists()
    assert read_params(_params(thesis, tmp_path))["channel_mult"] == (1, 2, 2)  # tuples as written


def test_template_grid_must_fit_the_slices(thesis, tmp_path, authors_files):
    from synth7t.thesis import import_thesis

    with pytest.raises(InputError, match="check --slice-dim"):
        import_thesis(authors_files["checkpoint"], authors_files["params"], authors_files["template_7t"],
                      tmp_path / "m", slice_dim=0)
    with pytest.raises(InputError, match="go together"):
        import_thesis(authors_files["checkpoint"], authors_files["params"], authors_files["template_7t"],
                      tmp_path / "m", template_3t=authors_files["template_3t"])


def test_the_published_files_are_recognised_by_digest(authors_files, tmp_path, monkeypatch):
    from synth7t import thesis as thesis_mod
    from synth7t.model_folder import sha256_file

    digest = sha256_file(authors_files["checkpoint"])
    assert "edf579c48dbee460db36b34d0c44dd488903a8c80915388584d5942028f135eb" in thesis_mod.PUBLISHED_CHECKPOINTS
    monkeypatch.setitem(thesis_mod.PUBLISHED_CHECKPOINTS, digest, ("my_unet_no_diag.pt", 1, "the published U-net"))
    out = thesis_mod.import_thesis(authors_files["checkpoint"], authors_files["params"], authors_files["template_7t"],
                                   tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["published"]["name"] == "my_unet_no_diag.pt"
    assert "This is the published file `my_unet_no_diag.pt`" in (out / "model_card.md").read_text()
    assert cfg["template"]["template_3t"] is None  # registered straight to the 7T template at prediction


def test_a_tensor_the_params_do_not_imply_is_named(thesis, tmp_path, authors_files):
    from synth7t.thesis import import_thesis

    net = thesis.reference_net()
    net.register_buffer("stray", torch.zeros(2))
    ckpt = thesis.save_authors_checkpoint(net, tmp_path / "extra.pt")
    with pytest.raises(InputError, match="holds stray, which the settings do not imply"):
        import_thesis(ckpt, authors_files["params"], authors_files["template_7t"], tmp_path / "m")
