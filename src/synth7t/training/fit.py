"""``train()``: one training run with Lightning, from a slice store to a model folder, resumable exactly.

``train(store, out, preset=...)`` resolves the configuration, trains, and writes ``out`` as a self-describing
*model folder* (:mod:`synth7t.model_folder`; its ``config.json`` and card: :mod:`synth7t.training.card`) that
:mod:`synth7t.inference` reads; Lightning checkpoints (``checkpoints/``) and logs (``logs/``, TensorBoard and CSV)
live beside it, for resuming and inspection only. The LightningModule is :mod:`synth7t.training.module`.

Resuming (``resume=True``) continues from ``checkpoints/last.ckpt`` (loaded with ``weights_only=True``) and is
exact: a run killed at any moment, ``kill -9`` in the middle of an epoch included, and resumed ends with the
weights of the same run uninterrupted (same machine and thread count; tests/training/test_resume.py). The
checkpoint holds the weights, optimizer and scheduler states, Lightning's epoch, batch and optimizer-step
counters (so the GAN's ``batch_idx``-based critic/generator alternation continues where it was), the train
loader's position in its epoch (:class:`~synth7t.training.data.ResumableLoader`: the epoch's order and every
augmentation are functions of ``(seed, epoch, index)``, so resuming only needs the number of batches done), the
torch, numpy and python RNG states, and the epoch's running training loss (the ``plateau`` scheduler steps on
the epoch's mean); the last two are restored at the first batch trained after the resume. Checkpoints are written every
``trainer.checkpoint_every_steps`` steps (not at an epoch's last batch: the epoch-end checkpoint, after
validation and the epoch's scheduler step, takes its place) and at every epoch's end, each to a temporary file
renamed into place, so a kill while writing leaves the previous ``last.ckpt`` usable. Work done after the last
checkpoint is recomputed, identically.

DDP (``devices`` > 1 or ``num_nodes`` > 1): every rank runs :func:`train`;
:class:`~synth7t.training.data.EpochSampler` gives each rank a strided share of the epoch (W ranks at batch b take
the steps of one process at batch W * b), validation is sharded and its sums all-gathered, every rank takes part
in the final validation, and only rank 0 writes files (:mod:`synth7t.training.distributed`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from synth7t.config import TrainConfig, apply_overrides, load_config, preset_dict, validate_config
from synth7t.devices import keep_freed_memory, resolve_accelerator, resolve_precision
from synth7t.errors import ConfigError, InputError
from synth7t.io import read_json, write_json
from synth7t.model_folder import load_generator_with_digest
from synth7t.training.card import write_model_folder
from synth7t.training.data import make_loaders
from synth7t.training.distributed import _strategy, launched_as_rank_zero

log = logging.getLogger(__name__)


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
    :func:`~synth7t.model_folder.load_generator`) and its architecture (``config.json``'s ``model``); the preset
    and ``overrides`` set everything else, and a ``model.*`` override that changes the architecture is a one-line
    ConfigError.
    The new model folder records ``init_from``: the source's ``model.safetensors`` sha256 (not its path).
    """
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from synth7t.dataset.slices import SliceStore
    from synth7t.training.module import Synth7tModule

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
        net, src_cfg, digest = load_generator_with_digest(init)  # model.safetensors hashed once
        init_state = net.state_dict()
        init_from = {"sha256": digest, "preset": src_cfg.get("preset")}
        config = config_for_init(src_cfg, Path(init), preset, overrides, config)
    cfg = _resolve_config(out, preset, overrides, config, resume)
    _check_store_fits(store_obj, cfg)
    _check_store_layout(store_obj, cfg, init)
    if len(cfg.data.views) > 1 and cfg.data.view_design == "per_view":
        if init is not None:
            raise ConfigError("--init fine-tunes one network; data.view_design per_view trains one per view")
        return _train_per_view(store, out, cfg, resume=resume, device=device, devices=devices, num_nodes=num_nodes,
                               progress=progress, extra_callbacks=extra_callbacks, data_notes=data_notes)
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
    if accelerator == "cpu" and keep_freed_memory():
        log.debug("glibc malloc keeps freed blocks up to 32 MiB (fewer page faults per CPU training step)")
    strategy = _strategy(accelerator, devices, num_nodes, cfg)
    if cfg.trainer.threads or accelerator == "cpu":  # the run's cores (synth7t.parallel), or trainer.threads
        from synth7t.parallel import resolve_cores

        threads = resolve_cores(cfg.trainer.threads).n
        torch.set_num_threads(threads)
        if strategy != "auto":  # else Lightning's DDP launcher sets cores / processes (OMP_NUM_THREADS unset)
            os.environ["OMP_NUM_THREADS"] = str(threads)
    precision = resolve_precision(cfg.trainer.precision, accelerator)
    train_loader, val_loader = make_loaders(store_obj, cfg, cfg.trainer.seed)
    module = Synth7tModule(cfg.model_dump(mode="json"))
    if init_state is not None:
        module.generator.load_state_dict(init_state)
    ckpt_dir = last_checkpoint(out).parent
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
    ckpt_path = _resume_checkpoint(out, resume, clean=first)
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


