"""Training end to end on a tiny store: model folder, exact resume, the WGAN-GP variant, loading checks."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from synth7t.errors import InputError
from synth7t.training import load_generator, ssim_map, train, verify_model_folder


@pytest.fixture(scope="module")
def trained(tiny_model):
    return tiny_model


def test_model_folder_is_self_describing(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"model.safetensors", "config.json", "metrics.json", "model_card.md", "checksums.sha256"} <= names
    assert not list(trained.glob("*.pt")) and not list(trained.glob("*.pkl"))
    cfg = verify_model_folder(trained)
    assert cfg["n_slices"] == 3 and cfg["voxel_size_mm"] and cfg["normalization"]["method"]
    assert cfg["model"]["channels"] == 8 and cfg["perceptual"] == "none"
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["epochs"] >= 1 and 5 < metrics["val/psnr_brain"] < 60
    assert "Not a clinical device" in (trained / "model_card.md").read_text()
    net, _ = load_generator(trained)
    x = torch.rand(2, 3, 16, 16)
    assert net(x, torch.zeros(2, 7)).shape == (2, 1, 16, 16)


def test_checkpoints_load_with_weights_only(trained):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert "state_dict" in ckpt and ckpt["global_step"] > 0


def test_tampered_or_incomplete_model_folder(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    weights = load_file(str(bad / "model.safetensors"))
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    from safetensors.torch import save_file

    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(InputError, match="checksum mismatch"):
        verify_model_folder(bad)
    (bad / "config.json").unlink()
    with pytest.raises(InputError, match="config.json is missing"):
        verify_model_folder(bad)


class _Kill(pl.Callback):
    """Simulate a crash at the start of epoch `at` (after the previous epoch's checkpoint)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.at:
            raise RuntimeError("simulated kill")


def test_resume_reaches_the_same_weights(tiny_store, tmp_path, fast_training):
    _, store = tiny_store
    full = train(store, tmp_path / "full", preset="tiny", overrides=fast_training, progress=False)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(store, tmp_path / "killed", preset="tiny", overrides=fast_training, progress=False, extra_callbacks=[_Kill(1)])
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    with pytest.raises(InputError, match="use --resume"):
        train(store, tmp_path / "killed", preset="tiny", overrides=fast_training, progress=False)
    resumed = train(store, tmp_path / "killed", resume=True, progress=False)
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_gan_variant_logs_wasserstein_and_gp(tiny_store, tmp_path, fast_training):
    _, store = tiny_store
    over = {**fast_training, "trainer.max_epochs": 1, "critic": {"channels": 8, "n_layers": 2}, "loss.n_critic": 2}
    out = train(store, tmp_path / "gan", preset="tiny", overrides=over, progress=False)
    logged = next((out / "logs" / "csv").glob("version_*/metrics.csv")).read_text().splitlines()[0]
    for col in ("train/wasserstein", "train/gp", "train/critic_loss", "train/adversarial"):
        assert col in logged
    assert json.loads((out / "config.json").read_text())["gan"] is True


def test_ssim_map_of_identical_images_is_one():
    x = torch.rand(1, 1, 24, 24)
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-5)
    assert ssim_map(x, torch.rand(1, 1, 24, 24)).mean() < 0.5
