"""Training end to end on a tiny store: model folder, exact resume, the WGAN-GP variant, loading checks."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from synth7t.errors import InputError
from synth7t.model_folder import load_generator, verify_model_folder
from synth7t.training import ssim_map, train


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
    assert cfg["parameters"] == net.count_parameters() > 0
    assert f"{cfg['parameters']:,} parameters" in (trained / "model_card.md").read_text()
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
    # a moving average of the weights is updated at generator steps only: 6 batches, a generator step every 2nd
    ema = train(store, tmp_path / "gan_ema", preset="tiny", overrides={**over, "optim.ema_decay": 0.9}, progress=False)
    state = torch.load(ema / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(state["ema.n_averaged"]) == 3


class _RecordWeights(pl.Callback):
    """The generator's weights after every optimizer step, by global step (callbacks run after the step)."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, module, *args):
        self.by_step[trainer.global_step] = {k: v.detach().clone() for k, v in module.generator.state_dict().items()}


def test_ema_weights_are_the_moving_average_of_the_steps(tiny_store, tmp_path, fast_training):
    """optim.ema_decay: the model folder holds ema_k = d ema_(k-1) + (1 - d) w_k (ema_1 = w_1), computed here by
    hand from the weights after each step, of the step its metrics name (final, or the best checkpoint's)."""
    _, store = tiny_store
    rec, d = _RecordWeights(), 0.6
    out = train(store, tmp_path / "ema", preset="tiny", overrides={**fast_training, "optim.ema_decay": d},
                progress=False, extra_callbacks=[rec])
    steps = sorted(rec.by_step)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 6
    ema, by_hand = None, {}
    for s in steps:
        w = rec.by_step[s]
        ema = dict(w) if ema is None else {k: d * ema[k] + (1 - d) * w[k] for k in w}
        by_hand[s] = ema
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_average"] == "EMA 0.6"
    step = metrics["steps"] if metrics["weights"] == "final" else torch.load(
        out / "checkpoints" / "best.ckpt", weights_only=True)["global_step"]
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == by_hand[step].keys()
    for k in saved:
        torch.testing.assert_close(saved[k], by_hand[step][k], rtol=1e-5, atol=1e-6)
    raw = rec.by_step[step]
    assert max(float((saved[k] - raw[k]).abs().max()) for k in saved) > 1e-4  # not the last step's weights
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == steps[-1]  # the average is checkpointed, for resuming
    assert "moving average (decay 0.6)" in (out / "model_card.md").read_text()


def test_ema_decay_is_checked():
    from synth7t.config import load_config
    from synth7t.errors import ConfigError

    assert load_config("tiny", {"optim.ema_decay": 0.99}).optim.ema_decay == 0.99
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="ema_decay"):
            load_config("tiny", {"optim.ema_decay": bad})


def test_ssim_map_of_identical_images_is_one():
    x = torch.rand(1, 1, 24, 24)
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-5)
    assert ssim_map(x, torch.rand(1, 1, 24, 24)).mean() < 0.5


def _epoch_means(out):
    """Mean of the logged per-step train/loss of each epoch, from the CSV log."""
    import csv

    rows = list(csv.DictReader(next((out / "logs" / "csv").glob("version_*/metrics.csv")).open()))
    per_epoch: dict[int, list[float]] = {}
    for r in rows:
        if r.get("train/loss"):
            per_epoch.setdefault(int(float(r["epoch"])), []).append(float(r["train/loss"]))
    return [sum(v) / len(v) for _, v in sorted(per_epoch.items())], rows


