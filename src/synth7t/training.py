"""Training with Lightning: the U-net (L1 + perceptual) or the WGAN-GP variant, and the model folder.

``train(store, out, preset=...)`` resolves the configuration, trains, and writes ``out`` as a self-describing
*model folder* (``model.safetensors``, ``config.json``, ``metrics.json``, ``model_card.md``,
``checksums.sha256``) that :mod:`synth7t.inference` reads; Lightning checkpoints (``checkpoints/``) and logs
(``logs/``, TensorBoard and CSV) live beside it, for resuming and inspection only.

Resuming (``resume=True``) continues from ``checkpoints/last.ckpt`` (loaded with ``weights_only=True``) and is
exact: a run killed at any moment, ``kill -9`` in the middle of an epoch included, and resumed ends with the
weights of the same run uninterrupted (same machine and thread count; tests/training/test_resume.py). The
checkpoint holds the weights, optimizer and scheduler states, Lightning's epoch, batch and optimizer-step
counters (so the GAN's ``batch_idx``-based critic/generator alternation continues where it was), the train
loader's position in its epoch (:class:`ResumableLoader`: the epoch's order and every augmentation are
functions of ``(seed, epoch, index)``, so resuming only needs the number of batches done), the torch, numpy
and python RNG states, and the epoch's running training loss (the ``plateau`` scheduler steps on the epoch's
mean); the last two are restored at the first batch trained after the resume. Checkpoints are written every
``trainer.checkpoint_every_steps`` steps (not at an epoch's last batch: the epoch-end checkpoint, after
validation and the epoch's scheduler step, takes its place) and at every epoch's end, each to a temporary file
renamed into place, so a kill while writing leaves the previous ``last.ckpt`` usable. Work done after the last
checkpoint is recomputed, identically.

DDP (``devices`` > 1 or ``num_nodes`` > 1): every rank runs :func:`train`; :class:`EpochSampler` gives each rank a
strided share of the epoch (W ranks at batch b take the steps of one process at batch W * b), validation is
sharded and its sums all-gathered, every rank takes part in the final validation, and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synth7t import __version__
from synth7t.config import TrainConfig, apply_overrides, load_config, preset_dict, validate_config
from synth7t.errors import ConfigError, InputError
from synth7t.io import read_json, write_json, write_text

log = logging.getLogger(__name__)

MODEL_FILES = ("model.safetensors", "config.json")


# ---------------------------------------------------------------------------------------------------------
# metrics used for validation (2-D, on the brain)


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------------------
# data


class EpochIndexed(torch.utils.data.Dataset):
    """Wraps a SliceDataset so that index ``e * N + i`` is sample ``i`` augmented as in epoch ``e``.

    With ``patch``, a random ``patch x patch`` in-plane crop (centred on a random brain pixel, shifted to stay
    inside the slice) of input, target and mask is returned; its position is drawn from a generator seeded by
    ``(seed, epoch, i)``, so it is the same whatever the worker count and after a resume. With ``align`` (> 0),
    the crop's corner is snapped to a multiple of ``align`` and returned as ``sample["offset"]`` (see
    :func:`random_patch`).
    """

    def __init__(self, dataset, patch: int | None = None, seed: int = 0, align: int = 0):
        self.dataset, self.patch, self.seed, self.align = dataset, patch, seed, align

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        epoch, i = divmod(index, n)
        self.dataset.set_epoch(epoch)
        sample = self.dataset[i]
        if self.patch is None:
            return sample
        return random_patch(sample, self.patch, np.random.default_rng([self.seed, epoch, i, 1]), self.align)


def random_patch(sample: dict, size: int, rng: np.random.Generator, align: int = 0) -> dict:
    """Crop the (C, H, W) arrays of a sample to ``size x size`` around a random brain pixel.

    ``align`` > 0: the crop's top-left corner (y0, x0) is rounded down to a multiple of ``align`` (the model's
    down-sampling factor: every pooled grid of the patch is then a crop of the whole slice's grid) and returned
    as ``out["offset"] = [y0, x0]`` (int64), for the model's positional encodings. ``align`` = 0 draws the same
    crops as ``align`` = 1 and returns no offset.
    """
    h, w = sample["input"].shape[-2:]
    if size > h or size > w:
        raise ConfigError(f"data.patch {size} is larger than the slices ({h}x{w})")
    if align < 0 or (align and (size % align or (h - size) % align or (w - size) % align)):
        raise ConfigError(f"patch alignment {align}: patch {size} and slices {h}x{w} must be multiples of it")
    brain = np.argwhere(sample["mask"][0] > 0)
    cy, cx = brain[rng.integers(len(brain))] if len(brain) else (h // 2, w // 2)
    y0 = int(np.clip(cy - size // 2, 0, h - size))
    x0 = int(np.clip(cx - size // 2, 0, w - size))
    if align:
        y0, x0 = y0 - y0 % align, x0 - x0 % align
    out = dict(sample)
    for key in ("input", "target", "mask"):
        if key in sample:
            out[key] = np.ascontiguousarray(sample[key][:, y0 : y0 + size, x0 : x0 + size])
    if align:
        out["offset"] = np.array([y0, x0], np.int64)
    return out


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by ``(seed, epoch)``; yields ``epoch * N + i`` (see EpochIndexed).

    :meth:`resume_at` ``(epoch, skip)`` makes the next pass yield epoch ``epoch``'s order without its first
    ``skip`` indices of this rank's share (a run resumed inside an epoch); :meth:`set_epoch` to another epoch
    cancels it.

    Rank-aware (DDP): with ``world_size`` > 1 (given, or else that of an initialized ``torch.distributed``, read at
    each pass), rank ``r`` takes the strided share ``order[r::world_size]`` of the epoch's permutation ``order``,
    so that the ranks' shares are disjoint and, batch by batch, together make the batches of one process at
    ``world_size`` times the batch size (global batch ``k`` is ``order[k*G:(k+1)*G]``). ``even`` (training):
    ``order`` is first truncated to a multiple of ``world_size`` (at most ``world_size - 1`` samples of the
    epoch's permutation, different ones each epoch, are left out; padding would repeat samples instead), so
    every rank runs the same number of steps, as DDP's gradient all-reduce needs. ``even=False`` (validation,
    which has no collective per batch): nothing is dropped, the shares may differ by one sample, and a set
    smaller than ``world_size`` is given whole to every rank (a rank with no batch would skip the metric
    reduction the others wait in).

    ``batch_size`` (> 0): the share is truncated to a multiple of it when it holds more than one batch (the
    loader's ``drop_last``, decided per rank: the loader is built before the world size is known).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, *, batch_size: int = 0, even: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        self.n, self.seed, self.shuffle, self.epoch, self.skip = n, seed, shuffle, 0, 0
        self.batch_size, self.even, self.rank, self.world_size = batch_size, even, rank, world_size

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of each epoch
        if int(epoch) != self.epoch:
            self.skip = 0
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = int(epoch), max(0, int(skip))

    def replicas(self) -> tuple[int, int]:
        """(rank, world size): as given, else torch.distributed's when initialized, else (0, 1)."""
        if self.world_size is not None:
            return int(self.rank or 0), int(self.world_size)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _share_range(self) -> tuple[int, int, int]:
        """(start, stop, step) of this rank's positions in the epoch's order, before the batch truncation."""
        rank, world = self.replicas()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        if world == 1 or (not self.even and self.n < world):
            return 0, self.n, 1
        stop = self.n - self.n % world if self.even else self.n
        return rank, stop, world

    def __len__(self) -> int:
        length = len(range(*self._share_range()))
        if self.batch_size and length > self.batch_size:
            length -= length % self.batch_size
        return length

    def __iter__(self):
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        share = order[slice(*self._share_range())][: len(self)]
        skip, self.skip = self.skip, 0  # a resumed position applies to one pass only
        return iter((share[skip:] + self.epoch * self.n).tolist())


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader over an :class:`EpochSampler` whose position inside an epoch survives a checkpoint.

    Lightning saves ``state_dict()`` (the epoch and the batches of it delivered so far) in its checkpoints and,
    when a run resumes inside that epoch, calls ``load_state_dict`` before iterating again: the next pass then
    starts at the first batch not yet trained on. The underlying iterator is created at the first ``next()``,
    after Lightning's ``set_epoch``, so that worker processes (``num_workers`` > 0), which draw indices as soon as
    they start, never see a stale epoch.
    """

    _batches = 0  # batches of the current pass delivered, counting those skipped by a resume

    def __iter__(self):
        return self._iterate()

    def _iterate(self):
        self._batches = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._batches)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume_at(state["epoch"], int(state["batches"]) * self.batch_size)


def _collate(batch: list[dict]) -> dict:
    out = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if isinstance(vals[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(vals))
        elif isinstance(vals[0], (int, np.integer)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


def input_reference(store, cfg: TrainConfig) -> np.ndarray | None:
    """The reference quantiles of input standardization (``data.standardize``), from the training split's 7T."""
    if cfg.data.standardize == "none":
        return None
    ref = store.target_quantiles("train")
    if ref is None:
        raise InputError(f"{store.root}: data.standardize={cfg.data.standardize} needs training subjects with a 7T")
    return ref


