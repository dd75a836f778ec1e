"""Losses: WGAN-GP terms against hand computations, perceptual networks, synthesis loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from synth7t.errors import ConfigError
from synth7t.nn import (
    CriticConfig,
    DeepbetPerceptual,
    PatchCritic,
    SynthesisLoss,
    build_perceptual,
    critic_loss,
    generator_adv_loss,
    gradient_penalty,
)


class LinearPatchCritic(torch.nn.Module):
    """D(x) = patch map of a 2x2 stride-2 convolution: its gradient norm is known in closed form."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 2, stride=2, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(w.view(1, 1, 2, 2))
            self.conv.bias.fill_(0.3)

    def forward(self, x):
        return self.conv(x)


def test_gradient_penalty_on_linear_critic_is_known():
    w = torch.tensor([1.0, -2.0, 0.5, 2.0])
    critic = LinearPatchCritic(w)
    real, fake = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    # D(x) = mean over P = 16 patches of <w, patch>: grad = w / P tiled, ||grad|| = ||w|| / sqrt(P)
    norm = w.norm().item() / 4.0
    gp = gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx((norm - 1.0) ** 2, rel=1e-5)


def test_gradient_penalty_matches_hand_written_autograd():
    torch.manual_seed(0)
    critic = PatchCritic(CriticConfig(channels=4, n_layers=2))
    real, fake = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    gp = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(7))
    e = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    terms = []
    for b in range(3):
        x = (e[b] * real[b] + (1 - e[b]) * fake[b])[None].requires_grad_(True)
        (g,) = torch.autograd.grad(critic(x).mean(), x)
        terms.append((g.norm() - 1.0) ** 2)
    torch.testing.assert_close(gp, torch.stack(terms).mean(), rtol=1e-4, atol=1e-6)
    gp.backward()  # double backward through the critic (GroupNorm, LeakyReLU) works
    assert critic.net[0].weight.grad is not None


def test_critic_and_generator_losses():
    d_real, d_fake = torch.tensor([2.0, 4.0]), torch.tensor([[1.0], [-1.0]])
    loss, w = critic_loss(d_real, d_fake, gp=torch.tensor(0.5), gp_weight=10.0)
    assert w.item() == pytest.approx(3.0)  # mean(D(real)) - mean(D(fake)) = 3 - 0
    assert loss.item() == pytest.approx(-3.0 + 5.0)
    assert generator_adv_loss(d_fake).item() == pytest.approx(0.0)
    assert generator_adv_loss(torch.tensor([1.0, 2.0])).item() == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="gp_weight"):
        critic_loss(d_real, d_fake, torch.tensor(0.0), gp_weight=-1)


@pytest.fixture(scope="module")
def deepbet_loss():
    pytest.importorskip("deepbet")
    return build_perceptual("deepbet")


def brain_like(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 48), indexing="ij")
    blob = ((yy / 0.8) ** 2 + (xx / 0.7) ** 2 < 1).float()
    texture = F.avg_pool2d(torch.rand(1, 1, 64, 48, generator=g), 3, 1, 1)
    return (blob * (0.4 + 0.6 * texture)).expand(2, 1, 64, 48).contiguous()


def test_deepbet_perceptual_zero_for_identical_positive_for_blurred(deepbet_loss):
    img = brain_like()
    assert deepbet_loss(img, img).item() == pytest.approx(0.0, abs=1e-7)
    blurred = F.avg_pool2d(img, 5, 1, 2)
    slightly = F.avg_pool2d(img, 3, 1, 1)
    d_blur, d_slight = deepbet_loss(blurred, img).item(), deepbet_loss(slightly, img).item()
    assert d_blur > d_slight > 1e-4