def test_plateau_steps_once_per_epoch_on_the_epoch_mean_loss(tiny_store, tmp_path, fast_training, monkeypatch):
    """Thesis 3.4.1: ReduceLROnPlateau per epoch on the epoch's mean training loss, patience in epochs."""
    from synth7t.nn import UNet

    _, store = tiny_store
    calls = []
    original = torch.optim.lr_scheduler.ReduceLROnPlateau.step

    def step(self, metrics, *args, **kwargs):
        calls.append(float(metrics))
        return original(self, metrics, *args, **kwargs)

    offsets = []
    forward = UNet.forward

    def record(self, x, context=None, offset=None):
        if self.training:
            offsets.append(offset)
        return forward(self, x, context, offset)

    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", step)
    monkeypatch.setattr(UNet, "forward", record)
    over = {**fast_training, "trainer.max_epochs": 3, "trainer.limit_train_batches": 3, "optim.schedule": "plateau",
            "optim.patience": 0,
            "optim.factor": 0.5, "data.patch_offsets": True}
    out = train(store, tmp_path / "plateau", preset="tiny", overrides=over, progress=False)
    means, rows = _epoch_means(out)
    assert len(calls) == 3 == len(means)  # once per epoch (3 steps each), not per step
    for got, want in zip(calls, means, strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    lrs = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    expected = 2e-3
    for e in range(1, 3):  # patience 0: the lr halves after every epoch whose mean did not improve
        if means[e - 1] >= min(means[: e - 1], default=float("inf")):
            expected *= 0.5
    assert lrs[-1] == pytest.approx(expected)
    # patches carry their slice offsets (multiples of the model's down-sampling factor 4) into the model
    assert offsets and all(o is not None and o.shape[1] == 2 and bool((o % 4 == 0).all()) for o in offsets)


def test_budget_schedule_anneals_over_the_run_to_lr_times_factor(tiny_store, tmp_path, fast_training):
    """optim.schedule budget: after optimizer step k of a run of n, the rate is lr * factor ** (k / n), here with
    the epochs as the budget (2 epochs of 3 steps), so the run ends at lr * factor whatever its length."""
    _, store = tiny_store
    over = {**fast_training, "trainer.max_epochs": 2, "trainer.limit_train_batches": 3, "optim.schedule": "budget",
            "optim.factor": 0.1}
    out = train(store, tmp_path / "budget", preset="tiny", overrides={**over, "trainer.precision": "bf16-mixed"},
                progress=False)
    metrics = json.loads((out / "metrics.json").read_text())  # the precision the run resolved and used
    assert metrics["precision"] == "bf16-mixed" and "precision bf16-mixed" in (out / "model_card.md").read_text()
    assert all(v.dtype == torch.float32 for v in load_file(str(out / "model.safetensors")).values())
    _, rows = _epoch_means(out)
    lrs = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    assert lrs == pytest.approx([2e-3 * 0.1 ** (k / 6) for k in range(6)], rel=1e-6)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)  # plain data, no callable saved
    [sched] = ckpt["lr_schedulers"]
    assert sched["_last_lr"] == pytest.approx([2e-4]) and "progress" not in sched