def make_loaders(store, cfg: TrainConfig, seed: int):
    from synth7t.dataset.augment import Augmenter
    from synth7t.dataset.slices import SliceDataset

    augment = Augmenter(cfg.data.augment, seed=seed) if cfg.data.augment.any_enabled else None
    reference = input_reference(store, cfg)
    train_ds = SliceDataset(store, "train", n_slices=cfg.model.in_slices, augment=augment, seed=seed,
                            standardize=reference)
    val_ds = SliceDataset(store, "val", n_slices=cfg.model.in_slices, augment=None, seed=seed, standardize=reference)
    if len(train_ds) == 0:
        raise InputError(f"{store.root}: the train split has no slices")
    workers = cfg.data.num_workers
    common = dict(batch_size=cfg.data.batch_size, num_workers=workers, collate_fn=_collate,
                  persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    align = cfg.model.downsample_factor if cfg.data.patch_offsets else 0
    # own generators: creating an iterator draws a worker base seed, which must not move the global torch RNG
    # (restored exactly on resume, see Synth7tModule.on_load_checkpoint). Under DDP the samplers shard the data
    # themselves (EpochSampler is rank-aware; the Trainer has use_distributed_sampler=False, so Lightning does not
    # wrap them in a DistributedSampler); the last incomplete batch is dropped by the sampler, per rank.
    train = ResumableLoader(EpochIndexed(train_ds, cfg.data.patch, seed, align),
                            sampler=EpochSampler(len(train_ds), seed, batch_size=cfg.data.batch_size),
                            generator=torch.Generator().manual_seed(seed), **common)
    val = None
    if len(val_ds):
        val = torch.utils.data.DataLoader(EpochIndexed(val_ds),
                                          sampler=EpochSampler(len(val_ds), seed, False, even=False),
                                          generator=torch.Generator().manual_seed(seed), **common)
    return train, val


# ---------------------------------------------------------------------------------------------------------
# the LightningModule


def _lightning_module_class():
    import lightning.pytorch as pl

    class Synth7tModule(pl.LightningModule):
        """Generator (U-net) training; with ``cfg.critic`` the WGAN-GP variant (manual optimization)."""

        def __init__(self, config: dict[str, Any]):
            super().__init__()
            from synth7t.nn import UNet

            self.save_hyperparameters({"config": config})
            self.cfg = validate_config(config)
            self.generator = UNet(self.cfg.model)
            self.critic = None
            if self.cfg.is_gan:
                from synth7t.nn import PatchCritic

                self.critic = PatchCritic(self.cfg.critic)
                self.automatic_optimization = False
            self.perceptual = None  # built in setup(): frozen, not part of the state dict
            self._val = []

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
                    offset: torch.Tensor | None = None) -> torch.Tensor:
            return self.generator(x, context, offset)

        def synthesis_loss(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
            """L1 + lambda_perc * perceptual (thesis 2.1.6)."""
            parts = {"l1": F.l1_loss(pred, target)}
            total = parts["l1"]
            if self.perceptual is not None:
                parts["perceptual"] = self.perceptual(pred.float(), target.float())
                total = total + self.cfg.loss.perceptual_weight * parts["perceptual"]
            parts["loss"] = total
            return parts

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
            pred = self(batch["input"], batch["context"], batch.get("offset"))
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
                if self.cfg.optim.schedule == "step":
                    self._scheduler().step()
                logs.update({f"train/{k}": v.detach() for k, v in parts.items()})
            self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=real.shape[0],
                          sync_dist=self._distributed())

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
            state = getattr(self, "_resume_state", None)
            if state is None:
                return
            self._resume_state = None
            set_rng_state(state["rng"])
            total, count = state["epoch_loss"] if batch_idx > 0 else (0.0, 0)  # batch 0: a new epoch
            self._epoch_loss = [torch.tensor(total, dtype=torch.float64, device=self.device), int(count)]

        # -- validation --------------------------------------------------------------------------------
        def validation_step(self, batch: dict, batch_idx: int) -> None:
            pred = self(batch["input"], batch["context"]).float().clamp(0, 1)
            target, mask = batch["target"].float(), batch["mask"].float()
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
            sched = _scheduler(opt_g, o)
            if self.critic is None:
                if sched is None:
                    return opt_g
                interval = "step" if o.schedule == "step" else "epoch"
                cfg = {"scheduler": sched, "interval": interval}
                if o.schedule == "plateau":  # stepped by on_train_epoch_end (see lr_scheduler_step)
                    cfg.update(monitor="train/epoch_loss", strict=False)
                return {"optimizer": opt_g, "lr_scheduler": cfg}
            opt_d = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.loss.critic_lr,
                                     betas=self.cfg.loss.critic_betas)
            return ([opt_g, opt_d], [sched] if sched is not None else [])

    return Synth7tModule


