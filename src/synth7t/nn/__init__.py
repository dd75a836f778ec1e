"""Neural networks of synth7t: the 2.5D attention residual U-net, the 3-D patch U-net (MONAI's), the WGAN-GP patch
critic and the losses.

See ``synth7t.nn.unet`` for the architecture (thesis 2.1-2.2), ``synth7t.nn.wavelet`` for the Haar sub-bands
of the ``wavelet`` input option. Importing this package loads torch but neither MONAI nor
deepbet (the perceptual networks are built on demand by :func:`build_perceptual`).
"""

from .blocks import (
    AdaDM,
    ContextEmbedding,
    CrossAttention,
    FeedForward,
    ResBlock,
    SelfAttention,
    TransformerBlock,
    sinusoidal_2d,
)
from .config import CONTEXT_DIM, CriticConfig, PublishedUNetConfig, UNet3DConfig, UNetConfig, generator_config
from .critic import CriticResBlock, PatchCritic
from .losses import (
    PERCEPTUAL_KINDS,
    DeepbetPerceptual,
    SynthesisLoss,
    build_perceptual,
    critic_loss,
    generator_adv_loss,
    gradient_penalty,
)
from .published import PublishedUNet
from .unet import UNet
from .unet3d import UNet3D, build_generator
from .wavelet import haar_dwt2, haar_idwt2

__all__ = [
    "CONTEXT_DIM",
    "PERCEPTUAL_KINDS",
    "AdaDM",
    "ContextEmbedding",
    "CriticConfig",
    "CriticResBlock",
    "CrossAttention",
    "DeepbetPerceptual",
    "FeedForward",
    "PatchCritic",
    "PublishedUNet",
    "PublishedUNetConfig",
    "ResBlock",
    "SelfAttention",
    "SynthesisLoss",
    "TransformerBlock",
    "UNet",
    "UNet3D",
    "UNet3DConfig",
    "UNetConfig",
    "build_generator",
    "build_perceptual",
    "critic_loss",
    "generator_adv_loss",
    "generator_config",
    "gradient_penalty",
    "haar_dwt2",
    "haar_idwt2",
    "sinusoidal_2d",
]
