"""Blocks: AdaDM formula, positional encoding, residual and attention blocks."""

from __future__ import annotations

import math

import pytest
import torch

from synth7t.nn import (
    AdaDM,
    ContextEmbedding,
    CrossAttention,
    FeedForward,
    ResBlock,
    SelfAttention,
    TransformerBlock,
    sinusoidal_2d,
)


def test_adadm_matches_hand_computation():
    torch.manual_seed(0)
    m = AdaDM()
    with torch.no_grad():
        m.weight.fill_(0.7)
        m.bias.fill_(-0.2)
    x = torch.randn(2, 3, 4, 5) * torch.tensor([1.0, 3.0])[:, None, None, None]
    h = torch.randn(2, 6, 4, 5)
    out = m(h, x)
    for b in range(2):
        v = x[b].flatten()
        std = math.sqrt(((v - v.mean()) ** 2).sum().item() / (v.numel() - 1))  # sample std over (C, H, W)
        factor = math.exp(0.7 * math.log(std + m.eps) - 0.2)
        torch.testing.assert_close(out[b], h[b] * factor, rtol=1e-5, atol=1e-6)


def test_adadm_initialisation_scales_by_input_std():
    x = torch.randn(1, 4, 8, 8) * 3.0
    h = torch.ones(1, 4, 8, 8)
    out = AdaDM()(h, x)  # w = 1, b = 0: out = h * std(x)
    torch.testing.assert_close(out, h * (x.std() + 1e-5), rtol=1e-5, atol=1e-6)


def test_sinusoidal_2d_values():
    pe = sinusoidal_2d(3, 4, 8)  # d = 4 channels per axis
    assert pe.shape == (12, 8)
    grid = pe.reshape(3, 4, 8)
    # row index in channels 0..3, column index in 4..7; PE(pos, 2i) = sin(pos / 10000^(2i/d))
    for r in range(3):
        for c in range(4):
            for i in range(2):
                f = 10000 ** (-2 * i / 4)
                assert grid[r, c, 2 * i].item() == pytest.approx(math.sin(r * f), abs=1e-6)
                assert grid[r, c, 2 * i + 1].item() == pytest.approx(math.cos(r * f), abs=1e-6)
                assert grid[r, c, 4 + 2 * i].item() == pytest.approx(math.sin(c * f), abs=1e-6)
                assert grid[r, c, 4 + 2 * i + 1].item() == pytest.approx(math.cos(c * f), abs=1e-6)
    assert torch.all(sinusoidal_2d(2, 2, 6)[:, 4:] == 0)  # C mod 4 channels left at zero


def test_resblock_shapes_and_skip_conv():
    x = torch.randn(2, 8, 16, 12)
    same = ResBlock(8, 8, n_groups=4)
    wider = ResBlock(8, 16, n_groups=4, dropout=0.1)
    assert isinstance(same.skip, torch.nn.Identity)
    assert isinstance(wider.skip, torch.nn.Conv2d)
    assert same(x).shape == (2, 8, 16, 12)
    assert wider(x).shape == (2, 16, 16, 12)
    with pytest.raises(ValueError, match="multiples of n_groups"):
        ResBlock(6, 8, n_groups=4)


def test_attention_blocks_start_as_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 5)
    ctx = torch.randn(2, 3, 10)
    torch.testing.assert_close(SelfAttention(16, 2, 4)(x), x)
    torch.testing.assert_close(CrossAttention(16, 10, 2, 4)(x, ctx), x)