def test_budget_spent_is_the_largest_fraction_of_time_steps_and_epochs():
    """The time budget counts the training time Lightning's Timer holds (restored with a checkpoint)."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from synth7t.config import load_config
    from synth7t.training.module import BudgetLR, Synth7tModule

    cfg = load_config("tiny", {"model.channels": 8, "model.n_groups": 4, "model.head_dim": 8, "loss.perceptual": "none",
                               "trainer.max_minutes": 10.0, "trainer.max_steps": 1000, "trainer.max_epochs": 100,
                               "optim.schedule": "budget"})
    module = Synth7tModule(cfg.model_dump(mode="json"))
    assert module.budget_spent() == 0.0  # no trainer yet
    timer = Timer(duration={"minutes": 10})
    timer.load_state_dict({"time_elapsed": {"train": 150.0}})  # 2.5 of 10 minutes, as after a resume
    trainer = SimpleNamespace(callbacks=[timer], global_step=100, max_epochs=100, num_training_batches=10,
                              current_epoch=3)
    module._trainer = trainer
    module._batch_in_epoch = 4
    assert module.budget_spent() == pytest.approx(0.25)  # time: 0.25 > steps 0.1 > epochs 0.035
    trainer.global_step = 400
    assert module.budget_spent() == pytest.approx(0.4)
    trainer.current_epoch, module._batch_in_epoch = 80, 9
    assert module.budget_spent() == pytest.approx(0.81)
    trainer.global_step = 5000
    assert module.budget_spent() == 1.0  # never past the end
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    spent = [0.0]
    sched = BudgetLR(opt, 0.01, lambda: spent[0])
    for p, want in [(0.5, 0.1), (1.0, 0.01), (3.0, 0.01), (-1.0, 1.0)]:
        spent[0] = p
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(want)


@pytest.fixture
def gan_module():
    """The training module of a small WGAN-GP configuration, and a fixed batch."""
    from synth7t.config import load_config
    from synth7t.training.module import Synth7tModule

    torch.manual_seed(0)
    cfg = load_config("tiny", {"model.channels": 8, "model.n_groups": 4, "model.head_dim": 8, "loss.perceptual": "none",
                               "critic": {"channels": 8, "n_layers": 2}, "loss.gan_weight": 50.0})
    module = Synth7tModule(cfg.model_dump(mode="json"))
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.avg_pool2d(torch.rand(4, 3, 32, 32, generator=g), 3, 1, 1)
    real = (x[:, 1:2] + 0.3 * (x[:, 1:2] - torch.nn.functional.avg_pool2d(x[:, 1:2], 5, 1, 2))).clamp(0, 1)
    return module, x, torch.randn(4, 7, generator=g), real


def test_critic_step_raises_the_wasserstein_estimate(gan_module):
    """Critic steps raise D(real) - D(fake) on a fixed batch (pure Wasserstein ascent, gp_weight 0), and with the
    gradient penalty they lower the full critic loss -W + 10 GP (same interpolation draws before and after)."""
    from synth7t.nn.losses import critic_loss, gradient_penalty
    from synth7t.training import critic_update

    module, x, ctx, real = gan_module
    critic = module.critic
    with torch.no_grad():
        fake = module(x, ctx)

    def estimate():
        with torch.no_grad():
            return (critic(real).mean() - critic(fake).mean()).item()

    def full_loss():
        gp = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(5))
        return critic_loss(critic(real), critic(fake), gp, gp_weight=10.0)[0].item()

    opt_d = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.9))
    before = estimate()
    for _ in range(3):
        logs = critic_update(critic, opt_d, real, fake, gp_weight=0.0)
    assert estimate() > before + 1e-3, (before, estimate())
    assert {"train/critic_loss", "train/wasserstein", "train/gp"} <= logs.keys()
    before = full_loss()
    for _ in range(3):
        critic_update(critic, opt_d, real, fake, gp_weight=10.0)
    assert full_loss() < before, (before, full_loss())


def test_generator_step_lowers_the_adversarial_loss(gan_module):
    from synth7t.training import generator_update

    module, x, ctx, real = gan_module
    module.train()
    critic = module.critic
    opt_g = torch.optim.Adam(module.generator.parameters(), lr=1e-3)

    def adversarial():
        with torch.no_grad():
            return -critic(module(x, ctx)).mean().item()  # -D(G(x))

    before = adversarial()
    critic_before = [p.detach().clone() for p in critic.parameters()]
    parts = generator_update(module, critic, opt_g, x, ctx, real, gan_weight=module.cfg.loss.gan_weight)
    assert adversarial() < before - 1e-4, (before, adversarial())
    assert all(torch.equal(a, b) for a, b in zip(critic_before, critic.parameters(), strict=True))  # not stepped
    assert {"l1", "loss", "adversarial"} <= parts.keys()


def test_model_config_carries_the_preprocessing(tiny_model, tiny_store):
    """config.json's ``preprocessing`` is the slice store's recipe (the work folder's provenance.json)."""
    cfg = json.loads((tiny_model / "config.json").read_text())
    store = json.loads((tiny_store[1] / "store.json").read_text())
    assert cfg["preprocessing"] == store["preprocessing"]
    prep = cfg["preprocessing"]
    assert prep["skullstrip"] == "deepbet" and prep["n4_3t"] == "3t" and prep["voxel_size_mm"] == [0.65] * 3
    assert prep["normalization"]["method"] == "clipped_minmax"


@pytest.mark.parametrize(("change", "message"), [
    ({"kind": "transformer9000"}, "model.kind 'transformer9000' is not a network this version knows"),
    ({"channels": -4}, "invalid model section"),
])
def test_model_folder_with_an_unknown_or_invalid_network_says_so(trained, tmp_path, change, message):
    """A config.json from another version names the network problem, not a weights mismatch."""

    from safetensors.torch import load_file as load_weights

    from synth7t.model_folder import load_generator, save_model_folder

    cfg = json.loads((trained / "config.json").read_text())
    cfg["model"].update(change)
    bad = save_model_folder(tmp_path / "bad", load_weights(str(trained / "model.safetensors")), cfg, {}, "card\n")
    with pytest.raises(InputError, match=message):
        load_generator(bad)


class _Layout(pl.Callback):
    """Record the memory layout of the generator's input and first convolution's weight during training."""

    def __init__(self):
        self.inputs, self.weights = [], []

    def on_fit_start(self, trainer, module):
        def hook(_net, args):
            self.inputs.append(args[0].is_contiguous(memory_format=torch.channels_last))
            self.weights.append(module.generator.stem.weight.is_contiguous(memory_format=torch.channels_last))

        module.generator.register_forward_pre_hook(hook)


@pytest.mark.parametrize(("setting", "expected"), [("auto", False), (False, False), (True, True)])
def test_training_memory_layout_follows_trainer_channels_last(tiny_store, tmp_path, fast_training, setting, expected):
    """true trains the 2.5D U-net channels-last (predict's layout); false, and "auto" for a narrow network like
    this one, keep PyTorch's."""
    _, store = tiny_store
    over = {**fast_training, "trainer.max_epochs": 1, "trainer.limit_train_batches": 2,
            "trainer.channels_last": setting}
    rec = _Layout()
    out = train(store, tmp_path / "run", preset="tiny", overrides=over, progress=False, extra_callbacks=[rec])
    assert rec.inputs and set(rec.inputs) == {expected} and set(rec.weights) == {expected}
    assert all(t.is_contiguous() for t in load_file(str(out / "model.safetensors")).values())  # safetensors: dense


def test_channels_last_choice():
    from synth7t.config import load_config
    from synth7t.training.module import use_channels_last

    cfg = load_config("biofinder")
    assert use_channels_last(cfg, torch.device("cpu")) is True
    assert use_channels_last(cfg, torch.device("cpu"), world_size=2) is False  # CPU DDP: not measured, left alone
    assert use_channels_last(cfg, torch.device("cuda")) is False
    assert use_channels_last(load_config("tiny"), torch.device("cpu")) is False  # narrow: measured slower
    assert use_channels_last(load_config("tiny", {"trainer.channels_last": True}), torch.device("cuda")) is True
    assert use_channels_last(load_config("tiny3d"), torch.device("cpu")) is False
    with pytest.raises(Exception, match="channels_last"):
        load_config("tiny", {"trainer.channels_last": "sometimes"})
