"""Issue 16 options end to end: ``synth7t train --set model.wavelet=true`` and the residual critic."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner


def _train_cli(store, out, sets: dict, preset: str = "tiny"):
    from synth7t.cli import app

    args = ["train", str(store), "-o", str(out), "--preset", preset, "--device", "cpu"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out


def test_wavelet_option_trains_and_round_trips_through_the_model_folder(tiny_store, tmp_path, fast_training):
    from synth7t.inference import Predictor
    from synth7t.model_folder import load_generator

    sets = {**fast_training, "trainer.max_epochs": 1, "trainer.limit_train_batches": 3, "model.wavelet": "true"}
    out = _train_cli(tiny_store[1], tmp_path / "wave", sets)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["wavelet"] is True
    net, _ = load_generator(out)
    assert net.cfg.wavelet and net.stem.in_channels == 5 * net.cfg.in_slices
    assert not any("wavelet" in k or "haar" in k for k in net.state_dict())  # nothing but the stem changed
    rng = np.random.default_rng(0)
    stack = np.zeros((5, 16, 24), np.float32)
    stack[:, 2:14, 3:21] = rng.uniform(0.05, 1.0, (5, 12, 18))
    pred, _ = Predictor(out, "cpu").predict_stack(stack)  # prediction needs nothing new
    assert pred.shape == stack.shape and np.isfinite(pred).all()


def test_residual_critic_trains_end_to_end(tiny_store, tmp_path, fast_training):
    """``critic.residual`` (thesis 5.2) through the CLI; the critic's config is recorded in the model folder."""
    sets = {**fast_training, "trainer.max_epochs": 1, "trainer.limit_train_batches": 3, "critic.channels": 8,
            "critic.n_layers": 2, "critic.residual": "true", "loss.n_critic": 2, "loss.gan_weight": 0.2}
    out = _train_cli(tiny_store[1], tmp_path / "gan", sets)
    assert json.loads((out / "config.json").read_text())["gan"] is True
    assert json.loads((out / "train_config.json").read_text())["critic"]["residual"] is True
    logged = next((out / "logs" / "csv").glob("version_*/metrics.csv")).read_text().splitlines()
    head = logged[0].split(",")
    col = head.index("train/wasserstein")
    assert any(row.split(",")[col] for row in logged[1:])  # the critic ran
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("critic.") and ".body." in k for k in ckpt["state_dict"])  # the residual blocks