def test_cross_attention_matches_hand_computation():
    torch.manual_seed(1)
    ch, heads, width = 8, 2, 6
    block = CrossAttention(ch, width, heads, n_groups=2)
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(1, ch, 3, 4)
    ctx = torch.randn(1, 5, width)
    out = block(x, ctx)
    t = block.norm(x).permute(0, 2, 3, 1).reshape(12, ch)  # tokens (N, C)
    q = t @ block.q.weight.T
    kv = ctx[0] @ block.kv.weight.T + block.kv.bias
    k, v = kv[:, :ch], kv[:, ch:]
    hd = ch // heads
    heads_out = []
    for i in range(heads):
        sl = slice(i * hd, (i + 1) * hd)
        a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)  # (N, T)
        heads_out.append(a @ v[:, sl])
    o = torch.cat(heads_out, dim=1) @ block.proj.weight.T + block.proj.bias  # (N, C)
    expected = x + o.T.reshape(1, ch, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_self_attention_uses_position():
    torch.manual_seed(2)
    block = SelfAttention(16, 2, 4)
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(1, 16, 1, 1).expand(1, 16, 4, 4).contiguous()  # every pixel identical
    out = block(x)
    assert out.shape == x.shape
    # identical tokens differ after attention only through the positional encoding
    assert (out[0, :, 0, 0] - out[0, :, 3, 3]).abs().max() > 1e-4


def test_context_embedding_shape():
    emb = ContextEmbedding(7, n_tokens=4, width=12)
    assert emb(torch.randn(3, 7)).shape == (3, 4, 12)


# ------------------------------------------------------------------------------ positions and thesis blocks
def test_sinusoidal_2d_of_a_patch_is_the_crop_of_the_whole_slice():
    whole = sinusoidal_2d(12, 10, 16).reshape(12, 10, 16)
    offsets = torch.tensor([[4, 2], [0, 6]])
    patches = sinusoidal_2d(6, 4, 16, offset=offsets).reshape(2, 6, 4, 16)
    torch.testing.assert_close(patches[0], whole[4:10, 2:6], rtol=0, atol=0)
    torch.testing.assert_close(patches[1], whole[0:6, 6:10], rtol=0, atol=0)
    torch.testing.assert_close(sinusoidal_2d(3, 4, 8, offset=torch.zeros(1, 2)), sinusoidal_2d(3, 4, 8)[None])
    with pytest.raises(ValueError, match=r"offset must be \(B, 2\)"):
        sinusoidal_2d(3, 4, 8, offset=torch.zeros(2))


def _attend(q, k, v):
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_feed_forward_is_geglu():
    torch.manual_seed(3)
    ff = FeedForward(4, mult=2)
    t = torch.randn(5, 4)
    h = t @ ff.inp.weight.T + ff.inp.bias  # (5, 16)
    a, g = h[:, :8], h[:, 8:]
    expected = (a * torch.nn.functional.gelu(g)) @ ff.out.weight.T + ff.out.bias
    torch.testing.assert_close(ff(t), expected, rtol=1e-5, atol=1e-6)
    assert ff.inp.out_features == 2 * 2 * 4 and ff.out.in_features == 2 * 4


def test_transformer_block_is_self_then_cross_then_feed_forward_with_residuals():
    """Figure 25 by hand: t = W_in GN(x); t += SA(LN1 t + PE); t += CA(LN2 t, ctx); t += FF(LN3 t); x + W_out t."""
    torch.manual_seed(4)
    ch, width = 8, 6
    block = TransformerBlock(ch, 1, n_groups=2, self_attention=True, second="cross", context_width=width)
    torch.nn.init.normal_(block.proj_out.weight)  # zero at init (identity block): give it weights
    x = torch.randn(1, ch, 3, 4)
    ctx = torch.randn(1, 5, width)
    calls = []
    for name in ("attn1", "attn2", "ff"):
        getattr(block, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    out = block(x, ctx)
    assert calls == ["attn1", "attn2", "ff"]

    t = block.norm(x)[0].permute(1, 2, 0).reshape(12, ch) @ block.proj_in.weight.T + block.proj_in.bias  # (N, C)
    a = block.norm1(t) + sinusoidal_2d(3, 4, ch)
    q, k, v = (a @ block.attn1.qkv.weight.T).split(ch, dim=1)
    t = t + _attend(q, k, v) @ block.attn1.out.weight.T + block.attn1.out.bias
    q = block.norm2(t) @ block.attn2.q.weight.T
    k, v = (ctx[0] @ block.attn2.kv.weight.T).split(ch, dim=1)
    t = t + _attend(q, k, v) @ block.attn2.out.weight.T + block.attn2.out.bias
    t = t + block.ff(block.norm3(t))
    expected = x + (t @ block.proj_out.weight.T + block.proj_out.bias).T.reshape(1, ch, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_transformer_block_variants():
    torch.manual_seed(5)
    x, ctx = torch.randn(2, 16, 4, 3), torch.randn(2, 3, 10)
    fig26 = TransformerBlock(16, 1, 4, self_attention=True, second="self")  # bottleneck: two self-attentions
    assert not fig26.attn1.cross and not fig26.attn2.cross
    torch.testing.assert_close(fig26(x), x)  # starts as the identity (W_out = 0)
    no_self = TransformerBlock(16, 2, 4, self_attention=False, second="cross", context_width=10)
    assert no_self.attn1 is None and no_self.attn2.cross
    assert no_self(x, ctx).shape == x.shape
    with pytest.raises(ValueError, match="needs context tokens"):
        no_self(x)
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        TransformerBlock(16, 3, 4, second="self")
    with pytest.raises(ValueError, match="needs context_width"):
        TransformerBlock(16, 1, 4, second="cross")


def test_transformer_block_parameters_match_monai_spatial_transformer():
    monai = pytest.importorskip("monai.networks.nets.diffusion_model_unet")
    ref = monai.SpatialTransformer(2, 32, num_attention_heads=1, num_head_channels=32, norm_num_groups=8,
                                   cross_attention_dim=10)
    ours = TransformerBlock(32, 1, 8, self_attention=True, second="cross", context_width=10)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_group_norm_silu_and_std_equal_the_plain_ops(shift):
    from synth7t.nn.kernels import group_norm_silu

    torch.manual_seed(6)
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(3, 16, 9, 7) * torch.linspace(0.5, 3, 16)[:, None, None] + shift).requires_grad_(True)
    out, std = group_norm_silu(norm, x, with_std=True)
    ref_out, ref_std = torch.nn.functional.silu(norm(x)), torch.std(x, dim=(1, 2, 3))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(std, ref_std, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum() + std.sum(), (x, norm.weight, norm.bias))
    ref = torch.autograd.grad((ref_out * w).sum() + ref_std.sum(), (x, norm.weight, norm.bias))
    for g, r in zip(grads, ref, strict=True):  # the recomputing backward and torch.std's gradient
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(group_norm_silu(norm, x), ref_out)
    xb = x.detach().bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_b, std_b = group_norm_silu(norm, xb, with_std=True)
        out_b.float().sum().backward()
    torch.testing.assert_close(std_b, torch.std(xb.detach().float(), dim=(1, 2, 3)), rtol=2e-2, atol=0)
    torch.testing.assert_close(out_b.float(), ref_out.detach(), rtol=2e-2, atol=2e-2)
    assert xb.grad is not None and norm.weight.grad is not None


def test_resblock_adadm_uses_the_input_std():
    torch.manual_seed(7)
    block = ResBlock(8, 16, n_groups=4)
    x = torch.randn(2, 8, 6, 5) * 2 + 1
    h = block.conv2(block.dropout(torch.nn.functional.silu(block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x)))))))
    torch.testing.assert_close(block(x), block.skip(x) + block.adadm(h, x), rtol=1e-5, atol=1e-6)