RESUME_KEY = "synth7t_resume"  # the checkpoint entry written by Synth7tModule.on_save_checkpoint


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


def critic_update(critic, opt_d, real: torch.Tensor, fake: torch.Tensor, gp_weight: float,
                  backward=torch.Tensor.backward) -> dict[str, torch.Tensor]:
    """One WGAN-GP critic step: minimise ``D(fake) - D(real) + gp_weight * GP``; returns detached logs.

    ``backward(loss)`` is Lightning's ``manual_backward`` in training (precision plugins), plain autograd in tests.
    """
    from synth7t.nn.losses import critic_loss, gradient_penalty

    fake = fake.detach()
    gp = gradient_penalty(critic, real, fake)
    d_loss, wasserstein = critic_loss(critic(real), critic(fake), gp, gp_weight=gp_weight)
    opt_d.zero_grad(set_to_none=True)
    backward(d_loss)
    opt_d.step()
    return {"train/critic_loss": d_loss.detach(), "train/wasserstein": wasserstein.detach(), "train/gp": gp.detach()}


def generator_update(module, critic, opt_g, x: torch.Tensor, context: torch.Tensor | None, real: torch.Tensor,
                     gan_weight: float, backward=torch.Tensor.backward, clip=None,
                     offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One generator step on ``L1 + lambda_perc * perceptual + gan_weight * (-D(G(x)))``; returns the loss parts.

    ``module`` has ``forward(x, context, offset)`` and ``synthesis_loss(pred, target)`` (the LightningModule);
    ``clip()`` clips the gradients before the step. The critic gets gradients here but is not stepped (its
    optimizer zeroes them before its next step).
    """
    from synth7t.nn.losses import generator_adv_loss

    pred = module(x, context, offset)
    parts = module.synthesis_loss(pred, real)
    adv = generator_adv_loss(critic(pred))
    opt_g.zero_grad(set_to_none=True)
    backward(parts["loss"] + gan_weight * adv)
    if clip is not None:
        clip()
    opt_g.step()
    parts = {k: v.detach() for k, v in parts.items()}
    parts["adversarial"] = adv.detach()
    return parts


def _scheduler(opt, o):
    if o.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=o.factor, patience=o.patience)
    if o.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=o.every_steps, gamma=o.factor)
    if o.schedule == "epoch":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=o.factor)
    return None


# ---------------------------------------------------------------------------------------------------------
# devices and precision


def resolve_accelerator(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu`` (decided at run time, never at import)."""
    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return "cuda" if device == "gpu" else device


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on a GPU that supports it, fp32 elsewhere."""
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    if accelerator == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


# ---------------------------------------------------------------------------------------------------------
# DDP


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_global_zero() -> bool:
    """Whether this process is global rank 0: torch.distributed's rank once initialized, else
    :func:`launched_as_rank_zero`. True for a single-process run."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launched_as_rank_zero()


def launched_as_rank_zero() -> bool:
    """Whether this process will be global rank 0 of the run, from the environment, before torch.distributed is
    initialized (Lightning's launcher gives the ranks it starts ``LOCAL_RANK`` >= 1, torchrun sets ``RANK``,
    srun ``SLURM_PROCID``, a multi-node run ``NODE_RANK``): none of them set to anything but 0."""
    return all(os.environ.get(name, "0").strip() in ("0", "") for name in RANK_VARIABLES)


def _strategy(accelerator: str, devices: int | str, num_nodes: int, cfg: TrainConfig):
    """``auto`` for one process; else Lightning's DDP with buffers not broadcast at each forward (the only
    buffers are the frozen perceptual network's constants, the same on every rank; a broadcast would also be a
    collective inside validation, whose shards may differ in length) and, for the GAN, unused parameters
    allowed (a critic step leaves the generator without gradients)."""
    count = str(devices).strip()
    if count == "auto":
        n = torch.cuda.device_count() if accelerator == "cuda" else 1
    else:
        try:
            n = int(count)
        except ValueError:  # a list of device indices, "0,1"
            n = len([c for c in count.split(",") if c.strip()])
    if n == 1 and num_nodes == 1:
        return "auto"
    import inspect

    from lightning.pytorch.strategies import DDPStrategy

    # torch >= 2.13 names it forward_sync_buffers (and deprecates broadcast_buffers)
    ddp_args = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers"
    return DDPStrategy(find_unused_parameters=cfg.is_gan, **{no_sync: False})


# ---------------------------------------------------------------------------------------------------------
# train()


def train(
    store: str | Path,
    out: str | Path,
    *,
    preset: str | Path = "tiny",
    overrides: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    device: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    progress: bool = True,
    extra_callbacks: list | None = None,
    data_notes: dict | None = None,
    init: str | Path | None = None,
) -> Path:
    """Train a model on a slice store and write the model folder ``out``; returns ``out``.

    ``config`` (a resolved :class:`TrainConfig`) takes precedence over ``preset`` + ``overrides``. ``data_notes``
    (e.g. ``{"simulated": True}``) are added to the model folder's description of its training data. With
    ``resume``, the configuration saved in ``out`` is used and training continues from the last checkpoint.

    ``init`` (a model folder) fine-tunes: the generator starts from its weights (verified, read from safetensors by
    :func:`load_generator`) and its architecture (``config.json``'s ``model``); the preset and ``overrides``
    set everything else, and a ``model.*`` override that changes the architecture is a one-line ConfigError.
    The new model folder records ``init_from``: the source's ``model.safetensors`` sha256 (not its path).
    """
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from synth7t.dataset.slices import SliceStore

    # the frozen perceptual network is in eval mode on purpose; the LeafSpec notice is Lightning-internal
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # GAN: checkpoints hold the state after each optimizer step, which is what resuming needs
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
    # DDP: the validation sums are all-gathered by the module itself (on_validation_epoch_end), not by sync_dist;
    # Lightning's own all_gather goes through a torch function deprecated in favour of an internal one
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")
    if resume:  # the checkpoints of the run being continued are expected there
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning's tips and notices: warnings only
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger("synth7t").getEffectiveLevel()))
    out = Path(out)
    store_obj = SliceStore(store)
    init_state, init_from = None, _recorded_init(out) if resume else None
    if init is not None:
        if resume:
            raise ConfigError("--resume continues a run from its checkpoint (which holds its weights); drop --init")
        net, src_cfg = load_generator(init)
        init_state = net.state_dict()
        init_from = {"sha256": _sha256(Path(init) / "model.safetensors"), "preset": src_cfg.get("preset")}
        config = config_for_init(src_cfg, Path(init), preset, overrides, config)
    cfg = _resolve_config(out, preset, overrides, config, resume)
    _check_store_fits(store_obj, cfg)
    _warn_patch_positions(cfg)
    # under DDP every rank runs this function (ranks > 0 are started by Lightning, or by srun, with the same
    # arguments); only rank 0 writes files: here, in the checkpoints and logs (Lightning), and the model folder
    first = launched_as_rank_zero()
    out.mkdir(parents=True, exist_ok=True)
    if first:
        write_json(out / "train_config.json", cfg.model_dump(mode="json"))
        if not resume:
            write_json(out / "init_from.json", {"init_from": init_from})
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    accelerator = resolve_accelerator(device)
    strategy = _strategy(accelerator, devices, num_nodes, cfg)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
        if strategy != "auto":  # else Lightning's DDP launcher sets cores / processes (OMP_NUM_THREADS unset)
            os.environ["OMP_NUM_THREADS"] = str(cfg.trainer.threads)
    precision = resolve_precision(cfg.trainer.precision, accelerator)
    train_loader, val_loader = make_loaders(store_obj, cfg, cfg.trainer.seed)
    module = _lightning_module_class()(cfg.model_dump(mode="json"))
    if init_state is not None:
        module.generator.load_state_dict(init_state)
    ckpt_dir = out / "checkpoints"
    monitor = {"monitor": "val/psnr_brain", "mode": "max"} if val_loader is not None else {}
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", save_top_k=1 if monitor else 0, **monitor)
    # last.ckpt (for resuming) is refreshed at every epoch end and every `checkpoint_every_steps` steps
    per_epoch = ModelCheckpoint(dirpath=ckpt_dir, filename="epoch", every_n_epochs=1, save_top_k=1, save_last=True,
                                save_on_train_epoch_end=True, enable_version_counter=False)
    step_checkpoint, atomic_io = _checkpoint_classes()
    per_steps = step_checkpoint(dirpath=ckpt_dir, filename="step",
                                every_n_train_steps=cfg.trainer.checkpoint_every_steps, save_top_k=1, save_last=True,
                                save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks = [best, per_epoch, per_steps, LearningRateMonitor(logging_interval="step"), *(extra_callbacks or [])]
    trainer = pl.Trainer(
        default_root_dir=out, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
        strategy=strategy,
        precision=precision, max_epochs=cfg.trainer.max_epochs, max_steps=cfg.trainer.max_steps,
        max_time={"minutes": cfg.trainer.max_minutes} if cfg.trainer.max_minutes else None,
        gradient_clip_val=cfg.optim.grad_clip if not cfg.is_gan else None,
        limit_train_batches=cfg.trainer.limit_train_batches, limit_val_batches=cfg.trainer.limit_val_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps, check_val_every_n_epoch=cfg.trainer.val_every_n_epochs,
        callbacks=callbacks, enable_progress_bar=progress,
        logger=[TensorBoardLogger(out / "logs", name="tensorboard"), CSVLogger(out / "logs", name="csv")],
        enable_model_summary=False, deterministic="warn", num_sanity_val_steps=0,
        use_distributed_sampler=False, plugins=[atomic_io()],
    )
    if train_loader.sampler.n < trainer.world_size:  # every rank's share of an epoch would be empty
        raise InputError(f"{store_obj.root}: the train split has {train_loader.sampler.n} slices, fewer than the "
                         f"{trainer.world_size} DDP processes")
    ckpt_path = _resume_checkpoint(ckpt_dir, resume, clean=first)
    if resume and ckpt_path is None and init_from is not None:
        raise InputError(f"{out}: this fine-tuning run has no checkpoint yet; start it again with --init (no --resume)")
    t0 = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    elapsed = time.perf_counter() - t0
    weights_from = _final_validation(trainer, module, val_loader, best)  # on every rank: it has collectives
    if trainer.global_rank != 0:
        return out
    return write_model_folder(out, module, cfg, store_obj, trainer, elapsed, weights_from, data_notes or {},
                              init_from=init_from)


def config_for_init(src_cfg: dict, init: Path, preset, overrides: dict | None, config: TrainConfig | None
                    ) -> TrainConfig:
    """The run's configuration when fine-tuning from ``init``: the preset (or ``config``) and overrides for the
    training settings, the source model's architecture. An override that changes the architecture is refused."""
    from synth7t.nn.config import UNetConfig

    try:
        src_model = UNetConfig.model_validate(src_cfg["model"]).model_dump(mode="json")
    except Exception as exc:  # noqa: BLE001 - load_generator built it already; keep the message to one line
        raise InputError(f"{init / 'config.json'}: unusable model section ({str(exc).splitlines()[0]})") from None
    overrides = dict(overrides or {})
    model_sets = {k: v for k, v in overrides.items() if k.startswith("model.")}
    base = config.model_dump(mode="json") if config is not None else preset_dict(preset)
    data = apply_overrides(base, {k: v for k, v in overrides.items() if k not in model_sets})
    data["model"] = dict(src_model)
    asked = validate_config(apply_overrides(data, model_sets), source=f"--init {init}").model.model_dump(mode="json")
    differ = [f"model.{k} {src_model[k]!r} -> {asked[k]!r}" for k in src_model if asked.get(k) != src_model[k]]
    if differ:
        raise ConfigError(f"--init {init}: the architecture comes from its config.json; --set would change "
                          f"{', '.join(differ)}")
    return validate_config(data, source=f"--init {init}")


def _recorded_init(out: Path) -> dict | None:
    """``init_from`` of a run being resumed, as written when it started (None: trained from scratch)."""
    path = out / "init_from.json"
    return read_json(path).get("init_from") if path.is_file() else None


def _final_validation(trainer, module, val_loader, best) -> str | None:
    """Validate the final weights, and the best checkpoint's if it scored higher; keep the better ones.

    Returns the checkpoint to take the weights from (None: the module's final weights). Afterwards
    ``trainer.callback_metrics`` holds the validation metrics of the weights kept. Under DDP every rank must
    call it (validation all-gathers its sums); the metrics and the best score are the same on every rank, so
    all ranks take the same branch.
    """
    if val_loader is None:
        return None
    final = trainer.validate(module, val_loader, verbose=False)[0]
    score = best.best_model_score
    if not best.best_model_path or score is None or float(score) <= final.get("val/psnr_brain", float("-inf")):
        return None
    trainer.validate(module, val_loader, ckpt_path=best.best_model_path, verbose=False, weights_only=True)
    return best.best_model_path


def _resolve_config(out: Path, preset, overrides, config, resume: bool) -> TrainConfig:
    saved = out / "train_config.json"
    if resume:
        if not saved.exists():
            raise InputError(f"{out}: nothing to resume (no train_config.json); drop --resume to start a run")
        if overrides:
            raise ConfigError("--resume continues the saved configuration; --set overrides are not allowed with it")
        return validate_config(read_json(saved), source=str(saved))
    if (out / "checkpoints" / "last.ckpt").exists():
        raise InputError(f"{out}: holds a run already; use --resume to continue it or choose another --out")
    return config if config is not None else load_config(preset, overrides)


def _checkpoint_classes():
    """(step checkpoint callback, atomic checkpoint writer) classes; Lightning is imported lazily."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from synth7t.io import atomic_path

    class StepCheckpoint(ModelCheckpoint):
        """Every ``n`` steps, except at an epoch's last batch (or the run's last step): the epoch-end checkpoint,
        written after validation and the epoch's scheduler step, follows it. A checkpoint of the last batch taken
        before those would make Lightning resume at the next epoch and skip them."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if batch_idx + 1 >= trainer.num_training_batches or (
                    trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps):
                return
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Writes each checkpoint to a temporary file beside it and renames it into place: a run killed while
        writing leaves the previous ``last.ckpt`` whole (Lightning's writer truncates the file, then writes)."""

        def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
            if storage_options is not None:
                raise TypeError("storage_options are not supported")
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)

    return StepCheckpoint, AtomicCheckpointIO


