"""UNetConfig / CriticConfig validation."""

from __future__ import annotations

import pytest

from synth7t.nn import CriticConfig, UNetConfig


def test_defaults_are_valid_and_derived_values():
    cfg = UNetConfig()
    assert cfg.stage_channels == (64, 128, 128, 128)
    assert cfg.downsample_factor == 8
    assert cfg.n_heads(128) == 4 and cfg.n_heads(16) == 1
    assert UNetConfig(channel_mult=(1, 2, 2, 2, 2), cross_attention_stages=(3, 4, 5)).downsample_factor == 16


def test_new_architecture_defaults_are_todays_light_network():
    cfg = UNetConfig()
    assert (cfg.attention_block, cfg.attention_heads, cfg.up_path) == ("light", None, "stage")
    assert cfg.covariates and cfg.out_norm and cfg.adadm and cfg.self_attention and cfg.n_up_blocks == cfg.n_res
    thesis = UNetConfig(attention_block="thesis", attention_heads=1, up_path="ho")
    assert thesis.n_heads(128) == 1 and thesis.n_up_blocks == thesis.n_res + 1
    assert not CriticConfig().residual


def test_bottleneck_stage_index_is_accepted():
    # thesis "CA at stages (3,4,5)" for the 4-stage UNC model: 5 is the bottleneck
    cfg = UNetConfig(channels=128, n_groups=32, cross_attention_stages=(3, 4, 5))
    assert cfg.attention_stages == (3, 4, 5)


def test_round_trip_through_json():
    cfg = UNetConfig(channels=32, channel_mult=(1, 2), n_groups=8, cross_attention_stages=(2,))
    assert UNetConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(channels=24, n_groups=16), "not divisible by n_groups"),
        (dict(cross_attention_stages=(0,)), "out of range"),
        (dict(cross_attention_stages=(6,)), "out of range"),
        (dict(cross_attention_stages=(3, 3)), "duplicates"),
        (dict(in_slices=4), "odd"),
        (dict(in_slices=0), "odd"),
        (dict(channel_mult=()), "non-empty"),
        (dict(channel_mult=(1, 0)), "positive"),
        (dict(dropout=1.0), "dropout"),
        (dict(channels=0), "channels must be >= 1"),
        (dict(channels=112, n_groups=16, channel_mult=(1,), cross_attention_stages=(1,)), "heads"),
        (dict(unknown=1), "Extra inputs"),
        (dict(attention_heads=0), "attention_heads must be >= 1"),
        (dict(attention_heads=3, cross_attention_stages=(2,)), "cannot be split into 3 heads"),
        (dict(attention_block="heavy"), "attention_block"),
        (dict(up_path="unet"), "up_path"),
    ],
)
def test_invalid_unet_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_critic_config():
    assert CriticConfig().downsample_factor == 16
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        CriticConfig(n_layers=0)
