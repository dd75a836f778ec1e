"""Losses: L1 + perceptual synthesis loss (thesis 2.1.6) and the WGAN-GP terms (thesis 2.2; Gulrajani 2017).

Perceptual networks (``build_perceptual``), all offline and frozen, each with a ``.name`` recorded in the
run config:

* ``"deepbet"`` (default): the encoder of deepbet's brain-extraction network (a 3-D LinkNet with a
  ResNet-18-like encoder and instance norm, trained on T1-weighted brain MRI, shipped inside the deepbet
  wheel as TorchScript, MIT licence). Its 3-D kernels are summed along the axial (S) axis, which makes the
  2-D network *exactly* the 3-D one applied to a volume that is constant along S (instance norm statistics
  of such a volume are those of one slice), i.e. a slice seen as a locally thick slab. We use the features
  after the stem (H/2, 16 channels), the first residual stage (H/4, 16) and the second (H/8, 32).
* ``"radimagenet"``: MONAI's ``PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50")`` of the
  thesis. Its weights come from torch hub; without them in the hub cache it fails offline, and we say so.
* ``"none"``: no perceptual term.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = [
    "PERCEPTUAL_KINDS",
    "DeepbetPerceptual",
    "RadImageNetPerceptual",
    "SynthesisLoss",
    "build_perceptual",
    "critic_loss",
    "generator_adv_loss",
    "gradient_penalty",
]

log = logging.getLogger(__name__)

PERCEPTUAL_KINDS = ("deepbet", "radimagenet", "none")


# ----------------------------------------------------------------------------------------------- WGAN-GP
def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gradient penalty of WGAN-GP: ``E[(||grad_x D(x_hat)||_2 - 1)^2]``.

    ``x_hat = e * real + (1 - e) * fake`` with ``e ~ U(0, 1)`` drawn per sample; ``D(x)`` of a patch critic is
    the mean of its patch scores (the same scalar the critic loss averages); the norm is taken per sample
    over all of (C, H, W). ``real`` and ``fake`` are detached (this term trains the critic only).
    Returns a scalar tensor that carries the graph (``create_graph=True``) for the critic's update.
    """
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    b = real.shape[0]
    e = torch.rand(b, *([1] * (real.ndim - 1)), device=real.device, generator=generator)  # (B, 1, 1, 1)
    x_hat = (e * real.detach().float() + (1 - e) * fake.detach().float()).requires_grad_(True)
    d = critic(x_hat).float().reshape(b, -1).mean(dim=1)  # (B,) D(x_hat) per sample
    (grad,) = torch.autograd.grad(d.sum(), x_hat, create_graph=True)
    norm = torch.sqrt(grad.reshape(b, -1).pow(2).sum(dim=1) + 1e-12)  # (B,)
    return ((norm - 1.0) ** 2).mean()