def _resume_checkpoint(ckpt_dir: Path, resume: bool, clean: bool = True) -> str | None:
    if not resume:
        return None
    for stale in ckpt_dir.glob(".*.tmp*") if clean else ():  # what a run killed while writing a checkpoint left
        stale.unlink(missing_ok=True)
    last = ckpt_dir / "last.ckpt"
    if not last.exists():
        log.warning("%s: no checkpoint yet; starting from the beginning", ckpt_dir)
        return None
    return str(last)


def _warn_patch_positions(cfg: TrainConfig) -> None:
    m = cfg.model
    if cfg.data.patch and not cfg.data.patch_offsets and m.self_attention and m.attention_stages:
        log.warning("training on %d-pixel patches with self-attention but data.patch_offsets false: positions "
                    "restart at each patch's corner, unlike prediction on whole slices (set data.patch_offsets=true)",
                    cfg.data.patch)


def _check_store_fits(store, cfg: TrainConfig) -> None:
    h, w = store.hw
    f = cfg.model.downsample_factor
    if h % f or w % f:
        raise ConfigError(f"{store.root}: slices of {h}x{w} are not divisible by {f} (2^downsamplings of the model); "
                          f"repack with --multiple {f}")
    if cfg.critic is not None and (h % cfg.critic.downsample_factor or w % cfg.critic.downsample_factor):
        raise ConfigError(f"{store.root}: slices of {h}x{w} are not divisible by the critic's "
                          f"{cfg.critic.downsample_factor}")


