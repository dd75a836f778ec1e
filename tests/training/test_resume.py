"""Exact resume: a run killed at any moment (mid-epoch included) and resumed ends with the uninterrupted run's weights.

In-process tests here simulate the kill with an exception (fast); ``test_sigkill_mid_epoch_then_resume_is_exact``
kills a real ``synth7t train`` process with SIGKILL (slow).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synth7t.training import EpochSampler, ResumableLoader, rng_state, set_rng_state, train


def _loader(n=10, batch=3, workers=0):
    return ResumableLoader(range(100 * n), sampler=EpochSampler(n, seed=7), batch_size=batch, drop_last=True,
                           num_workers=workers, generator=torch.Generator().manual_seed(0))


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_position_round_trip(workers):
    ref = _loader()
    epochs = [_epoch(ref, e) for e in range(3)]
    assert epochs[0] != epochs[1] and all(len(e) == 3 for e in epochs)
    # a run that stops after 2 batches of epoch 1: its state, loaded into a fresh loader, continues at batch 3
    run = _loader()
    run.sampler.set_epoch(1)
    it = iter(run)
    assert [next(it).tolist() for _ in range(2)] == epochs[1][:2]
    state = run.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    new = _loader(workers=workers)
    new.load_state_dict(state)
    it = iter(new)  # Lightning creates the iterator before set_epoch: nothing may be drawn yet
    new.sampler.set_epoch(1)
    assert [b.tolist() for b in it] == epochs[1][2:]
    assert new.state_dict() == {"epoch": 1, "batches": 3}
    assert _epoch(new, 2) == epochs[2]  # the position applies to one pass only
    # a state saved at an epoch's end, resumed at the next epoch: that epoch whole
    new = _loader(workers=workers)
    new.load_state_dict({"epoch": 1, "batches": 3})
    assert _epoch(new, 2) == epochs[2]


def test_rng_state_round_trip_with_weights_only(tmp_path):
    import random

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": rng_state()}, tmp_path / "s.ckpt")
    want = torch.rand(4), np.random.standard_normal(3), np.random.rand(2), random.random()
    set_rng_state(torch.load(tmp_path / "s.ckpt", weights_only=True)["rng"])
    got = torch.rand(4), np.random.standard_normal(3), np.random.rand(2), random.random()
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and np.array_equal(want[2], got[2])
    assert want[3] == got[3]


def test_checkpoint_write_interrupted_keeps_the_previous_one(tmp_path):
    from synth7t.training.fit import _checkpoint_classes

    _, atomic_io = _checkpoint_classes()
    path = tmp_path / "last.ckpt"
    atomic_io().save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        atomic_io().save_checkpoint({"global_step": 2, "w": torch.zeros(1000), "z": Boom()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class _Kill(pl.Callback):
    """Raise at the start of batch ``batch`` of epoch ``epoch`` (``batch="val"``: when that epoch's validation
    starts, after its last batch and before its end-of-epoch checkpoint)."""

    def __init__(self, epoch: int, batch):
        self.at = (epoch, batch)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            raise RuntimeError("simulated kill")

    def on_validation_start(self, trainer, module):
        if (trainer.current_epoch, "val") == self.at and trainer.state.fn == "fit":  # not the final validation
            raise RuntimeError("simulated kill")


# 3 epochs of 4 batches, a checkpoint every 2 steps, validation every epoch; dropout makes the torch RNG matter
RESUMABLE = {"trainer.max_epochs": 3, "trainer.limit_train_batches": 4, "trainer.checkpoint_every_steps": 2,
             "trainer.val_every_n_epochs": 1, "trainer.threads": 1, "model.dropout": 0.1}
VARIANTS = {
    "unet-plateau": {"optim.schedule": "plateau", "optim.patience": 0, "optim.factor": 0.5},
    # the rate follows the restored position; bf16 autocast on CPU (tiny's `auto` on a CPU with native bf16)
    "unet-budget-bf16": {"optim.schedule": "budget", "optim.factor": 0.1, "trainer.precision": "bf16-mixed"},
    "gan": {"critic": {"channels": 8, "n_layers": 2}, "loss.n_critic": 3, "optim.schedule": "step",
            "optim.every_steps": 2},
}


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_killed_mid_epoch_resumes_exactly(variant, tiny_store, tmp_path, fast_training, monkeypatch):
    _, store = tiny_store
    over = {**fast_training, **RESUMABLE, **VARIANTS[variant]}
    plateau_metrics = []
    original = torch.optim.lr_scheduler.ReduceLROnPlateau.step

    def step(self, metrics, *args, **kwargs):
        plateau_metrics.append(float(metrics))
        return original(self, metrics, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", step)
    full = train(store, tmp_path / "full", preset="tiny", overrides=over, progress=False, device="cpu")
    want = list(plateau_metrics)
    # mid-epoch (batch 3 of epoch 1: resumes at batch 2 with the epoch's running loss), and between an epoch's
    # last batch and its end-of-epoch checkpoint (validation)
    for epoch, batch in [(1, 3), (1, "val")]:
        plateau_metrics.clear()
        out = tmp_path / f"killed-{epoch}-{batch}"
        with pytest.raises(RuntimeError, match="simulated kill"):
            train(store, out, preset="tiny", overrides=over, progress=False, device="cpu",
                  extra_callbacks=[_Kill(epoch, batch)])
        ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
        [loader] = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert loader["epoch"] == 1 and 0 < loader["batches"] < 4  # a mid-epoch checkpoint (gan: 2 steps a batch)
        assert "synth7t_resume" in ckpt
        train(store, out, resume=True, progress=False, device="cpu")
        _same_weights(full, out)
        if variant == "unet-plateau":  # the scheduler saw the same epoch means (epoch 1's from both processes)
            assert len(want) == 3 and plateau_metrics == want


# ---------------------------------------------------------------------------------------------------------
# a real process, killed with SIGKILL


def _cli(store: Path, out: Path, sets: dict, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "synth7t.cli", "train", str(store), "-o", str(out), "--device", "cpu"]
    if resume:
        return [*args, "--resume"]
    return [*args, "--preset", "tiny", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _last_step(ckpt_dir: Path) -> tuple[int, dict] | None:
    try:
        ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")
    except (FileNotFoundError, EOFError, RuntimeError):  # not written yet
        return None
    return ckpt["global_step"], ckpt["loops"]["fit_loop"]["state_dict"].get("combined_loader", [{}])[0]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(tiny_store, tmp_path, fast_training):
    """`synth7t train` killed with SIGKILL three times (after steps >= 8, 20, 33 are checkpointed) and resumed
    with --resume each time ends with the weights of the same run uninterrupted, bit for bit."""
    _, store = tiny_store
    sets = {**fast_training, "trainer.max_epochs": 8, "trainer.checkpoint_every_steps": 1, "trainer.threads": 1,
            "model.dropout": 0.1, "model.channels": 16, "data.patch": 32, "trainer.val_every_n_epochs": 2,
            "optim.schedule": "plateau", "optim.patience": 0, "optim.factor": 0.5}
    subprocess.run(_cli(store, tmp_path / "full", sets), env=_env(), check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    mid_epoch = []
    for i, target in enumerate((8, 20, 33)):
        proc = subprocess.Popen(_cli(store, out, sets, resume=i > 0), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 240
            while (seen := _last_step(out / "checkpoints")) is None or seen[0] < target:
                assert proc.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (out / "model.safetensors").exists()
        step, loader = _last_step(out / "checkpoints")
        mid_epoch.append(0 < loader["batches"] < 6)  # 6 batches per epoch
    assert any(mid_epoch), "no kill left a mid-epoch checkpoint"
    subprocess.run(_cli(store, out, sets, resume=True), env=_env(), check=True, capture_output=True, timeout=300)
    _same_weights(tmp_path / "full", out)
