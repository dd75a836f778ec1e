"""Building blocks of the U-net: AdaDM, residual block, self- and cross-attention, context embedding.

Every block is written directly on ``torch.nn`` (one level of abstraction below ``unet.py``). Tokens are made by
a free reshape of a channels-last feature map, and the context path is computed once per forward, not per
block. Where the time went in MONAI's ``DiffusionModelUNet`` (DESIGN.md, "Where the time goes") and in this
file's first versions, measured on this project's CPU, and what each costs here instead:

* attention: :func:`attention` (fused ``scaled_dot_product_attention``, or exact chunked attention with its own
  memory-light backward for bf16 on CPU, 2-3x faster there);
* AdaDM's ``torch.std`` of each block input (a fifth of the forward): taken from the group norm's statistics
  (:func:`group_norm_silu`);
* GroupNorm -> SiLU: one autograd function that keeps only its input (one activation-sized tensor less per norm
  in training) with a fast bf16 channels-last backward (PyTorch's native one is 10x slower on that layout);
* 1x1 convolutions: one matrix product on the channels-last map (:class:`PointwiseConv2d`).

Those three fused kernels live in :mod:`synth7t.nn.kernels`; this module holds the blocks built from them.

Two families of attention blocks (``UNetConfig.attention_block``): the *light* blocks (:class:`SelfAttention`,
:class:`CrossAttention`: one attention layer each) and the *thesis* block (:class:`TransformerBlock`: Ho et al.'s
self-attention -> cross-attention -> feed-forward transformer of thesis figures 25-27).

Shapes: B batch, C channels, H x W image, N = H*W image tokens, T context tokens, E context width,
nh heads of hd channels (C = nh * hd).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from synth7t.nn.kernels import PointwiseConv2d, attention, group_norm_silu, scaled_residual

__all__ = [
    "AdaDM",
    "ContextEmbedding",
    "CrossAttention",
    "FeedForward",
    "PointwiseConv2d",
    "ResBlock",
    "SelfAttention",
    "TransformerBlock",
    "attention",
    "group_norm_silu",
    "sinusoidal_2d",
]


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view (no copy) when ``x`` is channels-last."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def from_tokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) with channels-last strides (no copy)."""
    b, _, c = t.shape
    return t.reshape(b, h, w, c).permute(0, 3, 1, 2)


def _axis_encoding(pos: torch.Tensor, d: int) -> torch.Tensor:
    """Positions (..., n) float64 -> (..., n, d): interleaved sin, cos of ``pos * 10000^(-2i/d)``."""
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
    ang = pos[..., None] * inv_freq  # (..., n, d/2)
    return torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)  # (..., n, d)


def _assemble(rows: torch.Tensor, cols: torch.Tensor, c: int) -> torch.Tensor:
    """Row encodings (..., h, d) and column encodings (..., w, d) -> (..., h*w, c) float32, zero-padded to c."""
    h, d = rows.shape[-2:]
    w = cols.shape[-2]
    lead = rows.shape[:-2]
    pe = torch.zeros(*lead, h, w, c, dtype=torch.float32, device=rows.device)
    pe[..., :d] = rows[..., :, None, :].float()
    pe[..., d : 2 * d] = cols[..., None, :, :].float()
    return pe.reshape(*lead, h * w, c)