# ---------------------------------------------------------------------------------------------------------
# the model folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generator_state(module_or_ckpt: Any) -> dict[str, torch.Tensor]:
    """The generator's weights, from a module or a checkpoint file (loaded with ``weights_only=True``)."""
    if isinstance(module_or_ckpt, (str, Path)):
        ckpt = torch.load(module_or_ckpt, map_location="cpu", weights_only=True)
        sd = ckpt["state_dict"]
    else:
        sd = module_or_ckpt.state_dict()
    return {k[len("generator."):]: v.detach().cpu().contiguous() for k, v in sd.items() if k.startswith("generator.")}


def write_model_folder(out: Path, module, cfg: TrainConfig, store, trainer, elapsed: float,
                       weights_from: str | None, data_notes: dict, *, init_from: dict | None = None) -> Path:
    """Write model.safetensors, config.json, metrics.json, model_card.md and checksums.sha256 into ``out``."""
    state = generator_state(weights_from) if weights_from else generator_state(module)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(epochs=int(trainer.current_epoch), steps=int(trainer.global_step), train_seconds=round(elapsed, 1),
                   weights="best" if weights_from else "final")
    config = model_config(cfg, store, module)
    config["training_data"].update(data_notes)
    config["init_from"] = init_from  # None: trained from random weights; else the source model's sha256
    return save_model_folder(out, state, config, metrics, model_card(cfg, config, metrics))


