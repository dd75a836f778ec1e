"""UNet: shapes, context handling, input checks, memory formats and a short overfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synth7t.nn import UNet, UNetConfig


def small_cfg(**kw) -> UNetConfig:
    base = dict(channels=8, channel_mult=(1, 2), n_groups=4, n_res=1, cross_attention_stages=(2,), head_dim=8,
                context_tokens=2, context_width=8)
    base.update(kw)
    return UNetConfig(**base)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(channel_mult=(1, 2, 2), cross_attention_stages=(2, 3, 4)),
        dict(channel_mult=(1, 2, 2), cross_attention_stages=(), self_attention=False),
        dict(in_slices=5),
        dict(in_slices=1, n_res=2, adadm=False, dropout=0.1),
    ],
)
@pytest.mark.parametrize("with_context", [False, True])
def test_output_shape(kw, with_context):
    cfg = small_cfg(**kw)
    model = UNet(cfg)
    x = torch.rand(2, cfg.in_slices, 16, 24)
    ctx = torch.randn(2, 7) if with_context else None
    y = model(x, ctx)
    assert y.shape == (2, 1, 16, 24)
    assert torch.isfinite(y).all()


def test_untrained_model_returns_middle_slice_and_none_is_zero_context():
    torch.manual_seed(0)
    model = UNet(small_cfg(in_slices=3)).eval()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(model(x), x[:, 1:2])  # zero-initialised last conv: y = middle slice
    with torch.no_grad():
        torch.nn.init.normal_(model.out_conv.weight, std=0.1)
        for block in model.modules():
            if hasattr(block, "proj") and isinstance(block.proj, torch.nn.Linear):
                torch.nn.init.normal_(block.proj.weight, std=0.5)
    y_none, y_zero = model(x, None), model(x, torch.zeros(2, 7))
    torch.testing.assert_close(y_none, y_zero)
    assert (y_none - model(x, torch.randn(2, 7) * 3)).abs().max() > 1e-5  # the covariates reach the output


def test_eval_output_is_clamped_training_output_is_not():
    model = UNet(small_cfg())
    with torch.no_grad():
        torch.nn.init.constant_(model.out_conv.bias, 5.0)
    x = torch.rand(1, 3, 16, 16)
    assert model.train()(x).min() > 1.0
    assert model.eval()(x).max() == 1.0


def test_input_checks():
    model = UNet(small_cfg(channel_mult=(1, 2, 2), cross_attention_stages=(3,)))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 5, 16, 16))
    with pytest.raises(ValueError, match="context must be"):
        model(torch.rand(2, 3, 16, 16), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="UNetConfig"):
        UNet({"channels": 8})


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = UNet(small_cfg(channel_mult=(1, 2, 2), cross_attention_stages=(2, 3, 4)))
    with torch.no_grad():
        torch.nn.init.normal_(model.out_conv.weight, std=0.1)
    x, ctx = torch.rand(2, 3, 16, 16), torch.randn(2, 7)
    ref = model(x, ctx)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.contiguous(memory_format=torch.channels_last), ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_on_cpu():
    model = UNet(small_cfg())
    x = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, torch.randn(2, 7))
    y.float().mean().backward()
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert model.stem.weight.grad is not None


def test_count_parameters():
    model = UNet(small_cfg())
    assert model.count_parameters() == sum(p.numel() for p in model.parameters())
    model.stem.weight.requires_grad_(False)
    assert model.count_parameters() == sum(p.numel() for p in model.parameters()) - model.stem.weight.numel()
    assert model.count_parameters(trainable_only=False) == sum(p.numel() for p in model.parameters())


def test_overfits_one_batch():
    """A tiny U-net drives L1 on one fixed batch below 30 % of its start within 100 Adam steps."""
    torch.manual_seed(0)
    cfg = small_cfg(channels=16, channel_mult=(1, 2), n_groups=8, cross_attention_stages=(2,), head_dim=16)
    model = UNet(cfg).to(memory_format=torch.channels_last)
    x = F.avg_pool2d(torch.rand(4, 3, 32, 32), 3, 1, 1)  # smooth "3T" slices
    mid = x[:, 1:2]
    target = (mid + 0.5 * (mid - F.avg_pool2d(mid, 3, 1, 1)) + 0.1 * x[:, 0:1]).clamp(0, 1)  # sharper "7T"
    ctx = torch.randn(4, 7)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = (model(x, ctx) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
