"""Haar wavelet transform (nn/wavelet.py) and the U-net's ``wavelet`` input option."""

from __future__ import annotations

import pytest
import torch

from synth7t.nn import UNet, UNetConfig
from synth7t.nn.wavelet import haar_dwt2, haar_idwt2


def small_cfg(**kw) -> UNetConfig:
    base = dict(channels=8, channel_mult=(1, 2), n_groups=4, n_res=1, cross_attention_stages=(2,), head_dim=8,
                context_tokens=2, context_width=8)
    return UNetConfig(**{**base, **kw})


def test_haar_of_one_block_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)  # [[a, b], [c, d]]
    y = haar_dwt2(x).flatten()
    # LL = (a+b+c+d)/2, LH = (a+b-c-d)/2, HL = (a-b+c-d)/2, HH = (a-b-c+d)/2
    torch.testing.assert_close(y, torch.tensor([5.0, -2.0, -1.0, 0.0]))
    torch.testing.assert_close(haar_idwt2(y.reshape(1, 4, 1, 1)), x)


def test_haar_is_orthonormal_and_invertible():
    # the transform of the 4 unit blocks: an orthogonal 4x4 matrix
    basis = torch.eye(4).reshape(4, 1, 2, 2)
    m = haar_dwt2(basis).reshape(4, 4)
    torch.testing.assert_close(m @ m.T, torch.eye(4))
    x = torch.randn(3, 5, 12, 18, dtype=torch.float64)
    y = haar_dwt2(x)
    assert y.shape == (3, 20, 6, 9)
    torch.testing.assert_close(y.square().sum(), x.square().sum())  # energy kept
    torch.testing.assert_close(haar_idwt2(y), x, rtol=0, atol=1e-12)  # perfect reconstruction
    # sub-band order per channel: channel 2's LL is the 2x2 block mean x 2
    torch.testing.assert_close(y[:, 8], torch.nn.functional.avg_pool2d(x[:, 2:3], 2)[:, 0] * 2)


def test_haar_input_checks():
    with pytest.raises(ValueError, match="even"):
        haar_dwt2(torch.rand(1, 1, 5, 4))
    with pytest.raises(ValueError, match="4C"):
        haar_idwt2(torch.rand(1, 3, 2, 2))


@pytest.mark.parametrize("kw", [dict(), dict(attention_block="thesis", attention_heads=1, up_path="ho"),
                                dict(in_slices=5, channel_mult=(1, 2, 2), cross_attention_stages=(3,))])
def test_wavelet_changes_only_the_stem(kw):
    torch.manual_seed(0)
    plain, wave = UNet(small_cfg(**kw)), UNet(small_cfg(wavelet=True, **kw))
    a, b = plain.state_dict(), wave.state_dict()
    assert a.keys() == b.keys()  # no buffers: the transform is not in the state dict
    changed = {k for k in a if a[k].shape != b[k].shape}
    assert changed == {"stem.weight"}
    s, c1 = wave.cfg.in_slices, wave.cfg.channels
    assert b["stem.weight"].shape == (c1, 5 * s, 3, 3)
    assert wave.count_parameters() - plain.count_parameters() == c1 * 4 * s * 9
    x = torch.rand(2, s, 16, 24)
    y = wave(x, torch.randn(2, 7))
    assert y.shape == (2, 1, 16, 24)
    # the last convolution starts at zero: an untrained model returns its middle slice, as without wavelets
    torch.testing.assert_close(y, x[:, s // 2 : s // 2 + 1])


def test_wavelet_stem_input_is_slices_then_upsampled_bands():
    x = torch.rand(1, 3, 4, 6)
    z = UNet._with_wavelets(x)
    assert z.shape == (1, 15, 4, 6)
    torch.testing.assert_close(z[:, :3], x)
    bands = haar_dwt2(x)
    torch.testing.assert_close(z[:, 3:, 1::2, 1::2], bands)  # each 2x2 block holds its own coefficients
    torch.testing.assert_close(z[:, 3:, 0::2, 0::2], bands)


def test_wavelet_needs_even_sizes():
    assert small_cfg(channel_mult=(1,), cross_attention_stages=(), wavelet=True).downsample_factor == 2
    assert small_cfg(channel_mult=(1,), cross_attention_stages=()).downsample_factor == 1
    net = UNet(small_cfg(channel_mult=(1,), cross_attention_stages=(), wavelet=True))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.rand(1, 3, 9, 8))


def test_wavelet_trains_and_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = UNet(small_cfg(wavelet=True))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, torch.randn(2, 7))
    assert y.shape == (2, 1, 16, 16) and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert model.stem.weight.grad is not None and torch.isfinite(model.stem.weight.grad).all()
    assert x.grad is not None
