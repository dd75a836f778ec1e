"""Blocks: AdaDM formula, positional encoding, residual and attention blocks."""

from __future__ import annotations

import math

import pytest
import torch

from synth7t.nn import AdaDM, ContextEmbedding, CrossAttention, ResBlock, SelfAttention, sinusoidal_2d


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
