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


THESIS = dict(attention_block="thesis", attention_heads=1, up_path="ho")


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(channel_mult=(1, 2, 2), cross_attention_stages=(2, 3, 4)),
        dict(channel_mult=(1, 2, 2), cross_attention_stages=(), self_attention=False),
        dict(in_slices=5),
        dict(in_slices=1, n_res=2, adadm=False, dropout=0.1),
        THESIS,
        dict(THESIS, channel_mult=(1, 2, 2), cross_attention_stages=(2, 3, 4), n_res=2),
        dict(THESIS, self_attention=False),
        dict(THESIS, cross_attention_stages=(), covariates=False, out_norm=False),
        dict(THESIS, up_path="stage", attention_heads=None),
        dict(up_path="ho", adadm=False),
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


def test_thesis_network_structure():
    """Thesis presets: transformer blocks after every CA-stage block (n_res down, n_res + 1 up), fig. 26 bottleneck."""
    from synth7t.nn import TransformerBlock

    cfg = small_cfg(channel_mult=(1, 2, 2), cross_attention_stages=(2, 3), n_res=2, **THESIS)
    model = UNet(cfg)
    assert [len(s.res) for s in model.down] == [2, 2, 2] and [len(s.res) for s in model.up] == [3, 3, 3]
    assert model.down[0].attn is None and len(model.down[1].attn) == 2 and len(model.up[2].attn) == 3
    assert all(isinstance(b, TransformerBlock) and b.attn2.cross and b.attn1 is not None for b in model.up[1].attn)
    mid = model.mid.attn
    assert isinstance(mid, TransformerBlock) and mid.second == "self"  # bottleneck (stage 4) not listed: fig. 26
    assert UNet(small_cfg(channel_mult=(1, 2, 2), cross_attention_stages=(4,), **THESIS)).mid.attn.second == "cross"
    assert all(m.n_heads == 1 for m in model.modules() if hasattr(m, "n_heads"))
    assert UNet(small_cfg(**THESIS, cross_attention_stages=(), self_attention=False)).mid.attn is None


def test_ho_up_path_matches_monai_skip_channels():
    """Each up block's input channels (previous output + one kept map) are those of MONAI's DiffusionModelUNet."""
    monai = pytest.importorskip("monai.networks.nets")
    cfg = small_cfg(channel_mult=(1, 2, 4), n_res=2, cross_attention_stages=(), **THESIS)
    ref = monai.DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=1, num_res_blocks=2,
                                   channels=cfg.stage_channels, attention_levels=(False,) * 3, norm_num_groups=4)
    ref_in = [r.channels for block in ref.up_blocks for r in block.resnets]
    ours = [r.conv1.in_channels for stage in reversed(UNet(cfg).up) for r in stage.res]
    assert ours == ref_in


def test_covariates_switch_and_last_norm_switch():
    torch.manual_seed(1)
    for kw in (dict(), THESIS):
        model = UNet(small_cfg(covariates=False, **kw)).eval()
        for m in model.modules():  # give the zero-initialised output projections weights
            for name in ("proj", "proj_out", "out_conv"):
                if isinstance(getattr(m, name, None), (torch.nn.Linear, torch.nn.Conv2d)):
                    torch.nn.init.normal_(getattr(m, name).weight, std=0.3)
        x = torch.rand(2, 3, 16, 16)
        torch.testing.assert_close(model(x, torch.randn(2, 7) * 3), model(x, None))  # the covariates are ignored
    assert UNet(small_cfg(out_norm=False)).out_norm is None
    assert isinstance(UNet(small_cfg()).out_norm, torch.nn.GroupNorm)


@pytest.mark.parametrize("kw", [dict(), THESIS], ids=["light", "thesis"])
def test_patch_positions_are_crops_of_whole_slice_positions(kw, monkeypatch):
    """Every positional encoding a patch sees at its offset is the crop of the one the whole slice sees."""
    import synth7t.nn.blocks as blocks

    cfg = small_cfg(channel_mult=(1, 2, 2), cross_attention_stages=(2, 3, 4), **kw)
    model = UNet(cfg).eval()
    seen = []
    original = blocks.sinusoidal_2d

    def record(h, w, c, device=None, dtype=None, offset=None):
        pe = original(h, w, c, device, dtype, offset)
        seen.append((h, w, c, pe))
        return pe

    monkeypatch.setattr(blocks, "sinusoidal_2d", record)
    x = torch.rand(1, 3, 32, 24)
    model(x)
    whole = list(seen)
    seen.clear()
    y0, x0 = 8, 12  # a multiple of the down-sampling factor 4
    model(x[:, :, y0 : y0 + 16, x0 : x0 + 8], None, torch.tensor([[y0, x0]]))
    assert len(seen) == len(whole) > 0
    for (h, w, c, pe), (hh, ww, cc, pe_whole) in zip(seen, whole, strict=True):
        f = 32 // hh  # this map's down-sampling
        crop = pe_whole.reshape(hh, ww, cc)[y0 // f : y0 // f + h, x0 // f : x0 // f + w]
        torch.testing.assert_close(pe.reshape(h, w, c), crop, rtol=0, atol=0)


def test_offset_reaches_self_attention_only():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16)
    for kw, moves in ((THESIS, True), (dict(THESIS, self_attention=False), False)):
        model = UNet(small_cfg(**kw)).eval()
        for m in model.modules():
            if isinstance(getattr(m, "proj_out", None), torch.nn.Linear):
                torch.nn.init.normal_(m.proj_out.weight, std=0.5)
        torch.nn.init.normal_(model.out_conv.weight, std=0.5)
        a, b = model(x, None, torch.zeros(2, 2)), model(x, None, torch.tensor([[40, 8], [0, 16]]))
        torch.testing.assert_close(a, model(x))  # offset 0 = whole slice
        assert ((a - b).abs().max() > 1e-6) == moves
    with pytest.raises(ValueError, match=r"offset must be \(B, 2\)"):
        model(x, None, torch.zeros(2, 3))
