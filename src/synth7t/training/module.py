"""The LightningModule: U-net training (L1 + perceptual), or WGAN-GP with manual optimization; exact resume state.

:class:`Synth7tModule` computes the losses (:mod:`synth7t.nn.losses`; the GAN steps are in
:mod:`synth7t.training.gan`), the validation metrics (brain PSNR, brain SSIM with :func:`ssim_map`, L1) and the
learning-rate schedule, and adds to each checkpoint what Lightning does not save (:func:`rng_state`, the epoch's
running loss) so that a resumed run reproduces an uninterrupted one. This is the one training module that
imports Lightning at import time; :func:`synth7t.training.train` imports it when a run starts.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from synth7t.config import validate_config
from synth7t.nn.losses import SynthesisLoss
from synth7t.training.gan import critic_update, generator_update

log = logging.getLogger(__name__)

RESUME_KEY = "synth7t_resume"  # the checkpoint entry written by Synth7tModule.on_save_checkpoint


# ---------------------------------------------------------------------------------------------------------
# validation metric (2-D, on the brain; not a loss)


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    """A normalized ``size x size`` Gaussian kernel, shaped (1, 1, size, size) for ``conv2d``."""
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004; k1 0.01, k2 0.03, Gaussian window sigma 1.5) of (B, 1, H, W) images.

    SSIM = (2 mu_x mu_y + c1)(2 cov_xy + c2) / ((mu_x^2 + mu_y^2 + c1)(var_x + var_y + c2)),
    c1 = (0.01 R)^2, c2 = (0.03 R)^2, moments taken under the Gaussian window.
    """
    w = gaussian_window(device=x.device).to(x.dtype)
    pad = w.shape[-1] // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), w)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))

def axial_slices(t: torch.Tensor) -> torch.Tensor:
    """(B, C, Z, H, W) 3-D patches -> (B * Z, C, H, W) axial slices (the store's axis 0); 2-D batches unchanged."""
    if t.ndim != 5:
        return t
    b, c, z, h, w = t.shape
    return t.transpose(1, 2).reshape(b * z, c, h, w)

# ---------------------------------------------------------------------------------------------------------
# the module