def test_cpu_bf16_attention_matches_sdpa(monkeypatch):
    """The chunked bf16 attention (forward, and its own backward) against float32 SDPA, on several chunks."""
    import synth7t.nn.kernels as kernels

    torch.manual_seed(8)
    n, t = 300, 5000  # forward chunks of 2**20 // 5000 = 209 queries
    monkeypatch.setattr(kernels, "BACKWARD_CHUNK", 2**19)  # backward chunks of 104 queries
    q, k, v = torch.randn(2, 2, n, 16), torch.randn(2, 2, t, 16), torch.randn(2, 2, t, 16)
    assert kernels._rows(n, t, kernels.FORWARD_CHUNK) < n and kernels._rows(n, t, kernels.BACKWARD_CHUNK) < n
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    qb, kb, vb = (x.bfloat16().requires_grad_(True) for x in (q, k, v))
    out = kernels.attention(qb, kb, vb)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=3e-2)
    g = torch.randn_like(ref)
    out.float().backward(g)
    q32, k32, v32 = (x.clone().requires_grad_(True) for x in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(q32, k32, v32).backward(g)
    for got, want in ((qb, q32), (kb, k32), (vb, v32)):
        scale = want.grad.abs().max()
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=0, atol=0.03 * scale)
    with torch.no_grad():
        torch.testing.assert_close(kernels.attention(qb, kb, vb).float(), ref, rtol=0, atol=3e-2)
    torch.testing.assert_close(kernels.attention(q, k, v), ref)  # float32: fused SDPA


