"""Presets (thesis appendix tables 2-3), overrides and clear configuration errors."""

from __future__ import annotations

import pytest
import torch

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
    assert tiny.gmm.enabled and tiny.covariates.enabled
    assert not (tiny.blur.enabled or tiny.noise.enabled or tiny.bias.enabled)  # switchable, off (README ablation)
    # synth7t's own presets (tiny and the 3-D ones) standardize the 3T input; the thesis presets do not
    assert all(load_config(p).data.standardize == "histmatch" for p in ("tiny", "tiny3d", "patch3d"))
    assert all(load_config(p).data.standardize == "none" for p in PRESETS if p not in ("tiny", "tiny3d", "patch3d"))
    for cfg in (unc, bio, gan):  # the thesis code's network (2.1.5, 3.4.1): Ho's blocks, one head, n_res + 1 up
        m = cfg.model
        assert (m.attention_block, m.attention_heads, m.up_path, m.self_attention) == ("thesis", 1, "ho", True)
        assert cfg.data.patch_offsets
    assert unc.optim.patience == 5  # epochs


def test_tiny_keeps_the_light_network_and_aligns_patch_positions():
    """New architecture options default to today's network; tiny keeps the light block but, since it self-attends
    on 96-pixel patches and predicts whole slices, it encodes each patch's position in its slice."""
    tiny = load_config("tiny")
    m = tiny.model
    assert (m.attention_block, m.attention_heads, m.up_path, m.covariates, m.out_norm) == ("light", None, "stage",
                                                                                           True, True)
    assert tiny.data.patch == 96 and tiny.data.patch_offsets is True


def test_ablation_switches_are_settable():
    cfg = load_config("biofinder", {"model.attention_block": "light", "model.self_attention": "false",
                                    "model.adadm": "false", "model.covariates": "false", "model.out_norm": "false",
                                    "model.attention_heads": "null", "model.up_path": "stage",
                                    "critic": "{channels: 8, n_layers: 2, residual: true}"})
    m = cfg.model
    assert (m.attention_block, m.self_attention, m.adadm, m.covariates, m.out_norm) == ("light", False, False, False,
                                                                                        False)
    assert m.attention_heads is None and m.up_path == "stage" and cfg.critic.residual
    with pytest.raises(ConfigError, match="model.attention_block"):
        load_config("unc", {"model.attention_block": "monai"})


def test_overrides_are_typed():
    cfg = load_config("tiny", {"model.n_res": "2", "model.cross_attention_stages": "[2, 3]",
                               "loss.perceptual": "none", "data.augment.gmm.enabled": "true"})
    assert cfg.model.n_res == 2 and cfg.model.cross_attention_stages == (2, 3)
    assert cfg.loss.perceptual == "none" and cfg.data.augment.gmm.enabled


def test_a_section_override_is_copied_not_written_into():
    section = {"channels": 16, "n_layers": 3}
    cfg = load_config("tiny", {"critic": section, "critic.residual": True})
    assert cfg.critic.residual and cfg.critic.channels == 16
    assert section == {"channels": 16, "n_layers": 3}  # the caller's dict (e.g. a module constant) is unchanged


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


def test_random_patch_offsets_are_aligned_and_locate_the_crop():
    import numpy as np

    from synth7t.training import random_patch

    img = np.arange(64 * 80, dtype=np.float32).reshape(1, 64, 80)
    mask = np.zeros((1, 64, 80), np.float32)
    mask[0, 30:45, 37:52] = 1
    sample = {"input": np.repeat(img, 3, 0), "target": img.copy(), "mask": mask}
    for seed in range(5):
        plain = random_patch(sample, 16, np.random.default_rng(seed))
        aligned = random_patch(sample, 16, np.random.default_rng(seed), align=8)
        assert "offset" not in plain
        y0, x0 = aligned["offset"]
        assert y0 % 8 == 0 and x0 % 8 == 0
        np.testing.assert_array_equal(aligned["target"][0], img[0, y0 : y0 + 16, x0 : x0 + 16])
        py, px = divmod(int(plain["target"][0, 0, 0]), 80)  # the unaligned corner: same draw, rounded down
        assert (y0, x0) == (py - py % 8, px - px % 8)
    with pytest.raises(ConfigError, match="multiples of it"):
        random_patch(sample, 12, np.random.default_rng(0), align=8)


def test_auto_precision_is_bf16_where_the_hardware_multiplies_bf16(monkeypatch):
    """``trainer.precision: auto`` (the presets' value): bf16 mixed precision on a CPU with native bf16 (AVX512-BF16
    or AMX, or SYNTH7T_CPU_BF16=1), fp32 on one that would emulate it; explicit values are passed through. The
    matmul probe that predict uses for the published models (cpu_bf16_is_faster) decides on measured rates."""
    from synth7t import devices
    from synth7t.devices import cpu_bf16_is_faster, cpu_has_native_bf16, resolve_precision

    monkeypatch.setenv("SYNTH7T_CPU_BF16", "1")
    assert cpu_has_native_bf16() and resolve_precision("auto", "cpu") == "bf16-mixed" and cpu_bf16_is_faster()
    monkeypatch.setenv("SYNTH7T_CPU_BF16", "0")
    assert not cpu_has_native_bf16() and resolve_precision("auto", "cpu") == "32-true" and not cpu_bf16_is_faster()
    assert resolve_precision("32", "cpu") == "32-true" and resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.delenv("SYNTH7T_CPU_BF16")
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() == flags
    # the probe decides on hardware bf16: the measured rates, whatever this machine's are
    for bf16_rate, fp32_rate, expected in ((300e9, 100e9, True), (166e9, 326e9, False), (105e9, 100e9, False)):
        devices._bf16_matmul_faster.cache_clear()
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
        monkeypatch.setattr(devices, "matmul_rate", lambda dtype, r=(bf16_rate, fp32_rate), **kw:
                            r[0] if dtype == torch.bfloat16 else r[1])
        assert cpu_bf16_is_faster() is expected
        assert resolve_precision("auto", "cpu") == "bf16-mixed"  # training: the hardware flag, not the probe
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert not cpu_bf16_is_faster()  # emulated bf16 is never probed
    devices._bf16_matmul_faster.cache_clear()
    assert load_config("tiny").trainer.precision == "auto" and load_config("tiny3d").trainer.precision == "32"