class Synth7tModule(pl.LightningModule):
    """Generator (U-net) training; with ``cfg.critic`` the WGAN-GP variant (manual optimization)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from synth7t.nn import build_generator

        self.save_hyperparameters({"config": config})
        self.cfg = validate_config(config)
        self.generator = build_generator(self.cfg.model)  # the 2.5D U-net or the 3-D patch U-net (model.kind)
        self.critic = None
        if self.cfg.is_gan:
            from synth7t.nn import PatchCritic

            self.critic = PatchCritic(self.cfg.critic)
            self.automatic_optimization = False
        self.ema = build_ema(self.generator, self.cfg.optim.ema_decay)  # None without optim.ema_decay
        self.perceptual = None  # built in setup(): frozen, not part of the state dict
        self._val = []
        self._channels_last = False  # decided in on_fit_start (use_channels_last)

    # -- losses ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        from synth7t.nn.losses import build_perceptual

        if self.perceptual is None and self.cfg.loss.perceptual != "none" and self.cfg.loss.perceptual_weight > 0:
            self.perceptual = build_perceptual(self.cfg.loss.perceptual, self.device)
            object.__setattr__(self, "_perceptual_module", self.perceptual)

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("perceptual.")}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        return super().load_state_dict(state_dict, strict=False, **kwargs)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                offset: torch.Tensor | None = None, net: torch.nn.Module | None = None) -> torch.Tensor:
        if self._channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return (self.generator if net is None else net)(x, context, offset)

    def evaluated_generator(self) -> torch.nn.Module:
        """The network validated and saved: the weights' moving average once it has had a step, else the
        generator itself."""
        if self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return self.generator

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the moving average's update, both inside the batch (before any callback's
        ``on_train_batch_end``, so a checkpoint written there holds the average of the same steps)."""
        super().optimizer_step(*args, **kwargs)
        self._update_ema()

    def _update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.generator)

    def on_fit_start(self) -> None:
        """Lay the 2.5D U-net out channels-last where ``trainer.channels_last`` asks for it (see
        :func:`use_channels_last`). Parameters keep their identity (the optimizer holds them already); restored
        optimizer states keep their own layout, which element-wise Adam does not mind."""
        self._channels_last = use_channels_last(self.cfg, self.device, self.trainer.world_size)
        if self._channels_last:
            self.generator.to(memory_format=torch.channels_last)
            if self.ema is not None:
                self.ema.module.to(memory_format=torch.channels_last)

    def synthesis_loss(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """L1 + lambda_perc * perceptual (thesis 2.1.6) by :class:`~synth7t.nn.losses.SynthesisLoss`, keyed for
        the logs: ``l1``, ``perceptual`` (only with a perceptual network) and ``loss`` (the total)."""
        weight = self.cfg.loss.perceptual_weight if self.perceptual is not None else 0.0
        pred, target = axial_slices(pred), axial_slices(target)  # 3-D patches: the 2-D losses per axial slice
        # a light wrapper made per call: the perceptual network stays registered here only (as before)
        parts = SynthesisLoss(self.perceptual, weight)(pred, target)
        out = {"l1": parts["l1"]}
        if self.perceptual is not None:
            out["perceptual"] = parts["perceptual"]
        out["loss"] = parts["total"]
        return out

    # -- training ----------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._epoch_loss = [torch.zeros((), device=self.device, dtype=torch.float64), 0]

    def _add_epoch_loss(self, loss: torch.Tensor) -> None:
        if not hasattr(self, "_epoch_loss"):
            self.on_train_epoch_start()
        self._epoch_loss[0] = self._epoch_loss[0] + loss.detach().double()
        self._epoch_loss[1] += 1

    def training_step(self, batch: dict, batch_idx: int):
        if self.critic is not None:
            return self._gan_step(batch, batch_idx)
        pred = self(batch["input"], batch.get("context"), batch.get("offset"))
        parts = self.synthesis_loss(pred, batch["target"])
        self._add_epoch_loss(parts["loss"])
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=True, on_step=True,
                      on_epoch=False, batch_size=pred.shape[0], sync_dist=self._distributed())
        return parts["loss"]

    def _distributed(self) -> bool:
        """Under DDP the step losses logged are the means over all ranks (the global batch's loss, as every
        rank has the same batch size): one small all-reduce per step, and logs comparable with one process."""
        return self._trainer is not None and self.trainer.world_size > 1

    def _gan_step(self, batch: dict, batch_idx: int):
        """WGAN-GP (Gulrajani et al. 2017): one critic update per batch, a generator update every n_critic."""
        opt_g, opt_d = self.optimizers()
        x, ctx, offset, real = batch["input"], batch["context"], batch.get("offset"), batch["target"]
        with torch.no_grad():
            fake = self(x, ctx, offset)
        logs = critic_update(self.critic, opt_d, real, fake, self.cfg.loss.gp_weight, self.manual_backward)
        if (batch_idx + 1) % self.cfg.loss.n_critic == 0:
            clip = self.cfg.optim.grad_clip
            parts = generator_update(
                self, self.critic, opt_g, x, ctx, real, self.cfg.loss.gan_weight, self.manual_backward,
                clip=(lambda: self.clip_gradients(opt_g, gradient_clip_val=clip, gradient_clip_algorithm="norm"))
                if clip else None, offset=offset,
            )
            self._add_epoch_loss(parts["loss"])
            self._update_ema()
            if self.cfg.optim.schedule in PER_STEP_SCHEDULES:
                self._scheduler().step()
            logs.update({f"train/{k}": v.detach() for k, v in parts.items()})
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=real.shape[0],
                      sync_dist=self._distributed())

    def budget_spent(self) -> float:
        """The fraction of the run's budget spent (``optim.schedule: budget``): the largest of the training time
        (Lightning's Timer, restored on resume) over ``trainer.max_minutes``, the optimizer steps over
        ``trainer.max_steps`` and the epochs (with the current one's batches) over ``trainer.max_epochs``, of
        those that can end the run; 0 before training."""
        if self._trainer is None:
            return 0.0
        from lightning.pytorch.callbacks import Timer

        trainer, t = self.trainer, self.cfg.trainer
        spent = [0.0]
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if t.max_minutes and timer is not None:
            spent.append(timer.time_elapsed("train") / (60.0 * t.max_minutes))
        if t.max_steps > 0:
            spent.append(trainer.global_step / t.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and batches and math.isfinite(batches):
            done = getattr(self, "_batch_in_epoch", -1) + 1
            spent.append((trainer.current_epoch + min(done, batches) / batches) / trainer.max_epochs)
        return min(max(spent), 1.0)

    def _scheduler(self):
        sched = self.lr_schedulers()
        return sched[0] if isinstance(sched, list) else sched

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return  # stepped in on_train_epoch_end, on the epoch's mean loss, before the epoch's checkpoint
        super().lr_scheduler_step(scheduler, metric)

    def on_train_epoch_end(self) -> None:
        """Epoch schedules: ``plateau`` on the epoch's mean training loss (thesis 3.4.1), ``epoch`` (GAN)."""
        schedule = self.cfg.optim.schedule
        if schedule == "plateau":
            total, count = getattr(self, "_epoch_loss", (None, 0))
            stats = torch.stack([total.double(), torch.tensor(float(count), device=total.device,
                                                              dtype=torch.float64)]) if count else None
            if stats is not None and self.trainer.world_size > 1:
                stats = self.all_gather(stats).reshape(-1, 2).sum(0)
            if stats is not None and stats[1] > 0:
                mean = (stats[0] / stats[1]).float()
                self.log("train/epoch_loss", mean, on_step=False, on_epoch=True, sync_dist=False)
                self._scheduler().step(mean.item())
        elif self.critic is not None and schedule == "epoch":
            self._scheduler().step()

    # -- exact resume --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add what Lightning does not save: RNG states and the epoch's running loss (plain tensors/ints)."""
        total, count = getattr(self, "_epoch_loss", (None, 0))
        checkpoint[RESUME_KEY] = {"rng": rng_state(),
                                  "epoch_loss": [float(total) if count else 0.0, int(count)]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_state = checkpoint.get(RESUME_KEY)  # applied at the first batch trained after it
        if self._resume_state is None and self._trainer is not None and self.trainer.state.fn == "fit":
            log.warning("checkpoint written by an earlier synth7t (no RNG states or data position): the resumed "
                        "run will not reproduce an uninterrupted one exactly")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """First batch after a resume: the RNG states and the epoch's running loss as they were when saved.

        Restored here rather than when loading, so that whatever Lightning does in between (building loaders,
        restoring the loops) cannot move them; nothing between a checkpoint and the next batch draws from the
        global generators in an uninterrupted run either (the loaders have their own).
        """
        self._batch_in_epoch = batch_idx
        state = getattr(self, "_resume_state", None)
        if state is None:
            return
        self._resume_state = None
        set_rng_state(state["rng"])
        total, count = state["epoch_loss"] if batch_idx > 0 else (0.0, 0)  # batch 0: a new epoch
        self._epoch_loss = [torch.tensor(total, dtype=torch.float64, device=self.device), int(count)]

    # -- validation --------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self(batch["input"], batch.get("context"), net=self.evaluated_generator())
        pred = axial_slices(pred.float().clamp(0, 1))
        target, mask = axial_slices(batch["target"].float()), axial_slices(batch["mask"].float())
        se = ((pred - target) ** 2 * mask).sum()
        ssim = (ssim_map(pred, target) * mask).sum()
        l1 = F.l1_loss(pred, target)
        self._val.append(torch.stack([se.detach(), ssim.detach(), mask.sum(), l1.detach() * pred.shape[0],
                                      torch.tensor(float(pred.shape[0]), device=pred.device)]))

    def on_validation_epoch_end(self) -> None:
        """Brain PSNR/SSIM and L1 from sums over the validation set. Under DDP each rank validates its share
        (EpochSampler, ``even=False``) and the sums are all-gathered, so every rank logs the same metrics, those
        of the whole set (a set smaller than the world is validated whole on every rank: the metrics are
        ratios of sums, unchanged)."""
        tot = torch.stack(self._val).sum(0) if self._val else torch.zeros(5, device=self.device)
        if self.trainer.world_size > 1:  # every rank takes part, with or without batches
            tot = self.all_gather(tot).reshape(-1, 5).sum(0)
        self._val.clear()
        if tot[4] == 0:
            return
        n_vox = tot[2].clamp_min(1)
        mse = tot[0] / n_vox
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-12))  # range R = 1: targets are clipped min-max
        self.log_dict({"val/psnr_brain": psnr, "val/ssim_brain": tot[1] / n_vox, "val/l1": tot[3] / tot[4]},
                      prog_bar=True, sync_dist=False)

    # -- optimizers --------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        sched = make_scheduler(opt_g, o, progress=self.budget_spent)
        if self.critic is None:
            if sched is None:
                return opt_g
            interval = "step" if o.schedule in PER_STEP_SCHEDULES else "epoch"
            cfg = {"scheduler": sched, "interval": interval}
            if o.schedule == "plateau":  # stepped by on_train_epoch_end (see lr_scheduler_step)
                cfg.update(monitor="train/epoch_loss", strict=False)
            return {"optimizer": opt_g, "lr_scheduler": cfg}
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.loss.critic_lr,
                                 betas=self.cfg.loss.critic_betas)
        return ([opt_g, opt_d], [sched] if sched is not None else [])


