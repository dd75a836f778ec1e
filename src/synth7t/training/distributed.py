"""DDP helpers: which process is rank 0, and Lightning's DDP strategy for a run.

Under DDP every rank runs :func:`synth7t.training.train`; only global rank 0 writes files (the model folder,
``train_config.json``, checkpoints and logs through Lightning).
"""

from __future__ import annotations

import os

import torch

from synth7t.config import TrainConfig

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
