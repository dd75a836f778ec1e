"""The 2.5D attention residual U-net that maps 3T slices to a synthetic 7T slice.

Architecture (thesis 2.1.3 figure 21, 2.1.5 figures 25-28; settings in appendix table 2 / :class:`UNetConfig`):

* input (B, S, H, W): S = 2k+1 neighbouring 3T slices, the middle one at the target's position (2.5D);
* a 3x3 convolution to ``channels`` (``wavelet=True``: of the slices and their 4 Haar sub-bands each, upsampled
  to full size, ``5 * S`` channels; :mod:`.wavelet`, :class:`UNetConfig`);
* down path, stage i = 1..L (L = ``len(channel_mult)``): max-pool by 2 (not before stage 1; thesis 2.1.1), then
  ``n_res`` residual blocks (thesis figure 20: (GroupNorm -> SiLU -> conv3x3) x 2 + AdaDM) with
  ``channels * channel_mult[i-1]`` channels, each followed by an attention block to the covariates when i is in
  ``cross_attention_stages``;
* bottleneck at the lowest resolution: residual block -> self-attention -> residual block (light: one
  self-attention layer [+ a cross-attention block if stage L+1 is listed]; thesis: the two-attention transformer
  block of figure 26, whose second attention is a cross-attention if stage L+1 is listed);
* up path, stage i = L..1: nearest-neighbour upsampling by 2 (not at stage L; thesis 2.1.1) and residual blocks
  (+ attention as on the way down) fed by skip connections: ``up_path="stage"`` concatenates the output of down
  stage i before ``n_res`` blocks; ``up_path="ho"`` is Ho et al.'s path (the thesis code, MONAI's
  ``DiffusionModelUNet``): ``n_res + 1`` blocks, each concatenating one kept map (stem output, every down
  block's output, every max-pooled map), last kept first;
* [GroupNorm ->] SiLU -> conv3x3 to one channel (``out_norm=False`` drops the GroupNorm, thesis 5.2).

Attention blocks: ``attention_block="light"`` (:class:`~.blocks.CrossAttention`, :class:`~.blocks.SelfAttention`)
or ``"thesis"`` (:class:`~.blocks.TransformerBlock`: self-attention -> cross-attention -> feed-forward).

Output in [0, 1] model units: the network predicts a residual that is added to the middle input slice
(``y = x[:, k] + f(x)``), a strong prior for super-resolution of registered pairs (the 7T slice is the 3T
slice plus detail); the last convolution starts at zero, so an untrained model returns its input slice.
In training mode the output is not clamped (clamping would stop the gradient of pixels pushed outside);
in eval mode it is clamped to [0, 1].

The covariate vector (docs/data-layout.md, "Context vector") is embedded into a few tokens once per forward
(:class:`ContextEmbedding`) and shared by all cross-attention blocks; ``context=None`` means all covariates
unknown, i.e. the zero vector.

Positions: self-attention adds a 2-D sinusoidal encoding of each token's position *in the whole slice*. A model
trained on patches is given each patch's ``offset`` (its top-left pixel in the slice; ``synth7t.training`` snaps
it to a multiple of the down-sampling factor, so the patch's pooled grids are the whole slice's), and prediction
on whole slices uses offset 0: a position then means the same place in training and prediction. Why offsets
rather than whole-slice training or windowed attention: patches keep the CPU-sized ``tiny`` training cheap, and
the thesis' global attention with its absolute sinusoidal encoding stays as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ContextEmbedding, CrossAttention, ResBlock, SelfAttention, TransformerBlock, group_norm_silu
from .config import UNetConfig
from .wavelet import haar_dwt2

__all__ = ["UNet"]


def _attention(cfg: UNetConfig, ch: int, *, self_attention: bool, cross: bool) -> nn.Module | None:
    """The attention block after a residual block (``cross``) or in the bottleneck (``self_attention``)."""
    heads = cfg.n_heads(ch)
    if cfg.attention_block == "thesis":
        if not (self_attention or cross):
            return None
        return TransformerBlock(ch, heads, cfg.n_groups, self_attention=self_attention,
                                second="cross" if cross else None, context_width=cfg.context_width)
    return CrossAttention(ch, cfg.context_width, heads, cfg.n_groups) if cross else None


class Stage(nn.Module):
    """Residual blocks with input channels ``block_in``, each optionally followed by an attention block.

    With ``skips`` (Ho's up path) each block first concatenates ``skips.pop()`` to its input; ``block_in`` then
    counts those channels too.
    """

    def __init__(self, cfg: UNetConfig, block_in: Sequence[int], out_ch: int, cross_attention: bool):
        super().__init__()
        self.thesis = cfg.attention_block == "thesis"
        self.res = nn.ModuleList(ResBlock(c, out_ch, cfg.n_groups, cfg.dropout, cfg.adadm) for c in block_in)
        self.attn = nn.ModuleList(
            _attention(cfg, out_ch, self_attention=cfg.self_attention, cross=True) for _ in block_in
        ) if cross_attention else None

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None, offset: torch.Tensor | None = None,
                skips: list[torch.Tensor] | None = None, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``keep``: a list each block's output is appended to (Ho's down path)."""
        for i, block in enumerate(self.res):
            if skips is not None:
                x = torch.cat((x, skips.pop()), dim=1)
            x = block(x)
            if self.attn is not None:
                x = self.attn[i](x, ctx, offset) if self.thesis else self.attn[i](x, ctx)
            if keep is not None:
                keep.append(x)
        return x


class Bottleneck(nn.Module):
    """ResBlock -> attention -> ResBlock at the lowest resolution (light: [SelfAttention] -> [CrossAttention];
    thesis: the :class:`TransformerBlock` of figure 26: self -> second self (or cross) -> feed-forward)."""

    def __init__(self, cfg: UNetConfig, ch: int, cross_attention: bool):
        super().__init__()
        heads = cfg.n_heads(ch)
        self.thesis = cfg.attention_block == "thesis"
        self.res1 = ResBlock(ch, ch, cfg.n_groups, cfg.dropout, cfg.adadm)
        if self.thesis:
            second = "cross" if cross_attention else ("self" if cfg.self_attention else None)
            self.attn = TransformerBlock(ch, heads, cfg.n_groups, self_attention=cfg.self_attention, second=second,
                                         context_width=cfg.context_width) if (cfg.self_attention or second) else None
        else:
            self.self_attn = SelfAttention(ch, heads, cfg.n_groups) if cfg.self_attention else None
            self.cross_attn = CrossAttention(ch, cfg.context_width, heads, cfg.n_groups) if cross_attention else None
        self.res2 = ResBlock(ch, ch, cfg.n_groups, cfg.dropout, cfg.adadm)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None, offset: torch.Tensor | None = None) -> torch.Tensor:
        x = self.res1(x)
        if self.thesis:
            if self.attn is not None:
                x = self.attn(x, ctx, offset)
        else:
            if self.self_attn is not None:
                x = self.self_attn(x, offset)
            if self.cross_attn is not None:
                x = self.cross_attn(x, ctx)
        return self.res2(x)


