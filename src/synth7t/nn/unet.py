"""The 2.5D attention residual U-net that maps 3T slices to a synthetic 7T slice.

Architecture (thesis 2.1.3 figure 21, 2.1.5 figure 28; settings in appendix table 2 / :class:`UNetConfig`):

* input (B, S, H, W): S = 2k+1 neighbouring 3T slices, the middle one at the target's position (2.5D);
* a 3x3 convolution to ``channels``;
* down path, stage i = 1..L (L = ``len(channel_mult)``): max-pool by 2 (not before stage 1), then
  ``n_res`` residual blocks (thesis figure 20: (GroupNorm -> SiLU -> conv3x3) x 2 + AdaDM) with
  ``channels * channel_mult[i-1]`` channels, each followed by a cross-attention block to the covariates
  when i is in ``cross_attention_stages``; the stage output is kept as the skip connection;
* bottleneck at the lowest resolution: residual block -> self-attention with a 2-D sinusoidal positional
  encoding (thesis 2.1.4) [-> cross-attention if stage L+1 is listed] -> residual block;
* up path, stage i = L..1: nearest-neighbour upsampling by 2 (not at stage L), concatenation with the skip of
  stage i, ``n_res`` residual blocks (+ cross-attention as on the way down);
* GroupNorm -> SiLU -> conv3x3 to one channel.

Output in [0, 1] model units: the network predicts a residual that is added to the middle input slice
(``y = x[:, k] + f(x)``), a strong prior for super-resolution of registered pairs (the 7T slice is the 3T
slice plus detail); the last convolution starts at zero, so an untrained model returns its input slice.
In training mode the output is not clamped (clamping would stop the gradient of pixels pushed outside);
in eval mode it is clamped to [0, 1].

The covariate vector (docs/data-layout.md, "Context vector") is embedded into a few tokens once per forward
(:class:`ContextEmbedding`) and shared by all cross-attention blocks; ``context=None`` means all covariates
unknown, i.e. the zero vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ContextEmbedding, CrossAttention, ResBlock, SelfAttention
from .config import UNetConfig

__all__ = ["UNet"]


class Stage(nn.Module):
    """``n`` residual blocks, each optionally followed by a cross-attention block."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, cross_attention: bool):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, cfg.n_groups, cfg.dropout, cfg.adadm)
            for i in range(cfg.n_res)
        )
        heads = cfg.n_heads(out_ch)
        self.attn = nn.ModuleList(
            CrossAttention(out_ch, cfg.context_width, heads, cfg.n_groups) for _ in range(cfg.n_res)
        ) if cross_attention else None

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn is not None:
                x = self.attn[i](x, ctx)
        return x


class Bottleneck(nn.Module):
    """ResBlock -> [SelfAttention] -> [CrossAttention] -> ResBlock at the lowest resolution."""

    def __init__(self, cfg: UNetConfig, ch: int, cross_attention: bool):
        super().__init__()
        heads = cfg.n_heads(ch)
        self.res1 = ResBlock(ch, ch, cfg.n_groups, cfg.dropout, cfg.adadm)
        self.self_attn = SelfAttention(ch, heads, cfg.n_groups) if cfg.self_attention else None
        self.cross_attn = CrossAttention(ch, cfg.context_width, heads, cfg.n_groups) if cross_attention else None
        self.res2 = ResBlock(ch, ch, cfg.n_groups, cfg.dropout, cfg.adadm)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        x = self.res1(x)
        if self.self_attn is not None:
            x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, ctx)
        return self.res2(x)


class UNet(nn.Module):
    """``UNet(cfg)(x: (B, S, H, W), context: (B, context_dim) | None) -> (B, 1, H, W)`` (module docstring)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if not isinstance(cfg, UNetConfig):
            raise ValueError(f"UNet needs a UNetConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        chs = cfg.stage_channels
        n = len(chs)
        ca = set(cfg.cross_attention_stages)
        self.context = (
            ContextEmbedding(cfg.context_dim, cfg.context_tokens, cfg.context_width) if ca else None
        )
        self.stem = nn.Conv2d(cfg.in_slices, chs[0], 3, padding=1)
        self.down = nn.ModuleList(
            Stage(cfg, chs[max(i - 1, 0)], chs[i], (i + 1) in ca) for i in range(n)
        )
        self.mid = Bottleneck(cfg, chs[-1], (n + 1) in ca)
        # up stage i gets the output of stage i+1 (or the bottleneck) concatenated with the skip of stage i
        self.up = nn.ModuleList(
            Stage(cfg, chs[min(i + 1, n - 1)] + chs[i], chs[i], (i + 1) in ca) for i in range(n)
        )
        self.out_norm = nn.GroupNorm(cfg.n_groups, chs[0])
        self.out_conv = nn.Conv2d(chs[0], 1, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def count_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_input(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_slices:
            raise ValueError(f"UNet input must be (B, {cfg.in_slices}, H, W), got {tuple(x.shape)}")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"UNet input H x W = {x.shape[2]} x {x.shape[3]} must be multiples of {f} "
                f"(2**(len(channel_mult)-1)); pad the slices"
            )
        if context is not None and (context.ndim != 2 or tuple(context.shape) != (x.shape[0], cfg.context_dim)):
            raise ValueError(
                f"UNet context must be (B, {cfg.context_dim}) = ({x.shape[0]}, {cfg.context_dim}), "
                f"got {tuple(context.shape)}"
            )

    def _context_tokens(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        """(B, context_dim) or None (= zeros, all unknown) -> (B, T, E), or None without cross-attention."""
        if self.context is None:
            return None
        if context is None:
            context = x.new_zeros(x.shape[0], self.cfg.context_dim)
        return self.context(context.to(self.context.mlp[0].weight.dtype))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, context)
        ctx = self._context_tokens(x, context)  # computed once, reused by every cross-attention block
        mid_slice = x[:, self.cfg.in_slices // 2 : self.cfg.in_slices // 2 + 1]  # (B, 1, H, W)
        h = self.stem(x)  # (B, C1, H, W)
        skips = []
        for i, stage in enumerate(self.down):
            if i > 0:
                h = F.max_pool2d(h, 2)  # (B, C_i, H/2^i, W/2^i)
            h = stage(h, ctx)
            skips.append(h)
        h = self.mid(h, ctx)
        for i in reversed(range(len(self.up))):
            if i < len(self.up) - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = self.up[i](torch.cat((h, skips[i]), dim=1), ctx)
        residual = self.out_conv(F.silu(self.out_norm(h)))  # (B, 1, H, W)
        y = mid_slice + residual.to(mid_slice.dtype)
        return y if self.training else y.clamp(0.0, 1.0)
