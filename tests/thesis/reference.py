"""An independent re-implementation, for the tests only, of the computation of the thesis authors' published U-net.

Written from the description of their network (DESIGN.md, issue 30) with their parameter names, so that its
``state_dict`` has the layout of their checkpoints: the tests save it as the authors' training script saved theirs
and compare synth7t's import against it. It computes the time embedding of ``timesteps`` on every call (synth7t
folds it), uses plain einsum attention (synth7t uses ``scaled_dot_product_attention``) and keeps the authors' module
tree; nothing here is shared with ``synth7t.nn.published``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def gn(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


class RefRes(nn.Module):
    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(gn(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(gn(cout, groups), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.phi = nn.Conv2d(1, 1, 1)
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        sd = x.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        h = h * torch.exp(self.phi(torch.log(sd)))
        return self.skip_connection(x) + h


class RefAttn(nn.Module):
    def __init__(self, dim, heads, kv_dim):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, ctx):
        b, n, d = x.shape
        dh = d // self.heads
        q = self.to_q(x).reshape(b, n, self.heads, dh)
        k = self.to_k(ctx).reshape(b, ctx.shape[1], self.heads, dh)
        v = self.to_v(ctx).reshape(b, ctx.shape[1], self.heads, dh)
        w = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(dh)
        a = torch.einsum("bhnm,bmhd->bnhd", w.softmax(-1), v)
        return self.to_out(a.reshape(b, n, d))


class RefFF(nn.Module):
    class Geglu(nn.Module):
        def __init__(self, dim, inner):
            super().__init__()
            self.proj = nn.Linear(dim, 2 * inner)

        def forward(self, x):
            a, g = self.proj(x).chunk(2, -1)
            return a * torch.nn.functional.gelu(g)

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(RefFF.Geglu(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, ctx_dim):
        super().__init__()
        self.attn1 = RefAttn(dim, heads, dim)
        self.ff = RefFF(dim)
        self.attn2 = RefAttn(dim, heads, ctx_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, ctx):
        y = self.norm1(x)
        x = x + self.attn1(y, y)
        x = x + self.attn2(self.norm2(x), ctx)
        return x + self.ff(self.norm3(x))


class RefTransformer(nn.Module):
    def __init__(self, ch, groups, heads, ctx_dim):
        super().__init__()
        self.norm = gn(ch, groups)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([RefBlock(ch, heads, ctx_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, ctx):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        t = self.transformer_blocks[0](t, ctx)
        return x + self.proj_out(t.reshape(b, h, w, c).permute(0, 3, 1, 2))


class RefDown(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class RefUp(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


class Seq(nn.ModuleList):
    def forward(self, x, emb, ctx):
        for m in self:
            if isinstance(m, RefRes):
                x = m(x, emb)
            elif isinstance(m, RefTransformer):
                x = m(x, ctx)
            else:
                x = m(x)
        return x


class ReferenceUNet(nn.Module):
    """The authors' U-net (settings as in their params files) with their parameter names."""

    def __init__(self, *, in_ch=3, ch=256, mult=(1, 2, 2, 2), n_res=3, attn=(4, 8), groups=64, ctx_dim=1,
                 mid_attention=True):
        super().__init__()
        self.ch = ch
        emb = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(in_ch, ch, 3, padding=1)])])
        kept, c, factor = [ch], ch, 1
        for level, m in enumerate(mult):
            for _ in range(n_res):
                mods = [RefRes(c, ch * m, emb, groups)]
                c = ch * m
                if factor in attn:
                    mods.append(RefTransformer(c, groups, 1, ctx_dim))
                self.input_blocks.append(Seq(mods))
                kept.append(c)
            if level + 1 < len(mult):
                self.input_blocks.append(Seq([RefDown(c)]))
                kept.append(c)
                factor *= 2
        mid = [RefRes(c, c, emb, groups)]
        if mid_attention:
            mid.append(RefTransformer(c, groups, 1, ctx_dim))
        mid.append(RefRes(c, c, emb, groups))
        self.middle_block = Seq(mid)
        self.output_blocks = nn.ModuleList()
        for level in range(len(mult) - 1, -1, -1):
            for i in range(n_res + 1):
                mods = [RefRes(c + kept.pop(), ch * mult[level], emb, groups)]
                c = ch * mult[level]
                if factor in attn:
                    mods.append(RefTransformer(c, groups, 1, ctx_dim))
                if level > 0 and i == n_res:
                    mods.append(RefUp(c))
                    factor //= 2
                self.output_blocks.append(Seq(mods))
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x, timesteps, context):
        half = self.ch // 2
        f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = timesteps.float()[:, None] * f[None]
        emb = self.time_embed(torch.cat([a.cos(), a.sin()], dim=1))
        hs = []
        h = x
        for blk in self.input_blocks:
            h = blk(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], 1), emb, context)
        return self.out(h)


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (the authors zero some layers at init; trained weights are not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(1, p[0].numel() if p.ndim > 1 else 1))))
        for name, p in net.named_parameters():
            if name.endswith("phi.weight"):
                p.fill_(0.9)
            if name.endswith("phi.bias"):
                p.fill_(0.05)
    return net
