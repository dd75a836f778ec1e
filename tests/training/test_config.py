"""Presets (thesis appendix tables 2-3), overrides and clear configuration errors."""

from __future__ import annotations

import pytest

from synth7t.config import PRESETS, load_config
from synth7t.errors import ConfigError


def test_presets_match_the_thesis_tables():
    unc, bio, gan = load_config("unc"), load_config("biofinder"), load_config("gan")
    assert (unc.model.channels, unc.model.channel_mult, unc.model.n_groups, unc.model.n_res) == (128, (1, 2, 2, 2), 32, 3)
    assert (unc.optim.lr, unc.optim.schedule, unc.loss.perceptual_weight, unc.trainer.max_epochs) == (5e-5, "plateau",
                                                                                                      5e-3, 15)
    assert (bio.model.channels, bio.model.channel_mult, bio.model.cross_attention_stages) == (64, (1, 2, 2, 2, 2),
                                                                                             (3, 4, 5))
    assert (bio.optim.schedule, bio.optim.factor, bio.optim.every_steps) == ("step", 0.5, 200)
    assert gan.is_gan and gan.critic.channels == 256 and gan.critic.n_layers == 4
    assert (gan.loss.n_critic, gan.loss.critic_lr, gan.loss.critic_betas, gan.loss.gan_weight) == (5, 2e-5, (0.0, 0.9),
                                                                                                    0.2)
    # the thesis trained without augmentations (1.3: explored, not implemented); the CPU demo preset uses them
    assert all(load_config(p).data.augment.any_enabled is False for p in PRESETS if p != "tiny")
    tiny = load_config("tiny").data.augment
    assert tiny.gmm.enabled and tiny.blur.enabled and tiny.noise.enabled and tiny.bias.enabled
    assert load_config("tiny").data.standardize == "histmatch"
    assert all(load_config(p).data.standardize == "none" for p in PRESETS if p != "tiny")


def test_overrides_are_typed():
    cfg = load_config("tiny", {"model.n_res": "2", "model.cross_attention_stages": "[2, 3]",
                               "loss.perceptual": "none", "data.augment.gmm.enabled": "true"})
    assert cfg.model.n_res == 2 and cfg.model.cross_attention_stages == (2, 3)
    assert cfg.loss.perceptual == "none" and cfg.data.augment.gmm.enabled


@pytest.mark.parametrize("overrides, message", [
    ({"model.n_groups": "7"}, "not divisible by n_groups"),
    ({"optim.lr": "-1"}, "optim.lr"),
    ({"model.oops": "1"}, "model.oops"),
    ({"loss.perceptual": "vgg"}, "loss.perceptual"),
])
def test_bad_values_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("tiny", overrides)
    assert "\n" not in str(info.value)


def test_unknown_preset_and_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  channels: 8\n  n_groups: 4\n  channel_mult: [1, 2]\n  cross_attention_stages: []\n")
    cfg = load_config(f)
    assert cfg.model.channels == 8 and cfg.preset == "mine"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(f)


def test_patch_must_fit_the_network():
    with pytest.raises(ConfigError, match="not a multiple of the model's down-sampling factor 4"):
        load_config("tiny", {"data.patch": "90"})


def test_random_patch_is_reproducible_and_centred_on_brain():
    import numpy as np

    from synth7t.training import random_patch

    mask = np.zeros((1, 64, 80), np.float32)
    mask[0, 40:50, 60:70] = 1
    sample = {"input": np.random.rand(3, 64, 80).astype(np.float32), "target": np.random.rand(1, 64, 80),
              "mask": mask}
    a = random_patch(sample, 16, np.random.default_rng([0, 1, 2]))
    b = random_patch(sample, 16, np.random.default_rng([0, 1, 2]))
    assert a["input"].shape == (3, 16, 16) and a["target"].shape == (1, 16, 16)
    np.testing.assert_array_equal(a["input"], b["input"])
    assert a["mask"].sum() > 0
    with pytest.raises(ConfigError, match="larger than the slices"):
        random_patch(sample, 128, np.random.default_rng(0))