class UNet(nn.Module):
    """``UNet(cfg)(x: (B, S, H, W), context: (B, context_dim) | None, offset: (B, 2) | None) -> (B, 1, H, W)``.

    ``offset``: for a patch, the (row, column) of its top-left pixel in the whole slice (module docstring,
    "Positions"); ``None`` for whole slices.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if not isinstance(cfg, UNetConfig):
            raise ValueError(f"UNet needs a UNetConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        chs = cfg.stage_channels
        n, r = len(chs), cfg.n_res
        ca = set(cfg.cross_attention_stages)
        self.context = (
            ContextEmbedding(cfg.context_dim, cfg.context_tokens, cfg.context_width) if ca else None
        )
        self.stem = nn.Conv2d(cfg.in_slices * (5 if cfg.wavelet else 1), chs[0], 3, padding=1)
        self.down = nn.ModuleList(
            Stage(cfg, [chs[max(i - 1, 0)]] + [chs[i]] * (r - 1), chs[i], (i + 1) in ca) for i in range(n)
        )
        self.mid = Bottleneck(cfg, chs[-1], (n + 1) in ca)
        # up stage i gets the output of stage i+1 (or the bottleneck) and skip connections of down stage i
        self.up = nn.ModuleList(Stage(cfg, self._up_inputs(i), chs[i], (i + 1) in ca) for i in range(n))
        self.out_norm = nn.GroupNorm(cfg.n_groups, chs[0]) if cfg.out_norm else None
        self.out_conv = nn.Conv2d(chs[0], 1, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def _up_inputs(self, i: int) -> list[int]:
        """Input channels of each residual block of up stage ``i`` (0-based), skip channels included."""
        chs, cfg = self.cfg.stage_channels, self.cfg
        below = chs[min(i + 1, len(chs) - 1)]
        if cfg.up_path == "stage":
            return [below + chs[i]] + [chs[i]] * (cfg.n_res - 1)
        # Ho: skips popped in reverse: the n_res block outputs of down stage i (chs[i]), then its max-pooled
        # input (chs[i-1]; for stage 1 the stem output, chs[0])
        skip = [chs[i]] * cfg.n_res + [chs[max(i - 1, 0)]]
        prev = [below] + [chs[i]] * cfg.n_res
        return [p + s for p, s in zip(prev, skip, strict=True)]

    def count_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_input(self, x: torch.Tensor, context: torch.Tensor | None, offset: torch.Tensor | None) -> None:
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
        if offset is not None and (offset.ndim != 2 or tuple(offset.shape) != (x.shape[0], 2)):
            raise ValueError(f"UNet offset must be (B, 2) = ({x.shape[0]}, 2) (row, column), got {tuple(offset.shape)}")

    def _context_tokens(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        """(B, context_dim) or None (= zeros, all unknown) -> (B, T, E), or None without cross-attention."""
        if self.context is None:
            return None
        if context is None or not self.cfg.covariates:
            context = x.new_zeros(x.shape[0], self.cfg.context_dim)
        return self.context(context.to(self.context.mlp[0].weight.dtype))

    @staticmethod
    def _with_wavelets(x: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) -> (B, 5S, H, W): the slices, then each slice's LL, LH, HL, HH upsampled by nearest."""
        bands = haar_dwt2(x)  # (B, 4S, H/2, W/2)
        return torch.cat((x, bands.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)), dim=1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_input(x, context, offset)
        ctx = self._context_tokens(x, context)  # computed once, reused by every cross-attention block
        n = len(self.down)
        # the offset of each stage's map in the whole slice, in that map's pixels (stage i is 2**i times smaller)
        offs = [None] * n if offset is None else [offset.to(torch.float64) / 2**i for i in range(n)]
        mid_slice = x[:, self.cfg.in_slices // 2 : self.cfg.in_slices // 2 + 1]  # (B, 1, H, W)
        ho = self.cfg.up_path == "ho"
        h = self.stem(self._with_wavelets(x) if self.cfg.wavelet else x)  # (B, C1, H, W)
        kept = [h] if ho else []  # Ho: stem, every block output, every pooled map; else: each stage's output
        for i, stage in enumerate(self.down):
            if i > 0:
                h = F.max_pool2d(h, 2)  # (B, C_i, H/2^i, W/2^i)
                if ho:
                    kept.append(h)
            h = stage(h, ctx, offs[i], keep=kept if ho else None)
            if not ho:
                kept.append(h)
        h = self.mid(h, ctx, offs[-1])
        for i in reversed(range(n)):
            if i < n - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            if ho:
                h = self.up[i](h, ctx, offs[i], skips=kept)
            else:
                h = self.up[i](torch.cat((h, kept[i]), dim=1), ctx, offs[i])
        h = group_norm_silu(self.out_norm, h) if self.out_norm is not None else F.silu(h)
        residual = self.out_conv(h)  # (B, 1, H, W)
        y = mid_slice + residual.to(mid_slice.dtype)
        return y if self.training else y.clamp(0.0, 1.0)