def test_deepbet_perceptual_is_frozen_and_passes_gradients(deepbet_loss):
    assert deepbet_loss.name == "deepbet_encoder2d"
    assert list(deepbet_loss.parameters()) == []  # weights are non-persistent buffers
    assert deepbet_loss.state_dict() == {}
    deepbet_loss.train()
    assert not deepbet_loss.training
    pred = brain_like(1).requires_grad_(True)
    deepbet_loss(pred, brain_like(0)).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_deepbet_2d_encoder_equals_the_3d_network_on_a_slab(deepbet_loss):
    """The 2-D encoder is deepbet's 3-D network applied to a volume constant along S."""
    from synth7t.nn.losses import deepbet_model_path

    scripted = torch.jit.load(str(deepbet_model_path()), map_location="cpu")
    w3 = {n.removesuffix(".weight"): p.detach() for n, p in scripted.named_parameters()}

    def conv(x, name, stride, pad, circular):
        if circular:  # periodic along S: an infinitely thick slab
            x = F.pad(x, (pad, pad, 0, 0, 0, 0), mode="circular")
            return F.instance_norm(F.conv3d(x, w3[name], stride=stride, padding=(pad, pad, 0)), eps=1e-5)
        return F.instance_norm(F.conv3d(x, w3[name], stride=stride, padding=pad), eps=1e-5)

    def block(x, prefix, stride, circ):
        r = conv(F.relu(conv(x, f"{prefix}.double_conv.0", stride, 1, circ)), f"{prefix}.double_conv.3", 1, 1, circ)
        skip = conv(x, f"{prefix}.downsample.0", stride, 0, circ) if f"{prefix}.downsample.0" in w3 else x
        return F.relu(r + skip)

    def encoder3d(x, circ):
        h = F.relu(conv(x, "init.0", 2, 3, circ))
        feats = [h]
        h = F.max_pool3d(F.pad(h, (1, 1, 0, 0, 0, 0), mode="circular"), 3, 2, (1, 1, 0)) if circ else \
            F.max_pool3d(h, 3, 2, 1)
        for stage in DeepbetPerceptual.STAGES[:2]:
            for prefix, stride in stage:
                h = block(h, prefix, stride, circ)
            feats.append(h)
        return feats

    img = brain_like()[:1, :, :32, :32]
    vol = img[..., None].expand(1, 1, 32, 32, 16).contiguous()  # (B, 1, R, A, S)
    act = getattr(scripted.conv, "2")
    with torch.no_grad():
        ref = scripted.down1(act, scripted.down0(act, scripted.init(act, vol)))
        torch.testing.assert_close(encoder3d(vol, circ=False)[-1], ref, rtol=1e-4, atol=1e-4)
        for f3, f2 in zip(encoder3d(vol, circ=True), deepbet_loss.features(img), strict=True):
            torch.testing.assert_close(f3, f2[..., None].expand_as(f3), rtol=1e-4, atol=1e-4)


def test_build_perceptual_none_and_unknown():
    assert build_perceptual("none") is None
    with pytest.raises(ConfigError, match="unknown perceptual loss 'vgg'"):
        build_perceptual("vgg")


def test_radimagenet_offline_gives_config_error():
    pytest.importorskip("monai")
    hub = Path(torch.hub.get_dir())
    if any(hub.glob("Project-MONAI_perceptual-models*")):
        pytest.skip("radimagenet weights are in the torch hub cache")
    with pytest.raises(ConfigError, match="radimagenet weights are not in the torch hub cache .*deepbet or none"):
        build_perceptual("radimagenet")


class ConstPerceptual(torch.nn.Module):
    name = "const"

    def forward(self, pred, target):
        return (pred - target).pow(2).mean()


def test_synthesis_loss_parts():
    pred = torch.tensor([0.0, 0.5, 1.0, 1.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    plain = SynthesisLoss()(pred, target)
    assert plain["l1"].item() == pytest.approx(1.5 / 4)
    assert plain["perceptual"].item() == 0.0 and plain["total"].item() == pytest.approx(1.5 / 4)
    weighted = SynthesisLoss(mask_weight=3.0)(pred, target, mask)
    # weights 1, 4, 4, 1: (0 + 4*0.5 + 4*1 + 0) / 10
    assert weighted["l1"].item() == pytest.approx(0.6)
    both = SynthesisLoss(ConstPerceptual(), perceptual_weight=0.1)(pred, target)
    assert both["perceptual"].item() == pytest.approx((0.25 + 1) / 4)
    assert both["total"].item() == pytest.approx(1.5 / 4 + 0.1 * 1.25 / 4)
    assert SynthesisLoss(ConstPerceptual(), 0.1).perceptual_name == "const"
    assert SynthesisLoss().perceptual_name == "none"


def test_synthesis_loss_checks():
    with pytest.raises(ValueError, match="needs a perceptual module"):
        SynthesisLoss(None, perceptual_weight=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        SynthesisLoss(mask_weight=-1)
    with pytest.raises(ValueError, match="differ"):
        SynthesisLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
