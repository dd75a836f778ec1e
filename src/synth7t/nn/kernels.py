"""Fused CPU kernels under the U-net's blocks: exact chunked attention, GroupNorm -> SiLU, a 1x1 convolution.

Each is a drop-in for a PyTorch op with the same result (up to bf16 rounding) and a measured reason to exist on
this project's CPU (numbers in each docstring and in ``blocks.py``'s module docstring):

* :func:`attention` -- ``scaled_dot_product_attention``, or exact chunked attention with its own memory-light
  backward (:class:`_ChunkedAttention`) for bf16 on CPU;
* :func:`group_norm_silu` -- ``silu(group_norm(x))`` keeping only its input for the backward
  (:class:`_GroupNormSiLU`, with a fast bf16 channels-last backward), and the per-sample std of ``x`` that
  AdaDM needs, taken from the norm's statistics (:class:`_SampleStd` gives it torch.std's gradient);
* :class:`PointwiseConv2d` -- a 1x1 convolution as one matrix product on a channels-last map.

``tests/nn/test_blocks.py`` checks each against the plain PyTorch op (values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv2d", "attention", "group_norm_silu"]


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
