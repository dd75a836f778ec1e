"""Fine-tuning with ``--init``: weights and architecture from a model folder, init_from recorded, mismatches refused."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load_file

from synth7t.model_folder import verify_model_folder


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_with_0_steps_keeps_the_source_weights_and_records_init_from(tiny_model, tiny_store, tmp_path, fast_training):
    from typer.testing import CliRunner

    from synth7t.cli import app

    # training settings of the fast fixture, 0 steps; model.* sets equal to the source's are allowed
    sets = {**fast_training, "trainer.max_epochs": 1, "trainer.max_steps": 0,
            "trainer.limit_train_batches": 1}
    out = tmp_path / "ft"
    args = ["train", str(tiny_store[1]), "-o", str(out), "--init", str(tiny_model), "--device", "cpu"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = verify_model_folder(out)
    src = load_file(str(tiny_model / "model.safetensors"))
    new = load_file(str(out / "model.safetensors"))
    assert src.keys() == new.keys()
    for k in src:
        torch.testing.assert_close(new[k], src[k], rtol=0, atol=0, msg=k)
    assert cfg["model"] == json.loads((tiny_model / "config.json").read_text())["model"]
    assert cfg["init_from"] == {"sha256": _sha(tiny_model / "model.safetensors"), "preset": "tiny"}
    assert str(tiny_model) not in (out / "config.json").read_text()
    assert _sha(tiny_model / "model.safetensors") in (out / "model_card.md").read_text()
    assert json.loads((tiny_model / "config.json").read_text())["init_from"] is None  # trained from scratch


def test_init_one_step_moves_the_weights_and_architecture_comes_from_the_source(tiny_model, tiny_store, tmp_path):
    """No model.* sets at all: the tiny preset's own channels (16) are replaced by the source's (8)."""
    from synth7t.training import train

    out = tmp_path / "ft1"
    train(tiny_store[1], out, preset="tiny", init=tiny_model, progress=False, device="cpu",
          overrides={"loss.perceptual": "none", "trainer.max_epochs": 1, "trainer.max_steps": 1,
                     "trainer.limit_train_batches": 1, "trainer.log_every_n_steps": 1, "data.batch_size": 4,
                     "data.patch": 16})
    cfg = verify_model_folder(out)
    assert cfg["model"]["channels"] == 8 and cfg["train_config"]["optim"]["lr"] > 0
    src, new = load_file(str(tiny_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(src[k], new[k]) for k in src)  # one real step changed something


def test_init_architecture_mismatch_is_one_line(tiny_model, tiny_store, tmp_path):
    from typer.testing import CliRunner

    from synth7t.cli import app

    out = tmp_path / "bad"
    res = CliRunner().invoke(app, ["train", str(tiny_store[1]), "-o", str(out), "--init", str(tiny_model),
                                   "--set", "model.channels=16", "--set", "model.n_res=1"])
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "model.channels 8 -> 16" in lines[0] and "--init" in lines[0], lines[0]
    assert not out.exists()  # refused before anything was written


def test_init_from_a_broken_model_folder_is_one_line(tiny_model, tiny_store, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from synth7t.cli import app

    bad = tmp_path / "src"
    shutil.copytree(tiny_model, bad, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    res = CliRunner().invoke(app, ["train", str(tiny_store[1]), "-o", str(tmp_path / "o"), "--init", str(bad)])
    assert res.exit_code != 0 and "checksum mismatch" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["train", str(tiny_store[1]), "-o", str(tmp_path / "o"), "--init",
                                   str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "model folder not found" in res.output


def test_init_with_resume_is_refused(tiny_model, tiny_store, tmp_path):
    from typer.testing import CliRunner

    from synth7t.cli import app

    res = CliRunner().invoke(app, ["train", str(tiny_store[1]), "-o", str(tmp_path / "o"), "--init", str(tiny_model),
                                   "--resume"])
    assert res.exit_code != 0 and "drop --init" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_demo_fine_tune_restarts_from_init_or_resumes_its_checkpoint(tiny_model, tiny_store, tmp_path):
    """``synth7t demo --benchmark``'s GAN fine-tune (pipeline_demo.train_model with init): killed before its first
    checkpoint it starts again from the source (train_config.json alone does not mean "resume", which would be
    refused); killed after one it resumes, with the saved configuration (the demo passes its overrides every time:
    before the fix, any killed demo training failed to resume with "--set overrides are not allowed"); both record
    the source's sha256."""
    import shutil

    from synth7t.pipeline_demo import train_model

    over = {"loss.perceptual": "none", "trainer.max_epochs": 1, "trainer.max_steps": 2,
            "trainer.limit_train_batches": 2, "trainer.log_every_n_steps": 1, "data.batch_size": 4, "data.patch": 16,
            "trainer.checkpoint_every_steps": 1}
    out = tmp_path / "gan"
    sha = _sha(tiny_model / "model.safetensors")
    train_model(tiny_store[1], out, over, False, init=tiny_model)
    assert json.loads((out / "config.json").read_text())["init_from"]["sha256"] == sha
    # killed before its first checkpoint: only the run's configuration is there
    (out / "model.safetensors").unlink()
    shutil.rmtree(out / "checkpoints")
    assert (out / "train_config.json").exists()
    train_model(tiny_store[1], out, over, False, init=tiny_model)
    assert json.loads((out / "config.json").read_text())["init_from"]["sha256"] == sha
    # killed after a checkpoint: resumed (from the checkpoint, not from the source again)
    (out / "model.safetensors").unlink()
    assert (out / "checkpoints" / "last.ckpt").exists()
    train_model(tiny_store[1], out, over, False, init=tiny_model)
    assert verify_model_folder(out)["init_from"]["sha256"] == sha