def save_model_folder(out: Path, state: dict[str, torch.Tensor], config: dict, metrics: dict, card: str) -> Path:
    """Write a model folder: weights (safetensors), config.json, metrics.json, model_card.md, checksums.sha256."""
    from safetensors.torch import save_file

    from synth7t.io import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "synth7t", "version": __version__})
    write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", config)
    write_text(out / "model_card.md", card)
    files = [*MODEL_FILES, "metrics.json", "model_card.md"]
    write_text(out / "checksums.sha256", "".join(f"{_sha256(out / f)}  {f}\n" for f in files))
    log.info("model folder written: %s", out)
    return out


DEFAULT_NORMALIZATION = {"method": "clipped_minmax", "lower_pct": 1.0, "upper_pct": 99.0}


def model_config(cfg: TrainConfig, store, module) -> dict:
    """What inference needs, and nothing it must guess: architecture, slices, grid, normalization, context.

    ``store=None`` describes an untrained model (benchmarks): 0.65 mm grid, no training data.
    ``module`` is the LightningModule (its ``generator`` is counted) or the network itself.
    """
    meta = store.meta if store is not None else {}
    net = getattr(module, "generator", module)
    if store is None:
        data = {"untrained": True}
    else:
        data = {"store": str(Path(store.root).resolve().name), "n_train": len(store.split_subjects("train")),
                "n_val": len(store.split_subjects("val")), "n_test": len(store.split_subjects("test")),
                "simulated": bool(meta.get("simulated", False))}
    return {
        "format": "synth7t-model",
        "synth7t_version": __version__,
        "preset": cfg.preset,
        "architecture": "attention residual U-net (2.5D)",
        "model": cfg.model.model_dump(mode="json"),
        "n_slices": cfg.model.in_slices,
        "slice_axis": "axial (canonical RAS+ axis 2)",
        "voxel_size_mm": store_voxel_size(store) if store is not None else [0.65, 0.65, 0.65],
        "multiple": cfg.model.downsample_factor,
        "normalization": meta.get("normalization", DEFAULT_NORMALIZATION),
        "input_standardization": _standardization(store, cfg),
        "context": meta.get("context", {"dim": cfg.model.context_dim}),
        "preprocessing": meta.get("preprocessing", {}),
        "perceptual": cfg.loss.perceptual if store is not None and cfg.loss.perceptual_weight > 0 else "none",
        "gan": cfg.is_gan,
        "training_data": data,
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "train_config": cfg.model_dump(mode="json"),
    }


