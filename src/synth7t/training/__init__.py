"""Training with Lightning: the U-net (L1 + perceptual) or its WGAN-GP variant, from a slice store to a model folder.

Where things are:

* :mod:`~synth7t.training.fit`: :func:`train` (configuration, Trainer, callbacks, exact resume from
  ``checkpoints/last.ckpt``, final validation) and :func:`config_for_init` (fine-tuning with ``--init``);
* :mod:`~synth7t.training.data`: samples of an epoch (:class:`EpochIndexed`, :func:`random_patch`), the
  rank-aware :class:`EpochSampler`, the :class:`ResumableLoader` and :func:`make_loaders`;
* :mod:`~synth7t.training.module`: the LightningModule ``Synth7tModule`` (losses from :mod:`synth7t.nn.losses`,
  validation PSNR/SSIM, schedulers) and the RNG states saved in checkpoints (``rng_state``,
  ``set_rng_state``); the only training module that imports Lightning when imported;
* :mod:`~synth7t.training.gan`: the WGAN-GP critic and generator updates;
* :mod:`~synth7t.training.card`: what goes into the model folder's ``config.json`` and ``model_card.md``;
* :mod:`~synth7t.training.distributed`: DDP rank helpers and strategy.

The model folder's format (writing, checksums, loading the generator) is :mod:`synth7t.model_folder`; device
choice is :mod:`synth7t.devices`. ``import synth7t.training`` does not import Lightning: the names of
:mod:`~synth7t.training.module` below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from synth7t.devices import resolve_accelerator, resolve_precision
from synth7t.training.card import (
    DEFAULT_NORMALIZATION,
    architecture_summary,
    model_card,
    model_config,
    store_voxel_size,
    write_model_folder,
)
from synth7t.training.data import (
    EpochIndexed,
    EpochSampler,
    ResumableLoader,
    collate,
    input_standardization,
    make_loaders,
    random_patch,
)
from synth7t.training.distributed import RANK_VARIABLES, is_global_zero, launched_as_rank_zero
from synth7t.training.fit import config_for_init, last_checkpoint, train
from synth7t.training.gan import critic_update, generator_update

_LIGHTNING = ("RESUME_KEY", "Synth7tModule", "gaussian_window", "make_scheduler", "rng_state", "set_rng_state",
              "ssim_map")


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        return getattr(importlib.import_module("synth7t.training.module"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_NORMALIZATION",
    "RANK_VARIABLES",
    "EpochIndexed",
    "EpochSampler",
    "ResumableLoader",
    "architecture_summary",
    "collate",
    "config_for_init",
    "critic_update",
    "generator_update",
    "input_standardization",
    "last_checkpoint",
    "is_global_zero",
    "launched_as_rank_zero",
    "make_loaders",
    "model_card",
    "model_config",
    "random_patch",
    "resolve_accelerator",
    "resolve_precision",
    "store_voxel_size",
    "train",
    "write_model_folder",
    *_LIGHTNING,
]
