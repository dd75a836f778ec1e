"""Fused CPU kernels under the U-net's blocks: exact chunked attention, GroupNorm -> SiLU, a 1x1 convolution.

Each is a drop-in for a PyTorch op with the same result (up to bf16 rounding) and a measured reason to exist on
this project's CPU (numbers in each docstring and in ``blocks.py``'s module docstring):

* :func:`attention` -- ``scaled_dot_product_attention``, or exact chunked attention with its own memory-light
  backward (:class:`_ChunkedAttention`) for bf16 on CPU;
* :func:`group_norm_silu` -- ``silu(group_norm(x))`` keeping only its input for the backward
  (:class:`_GroupNormSiLU`), and the per-sample std of ``x`` that AdaDM needs, taken from the norm's statistics,
  with torch.std's gradient added in the same backward; on CPU its backward runs the two-pass C kernel of
  :mod:`synth7t.nn.native` on large channels-last maps (a fast eager bf16 channels-last path otherwise);
* :class:`PointwiseConv2d` -- a 1x1 convolution as one matrix product on a channels-last map.

``tests/nn/test_blocks.py`` checks each against the plain PyTorch op (values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv2d", "attention", "group_norm_silu", "scaled_residual"]


FORWARD_CHUNK = 2**20  # scores per chunk of queries (rows x T per sample and head) in the forward pass
BACKWARD_CHUNK = 2**22  # and in the backward pass: fewer, larger chunks, fewer float32 dK/dV accumulations


def _rows(n: int, t: int, scores: int) -> int:
    """Queries per chunk: a chunk's scores (rows x T per sample and head) are about ``scores`` values."""
    return max(64, min(n, scores // t))


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
        rows = _rows(n, t, BACKWARD_CHUNK)
        for i in range(0, n, rows):
            sl = slice(i, i + rows)
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
    rows = _rows(n, t, FORWARD_CHUNK)
    for i in range(0, n, rows):
        s = torch.matmul(q[..., i : i + rows, :], kt)  # (B, nh, rows, T)
        torch.matmul(torch.softmax(s, dim=-1), v, out=out[..., i : i + rows, :])
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(hd)) v`` for q (B, nh, N, hd), k and v (B, nh, T, hd) -> (B, nh, N, hd).

    Fused ``scaled_dot_product_attention`` everywhere except on CPU in bfloat16 over many keys: there PyTorch's
    CPU flash kernel ran at ~100 GFLOP/s per core for one 128-wide head over 4032 tokens, while the plain form
    over chunks of queries (a chunk's scores, ~2**20 per sample and head, stay in cache; 2**22 in the backward
    pass; the matmuls are oneDNN bf16 GEMMs; the softmax accumulates in float32) ran 3x faster forward and ~2x
    forward + backward (measured here, one thread). With gradients, :class:`_ChunkedAttention` keeps only q, k, v
    and the output, like the fused kernel. Same result up to bf16 rounding.
    """
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] > 64):
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            return _ChunkedAttention.apply(q, k, v)
        kt = (k * k.shape[-1] ** -0.5).transpose(-1, -2).contiguous()
        return _chunked_forward(q, kt, v.contiguous())


NATIVE_MIN_NUMEL = 1 << 21  # maps this large (e.g. 4 x 64 x 144 x 112) take the C kernel's backward on CPU


def _sample_stats(mean: torch.Tensor, rstd: torch.Tensor, eps: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and unbiased std (float32, (B,)) of a map of ``n`` values per sample from its group norm's
    statistics (B, G): with G groups of equal size, the (biased) variance is ``mean_g(var_g) + mean_g((m_g -
    mean_g(m_g))^2)`` (no cancellation) where ``var_g = rstd_g^-2 - eps``; ``* n / (n - 1)`` as :func:`torch.std`."""
    mean, rstd = mean.float(), rstd.float()
    var_g = (rstd.pow(-2) - eps).clamp_min(0.0)
    m = mean.mean(1)  # (B,)
    var = var_g.mean(1) + (mean - m[:, None]).pow(2).mean(1)  # (B,) biased
    return m, (var * (n / max(n - 1, 1))).sqrt()


def _native_library(x: torch.Tensor):
    """The C kernels' library when ``x`` is a map they handle (a large channels-last float32/bf16 CPU map), else
    None (also where the library could not be built)."""
    if not (x.device.type == "cpu" and x.ndim == 4 and x.dtype in (torch.float32, torch.bfloat16)
            and x.numel() >= NATIVE_MIN_NUMEL and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    from synth7t.nn import native

    return native.library()


def _group_norm_silu_forward(x, weight, bias, groups: int, eps: float):
    """``(silu(group_norm(x)), mean, rstd)``: the C kernel's two passes where it applies, else PyTorch's group norm
    and an in-place SiLU."""
    lib = _native_library(x)
    if lib is not None:
        from synth7t.nn import native

        return native.group_norm_silu_forward(lib, x, weight, bias, groups, eps)
    b, c = x.shape[:2]
    y, mean, rstd = torch.native_group_norm(x, weight, bias, b, c, x[0, 0].numel(), groups, eps)
    return F.silu(y, inplace=True), mean, rstd


class _GroupNormSiLU(torch.autograd.Function):
    """``silu(group_norm(x))`` that keeps only ``x`` and the group statistics for the backward pass, and optionally
    the per-sample standard deviation of ``x`` (AdaDM's), with :func:`torch.std`'s gradient.

    The backward recomputes the normalized map instead of keeping it: one activation-sized tensor less per
    normalization in training memory, and the SiLU is applied in place. The std's gradient,
    ``d std / d x = (x - mean) / ((n - 1) std)``, is added inside the same backward (no graph through the norm's
    statistics, no separate pass). Returns the output, the (non-differentiable) per-group mean and
    ``1 / sqrt(var + eps)`` (B, G), and the std (B,) (empty without ``with_std``).

    On CPU, large channels-last float32/bf16 maps take the two-pass C kernels of :mod:`synth7t.nn.native` forward
    and backward (where they could be built); other half-precision channels-last maps
    :func:`_group_norm_silu_backward_cl`; the rest PyTorch's native group-norm backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, with_std: bool):
        b, c = x.shape[:2]
        hw = x[0, 0].numel()
        out, mean, rstd = _group_norm_silu_forward(x, weight, bias, groups, eps)
        if with_std:
            m, std = _sample_stats(mean, rstd, eps, x[0].numel())
        else:
            m, std = None, torch.empty(0, device=x.device)
            ctx.mark_non_differentiable(std)
        ctx.save_for_backward(x, weight, bias, mean, rstd, m, std)
        ctx.dims = (b, c, hw, groups, eps)
        ctx.mark_non_differentiable(mean, rstd)
        return out, mean, rstd, std

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_rstd, grad_std):
        x, weight, bias, mean, rstd, m, std = ctx.saved_tensors
        b, c, hw, groups, eps = ctx.dims
        coef = None  # d std / d x = coef_b * (x - m_b)
        if m is not None and grad_std is not None:
            coef = grad_std.float() / (max(x[0].numel() - 1, 1) * std.clamp_min(torch.finfo(std.dtype).tiny))
        lib = _native_library(x) if ctx.needs_input_grad[0] else None
        if lib is not None:
            from synth7t.nn import native

            gx, gw, gb = native.group_norm_silu_backward(lib, grad, x, weight, bias, mean, rstd, groups, coef, m)
            return gx, gw, gb, None, None, None
        cpu_cl = x.device.type == "cpu" and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
        if cpu_cl and x.dtype in (torch.bfloat16, torch.float16) and weight is not None:
            gx, gw, gb = _group_norm_silu_backward_cl(grad, x, weight, bias, mean, rstd, groups)
        else:
            z = torch.native_group_norm(x, weight, bias, b, c, hw, groups, eps)[0]  # recomputed normalized map
            dz = torch.ops.aten.silu_backward(grad.to(z.dtype), z)
            mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                    bias is not None and ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.native_group_norm_backward(dz, x, mean, rstd, weight, b, c, hw, groups, mask)
        if coef is not None and gx is not None:
            shape = (-1,) + (1,) * (x.ndim - 1)
            gx = gx + (x - m.to(x.dtype).view(shape)) * coef.to(x.dtype).view(shape)
        return gx, gw, gb, None, None, None


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

    The std comes from the norm's own statistics (:func:`_sample_stats`), the unbiased one of :func:`torch.std`,
    with torch.std's gradient (:class:`_GroupNormSiLU`). This saves AdaDM a separate reduction over the block input
    (``torch.std`` was a fifth of the U-net's CPU time). The statistics have the precision of ``x``'s dtype (bf16
    under autocast: ~0.5 %, like the activations).
    """
    if x.device.type not in ("cpu", "meta") and torch.is_autocast_enabled(x.device.type):
        x = x.float()  # CUDA autocast runs group_norm in float32; calling the op directly bypasses autocast
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
        out, _, _, std = _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, with_std)
        return (out, std) if with_std else out
    out, mean, rstd = _group_norm_silu_forward(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    if not with_std:
        return out
    return out, _sample_stats(mean, rstd, norm.eps, x[0].numel())[1]


class _ScaledResidual(torch.autograd.Function):
    """``skip + h * scale`` with a per-sample ``scale`` (B,): AdaDM's modulation and the residual add in one pass.

    Forward: one ``addcmul`` (no ``h * scale`` temporary). Backward: ``dh = grad * scale`` and the per-sample
    ``dscale = sum(grad * h)``, and the gradient of ``skip`` passed on as it is.
    """

    @staticmethod
    def forward(ctx, skip, h, scale):
        ctx.save_for_backward(h, scale)
        return torch.addcmul(skip, h, scale.to(h.dtype).view(-1, 1, 1, 1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, scale = ctx.saved_tensors
        dh = grad * scale.to(grad.dtype).view(-1, 1, 1, 1) if ctx.needs_input_grad[1] else None
        # sum of the product in its dtype (PyTorch's CPU/GPU reductions accumulate bf16 in float32): no float copy
        dscale = (grad * h).sum(dim=(1, 2, 3)).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return grad if ctx.needs_input_grad[0] else None, dh, dscale


def scaled_residual(skip: torch.Tensor, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``skip + h * scale.view(-1, 1, 1, 1)`` for 4-D maps of one dtype (fused; :class:`_ScaledResidual`)."""
    if h.ndim != 4 or skip.dtype != h.dtype or skip.shape != h.shape:
        return skip + h * scale.to(h.dtype).view(-1, 1, 1, 1)
    return _ScaledResidual.apply(skip, h, scale)  # without grad: just its forward, one addcmul


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
