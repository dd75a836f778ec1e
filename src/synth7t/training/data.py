"""Training data: epoch-indexed samples, random patches, the rank-aware epoch sampler and the resumable loader.

Every sample and augmentation of an epoch is a function of ``(seed, epoch, index)`` (:class:`EpochIndexed`,
:class:`EpochSampler`), so a run resumed inside an epoch (:class:`ResumableLoader`) or sharded over DDP ranks
sees exactly the batches an uninterrupted single-process run would. :func:`make_loaders` builds the train and
validation loaders of a slice store.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from synth7t.config import TrainConfig
from synth7t.errors import ConfigError, InputError

log = logging.getLogger(__name__)


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


def loader_workers(cfg: TrainConfig) -> int:
    """Loader processes: ``data.num_workers``, at most one fewer than the run's cores
    (:func:`synth7t.parallel.resolve_cores` with ``trainer.threads``): on one core the main process loads.
    Samples are drawn from their index, so the batches do not depend on it."""
    from synth7t.parallel import resolve_cores

    cores = resolve_cores(cfg.trainer.threads).n
    workers = min(cfg.data.num_workers, max(0, cores - 1))
    if workers < cfg.data.num_workers:
        log.info("data.num_workers %d -> %d loader process(es) on %d core(s)", cfg.data.num_workers, workers, cores)
    return workers


def collate(batch: list[dict]) -> dict:
    """Stack a list of samples: arrays into tensors, ints into a tensor, anything else into a list."""
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


def input_standardization(store, cfg: TrainConfig) -> dict:
    """The model folder's ``input_standardization`` record (``data.standardize``), learned on the training split
    only: ``histmatch`` from its 7T (mean brain histogram), ``nyul`` from its 3T (standard landmarks)."""
    method = cfg.data.standardize
    if method == "none":
        return {"method": "none"}
    if method == "nyul":
        marks = store.standard_landmarks("train", cfg.data.nyul_percentiles)
        if marks is None:
            raise InputError(f"{store.root}: data.standardize=nyul needs training subjects")
        return {"method": "nyul", "reference": "Nyul-Udupa standard landmarks of the training split's 3T",
                "percentiles": [float(p) for p in cfg.data.nyul_percentiles],
                "standard_landmarks": [round(float(m), 6) for m in marks]}
    ref = store.target_quantiles("train")
    if ref is None:
        raise InputError(f"{store.root}: data.standardize={method} needs training subjects with a 7T")
    return {"method": method, "reference": "training split's mean 7T brain histogram",
            "reference_quantiles": [round(float(q), 6) for q in ref]}


def make_loaders(store, cfg: TrainConfig, seed: int):
    """(train loader, validation loader or None) of a store: 2.5D slice samples, or 3-D cubes for a 3-D model."""
    from synth7t.dataset.augment import Augmenter
    from synth7t.dataset.slices import SliceDataset

    if cfg.is_3d:
        return _make_loaders_3d(store, cfg, seed)
    augment = Augmenter(cfg.data.augment, seed=seed) if cfg.data.augment.any_enabled else None
    ds_kw = dict(n_slices=cfg.model.in_slices, seed=seed, standardize=input_standardization(store, cfg),
                 match_target=cfg.data.match_target_to_input, views=cfg.data.views, view_code=cfg.view_coded,
                 multiple=cfg.model.downsample_factor, min_size=cfg.data.patch or 0)
    train_ds = SliceDataset(store, "train", augment=augment, **ds_kw)
    val_ds = SliceDataset(store, "val", augment=None, **ds_kw)
    if len(train_ds) == 0:
        raise InputError(f"{store.root}: the train split has no slices")
    workers = loader_workers(cfg)
    common = dict(batch_size=cfg.data.batch_size, num_workers=workers, collate_fn=collate,
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



def _make_loaders_3d(store, cfg: TrainConfig, seed: int):
    """The loaders of a 3-D model: random cubes of the training subjects, fixed cubes of the validation ones
    (:class:`~synth7t.dataset.patches3d.PatchDataset3D`), with the 2.5D loaders' sampler and exact resume."""
    from synth7t.dataset.patches3d import PatchDataset3D

    d, reference = cfg.data, input_standardization(store, cfg)
    train_ds = PatchDataset3D(store, "train", d.patch3d, d.patches_per_subject, seed=seed, standardize=reference)
    val_ds = PatchDataset3D(store, "val", d.patch3d, d.val_patches, seed=seed, fixed=True, standardize=reference)
    if len(train_ds) == 0:
        raise InputError(f"{store.root}: the train split has no subject with a 7T")
    workers = loader_workers(cfg)
    common = dict(batch_size=d.batch_size, num_workers=workers, collate_fn=collate,
                  persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    train = ResumableLoader(EpochIndexed(train_ds), sampler=EpochSampler(len(train_ds), seed, batch_size=d.batch_size),
                            generator=torch.Generator().manual_seed(seed), **common)
    val = None
    if len(val_ds):
        val = torch.utils.data.DataLoader(EpochIndexed(val_ds), sampler=EpochSampler(len(val_ds), seed, False,
                                                                                     even=False),
                                          generator=torch.Generator().manual_seed(seed), **common)
    return train, val
