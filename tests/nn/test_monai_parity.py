"""The thesis presets have the thesis network's size: MONAI's DiffusionModelUNet at the same settings.

MONAI's network (the thesis code's, Ho et al.'s design) is built on the meta device (no memory) with the preset's
channels, groups, residual blocks, attention levels and one head. Differences kept on purpose, counted here:

* its timestep embedding (``time_embed`` MLP and every block's ``time_emb_proj``): the thesis network has none;
* its strided-convolution down-sampling and convolution after each up-sampling: the thesis used max-pooling
  and nearest-neighbour interpolation (2.1.1), which have no parameters;
* our covariate tokens are ``context_width`` wide after a small embedding MLP (MONAI: the raw 7-vector), and the
  ``biofinder`` bottleneck's second attention is a self-attention (figure 26) where MONAI's conditioned middle
  block cross-attends: a few hundred thousand parameters at most.
"""

from __future__ import annotations

import pytest
import torch

from synth7t.config import load_config
from synth7t.nn import CONTEXT_DIM, UNet

monai_nets = pytest.importorskip("monai.networks.nets")


def monai_reference(cfg):
    """MONAI's DiffusionModelUNet at the settings of ``cfg`` (a UNetConfig), on the meta device."""
    chs = cfg.stage_channels
    ca = set(cfg.cross_attention_stages)
    with torch.device("meta"):
        return monai_nets.DiffusionModelUNet(
            spatial_dims=2, in_channels=cfg.in_slices, out_channels=1, num_res_blocks=cfg.n_res, channels=chs,
            attention_levels=[(i + 1) in ca for i in range(len(chs))], norm_num_groups=cfg.n_groups,
            num_head_channels=[c // cfg.n_heads(c) for c in chs], with_conditioning=True,
            # without covariates (gan), the conditioned middle block called without context is figure 26's
            cross_attention_dim=CONTEXT_DIM if ca else chs[-1],
        )


def counts(cfg) -> dict[str, int]:
    ref = monai_reference(cfg)
    with torch.device("meta"):
        ours = UNet(cfg)
    named = dict(ref.named_parameters())
    return {
        "ours": ours.count_parameters(),
        "monai": sum(p.numel() for p in named.values()),
        "time": sum(p.numel() for k, p in named.items() if "time_emb" in k),
        "resampling": sum(p.numel() for k, p in named.items() if "downsampler" in k or "upsampler" in k),
    }


@pytest.mark.parametrize("preset", ["unc", "biofinder", "gan"])
def test_thesis_presets_have_the_thesis_parameter_count(preset):
    cfg = load_config(preset).model
    assert cfg.attention_block == "thesis" and cfg.attention_heads == 1 and cfg.up_path == "ho"
    c = counts(cfg)
    thesis = c["monai"] - c["time"]  # the thesis network: MONAI's without its timestep embedding
    assert abs(c["ours"] / thesis - 1) < 0.07, c  # within a few percent: the resampling convolutions
    assert abs(c["ours"] / (thesis - c["resampling"]) - 1) < 0.02, c  # and with those removed, the context width


def test_thesis_figures_quoted_in_the_issue():
    """biofinder 20.7 M and unc 61.1 M for the thesis network (MONAI without its timestep embedding)."""
    for preset, millions in (("biofinder", 20.7), ("unc", 61.1)):
        c = counts(load_config(preset).model)
        assert round((c["monai"] - c["time"]) / 1e6, 1) == millions


def test_gan_generator_differs_from_monai_only_by_resampling_and_adadm():
    cfg = load_config("gan").model
    c = counts(cfg)
    n_res_blocks = len(cfg.channel_mult) * (2 * cfg.n_res + 1) + 2  # down n_res, up n_res + 1, two in the bottleneck
    assert c["ours"] == c["monai"] - c["time"] - c["resampling"] + 2 * n_res_blocks  # AdaDM: 2 scalars per block