def _train_per_view(store, out: Path, cfg: TrainConfig, *, resume: bool, **kw) -> Path:
    """``data.view_design: per_view``: one run per view in ``OUT/views/<view>/`` (each a whole model folder, with
    its checkpoints: a killed run resumes in the view it was training; finished views are skipped), each with an
    equal share of ``trainer.max_minutes`` and ``trainer.max_steps``, then the model folder of all of them
    (:func:`~synth7t.training.card.write_per_view_folder`)."""
    from synth7t.training.card import write_per_view_folder

    n = len(cfg.data.views)
    share: dict[str, Any] = {"data.view_design": "shared"}
    if cfg.trainer.max_minutes:
        share["trainer.max_minutes"] = cfg.trainer.max_minutes / n
    if cfg.trainer.max_steps > 0:
        share["trainer.max_steps"] = max(1, cfg.trainer.max_steps // n)
    if launched_as_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", cfg.model_dump(mode="json"))
    runs = {}
    for view in cfg.data.views:
        sub = out / "views" / view
        runs[view] = sub
        if (sub / "checksums.sha256").exists():
            log.info("view %s: trained already (%s)", view, sub)
            continue
        sub_cfg = validate_config(apply_overrides(cfg.model_dump(mode="json"), {**share, "data.views": [view]}),
                                  source=f"{out} ({view} view)")
        log.info("training the %s view's network (%d of %d)", view, list(cfg.data.views).index(view) + 1, n)
        train(store, sub, config=sub_cfg, resume=resume and (sub / "train_config.json").exists(), **kw)
    if not launched_as_rank_zero():
        return out
    return write_per_view_folder(out, cfg, runs)


def config_for_init(src_cfg: dict, init: Path, preset, overrides: dict | None, config: TrainConfig | None
                    ) -> TrainConfig:
    """The run's configuration when fine-tuning from ``init``: the preset (or ``config``) and overrides for the
    training settings, the source model's architecture. An override that changes the architecture is refused."""
    from synth7t.nn.config import generator_config

    try:
        src_model = generator_config(src_cfg["model"]).model_dump(mode="json")
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
    if src_model.get("kind") == "thesis_published":
        data = _published_inputs(data, overrides, init)
    return validate_config(data, source=f"--init {init}")


#: What a published thesis model's inputs are, whatever the preset says: the authors' normalization without an
#: input standardization, the 7T target as it is, the covariate tokens as given (their drop-out codes a synth7t
#: context vector, which these models do not read).
PUBLISHED_INPUTS = {"data.standardize": "none", "data.match_target_to_input": False,
                    "data.augment.covariates.enabled": False}


def _published_inputs(data: dict, overrides: dict, init: Path) -> dict:
    """The run's settings with :data:`PUBLISHED_INPUTS`; an override asking otherwise is a one-line ConfigError."""
    for key, value in PUBLISHED_INPUTS.items():
        if key in overrides and apply_overrides({}, {key: overrides[key]}) != apply_overrides({}, {key: value}):
            raise ConfigError(f"--init {init}: a published thesis model is fine-tuned with {key}={value} "
                              f"(its inputs as it was trained); --set {key}={overrides[key]} is not possible")
    log.info("fine-tuning a published thesis model: %s", ", ".join(f"{k}={v}" for k, v in PUBLISHED_INPUTS.items()))
    return apply_overrides(data, PUBLISHED_INPUTS)


def _recorded_init(out: Path) -> dict | None:
    """``init_from`` of a run being resumed, as written when it started (None: trained from scratch)."""
    path = out / "init_from.json"
    return read_json(path).get("init_from") if path.is_file() else None


def _final_validation(trainer, module, val_loader, best) -> str | None:
    """Validate the final weights, and the best checkpoint's if it scored higher; keep the better ones. With
    ``optim.ema_decay`` both are the moving average's weights (:meth:`Synth7tModule.evaluated_generator`).

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


def last_checkpoint(out: Path) -> Path:
    """Where a run in the folder ``out`` keeps the checkpoint ``--resume`` continues from."""
    return Path(out) / "checkpoints" / "last.ckpt"


def _resolve_config(out: Path, preset, overrides, config, resume: bool) -> TrainConfig:
    saved = out / "train_config.json"
    if resume:
        if not saved.exists():
            raise InputError(f"{out}: nothing to resume (no train_config.json); drop --resume to start a run")
        if overrides:
            raise ConfigError("--resume continues the saved configuration; --set overrides are not allowed with it")
        return validate_config(read_json(saved), source=str(saved))
    if last_checkpoint(out).exists():
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


def _resume_checkpoint(out: Path, resume: bool, clean: bool = True) -> str | None:
    if not resume:
        return None
    last = last_checkpoint(out)
    for stale in last.parent.glob(".*.tmp*") if clean else ():  # what a run killed while writing a checkpoint left
        stale.unlink(missing_ok=True)
    if not last.exists():
        log.warning("%s: no checkpoint yet; starting from the beginning", last.parent)
        return None
    return str(last)


def _warn_patch_positions(cfg: TrainConfig) -> None:
    m = cfg.model
    if cfg.is_3d:
        return
    if cfg.data.patch and not cfg.data.patch_offsets and m.self_attention and m.attention_stages:
        log.warning("training on %d-pixel patches with self-attention but data.patch_offsets false: positions "
                    "restart at each patch's corner, unlike prediction on whole slices (set data.patch_offsets=true)",
                    cfg.data.patch)


def _check_store_layout(store, cfg: TrainConfig, init) -> None:
    """A model on a template grid trains on a store packed onto that grid (``pack --like``), and only such a
    model does; the store's template must be the model's."""
    published = getattr(cfg.model, "kind", "unet") == "thesis_published"
    if published and not store.on_template:
        raise ConfigError(f"{store.root}: this model works on its template grid; pack the store onto it with "
                          f"`synth7t pack WORK --like {init or 'MODEL_DIR'}`")
    if store.on_template and not published:
        raise ConfigError(f"{store.root}: a store packed onto a template grid (pack --like) trains only the model "
                          "it was packed like: add --init MODEL_DIR")
    if published and init is not None:
        import numpy as np

        want = read_json(Path(init) / "config.json")["template"]
        have = store.meta["template"]
        if list(want["shape"]) != list(have["shape"]) or int(want["slice_dim"]) != int(have["slice_dim"]) \
                or not np.allclose(want["affine"], have["affine"], atol=1e-4):
            raise ConfigError(f"{store.root}: packed onto another template grid than {init}'s; repack with --like "
                              f"{init}")


def _check_store_fits(store, cfg: TrainConfig) -> None:
    if cfg.is_3d:  # cubes are zero-padded where a volume is smaller; prediction pads its sliding windows
        return
    h, w = store.hw
    f = cfg.model.downsample_factor
    if h % f or w % f:
        raise ConfigError(f"{store.root}: slices of {h}x{w} are not divisible by {f} (2^downsamplings of the model); "
                          f"repack with --multiple {f}")
    if cfg.critic is not None and (h % cfg.critic.downsample_factor or w % cfg.critic.downsample_factor):
        raise ConfigError(f"{store.root}: slices of {h}x{w} are not divisible by the critic's "
                          f"{cfg.critic.downsample_factor}")
