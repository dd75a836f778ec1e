"""The 3-D patch generator (issue 16): MONAI's residual ``UNet`` over whole 3T volumes, one patch at a time.

:class:`UNet3D` wraps ``monai.networks.nets.UNet`` (``spatial_dims=3``, residual units) rather than re-implementing
a 3-D U-net. MONAI's ``UNet`` was chosen over ``BasicUNet`` (plain double convolutions, no residual units, fixed
six-stage widths) and ``DynUNet`` (nnU-Net's kernel/stride lists and deep supervision: more settings than this
task needs): it is residual, its depth and widths are two lists, and its parameter count stays small (the
``tiny3d`` preset: 34 k, ``patch3d``: 4.7 M; :meth:`UNet3D.count_parameters`).

The network predicts a residual added to its input, as the 2.5D U-net adds one to its middle slice, and clamps
to [0, 1] in eval mode. It has the 2.5D U-net's call signature, ``(x, context=None, offset=None)``, but ignores
``context`` and ``offset``: 3-D models do not use the covariates. :func:`build_generator` builds either kind from
its config (the model folder's ``config.json["model"]``, dispatched on ``kind``).
"""

from __future__ import annotations

import torch
from torch import nn

from synth7t.nn.config import PublishedUNetConfig, UNet3DConfig, UNetConfig, generator_config


class UNet3D(nn.Module):
    """(B, 1, D, H, W) 3T patch -> (B, 1, D, H, W) synthetic 7T; D, H, W multiples of ``cfg.downsample_factor``."""

    def __init__(self, cfg: UNet3DConfig):
        super().__init__()
        from monai.networks.layers import Norm
        from monai.networks.nets import UNet

        self.cfg = cfg
        self.net = UNet(
            spatial_dims=3, in_channels=1, out_channels=1, channels=cfg.channels,
            strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units,
            norm={"instance": Norm.INSTANCE, "batch": Norm.BATCH}[cfg.norm], dropout=cfg.dropout,
        )

    def count_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        f = self.cfg.downsample_factor
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"UNet3D input must be (B, 1, D, H, W), got {tuple(x.shape)}")
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"UNet3D input sides {tuple(x.shape[2:])} must be multiples of {f}")
        y = x + self.net(x).to(x.dtype)
        return y if self.training else y.clamp(0.0, 1.0)


def build_generator(cfg: UNetConfig | UNet3DConfig | PublishedUNetConfig | dict) -> nn.Module:
    """The generator of a model config (or of a ``config.json["model"]`` dict): :class:`UNet` or :class:`UNet3D`."""
    cfg = generator_config(cfg) if isinstance(cfg, dict) else cfg
    if isinstance(cfg, UNet3DConfig):
        return UNet3D(cfg)
    if isinstance(cfg, PublishedUNetConfig):
        from synth7t.nn.published import PublishedUNet

        return PublishedUNet(cfg)
    from synth7t.nn.unet import UNet

    return UNet(cfg)
