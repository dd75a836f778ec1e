"""The network of the thesis authors' published BioFINDER-2 models (``model.kind: thesis_published``).

The journal version of the thesis published two trained U-nets (DeMONLab-BioFINDER/SuperResolutionMalo,
``models/my_unet_no_diag.pt`` and ``models/my_unetGanNoDiag.pt``). Their class is an LDM-style U-net
(``input_blocks`` / ``middle_block`` / ``output_blocks`` / ``out``) with AdaDM residual blocks and a
transformer block with cross-attention to the covariates. :class:`PublishedUNet` computes exactly what that
network computes when it is called, as the authors' code always calls it, with ``timesteps = 1``: the time
embedding is then one constant vector, and each residual block's projection of it is a constant per-channel
bias that :mod:`synth7t.thesis` folds into the block's first convolution when it imports a checkpoint. The
module therefore has no time-embedding path at all.

What it computes (``cfg``: :class:`~synth7t.nn.config.PublishedUNetConfig`; C = ``channels``, m = ``channel_mult``):

* input (B, S, H, W), S = ``in_slices`` neighbouring slices; H and W multiples of ``2**(len(m) - 1)``;
* stem: conv3x3 S -> C (``initial_down``: a stride-2 conv3x3, with a nearest x2 + conv3x3 before the head);
* down path, level l = 0..L-1: ``n_res`` residual blocks to ``C * m[l]`` channels, each followed by a
  transformer block when the level's down-sampling factor ``2**l`` is in ``attention_res``; between levels a
  stride-2 conv3x3 (padding 1). Every output (stem, blocks, down-samplings) is kept for the up path;
* middle: residual block -> transformer block (``mid_attention``) -> residual block;
* up path, level l = L-1..0: ``n_res + 1`` residual blocks, each on the concatenation of the running map and
  the last kept map, each followed by a transformer block at the levels that have one; at the end of every level
  but the first a nearest-neighbour x2 upsampling and a conv3x3;
* head: SiLU -> conv3x3 C -> 1. No normalization before it, no residual to the input, no clamp.

Residual block (x -> y; GroupNorm -> SiLU and AdaDM's std fused by :func:`~.kernels.group_norm_silu`):
``h = conv3x3(SiLU(GN(x))) (+ the folded time bias)``, ``h = conv3x3(dropout(SiLU(GN(h))))``,
AdaDM ``h = h * exp(phi(log(std(x))))`` with ``std`` the unbiased standard deviation of each sample over (C, H, W)
and ``phi`` a 1x1 convolution of one channel (a scale and a bias; no epsilon in the log), and
``y = skip(x) + h`` (skip: identity, or a 1x1 convolution when the channels change). GroupNorm eps 1e-6.

Transformer block on (B, C, H, W): ``t = proj_in(GN(x))`` (1x1) as H*W tokens of width C, then
``t += SelfAttn(LN(t))``, ``t += CrossAttn(LN(t), context)``, ``t += W2 GEGLU(W1 LN(t))`` (inner width 4C),
and ``x + proj_out(t)``. Attention: ``n_heads`` heads of width ``C / n_heads``, scale ``1/sqrt(width)``, no
positional encoding, q/k/v projections without bias, output projection with bias. The context is ``(B, T, 1)``:
T covariate tokens of dimension ``context_dim`` (1), projected to keys and values without any type embedding, so
their order does not matter and their number does (LayerNorm eps 1e-5).

This is not synth7t's own thesis block (:mod:`.blocks`): that one adds a positional encoding, uses GroupNorm
eps 1e-5, an epsilon in AdaDM's log and max-pooling; the published weights need this computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PublishedUNetConfig
from .kernels import group_norm_silu

__all__ = ["PublishedUNet"]

GN_EPS = 1e-6


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=GN_EPS)


class PublishedResBlock(nn.Module):
    """Residual block with AdaDM (module docstring); ``conv1.bias`` holds the folded time-embedding bias."""

    def __init__(self, cin: int, cout: int, groups: int, *, adadm: bool, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.adadm = nn.Conv2d(1, 1, 1) if adadm else None
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        if self.adadm is not None:
            nn.init.ones_(self.adadm.weight)
            nn.init.zeros_(self.adadm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adadm is None:
            h = self.conv1(group_norm_silu(self.norm1, x))
        else:  # the unbiased std of each sample over (C, H, W), from the first norm's own statistics
            h, s = group_norm_silu(self.norm1, x, with_std=True)
            h = self.conv1(h)
        h = self.conv2(self.dropout(group_norm_silu(self.norm2, h)))
        if self.adadm is not None:
            w, b = self.adadm.weight.float().reshape(()), self.adadm.bias.float().reshape(())
            scale = torch.exp(w * torch.log(s.float()) + b)  # phi as a scalar affine map, in fp32 under autocast
            h = h * scale.view(-1, 1, 1, 1).to(h.dtype)
        return self.skip(x) + h


class PublishedAttention(nn.Module):
    """Multi-head attention of ``dim``-wide queries to keys/values of width ``kv_dim`` (no bias but the output's)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(kv_dim, dim, bias=False)
        self.v = nn.Linear(kv_dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, h, N, D/h)
            return t.view(b, t.shape[1], h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(kv)), split(self.v(kv))
        if k.dtype != q.dtype:  # the context's tiny projections may run outside autocast's dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D/h)) v
        return self.out(a.transpose(1, 2).reshape(b, n, d))


class PublishedTransformer(nn.Module):
    """GroupNorm -> 1x1 -> [self-attention, cross-attention, GEGLU feed-forward] -> 1x1, plus the input."""

    def __init__(self, ch: int, groups: int, heads: int, context_dim: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(ch), nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.attn_self = PublishedAttention(ch, heads)
        self.attn_context = PublishedAttention(ch, heads, context_dim)
        self.ff_in = nn.Linear(ch, 8 * ch)  # GEGLU: value and gate, 4C each
        self.ff_out = nn.Linear(4 * ch, ch)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        u = self.ln1(t)
        t = t + self.attn_self(u, u)
        t = t + self.attn_context(self.ln2(t), context)
        val, gate = self.ff_in(self.ln3(t)).chunk(2, dim=-1)
        t = t + self.ff_out(val * F.gelu(gate))
        return x + self.proj_out(t.transpose(1, 2).reshape(b, c, hh, ww))


class PublishedUNet(nn.Module):
    """The authors' U-net at ``timesteps = 1`` (module docstring): ``net(x, context)`` with ``x`` (B, S, H, W)
    and ``context`` (B, T, 1) -> (B, 1, H, W)."""

    def __init__(self, cfg: PublishedUNetConfig):
        super().__init__()
        self.cfg = cfg
        c, g = cfg.channels, cfg.n_groups

        def res(cin: int, cout: int) -> PublishedResBlock:
            return PublishedResBlock(cin, cout, g, adadm=cfg.adadm, dropout=cfg.dropout)

        def attn(ch: int) -> PublishedTransformer:
            return PublishedTransformer(ch, g, cfg.n_heads, cfg.context_dim)

        self.stem = nn.Conv2d(cfg.in_slices, c, 3, stride=2 if cfg.initial_down else 1, padding=1)
        kept = [c]
        ch = c
        self.down = nn.ModuleList()  # each entry: ModuleList [resblock, (transformer)] or a stride-2 conv
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.n_res):
                layers = [res(ch, c * mult)]
                ch = c * mult
                if 2**level in cfg.attention_res:
                    layers.append(attn(ch))
                self.down.append(nn.ModuleList(layers))
                kept.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                kept.append(ch)
        self.mid1 = res(ch, ch)
        self.mid_attn = attn(ch) if cfg.mid_attention else None
        self.mid2 = res(ch, ch)
        self.up = nn.ModuleList()  # each entry: ModuleList [resblock, (transformer), (upsampling conv)]
        for level in reversed(range(len(cfg.channel_mult))):
            mult = cfg.channel_mult[level]
            for i in range(cfg.n_res + 1):
                layers = [res(ch + kept.pop(), c * mult)]
                ch = c * mult
                if 2**level in cfg.attention_res:
                    layers.append(attn(ch))
                if level and i == cfg.n_res:
                    layers.append(nn.Conv2d(ch, ch, 3, padding=1))  # after a nearest x2 upsampling
                self.up.append(nn.ModuleList(layers))
        self.final_up = nn.Conv2d(ch, ch, 3, padding=1) if cfg.initial_down else None
        self.head = nn.Conv2d(c, 1, 3, padding=1)

    def count_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        """``offset`` (a training patch's place in its slice) is accepted and unused: no positional encoding."""
        cfg = self.cfg
        f = cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != cfg.in_slices:
            raise ValueError(f"input must be (B, {cfg.in_slices}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"H and W must be multiples of {f}, got {tuple(x.shape[-2:])}")
        if context is None or context.ndim != 3 or context.shape[0] != x.shape[0] \
                or context.shape[2] != cfg.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context must be (B, tokens, {cfg.context_dim}) with B = {x.shape[0]}, got {got}")
        context = context.to(x.dtype if x.is_floating_point() else torch.float32)
        h = self.stem(x)
        kept = [h]
        for block in self.down:
            h = self._run_block(block, h, context)
            kept.append(h)
        h = self.mid1(h)
        if self.mid_attn is not None:
            h = self.mid_attn(h, context)
        h = self.mid2(h)
        for block in self.up:
            h = self._run_block(block, torch.cat([h, kept.pop()], dim=1), context)
        if self.final_up is not None:
            h = self.final_up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(F.silu(h))

    @staticmethod
    def _run_block(block: nn.Module, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if isinstance(block, nn.Conv2d):  # a down-sampling convolution
            return block(h)
        for layer in block:
            if isinstance(layer, PublishedTransformer):
                h = layer(h, context)
            elif isinstance(layer, PublishedResBlock):
                h = layer(h)
            else:  # the up-sampling convolution closing an up level
                h = layer(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h
