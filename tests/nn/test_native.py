"""The C kernel of synth7t.nn.native (GroupNorm -> SiLU backward) against float64 autograd, and its fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

from synth7t.nn import kernels, native


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """A native module state of its own, building into a temporary cache."""
    monkeypatch.setenv("SYNTH7T_CACHE", str(tmp_path))
    monkeypatch.delenv("SYNTH7T_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {})
    return native


@pytest.fixture
def lib(fresh_native):
    if fresh_native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    out = fresh_native.library()
    assert out is not None, "a C compiler is present, so the kernel must build"
    return out


def _reference(x, weight, bias, grad, groups, std_weight):
    """Float64 autograd of silu(group_norm(x)) and std_weight * torch.std(x) per sample."""
    x64 = x.double().requires_grad_(True)
    w64, b64 = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    out = torch.nn.functional.silu(torch.nn.functional.group_norm(x64, groups, w64, b64, 1e-5))
    std = torch.std(x64, dim=(1, 2, 3))
    loss = (out * grad.double()).sum() + (std * std_weight.double()).sum()
    return torch.autograd.grad(loss, (x64, w64, b64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_backward_matches_float64_autograd(lib, monkeypatch, dtype):
    monkeypatch.setattr(kernels, "NATIVE_MIN_NUMEL", 0)
    torch.manual_seed(0)
    groups, shape = 4, (2, 16, 48, 50)  # 2400 pixels per sample: two chunks of native.ROWS, the second partial
    norm = torch.nn.GroupNorm(groups, shape[1])
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    offsets = torch.linspace(-4, 8, shape[1])[:, None, None]  # group means away from the sample mean
    x = (torch.randn(shape) * 2 + offsets).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    std_weight = torch.tensor([3e4, -5e4])  # the std term as large as the map term (its gradient is ~1/n)
    xr = x.clone().requires_grad_(True)
    calls = []
    real = native.group_norm_silu_backward
    monkeypatch.setattr(native, "group_norm_silu_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, std = kernels.group_norm_silu(norm, xr, with_std=True)
    gx, gw, gb = torch.autograd.grad((out * grad).float().sum() + (std * std_weight).sum(),
                                     (xr, norm.weight, norm.bias))
    assert calls, "the C kernel was not used"
    assert gx.dtype == dtype and gx.is_contiguous(memory_format=torch.channels_last)
    rx, rw, rb = _reference(x, norm.weight.detach(), norm.bias.detach(), grad, groups, std_weight)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # relative to the largest gradient
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= tol * scale


def test_native_result_does_not_depend_on_the_thread_count(lib, monkeypatch):
    monkeypatch.setattr(kernels, "NATIVE_MIN_NUMEL", 0)
    torch.manual_seed(1)
    x = torch.randn(3, 32, 40, 70).bfloat16().contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    norm = torch.nn.GroupNorm(8, 32)
    _, mean, rstd = torch.native_group_norm(x, norm.weight, norm.bias, 3, 32, 2800, 8, 1e-5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(native.group_norm_silu_backward(lib, grad, x, norm.weight, norm.bias, mean, rstd, 8))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_without_a_compiler_the_pytorch_path_is_used(fresh_native, monkeypatch, caplog):
    monkeypatch.setattr(fresh_native, "_compiler", lambda: None)
    monkeypatch.setattr(kernels, "NATIVE_MIN_NUMEL", 0)
    with caplog.at_level(logging.WARNING, logger="synth7t.nn.native"):
        assert fresh_native.library() is None
    assert "no C compiler" in caplog.text
    torch.manual_seed(2)
    norm = torch.nn.GroupNorm(2, 8)
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out, std = kernels.group_norm_silu(norm, x, with_std=True)
    (out.sum() + std.sum()).backward()
    x2 = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.silu(norm(x2)).sum() + torch.std(x2, dim=(1, 2, 3)).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_native_can_be_switched_off(fresh_native, monkeypatch):
    monkeypatch.setenv("SYNTH7T_NATIVE", "0")
    assert fresh_native.library() is None


def test_a_failing_build_is_reported_not_raised(fresh_native, monkeypatch, tmp_path, caplog):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: simulated failure' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(fresh_native, "_compiler", lambda: str(bad))
    with caplog.at_level(logging.WARNING, logger="synth7t.nn.native"):
        assert fresh_native.library() is None
    assert "simulated failure" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left in the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_forward_matches_float64(lib, dtype):
    """Output and group statistics of the C forward against float64 group norm, on a map far from zero mean."""
    torch.manual_seed(3)
    groups, shape = 4, (2, 16, 48, 50)
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    offsets = torch.linspace(-40, 80, shape[1])[:, None, None]  # large channel means: a naive E[x^2] - m^2 cancels
    x = (torch.randn(shape) * 0.5 + offsets).to(dtype).contiguous(memory_format=torch.channels_last)
    y, mean, rstd = native.group_norm_silu_forward(lib, x, weight, bias, groups, 1e-5)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (2, groups)
    x64 = x.double()
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x64, groups, weight.double(), bias.double(), 1e-5))
    g = x64.contiguous().view(2, groups, -1)
    torch.testing.assert_close(mean.double(), g.mean(-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (g.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4, atol=0)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