def _standardization(store, cfg: TrainConfig) -> dict:
    """What :func:`synth7t.intensity.standardize` needs at prediction time (``{"method": "none"}`` when off)."""
    if cfg.data.standardize == "none" or store is None:
        return {"method": "none"}
    return {"method": cfg.data.standardize, "reference": "training split's mean 7T brain histogram",
            "reference_quantiles": [round(float(q), 6) for q in input_reference(store, cfg)]}


def store_voxel_size(store) -> list[float]:
    """Voxel size (mm) of the store's training grid, from its first training subject's affine."""
    subjects = store.split_subjects("train") or store.subjects
    affine = np.asarray(store.info(subjects[0]).get("affine", np.diag([0.65, 0.65, 0.65, 1.0])), float)
    return [round(float(z), 4) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))]


def architecture_summary(m) -> str:
    """One line on the attention design of a UNetConfig, for the model card."""
    heads = f"{m.attention_heads} head{'s' if m.attention_heads != 1 else ''}" if m.attention_heads else \
        f"heads of {m.head_dim} channels"
    if m.attention_block == "thesis":
        block = "thesis attention blocks (self-attention -> cross-attention -> feed-forward)"
    else:
        block = "light attention blocks"
    parts = [block, heads, f"{m.n_up_blocks} residual blocks per up stage"]
    if not m.self_attention:
        parts.append("no self-attention")
    if not m.covariates:
        parts.append("covariates ignored")
    if not m.out_norm:
        parts.append("no last normalization")
    return ", ".join(parts)


