"""The two WGAN-GP updates (Gulrajani et al. 2017) the training module alternates: critic, then generator.

Plain functions of the networks and their optimizers, so that tests can run them without a Trainer; the loss
terms themselves are in :mod:`synth7t.nn.losses`.
"""

from __future__ import annotations

import torch


def critic_update(critic, opt_d, real: torch.Tensor, fake: torch.Tensor, gp_weight: float,
                  backward=torch.Tensor.backward) -> dict[str, torch.Tensor]:
    """One WGAN-GP critic step: minimise ``D(fake) - D(real) + gp_weight * GP``; returns detached logs.

    ``backward(loss)`` is Lightning's ``manual_backward`` in training (precision plugins), plain autograd in tests.
    """
    from synth7t.nn.losses import critic_loss, gradient_penalty

    fake = fake.detach()
    gp = gradient_penalty(critic, real, fake)
    d_loss, wasserstein = critic_loss(critic(real), critic(fake), gp, gp_weight=gp_weight)
    opt_d.zero_grad(set_to_none=True)
    backward(d_loss)
    opt_d.step()
    return {"train/critic_loss": d_loss.detach(), "train/wasserstein": wasserstein.detach(), "train/gp": gp.detach()}


def generator_update(module, critic, opt_g, x: torch.Tensor, context: torch.Tensor | None, real: torch.Tensor,
                     gan_weight: float, backward=torch.Tensor.backward, clip=None,
                     offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One generator step on ``L1 + lambda_perc * perceptual + gan_weight * (-D(G(x)))``; returns the loss parts.

    ``module`` has ``forward(x, context, offset)`` and ``synthesis_loss(pred, target)`` (the LightningModule);
    ``clip()`` clips the gradients before the step. The critic gets gradients here but is not stepped (its
    optimizer zeroes them before its next step).
    """
    from synth7t.nn.losses import generator_adv_loss

    pred = module(x, context, offset)
    parts = module.synthesis_loss(pred, real)
    adv = generator_adv_loss(critic(pred))
    opt_g.zero_grad(set_to_none=True)
    backward(parts["loss"] + gan_weight * adv)
    if clip is not None:
        clip()
    opt_g.step()
    parts = {k: v.detach() for k, v in parts.items()}
    parts["adversarial"] = adv.detach()
    return parts