@lru_cache(maxsize=64)
def _sinusoidal_2d_cached(h: int, w: int, c: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in training after inference
        d = (c // 4) * 2  # channels per axis (even: sin/cos pairs); leftover channels stay 0
        if d == 0:
            return torch.zeros(h * w, c, device=device, dtype=dtype)
        rows = _axis_encoding(torch.arange(h, dtype=torch.float64), d)
        cols = _axis_encoding(torch.arange(w, dtype=torch.float64), d)
        return _assemble(rows, cols, c).to(device=device, dtype=dtype)


def sinusoidal_2d(
    h: int,
    w: int,
    c: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """2-D sinusoidal positional encoding of Vaswani et al. (thesis 2.1.4), shape (H*W, C), or (B, H*W, C).

    The first ``d = 2*(C//4)`` channels encode the row position, the next ``d`` the column position, each as
    ``PE(pos, 2i) = sin(pos / 10000**(2i/d))``, ``PE(pos, 2i+1) = cos(pos / 10000**(2i/d))``; the
    ``C mod 4`` channels left over are zero. Token order is row-major, matching :func:`to_tokens`.

    ``offset`` (B, 2): the (row, column) position of each sample's top-left pixel in the whole slice, in units of
    this feature map's pixels (fractions allowed). Positions are then ``offset + index``, so the encoding of a
    patch is exactly the crop of the whole slice's encoding: a position means the same place in training on
    patches and in prediction on whole slices. ``None`` means offset 0 (a whole slice) and returns (H*W, C).
    """
    if min(h, w, c) < 1:
        raise ValueError(f"sinusoidal_2d needs positive sizes, got h={h}, w={w}, c={c}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.get_default_dtype()
    if offset is None:
        return _sinusoidal_2d_cached(h, w, c, device, dtype)
    if offset.ndim != 2 or offset.shape[1] != 2:
        raise ValueError(f"sinusoidal_2d offset must be (B, 2) (row, column), got {tuple(offset.shape)}")
    d = (c // 4) * 2
    off = offset.detach().to(device=device, dtype=torch.float64)
    if d == 0:
        return torch.zeros(off.shape[0], h * w, c, device=device, dtype=dtype)
    rows = _axis_encoding(off[:, :1] + torch.arange(h, dtype=torch.float64, device=device), d)  # (B, h, d)
    cols = _axis_encoding(off[:, 1:] + torch.arange(w, dtype=torch.float64, device=device), d)  # (B, w, d)
    return _assemble(rows, cols, c).to(dtype)


class AdaDM(nn.Module):
    """Adaptive Deviation Modulator (Liu, Tang, Wu 2021; thesis 2.1.1).

    ``out = h * exp(w * log(std(x) + eps) + b)`` where ``std(x)`` is the standard deviation of each sample
    of the block input over (C, H, W), and ``w``, ``b`` are learnable scalars. It gives back to the residual
    ``h`` (computed through group norms, which shrink feature deviation and blur edges) the deviation of the
    input. Initialised as in the authors' code, ``w = 1, b = 0``: the residual is scaled by ``std(x)``, so a
    block changes its input in proportion to the input's own spread.
    """

    def __init__(self, weight_init: float = 1.0, bias_init: float = 0.0, eps: float = 1e-5):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"AdaDM eps must be > 0, got {eps}")
        self.weight = nn.Parameter(torch.tensor(float(weight_init)))
        self.bias = nn.Parameter(torch.tensor(float(bias_init)))
        self.eps = eps

    def scale(self, x: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample factor (B,) for the deviation of ``x`` (B, C, H, W), or for a given ``std`` (B,)."""
        if std is None:
            std = torch.std(x, dim=(1, 2, 3))
        return torch.exp(self.weight * torch.log(std.float() + self.eps) + self.bias)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
        """Modulate ``h`` (B, C', H, W) by the deviation of ``x`` (B, C, H, W), or by a given ``std`` (B,)."""
        return h * self.scale(x, std).to(h.dtype).view(-1, 1, 1, 1)


class ResBlock(nn.Module):
    """Residual block of thesis figure 20: ``skip(x) + AdaDM((GN -> SiLU -> conv3x3) x 2, x)``.

    ``skip`` is the identity, or a 1x1 convolution when the channel count changes; dropout (if any) sits
    before the second convolution as in Ho et al.'s block.
    """

    def __init__(self, in_ch: int, out_ch: int, n_groups: int, dropout: float = 0.0, adadm: bool = True):
        super().__init__()
        if in_ch % n_groups or out_ch % n_groups:
            raise ValueError(f"ResBlock: channels {in_ch} -> {out_ch} must be multiples of n_groups={n_groups}")
        self.norm1 = nn.GroupNorm(n_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(n_groups, out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.adadm = AdaDM() if adadm else None
        self.skip = PointwiseConv2d(in_ch, out_ch) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adadm is not None:
            a, std = group_norm_silu(self.norm1, x, with_std=True)  # std(x) for AdaDM from the norm's statistics
        else:
            a, std = group_norm_silu(self.norm1, x), None
        h = self.conv1(a)  # (B, out, H, W)
        h = self.conv2(self.dropout(group_norm_silu(self.norm2, h)))
        skip = self.skip(x)
        if self.adadm is not None:
            scale = self.adadm.scale(std=std)
            if not torch.is_grad_enabled() and h.dtype == skip.dtype:  # prediction: no new (page-faulted) buffer
                return h.mul_(scale.to(h.dtype).view(-1, 1, 1, 1)).add_(skip)
            return scaled_residual(skip, h, scale)  # skip + AdaDM(h), one pass
        if not torch.is_grad_enabled() and h.dtype == skip.dtype:
            return h.add_(skip)
        return skip + h


def _zero_(layer: nn.Linear) -> nn.Linear:
    """Zero a layer's weights so that the residual branch it ends starts as the identity."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class SelfAttention(nn.Module):
    """The light network's bottleneck self-attention (thesis 2.1.4): one pre-norm transformer layer.

    Lighter than the thesis' figure 26 block (:class:`TransformerBlock` with ``second="self"``): one attention
    layer, not two, and no 1x1 projections around it.

    ``t = tokens(GN(x)) + PE``; ``x' = x + W_o MHA(t W_q, t W_k, t W_v)``; ``out = x' + FF(LN(x'))``, with
    ``FF = Linear(C, 4C) -> GELU -> Linear(4C, C)``. Output projections start at zero (identity block). ``PE`` is
    taken at the map's position in the whole slice (``offset``, see :func:`sinusoidal_2d`).
    """

    def __init__(self, ch: int, n_heads: int, n_groups: int, ff_mult: int = 4):
        super().__init__()
        if ch % n_heads:
            raise ValueError(f"SelfAttention: {ch} channels are not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.norm = nn.GroupNorm(n_groups, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = _zero_(nn.Linear(ch, ch))
        self.ff_norm = nn.LayerNorm(ch)
        self.ff = nn.Sequential(nn.Linear(ch, ff_mult * ch), nn.GELU(), _zero_(nn.Linear(ff_mult * ch, ch)))

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, H, W); ``offset`` (B, 2) of the map in the whole slice, in its pixels (see sinusoidal_2d)."""
        b, c, h, w = x.shape
        n, nh = h * w, self.n_heads
        t = to_tokens(self.norm(x))  # (B, N, C)
        t = t + sinusoidal_2d(h, w, c, t.device, t.dtype, offset)
        q, k, v = self.qkv(t).view(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        o = attention(q, k, v)  # (B, nh, N, hd)
        o = o.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        t = to_tokens(x) + self.proj(o)
        t = t + self.ff(self.ff_norm(t))
        return from_tokens(t, h, w)


class ContextEmbedding(nn.Module):
    """Covariate vector -> context tokens, computed once per forward and shared by every cross-attention.

    ``tokens = LN(reshape(Linear(SiLU(Linear(c))), (T, E)))``: (B, context_dim) -> (B, T, E).
    """

    def __init__(self, context_dim: int, n_tokens: int, width: int):
        super().__init__()
        self.n_tokens, self.width = n_tokens, width
        self.mlp = nn.Sequential(
            nn.Linear(context_dim, width), nn.SiLU(), nn.Linear(width, n_tokens * width)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        t = self.mlp(context).view(context.shape[0], self.n_tokens, self.width)  # (B, T, E)
        return self.norm(t)


class CrossAttention(nn.Module):
    """The light network's cross-attention from image tokens to context tokens (the attention of thesis figure 25).

    ``q = tokens(GN(x)) W_q`` (B, nh, N, hd); ``k, v = ctx W_k, ctx W_v`` (B, nh, T, hd);
    ``out = x + W_o softmax(q k^T / sqrt(hd)) v``. The context path (``ContextEmbedding``) is computed once
    per forward by the U-net; here only the cheap per-block key/value projection of the T tokens happens.
    Unlike MONAI's ``SpatialTransformer``, there is no spatial self-attention over the N tokens in this
    block: the covariates enter through the keys/values only.
    """

    def __init__(self, ch: int, context_width: int, n_heads: int, n_groups: int):
        super().__init__()
        if ch % n_heads:
            raise ValueError(f"CrossAttention: {ch} channels are not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.norm = nn.GroupNorm(n_groups, ch)
        self.q = nn.Linear(ch, ch, bias=False)
        self.kv = nn.Linear(context_width, 2 * ch)
        self.proj = _zero_(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        nh, t_len = self.n_heads, ctx.shape[1]
        q = self.q(to_tokens(self.norm(x))).view(b, h * w, nh, c // nh).transpose(1, 2)  # (B, nh, N, hd)
        k, v = self.kv(ctx).view(b, t_len, 2, nh, c // nh).permute(2, 0, 3, 1, 4)  # 2 x (B, nh, T, hd)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # (B, nh, N, hd)
        o = self.proj(o.transpose(1, 2).reshape(b, h * w, c))  # (B, N, C)
        return x + from_tokens(o, h, w)


# ------------------------------------------------------------------------------------------ thesis blocks
class FeedForward(nn.Module):
    """Feed-forward of thesis figure 27 (Ho et al.; MONAI ``MLPBlock(act="GEGLU")``), on tokens (B, N, C).

    ``FF(t) = W_2 (a * GELU(g)) + b_2`` with ``(a, g) = split(W_1 t + b_1)``, ``W_1``: C -> 2 * mult * C,
    ``W_2``: mult * C -> C (the gated GELU of Shazeer 2020).
    """

    def __init__(self, ch: int, mult: int = 4):
        super().__init__()
        self.inp = nn.Linear(ch, 2 * mult * ch)
        self.out = nn.Linear(mult * ch, ch)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a, g = self.inp(t).chunk(2, dim=-1)  # 2 x (B, N, mult*C)
        return self.out(a * F.gelu(g))


class _Attention(nn.Module):
    """Multi-head attention ``W_o softmax(q k^T / sqrt(hd)) v`` on tokens; keys/values from ``kv`` or the queries.

    As in MONAI's ``SABlock``/``CrossAttentionBlock`` the q/k/v projections have no bias and the output
    projection has one; self-attention uses one fused (C -> 3C) projection, cross-attention a (E -> 2C) one.
    """

    def __init__(self, ch: int, n_heads: int, kv_width: int | None = None):
        super().__init__()
        if ch % n_heads:
            raise ValueError(f"attention: {ch} channels are not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.cross = kv_width is not None
        if self.cross:
            self.q = nn.Linear(ch, ch, bias=False)
            self.kv = nn.Linear(kv_width, 2 * ch, bias=False)
        else:
            self.qkv = nn.Linear(ch, 3 * ch, bias=False)
        self.out = nn.Linear(ch, ch)

    def forward(self, t: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = t.shape
        nh, hd = self.n_heads, c // self.n_heads
        if self.cross:
            q = self.q(t).view(b, n, nh, hd).transpose(1, 2)  # (B, nh, N, hd)
            k, v = self.kv(ctx).view(b, ctx.shape[1], 2, nh, hd).permute(2, 0, 3, 1, 4)  # 2 x (B, nh, T, hd)
            k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            q, k, v = self.qkv(t).view(b, n, 3, nh, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        o = attention(q, k, v)  # (B, nh, N, hd)
        return self.out(o.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Ho et al.'s attention block as the thesis code used it (thesis 2.1.5, figures 25-27).

    On image tokens ``t = W_in tokens(GN(x))`` (the 1x1 projection of MONAI's ``SpatialTransformer``)::

        t = t + SelfAttn(LN_1(t) + PE)                      # spatial self-attention      (if ``self_attention``)
        t = t + CrossAttn(LN_2(t), ctx)                     # to the covariate tokens     (``second="cross"``, fig. 25)
          or t + SelfAttn(LN_2(t) + PE)                     # a second self-attention     (``second="self"``, fig. 26)
        t = t + FF(LN_3(t))                                 # GEGLU feed-forward          (fig. 27)
        out = x + W_out t                                   # W_out starts at zero: the block starts as the identity

    ``PE`` is the 2-D sinusoidal encoding (thesis 2.1.4, ``Q = K = V = phi(X) + PE``), taken at the map's
    position in the whole slice (``offset``), so patches and whole slices see the same positions. MONAI's block
    has no positional encoding; it is parameter-free, so the parameter count is MONAI's.
    """

    def __init__(
        self,
        ch: int,
        n_heads: int,
        n_groups: int,
        *,
        self_attention: bool = True,
        second: str | None = "cross",
        context_width: int | None = None,
        ff_mult: int = 4,
    ):
        super().__init__()
        if second not in ("cross", "self", None):
            raise ValueError(f"TransformerBlock second attention must be 'cross', 'self' or None, got {second!r}")
        if second == "cross" and not context_width:
            raise ValueError("TransformerBlock: a cross-attention needs context_width")
        if ch % n_heads:
            raise ValueError(f"TransformerBlock: {ch} channels are not divisible by {n_heads} heads")
        self.second = second
        self.norm = nn.GroupNorm(n_groups, ch)
        self.proj_in = nn.Linear(ch, ch)
        self.norm1 = nn.LayerNorm(ch) if self_attention else None
        self.attn1 = _Attention(ch, n_heads) if self_attention else None
        self.norm2 = nn.LayerNorm(ch) if second else None
        self.attn2 = _Attention(ch, n_heads, context_width if second == "cross" else None) if second else None
        self.norm3 = nn.LayerNorm(ch)
        self.ff = FeedForward(ch, ff_mult)
        self.proj_out = _zero_(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, offset: torch.Tensor | None = None):
        """``x`` (B, C, H, W), ``ctx`` (B, T, E) context tokens, ``offset`` (B, 2) in this map's pixels or None."""
        b, c, h, w = x.shape
        if self.second == "cross" and ctx is None:
            raise ValueError("TransformerBlock with cross-attention needs context tokens")
        t = self.proj_in(to_tokens(self.norm(x)))  # (B, N, C)
        pe = None
        if self.attn1 is not None or self.second == "self":
            pe = sinusoidal_2d(h, w, c, t.device, t.dtype, offset)  # (N, C) or (B, N, C)
        if self.attn1 is not None:
            t = t + self.attn1(self.norm1(t) + pe.to(t.dtype))
        if self.second == "cross":
            t = t + self.attn2(self.norm2(t), ctx)
        elif self.second == "self":
            t = t + self.attn2(self.norm2(t) + pe.to(t.dtype))
        t = t + self.ff(self.norm3(t))
        return x + from_tokens(self.proj_out(t), h, w)