def model_card(cfg: TrainConfig, d: dict, metrics: dict) -> str:
    """A short human-readable card: what the model is, what it was trained on, what it is not for."""
    t = d["training_data"]
    sim = " The training data were SIMULATED (synth7t demo); this model is for trying the tool only." if t[
        "simulated"] else ""
    val = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val/")) or "no validation split"
    return (
        f"# synth7t model ({cfg.preset})\n\n"
        f"Turns 3T T1-weighted brain MRI into a synthetic 7T-like image at {d['voxel_size_mm']} mm.\n\n"
        f"- Architecture: 2.5D attention residual U-net, {cfg.model.in_slices} input slices, channels "
        f"{cfg.model.stage_channels}, {architecture_summary(cfg.model)}, "
        f"{'WGAN-GP critic' if cfg.is_gan else 'no critic'}; {d['parameters']:,} parameters.\n"
        f"- Loss: L1 + {cfg.loss.perceptual_weight:g} x perceptual ({d['perceptual']}).\n"
        f"- Training data: {t['n_train']} training / {t['n_val']} validation / {t['n_test']} test subjects.{sim}\n"
        f"- Training: {metrics.get('epochs', '?')} epochs, {metrics.get('steps', '?')} steps, "
        f"{metrics.get('train_seconds', '?')} s.{_init_line(d.get('init_from'))}\n- Validation: {val}.\n\n"
        "## Intended use\nResearch on brain MRI: producing 7T-like images from 3T scans for visualisation and for\n"
        "downstream analyses whose sensitivity to synthetic data has been checked. Outputs are estimates learnt\n"
        "from paired data; they can miss or invent detail, especially for anatomy unlike the training cohort\n"
        "(lesions, other scanners, children).\n\n**Not a clinical device. Not for diagnosis or treatment decisions.**\n"
    )


def _init_line(init_from: dict | None) -> str:
    if not init_from:
        return ""
    return (f" Fine-tuned from the model whose model.safetensors has sha256 {init_from['sha256']}"
            f" (preset {init_from.get('preset')}).")


# ---------------------------------------------------------------------------------------------------------
# reading a model folder


def verify_model_folder(model_dir: str | Path) -> dict:
    """Check a model folder's files and checksums; return its config. One-line InputError on any problem."""
    d = Path(model_dir)
    if not d.is_dir():
        raise InputError(f"{d}: model folder not found")
    for name in (*MODEL_FILES, "checksums.sha256"):
        if not (d / name).is_file():
            raise InputError(f"{d}: not a synth7t model folder ({name} is missing)")
    for line in (d / "checksums.sha256").read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        f = d / name.strip()
        if not f.is_file():
            raise InputError(f"{d}: {name.strip()} listed in checksums.sha256 is missing")
        if _sha256(f) != digest:
            raise InputError(f"{f}: checksum mismatch (file changed or corrupt)")
    cfg = read_json(d / "config.json")
    if cfg.get("format") != "synth7t-model" or "model" not in cfg:
        raise InputError(f"{d / 'config.json'}: not a synth7t model config")
    return cfg


def load_generator(model_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the U-net from a model folder (config.json + model.safetensors); returns (model, config)."""
    from safetensors.torch import load_file

    from synth7t.nn import UNet
    from synth7t.nn.config import UNetConfig

    cfg = verify_model_folder(model_dir)
    try:
        net = UNet(UNetConfig.model_validate(cfg["model"]))
        net.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors"), device="cpu"))
    except Exception as exc:  # a config/weights mismatch is a broken model folder, not a bug
        raise InputError(f"{model_dir}: weights do not match config.json ({str(exc).splitlines()[0]})") from None
    return net.to(device).eval(), cfg
