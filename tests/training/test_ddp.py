"""DDP: the rank-aware epoch sampler (fast, ranks simulated) and a real 2-process CPU (gloo) `synth7t train` whose
per-step losses match one process at the same global batch (slow)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synth7t.training import EpochSampler, ResumableLoader, launched_as_rank_zero


def _order(n: int, seed: int, epoch: int) -> list[int]:
    return (np.random.default_rng([seed, epoch]).permutation(n) + epoch * n).tolist()


def _share(n, rank, world, epoch=0, **kw) -> list[int]:
    sampler = EpochSampler(n, seed=3, rank=rank, world_size=world, **kw)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n, world", [(12, 2), (13, 2), (13, 3), (5, 4)])
def test_rank_shares_split_the_epoch_without_duplicates(n, world):
    for epoch in (0, 1):
        order = _order(n, 3, epoch)
        shares = [_share(n, r, world, epoch) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # every rank runs the same number of steps
        assert all(len(s) == len(EpochSampler(n, 3, rank=r, world_size=world)) for r, s in enumerate(shares))
        union = [i for s in shares for i in s]
        assert len(union) == len(set(union))  # no sample twice
        kept = n - n % world  # truncated to a multiple of the world size: the permutation's tail is left out
        assert sorted(union) == sorted(order[:kept])
        if n % world == 0:
            assert sorted(union) == sorted(order)  # the whole epoch
    assert _share(12, 0, 1) == _order(12, 3, 0)  # one rank: the single-process order


def test_rank_batches_make_the_single_process_global_batches():
    """Rank r's batch k, for all r, is batch k of one process at world_size x the batch size (the same samples,
    so with gradient averaging the same step); the last incomplete batch is dropped consistently."""
    n, world, b = 23, 2, 3
    single = EpochSampler(n, 3, batch_size=world * b)
    single.set_epoch(1)
    glob = list(single)
    assert len(glob) == 18  # 23 -> 3 global batches of 6
    shares = [_share(n, r, world, 1, batch_size=b) for r in range(world)]
    assert [len(s) for s in shares] == [9, 9]  # 11 each, truncated to 3 batches of 3
    for k in range(3):
        ranks = sorted(i for s in shares for i in s[k * b:(k + 1) * b])
        assert ranks == sorted(glob[k * world * b:(k + 1) * world * b])


def test_validation_shares_cover_the_set_once():
    for n, world in [(21, 2), (7, 3)]:
        shares = [_share(n, r, world, shuffle=False, even=False) for r in range(world)]
        union = [i for s in shares for i in s]
        assert sorted(union) == list(range(n)) and len(union) == n
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # fewer samples than ranks: the whole set on every rank (no rank without a batch)
    assert all(_share(2, r, 3, shuffle=False, even=False) == [0, 1] for r in range(3))


def _loader(rank, world, n=20, batch=3):
    return ResumableLoader(range(100 * n), sampler=EpochSampler(n, seed=7, batch_size=batch, rank=rank,
                                                                world_size=world),
                           batch_size=batch, generator=torch.Generator().manual_seed(0))


def test_resume_position_per_rank():
    world = 2
    for rank in range(world):
        ref = _loader(rank, world)
        ref.sampler.set_epoch(1)
        full = [b.tolist() for b in ref]
        assert len(full) == 3  # 10 of 20 per rank, 3 batches of 3
        run = _loader(rank, world)
        run.sampler.set_epoch(1)
        it = iter(run)
        assert [next(it).tolist() for _ in range(2)] == full[:2]
        state = run.state_dict()  # what rank 0 saves; every rank has done as many batches
        assert state == {"epoch": 1, "batches": 2}
        new = _loader(rank, world)
        new.load_state_dict(state)
        it = iter(new)
        new.sampler.set_epoch(1)
        assert [b.tolist() for b in it] == full[2:]


def test_sampler_reads_torch_distributed_when_initialized(monkeypatch):
    sampler = EpochSampler(10, seed=3)
    assert sampler.replicas() == (0, 1) and len(sampler) == 10
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert sampler.replicas() == (1, 2) and len(sampler) == 5
    assert list(sampler) == _order(10, 3, 0)[1::2]


def test_rank_zero_from_the_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert launched_as_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_as_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank started by Lightning's launcher
    assert not launched_as_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # local rank 0 of the second node
    assert not launched_as_rank_zero()


def test_strategy_choice(fast_training):
    from lightning.pytorch.strategies import DDPStrategy

    from synth7t.config import load_config
    from synth7t.training.distributed import _strategy

    cfg = load_config("tiny", fast_training)
    assert _strategy("cpu", "1", 1, cfg) == "auto" and _strategy("cpu", "auto", 1, cfg) == "auto"
    ddp = _strategy("cpu", "2", 1, cfg)
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is False
    assert False in ddp._ddp_kwargs.values()  # no buffer broadcast at each forward
    assert isinstance(_strategy("cpu", "1", 2, cfg), DDPStrategy)  # one device on each of 2 nodes
    gan = load_config("tiny", {**fast_training, "critic": {"channels": 8, "n_layers": 2}})
    assert _strategy("cpu", "2", 1, gan)._ddp_kwargs["find_unused_parameters"] is True


def test_lightning_does_not_wrap_the_epoch_sampler(tiny_store, tmp_path, fast_training):
    """The Trainer of train() keeps Lightning from replacing EpochSampler by a DistributedSampler under DDP (it
    would shard the already sharded epoch again, or shuffle it its own way)."""
    import lightning.pytorch as pl

    from synth7t.training import train

    seen = {}

    class Look(pl.Callback):
        def on_fit_start(self, trainer, module):
            seen["use_distributed_sampler"] = trainer._accelerator_connector.use_distributed_sampler

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["sampler"] = type(trainer.train_dataloader.sampler)

    over = {**fast_training, "trainer.max_epochs": 1, "trainer.limit_train_batches": 1}
    train(tiny_store[1], tmp_path / "run", preset="tiny", overrides=over, progress=False, device="cpu",
          extra_callbacks=[Look()])
    assert seen == {"use_distributed_sampler": False, "sampler": EpochSampler}


# ---------------------------------------------------------------------------------------------------------
# a real 2-process run (CPU, gloo)


def _args(store: Path, out: Path, sets: dict, devices: int, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "synth7t.cli", "train", str(store), "-o", str(out), "--device", "cpu",
            "--devices", str(devices)]
    if resume:
        return [*args, "--resume"]
    return [*args, "--preset", "tiny", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _train(store: Path, out: Path, sets: dict, devices: int, resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(_args(store, out, sets, devices, resume), env=_env(), capture_output=True, text=True,
                          timeout=300)


def _step_losses(out: Path) -> dict[int, float]:
    [log] = (out / "logs" / "csv").glob("version_*/metrics.csv")  # one logger folder: only rank 0 logs
    with log.open() as fh:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process_at_the_same_global_batch(tiny_store, tmp_path, fast_training):
    """`synth7t train --device cpu --devices 2` (gloo, batch 4 per rank) runs to the end, writes one model folder,
    and logs the per-step losses of one process at batch 8, to float32 rounding (measured: < 1e-6 relative over
    12 steps; the tolerance, 1e-4, is far below the step-to-step changes of the loss, ~10 %, which a wrong data
    split, e.g. both ranks on the same samples, would show)."""
    _, store = tiny_store
    sets = {**fast_training, "trainer.val_every_n_epochs": 1, "data.num_workers": 0, "optim.schedule": "plateau",
            "optim.patience": 0, "optim.factor": 0.5}
    ddp = _train(store, tmp_path / "ddp", {**sets, "data.batch_size": 4}, devices=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("model folder:") == 1
    one = _train(store, tmp_path / "one", {**sets, "data.batch_size": 8, "trainer.threads": 1}, devices=1)
    assert one.returncode == 0, one.stderr[-3000:]
    want, got = _step_losses(tmp_path / "one"), _step_losses(tmp_path / "ddp")
    assert sorted(got) == sorted(want) == list(range(12))  # 2 epochs of 6 steps
    np.testing.assert_allclose([got[s] for s in range(12)], [want[s] for s in range(12)], rtol=1e-4)
    assert np.ptp(list(want.values())) > 100 * 1e-4 * max(want.values())  # the tolerance can tell steps apart
    out = tmp_path / "ddp"
    for name in ("model.safetensors", "config.json", "metrics.json", "model_card.md", "checksums.sha256"):
        assert (out / name).is_file()
    assert not list(out.rglob("*.tmp*"))
    m_ddp, m_one = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("ddp", "one"))
    assert m_ddp["steps"] == m_one["steps"] == 12 and m_ddp["weights"] == m_one["weights"]
    for key in ("val/psnr_brain", "val/ssim_brain", "val/l1"):  # the whole validation set, sharded and reduced
        assert m_ddp[key] == pytest.approx(m_one[key], rel=1e-4)


@pytest.mark.slow
def test_ddp_killed_mid_epoch_resumes_exactly(tiny_store, tmp_path, fast_training):
    """A 2-process CPU DDP run killed with SIGKILL (both ranks) twice, mid-epoch, and resumed with --resume ends
    with the weights of the same DDP run uninterrupted, bit for bit (dropout and a loader worker included)."""
    import torch
    from safetensors.torch import load_file

    _, store = tiny_store
    sets = {**fast_training, "trainer.max_epochs": 3, "data.batch_size": 4, "trainer.checkpoint_every_steps": 2,
            "model.dropout": 0.1, "trainer.val_every_n_epochs": 1, "data.num_workers": 1,
            "optim.schedule": "plateau", "optim.patience": 0, "optim.factor": 0.5}
    full = _train(store, tmp_path / "full", sets, devices=2)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    mid_epoch = []
    for i, target in enumerate((4, 9)):  # checkpoints at steps 2, 4 (mid epoch 0), 8 (mid epoch 1), 10, ...
        proc = subprocess.Popen(_args(store, out, sets, 2, resume=i > 0), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # its own group: both ranks
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
                    if ckpt["global_step"] >= target:
                        break
                except (FileNotFoundError, EOFError, RuntimeError):  # not written yet
                    pass
                assert proc.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.005)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        [loader] = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        mid_epoch.append(0 < loader["batches"] < 6)
        assert not (out / "model.safetensors").exists()
    assert any(mid_epoch), "no kill left a mid-epoch checkpoint"
    resumed = _train(store, out, sets, devices=2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_more_processes_than_training_slices_is_a_one_line_error(tiny_store, tmp_path, fast_training):
    from synth7t.errors import InputError
    from synth7t.training import train

    with pytest.raises(InputError, match="fewer than the 200 DDP processes"):  # refused before any process starts
        train(tiny_store[1], tmp_path / "run", preset="tiny", overrides=fast_training, progress=False, device="cpu",
              devices=200)
