"""The learned fusion of multi-view predictions: a small 3-D convolutional network (after the thesis authors'
``fusion_CNN_unet_1.py``, which fused their three per-view U-nets' volumes).

``FusionNet(cfg)(views: (B, V, D, H, W)) -> (B, 1, D, H, W)``: the mean of the V view predictions plus a learned
correction, ``mean + conv(GELU(conv(GELU(conv(views)))))`` with 3x3x3 convolutions of ``channels`` features; the
last convolution starts at zero, so an untrained network *is* the mean fusion. Its receptive field is
``2 * layers + 1`` voxels (:attr:`FusionConfig.halo` voxels each side), which is what a slab-wise application
needs as overlap. Pure PyTorch; trained by :func:`synth7t.inference.fusion.train_fusion`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class FusionConfig(BaseModel):
    """Settings of :class:`FusionNet`, saved in a model folder's ``config.json`` as ``fusion_network``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_views: int = Field(3, ge=1)  # 1: a learned 3-D refinement of one view (train_fusion(single_view=True))
    channels: int = Field(16, ge=1)
    layers: int = Field(3, ge=1)

    @property
    def halo(self) -> int:
        """Voxels of context the output needs on each side: one per 3x3x3 convolution."""
        return self.layers


class FusionNet(nn.Module):
    """Mean of the views + a small residual 3-D CNN (module docstring)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        ch_in = cfg.n_views
        for _ in range(cfg.layers - 1):
            layers += [nn.Conv3d(ch_in, cfg.channels, 3, padding=1), nn.GELU()]
            ch_in = cfg.channels
        last = nn.Conv3d(ch_in, 1, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*layers, last)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.ndim != 5 or views.shape[1] != self.cfg.n_views:
            raise ValueError(f"FusionNet expects (B, {self.cfg.n_views}, D, H, W), got {tuple(views.shape)}")
        return views.mean(1, keepdim=True) + self.body(views)  # (B, 1, D, H, W)
