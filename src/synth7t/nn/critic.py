"""Patch critic of the WGAN-GP (thesis 2.2, figure 30; table 3).

``n_layers`` x (conv k4 s2 p1 -> LeakyReLU(0.2) -> LayerNorm), channels ``c, 2c, 4c, ...``, then a 3x3
convolution to one channel. The output is a map of unbounded scores, one per patch,
(B, 1, H / 2**n_layers, W / 2**n_layers): no sigmoid (a Wasserstein critic is not a classifier) and no
batch norm (the gradient penalty is taken per sample, which batch statistics would couple). LayerNorm over
(C, H, W) of a feature map is ``GroupNorm(1, C)``. With ``residual`` (thesis 5.2), each down-sampling layer is
followed by a :class:`CriticResBlock`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CriticConfig

__all__ = ["CriticResBlock", "PatchCritic"]


class CriticResBlock(nn.Module):
    """``x + conv3x3(LeakyReLU(LN(conv3x3(LeakyReLU(LN(x))))))``, shape-preserving; the last conv starts at zero."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(1, ch), nn.LeakyReLU(0.2), nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(1, ch), nn.LeakyReLU(0.2), nn.Conv2d(ch, ch, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PatchCritic(nn.Module):
    """``PatchCritic(cfg)(x: (B, in_channels, H, W)) -> (B, 1, H / 2**n, W / 2**n)`` scores (higher = real)."""

    def __init__(self, cfg: CriticConfig):
        super().__init__()
        if not isinstance(cfg, CriticConfig):
            raise ValueError(f"PatchCritic needs a CriticConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        layers: list[nn.Module] = []
        in_ch = cfg.in_channels
        for i in range(cfg.n_layers):
            out_ch = cfg.channels * 2**i
            layers += [
                nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1),
                nn.LeakyReLU(0.2),
                nn.GroupNorm(1, out_ch),  # layer norm over (C, H, W)
            ]
            if cfg.residual:
                layers.append(CriticResBlock(out_ch))
            in_ch = out_ch
        layers.append(nn.Conv2d(in_ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"PatchCritic input must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"PatchCritic input H x W = {x.shape[2]} x {x.shape[3]} must be multiples of {f}")
        return self.net(x)

    def count_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