def test_group_norm_silu_channels_last_bf16_backward_matches_native():
    """The hand-written bf16 channels-last backward against float32 autograd of GroupNorm -> SiLU."""
    from synth7t.nn.kernels import group_norm_silu

    torch.manual_seed(9)
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2, 16, 12, 10) * 2 + 3).bfloat16().contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 16, 12, 10).bfloat16().contiguous(memory_format=torch.channels_last)
    xb = x.clone().requires_grad_(True)
    out = group_norm_silu(norm, xb)
    gxb, gwb, gbb = torch.autograd.grad(out, (xb, norm.weight, norm.bias), g)
    assert gxb.is_contiguous(memory_format=torch.channels_last) and gxb.dtype == torch.bfloat16
    x32 = x.float().requires_grad_(True)
    gx, gw, gb = torch.autograd.grad(torch.nn.functional.silu(norm(x32)), (x32, norm.weight, norm.bias), g.float())
    scale = gx.abs().max()
    torch.testing.assert_close(gxb.float(), gx, rtol=0, atol=0.03 * scale)
    torch.testing.assert_close(gwb, gw, rtol=0.03, atol=0.03 * gw.abs().max())
    torch.testing.assert_close(gbb, gb, rtol=0.03, atol=0.03 * gb.abs().max())


def test_pointwise_conv_equals_conv2d_in_both_layouts():
    from synth7t.nn.kernels import PointwiseConv2d

    torch.manual_seed(10)
    pw = PointwiseConv2d(6, 4)
    ref = torch.nn.Conv2d(6, 4, 1)
    ref.load_state_dict(pw.state_dict())
    x = torch.randn(2, 6, 5, 7)
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pw(x), ref(x))
    out = pw(xc)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_residual_equals_the_plain_expression(layout, dtype):
    """AdaDM's fused ``skip + h * scale`` against autograd of the plain expression (values and all gradients)."""
    from synth7t.nn.kernels import scaled_residual

    torch.manual_seed(11)
    skip, h = (torch.randn(3, 8, 7, 5).to(dtype).contiguous(memory_format=layout) for _ in range(2))
    scale = torch.tensor([0.5, 2.0, -1.5])
    g = torch.randn(3, 8, 7, 5).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (skip, h, scale)]
    out = scaled_residual(*leaves)
    got = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.float().clone().requires_grad_(True) for t in (skip, h, scale)]
    ref = ref_leaves[0] + ref_leaves[1] * ref_leaves[2].view(-1, 1, 1, 1)
    want = torch.autograd.grad(ref, ref_leaves, g.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.detach(), rtol=tol, atol=tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol * b.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(scaled_residual(skip, h, scale).float(), ref.detach(), rtol=tol, atol=tol)