def critic_loss(
    d_real: torch.Tensor, d_fake: torch.Tensor, gp: torch.Tensor, gp_weight: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic loss ``mean(D(fake)) - mean(D(real)) + gp_weight * gp``, and the Wasserstein estimate.

    The estimate ``mean(D(real)) - mean(D(fake))`` (detached) is the quantity to log: it should shrink as the
    generator improves.
    """
    if gp_weight < 0:
        raise ValueError(f"gp_weight must be >= 0, got {gp_weight}")
    w = d_real.float().mean() - d_fake.float().mean()
    return -w + gp_weight * gp, w.detach()


def generator_adv_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Adversarial loss of the generator: ``-mean(D(fake))``."""
    return -d_fake.float().mean()


# ----------------------------------------------------------------------------------------- perceptual
class _Frozen(nn.Module):
    """A module that stays in eval mode and never trains (``train()`` is a no-op)."""

    name = "frozen"

    def train(self, mode: bool = True) -> _Frozen:  # noqa: ARG002 - always eval
        return super().train(False)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(
            f"perceptual loss needs pred and target of the same shape (B, 1, H, W), "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def deepbet_model_path() -> Path:
    """Path of deepbet's bundled TorchScript network (``deepbet.utils.DATA_PATH/models/model.pt``)."""
    spec = importlib.util.find_spec("deepbet")
    if spec is None or spec.origin is None:
        raise ConfigError("the deepbet package is not installed; use --perceptual none (or install deepbet)")
    path = Path(spec.origin).resolve().parents[1] / "data" / "models" / "model.pt"
    if not path.is_file():
        raise ConfigError(f"{path}: deepbet's network file is missing; reinstall deepbet or use --perceptual none")
    return path


class DeepbetPerceptual(_Frozen):
    """Perceptual loss on deepbet's encoder, used as a 2-D network (module docstring).

    ``L = sum_l mean_{b,v} sum_c (n(phi_l(a))_{c,v} - n(phi_l(b))_{c,v})^2`` with ``n`` the unit-length
    normalisation over channels (LPIPS, as MONAI's perceptual losses compute it, so thesis weights such as
    1e-3 keep their meaning). Both images go through the same affine map ``0.226 * (x - m) / s + 0.449``
    with m, s the target's mean and deviation (deepbet's input normalisation). Weights are non-persistent
    buffers: they are not parameters, not trained and not saved with the U-net.
    """

    name = "deepbet_encoder2d"
    #: (prefix, stride) of the residual blocks per stage after the stem; stage s ends a feature level
    STAGES = ((("down0.block1", 1), ("down0.block2", 1)), (("down1.block1", 2), ("down1.block2", 1)),
              (("down2.block1", 2), ("down2.block2", 1)))

    def __init__(self, model_path: Path | str | None = None, n_stages: int = 2):
        super().__init__()
        if not 0 <= n_stages <= len(self.STAGES):
            raise ValueError(f"n_stages must be in 0..{len(self.STAGES)}, got {n_stages}")
        path = Path(model_path) if model_path is not None else deepbet_model_path()
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot load deepbet's network ({err})") from err
        self.n_stages = n_stages
        self._names: dict[str, str] = {}
        for name, w in scripted.named_parameters():
            if name.startswith(("init.", "down")) and w.ndim == 5:
                key = name.removesuffix(".weight").replace(".", "_")
                # (O, I, kR, kA, kS) -> (O, I, kR, kA): a slice is constant along S
                self.register_buffer(key, w.detach().sum(dim=4).contiguous(), persistent=False)
                self._names[name.removesuffix(".weight")] = key
        self.eval()

    def _w(self, name: str) -> torch.Tensor | None:
        key = self._names.get(name)
        return getattr(self, key) if key is not None else None

    @staticmethod
    def _cin(x: torch.Tensor, w: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
        """conv (no bias) -> instance norm (no affine), as every deepbet layer."""
        return F.instance_norm(F.conv2d(x, w.to(x.dtype), stride=stride, padding=pad), eps=1e-5)

    def _block(self, x: torch.Tensor, prefix: str, stride: int) -> torch.Tensor:
        """ResNet basic block: relu(IN(conv(relu(IN(conv(x))))) + skip(x))."""
        r = F.relu(self._cin(x, self._w(f"{prefix}.double_conv.0"), stride, 1))
        r = self._cin(r, self._w(f"{prefix}.double_conv.3"), 1, 1)
        w_skip = self._w(f"{prefix}.downsample.0")
        s = self._cin(x, w_skip, stride, 0) if w_skip is not None else x
        return F.relu(r + s)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, H, W) normalised image -> feature maps at H/2, H/4, H/8, ... (1 + n_stages of them)."""
        h = F.relu(self._cin(x, self._w("init.0"), 2, 3))  # (B, 16, H/2, W/2)
        feats = [h]
        h = F.max_pool2d(h, 3, stride=2, padding=1)  # (B, 16, H/4, W/4)
        for stage in self.STAGES[: self.n_stages]:
            for prefix, stride in stage:
                h = self._block(h, prefix, stride)
            feats.append(h)
        return feats

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target)
        m = target.detach().mean(dim=(1, 2, 3), keepdim=True)
        s = target.detach().std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        fp = self.features(0.226 * (pred - m) / s + 0.449)
        with torch.no_grad():
            ft = self.features(0.226 * (target - m) / s + 0.449)
        loss = pred.new_zeros((), dtype=torch.float32)
        for a, b in zip(fp, ft, strict=True):
            d = F.normalize(a.float(), dim=1, eps=1e-10) - F.normalize(b.float(), dim=1, eps=1e-10)
            loss = loss + d.pow(2).sum(dim=1).mean()
        return loss


class RadImageNetPerceptual(_Frozen):
    """MONAI's RadImageNet ResNet-50 perceptual loss of the thesis, from the torch hub cache only."""

    name = "radimagenet_resnet50"

    def __init__(self):
        super().__init__()
        from monai.losses import PerceptualLoss

        try:
            self.loss = PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50")
        except OSError as err:  # urllib's URLError and HTTPError are OSErrors
            raise ConfigError(
                f"radimagenet weights are not in the torch hub cache ({torch.hub.get_dir()}); "
                "use --perceptual deepbet or none"
            ) from err
        for p in self.loss.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target)
        return self.loss(pred, target)


def build_perceptual(kind: str = "deepbet", device: torch.device | str | None = None) -> nn.Module | None:
    """Frozen perceptual loss module ``f(pred, target) -> scalar`` of ``kind`` (module docstring), or None."""
    if kind == "none":
        return None
    if kind == "deepbet":
        module: nn.Module = DeepbetPerceptual()
    elif kind == "radimagenet":
        module = RadImageNetPerceptual()
    else:
        raise ConfigError(f"unknown perceptual loss {kind!r}; choose one of {', '.join(PERCEPTUAL_KINDS)}")
    log.info("perceptual loss: %s", module.name)
    return module.to(device) if device is not None else module


class SynthesisLoss(nn.Module):
    """``L = L1 + perceptual_weight * L_perc`` (thesis 2.1.6), returned as a dict of its parts.

    With ``mask_weight = w > 0`` and a brain mask, the L1 is a weighted mean with weights ``1 + w * mask``:
    ``L1 = sum((1 + w m) |y - y'|) / sum(1 + w m)``, so brain voxels count ``1 + w`` times the background.
    The perceptual module is a frozen submodule (moved with ``.to()``); deepbet's weights are non-persistent
    buffers, so they are neither parameters nor part of the state dict. Both terms are computed in float32
    (under mixed precision too). This is the loss the trainer runs
    (:meth:`synth7t.training.module.Synth7tModule.synthesis_loss`).
    """

    def __init__(self, perceptual: nn.Module | None = None, perceptual_weight: float = 0.0, mask_weight: float = 0.0):
        super().__init__()
        if perceptual_weight < 0 or mask_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got perceptual_weight={perceptual_weight}, mask_weight={mask_weight}"
            )
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual module (build_perceptual)")
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.mask_weight = mask_weight

    @property
    def perceptual_name(self) -> str:
        """Name of the perceptual network, for the run config ("none" without one)."""
        return getattr(self.perceptual, "name", "none") if self.perceptual is not None else "none"

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``pred``, ``target`` (B, 1, H, W), optional ``mask`` (B, 1, H, W) -> {"l1", "perceptual", "total"}."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        diff = (pred.float() - target.float()).abs()
        if self.mask_weight > 0 and mask is not None:
            w = 1.0 + self.mask_weight * mask.float()
            l1 = (w * diff).sum() / w.sum()
        else:
            l1 = diff.mean()
        if self.perceptual is not None and self.perceptual_weight > 0:
            perc = self.perceptual(pred.float(), target.float()).float()
        else:
            perc = l1.new_zeros(())
        return {"l1": l1, "perceptual": perc, "total": l1 + self.perceptual_weight * perc}