def build_ema(generator: torch.nn.Module, decay: float | None):
    """An exponential moving average of ``generator``'s weights (``optim.ema_decay``; None: no average).

    torch's :class:`~torch.optim.swa_utils.AveragedModel` (its first update copies the weights); frozen, so that
    neither the optimizer nor DDP sees its parameters. It is a submodule of the LightningModule, so checkpoints
    hold it (``ema.module.*`` and ``ema.n_averaged``) and a resumed run continues the same average."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return ema.requires_grad_(False)


CHANNELS_LAST_MIN_WIDTH = 64
"""``trainer.channels_last: auto`` lays out a 2.5D U-net at least this wide (``model.channels``) channels-last on CPU.

Measured alone on the 2-core machine: biofinder (64) trains its step 1.13x (bf16) / 1.15x (fp32) faster
channels-last (``benchmarks/train_step.py --impls ours ours-nchw``), while ``tiny`` (16) took 282 vs 308 steps in
the same 2 minutes of ``synth7t train`` (NCHW faster), though its bare network step was 1.04-1.06x faster."""


def use_channels_last(cfg, device: torch.device, world_size: int = 1) -> bool:
    """Whether the generator trains channels-last: ``trainer.channels_last`` true/false as given; ``"auto"``: a
    2.5D U-net of at least :data:`CHANNELS_LAST_MIN_WIDTH` channels on CPU in one process, where it was measured
    faster. A 3-D model never does."""
    if cfg.is_3d:
        return False
    choice = cfg.trainer.channels_last
    if choice != "auto":
        return bool(choice)
    return (torch.device(device).type == "cpu" and world_size == 1
            and cfg.model.channels >= CHANNELS_LAST_MIN_WIDTH)


PER_STEP_SCHEDULES = ("step", "budget")
"""``optim.schedule`` values whose scheduler steps after every (generator) optimizer step."""


def make_scheduler(opt, o, progress=None):
    """The generator's learning-rate scheduler for ``optim.schedule`` (None: constant rate); ``progress``: for
    ``budget``, a callable giving the fraction of the run's budget spent (:meth:`Synth7tModule.budget_spent`)."""
    if o.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=o.factor, patience=o.patience)
    if o.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=o.every_steps, gamma=o.factor)
    if o.schedule == "epoch":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=o.factor)
    if o.schedule == "budget":
        if progress is None:
            raise ValueError("optim.schedule 'budget' needs the run's progress")
        return BudgetLR(opt, o.factor, progress)
    return None


class BudgetLR(torch.optim.lr_scheduler.LRScheduler):
    """``lr * factor ** p`` with ``p = progress()`` in [0, 1], the fraction of the run's budget spent
    (``optim.schedule: budget``). Stepped after every optimizer step. Its saved state is torch's (step count,
    base and last rates) without the ``progress`` callable, so checkpoints stay plain data; a resumed run's rate
    follows from the progress restored with it (Lightning's Timer saves the elapsed training time)."""

    def __init__(self, optimizer, factor: float, progress):
        self.factor = float(factor)
        self.progress = progress
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        p = min(max(float(self.progress()), 0.0), 1.0)
        return [base * self.factor ** p for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "progress")}


# ---------------------------------------------------------------------------------------------------------
# exact resume: the global RNG states


def rng_state() -> dict:
    """The torch (CPU and CUDA), numpy (legacy global) and python ``random`` generator states, as plain
    tensors, ints, floats and lists (loadable with ``torch.load(weights_only=True)``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": [int(v) for v in internal], "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
