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


def _rows(n: int, t: int) -> int:
    """Queries per chunk: a chunk's scores (rows x T per sample and head) are ~2**20 values."""
    return max(64, min(n, 2**20 // t))


class _ChunkedAttention(torch.autograd.Function):
    """Exact attention over chunks of queries that keeps only q, k and v for the backward pass (like a fused
    kernel): the memory of one chunk instead of the N x T attention matrix per call, for one extra matmul.

    The backward pass recomputes each chunk's probabilities ``P = softmax(q_c k^T / sqrt(hd))`` (bitwise the
    forward's), then ``dV += P^T dO_c``, ``dS = P * (dP - rowsum(dP * P))`` with ``dP = dO_c V^T``,
    ``dQ_c = dS K / sqrt(hd)`` and ``dK += dS^T q_c / sqrt(hd)`` (dK, dV accumulated in float32).
    """

    @staticmethod
    def forward(ctx, q, k, v):
        kt = (k * k.shape[-1] ** -0.5).transpose(-1, -2).contiguous()  # (B, nh, hd, T), scaled once
        v = v.contiguous()
        out = _chunked_forward(q, kt, v)
        ctx.save_for_backward(q, kt, v)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, kt, v = ctx.saved_tensors
        n, t = q.shape[-2], kt.shape[-1]
        d_out = d_out.to(q.dtype)
        dq = torch.empty_like(q)
        dkt = torch.zeros(kt.shape, dtype=torch.float32, device=q.device)  # (B, nh, hd, T)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)  # (B, nh, T, hd)
        k_scaled = kt.transpose(-1, -2)  # (B, nh, T, hd)
        for i in range(0, n, _rows(n, t)):
            sl = slice(i, i + _rows(n, t))
            qc, doc = q[..., sl, :], d_out[..., sl, :]
            prob = torch.softmax(torch.matmul(qc, kt), dim=-1)  # (B, nh, rows, T)
            dv += torch.matmul(prob.transpose(-1, -2), doc)
            # dS = P * (dP - rowsum(dP * P)), fused (rowsum(dP * P) = rowsum(dO * O))
            ds = torch._softmax_backward_data(torch.matmul(doc, v.transpose(-1, -2)), prob, -1, prob.dtype)
            dq[..., sl, :] = torch.matmul(ds, k_scaled)
            dkt += torch.matmul(qc.transpose(-1, -2), ds)
        scale = kt.new_tensor(q.shape[-1] ** -0.5, dtype=torch.float32)
        return dq, (dkt.transpose(-1, -2) * scale).to(q.dtype), dv.to(v.dtype)


def _chunked_forward(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n, t = q.shape[-2], kt.shape[-1]
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    rows = _rows(n, t)
    for i in range(0, n, rows):
        s = torch.matmul(q[..., i : i + rows, :], kt)  # (B, nh, rows, T)
        torch.matmul(torch.softmax(s, dim=-1), v, out=out[..., i : i + rows, :])
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(hd)) v`` for q (B, nh, N, hd), k and v (B, nh, T, hd) -> (B, nh, N, hd).

    Fused ``scaled_dot_product_attention`` everywhere except on CPU in bfloat16 over many keys: there PyTorch's
    CPU flash kernel ran at ~100 GFLOP/s per core for one 128-wide head over 4032 tokens, while the plain form
    over chunks of queries (a chunk's scores, ~2**20 per sample and head, stay in cache; the matmuls are oneDNN
    bf16 GEMMs; the softmax accumulates in float32) ran 3x faster forward and ~2x forward + backward (measured
    here, one thread). With gradients, :class:`_ChunkedAttention` keeps only q, k, v and the output, like the
    fused kernel. Same result up to bf16 rounding.
    """
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] > 64):
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            return _ChunkedAttention.apply(q, k, v)
        kt = (k * k.shape[-1] ** -0.5).transpose(-1, -2).contiguous()
        return _chunked_forward(q, kt, v.contiguous())


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

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
        """Modulate ``h`` (B, C', H, W) by the deviation of ``x`` (B, C, H, W), or by a given ``std`` (B,)."""
        if std is None:
            std = torch.std(x, dim=(1, 2, 3))
        scale = torch.exp(self.weight * torch.log(std.float() + self.eps) + self.bias)  # (B,)
        return h * scale.to(h.dtype).view(-1, 1, 1, 1)


class _SampleStd(torch.autograd.Function):
    """Per-sample std of ``x`` over (C, H, W), given its (detached) mean and std: the backward pass is torch.std's,
    ``d std / d x = (x - mean) / ((n - 1) std)``, one element-wise pass (no graph through the group norm's stats)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, mean, std)
        return std.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, mean, std = ctx.saved_tensors
        n = x[0].numel()
        scale = grad / (max(n - 1, 1) * std.clamp_min(torch.finfo(std.dtype).tiny))  # (B,)
        shape = (-1,) + (1,) * (x.ndim - 1)
        gx = (x - mean.to(x.dtype).view(shape)) * scale.to(x.dtype).view(shape)
        return gx, None, None


class _GroupNormSiLU(torch.autograd.Function):
    """``silu(group_norm(x))`` that keeps only ``x`` and the group statistics for the backward pass.

    The backward recomputes the normalized map (one pass) instead of keeping it: one activation-sized tensor
    less per normalization in training memory, and the SiLU is applied in place. Returns the output and the
    (non-differentiable) per-group mean and ``1 / sqrt(var + eps)``, shape (B, G).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        b, c = x.shape[:2]
        hw = x[0, 0].numel()
        y, mean, rstd = torch.native_group_norm(x, weight, bias, b, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.dims = (b, c, hw, groups, eps)
        ctx.mark_non_differentiable(mean, rstd)
        return F.silu(y, inplace=True), mean, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        b, c, hw, groups, eps = ctx.dims
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and weight is not None \
                and x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4:
            return (*_group_norm_silu_backward_cl(grad, x, weight, bias, mean, rstd, groups), None, None)
        z = torch.native_group_norm(x, weight, bias, b, c, hw, groups, eps)[0]  # recomputed normalized map
        dz = torch.ops.aten.silu_backward(grad.to(z.dtype), z)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(dz, x, mean, rstd, weight, b, c, hw, groups, mask)
        return gx, gw, gb, None, None


def _group_norm_silu_backward_cl(grad, x, weight, bias, mean, rstd, groups):
    """Backward of ``silu(group_norm(x))`` for a half-precision channels-last ``x`` on CPU, in ~8 element-wise passes.

    PyTorch's native CPU group-norm backward is ~10x slower for bf16 channels-last maps than for NCHW ones (50 vs
    5 ms on a 2 x 128 x 288 x 224 map here), and a layout change costs more than it saves. With
    ``xc = x - m_g``, ``z = rstd_g w_c xc + b_c`` and ``dz = dL/dz`` (through the SiLU):
    ``dx = rstd_g (w_c dz - a_g) - rstd_g^2 b_g xc`` with ``a_g = mean_g(w dz)``, ``b_g = mean_g(w dz xc)``;
    ``dw_c = sum rstd_g dz xc``, ``db_c = sum dz``. Sums over pixels accumulate in float32 inside PyTorch's
    reduction; per-group arithmetic is float32.
    """
    bsz, c, h, w = x.shape
    cg = c // groups
    dt = x.dtype
    xv = x.permute(0, 2, 3, 1).reshape(bsz, h * w, c)  # a view of the channels-last memory
    gv = grad.to(dt).permute(0, 2, 3, 1).reshape(bsz, h * w, c)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # (B, G) -> (B, 1, C): per-channel broadcasting vectorizes
        return t.float().repeat_interleave(cg, dim=1).view(bsz, 1, c)

    m32, r32 = per_channel(mean), per_channel(rstd)
    w32 = weight.float().view(1, 1, c)
    b32 = bias.float().view(1, 1, c) if bias is not None else torch.zeros_like(w32)
    xc = xv - m32.to(dt)  # (B, HW, C)
    dz = torch.ops.aten.silu_backward(gv, torch.addcmul(b32.to(dt), xc, (r32 * w32).to(dt)))
    s1 = dz.sum(1, keepdim=True).float()  # (B, 1, C): sum of dz per sample and channel
    s2 = (dz * xc).sum(1, keepdim=True).float()  # sum of dz * xc
    n = h * w * cg

    def group_mean(t: torch.Tensor) -> torch.Tensor:  # (B, 1, C) -> per-group means broadcast back to (B, 1, C)
        return per_channel(t.view(bsz, groups, cg).sum(-1) / n)

    a_g = group_mean(w32 * s1)
    b_g = group_mean(w32 * s2) * r32
    coef_dz = (r32 * w32).to(dt)
    coef_xc = (-(r32**2) * b_g).to(dt)
    gx = torch.addcmul(torch.addcmul((-r32 * a_g).to(dt), xc, coef_xc), dz, coef_dz)  # (B, HW, C)
    gx = gx.view(bsz, h, w, c).permute(0, 3, 1, 2)  # channels-last (B, C, H, W)
    gw = (r32 * s2).sum(0).reshape(c).to(weight.dtype)
    gb = s1.sum(0).reshape(c).to(bias.dtype) if bias is not None else None
    return gx, gw, gb


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, with_std: bool = False):
    """``silu(norm(x))``, and with ``with_std`` the per-sample standard deviation of ``x`` over (C, H, W).

    The std comes from the norm's own statistics: with G groups of equal size, the sample's (biased) variance
    is ``mean_g(var_g) + mean_g((m_g - mean_g(m_g))^2)`` (no cancellation) where ``var_g = rstd_g^-2 - eps``;
    the returned std is the unbiased one of :func:`torch.std` (``* n / (n - 1)``), with torch.std's gradient
    (:class:`_SampleStd`). This saves AdaDM a separate reduction over the block input (``torch.std`` was a fifth
    of the U-net's CPU time). The statistics have the precision of ``x``'s dtype (bf16 under autocast: ~0.5 %,
    like the activations).
    """
    if x.device.type != "cpu" and torch.is_autocast_enabled(x.device.type):
        x = x.float()  # CUDA autocast runs group_norm in float32; calling the op directly bypasses autocast
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
        out, mean, rstd = _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    else:
        b, c = x.shape[:2]
        out, mean, rstd = torch.native_group_norm(x, norm.weight, norm.bias, b, c, x[0, 0].numel(),
                                                  norm.num_groups, norm.eps)
        out = F.silu(out, inplace=True)
    if not with_std:
        return out
    with torch.no_grad():
        mean, rstd = mean.float(), rstd.float()  # (B, G)
        var_g = (rstd.pow(-2) - norm.eps).clamp_min(0.0)
        m = mean.mean(1)  # (B,)
        var = var_g.mean(1) + (mean - m[:, None]).pow(2).mean(1)  # (B,) biased
        n = x[0].numel()
        std = (var * (n / max(n - 1, 1))).sqrt()
    if torch.is_grad_enabled() and x.requires_grad:
        std = _SampleStd.apply(x, m, std)
    return out, std


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution that runs as one matrix product on a channels-last map.

    Same parameters (and state-dict keys) as ``nn.Conv2d(in_ch, out_ch, 1)``; on a channels-last input it is
    ``F.linear`` of the (B, H, W, C) view, which avoids PyTorch's slow non-oneDNN path that float32 1x1
    convolutions of channels-last maps took here.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last) or x.shape[1] == 1:
            return super().forward(x)
        y = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)  # (B, H, W, out)
        return y.permute(0, 3, 1, 2)  # channels-last (B, out, H, W)


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
        if self.adadm is not None:
            h = self.adadm(h, std=std)
        skip = self.skip(x)
        if not torch.is_grad_enabled() and h.dtype == skip.dtype:
            return h.add_(skip)  # prediction: no new (page-faulted) buffer
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
