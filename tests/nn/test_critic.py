"""PatchCritic: shape, no sigmoid, no batch norm, input checks."""

from __future__ import annotations

import pytest
import torch

from synth7t.nn import CriticConfig, PatchCritic


def test_output_shape_and_unbounded_scores():
    torch.manual_seed(0)
    critic = PatchCritic(CriticConfig(channels=8, n_layers=3))
    x = torch.rand(2, 1, 32, 48) * 50 - 25
    with torch.no_grad():
        critic.net[-1].bias.fill_(3.0)
    y = critic(x)
    assert y.shape == (2, 1, 4, 6)
    assert y.max() > 1.0  # no sigmoid: scores outside [0, 1]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in critic.modules())


def test_channels_double_per_layer():
    critic = PatchCritic(CriticConfig(channels=4, n_layers=3, in_channels=2))
    convs = [m for m in critic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 1]
    assert convs[0].in_channels == 2 and convs[0].kernel_size == (4, 4) and convs[0].stride == (2, 2)


def test_input_checks():
    critic = PatchCritic(CriticConfig(channels=4, n_layers=2))
    with pytest.raises(ValueError, match="multiples of 4"):
        critic(torch.rand(1, 1, 10, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        critic(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="CriticConfig"):
        PatchCritic(None)


def test_residual_critic():
    """Thesis 5.2: residual blocks after each down-sampling layer; same output size, starts as the plain critic."""
    from synth7t.nn import CriticResBlock, gradient_penalty

    torch.manual_seed(0)
    plain = PatchCritic(CriticConfig(channels=4, n_layers=2))
    res = PatchCritic(CriticConfig(channels=4, n_layers=2, residual=True))
    blocks = [m for m in res.modules() if isinstance(m, CriticResBlock)]
    assert len(blocks) == 2
    outer = [m for m in res.net if not isinstance(m, CriticResBlock)]
    for a, b in zip(plain.net, outer, strict=True):  # same weights outside the residual blocks
        b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(res(x), plain(x))  # the residual branches start at zero
    for b in blocks:
        torch.nn.init.normal_(b.body[-1].weight, std=0.2)
    assert (res(x) - plain(x)).abs().max() > 1e-4
    gp = gradient_penalty(res, x, torch.rand(2, 1, 16, 16))
    gp.backward()  # double backward through the residual blocks
    assert blocks[0].body[2].weight.grad is not None
