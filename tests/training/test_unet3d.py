"""The 3-D patch model (issue 16): cube sampler, network, config checks, tiny3d training, kind dispatch, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synth7t.config import load_config
from synth7t.dataset.patches3d import PatchDataset3D, cube_corner, cut_cube
from synth7t.errors import ConfigError
from synth7t.model_folder import load_generator
from synth7t.nn import UNet, UNet3D, UNet3DConfig, build_generator
from synth7t.training import train


@pytest.fixture(scope="module")
def model3d(tiny3d_model):
    return tiny3d_model


def test_cube_helpers_pad_small_volumes():
    arr = np.arange(4 * 5 * 6, dtype=np.float16).reshape(4, 5, 6)
    corner = cube_corner(np.array([3, 4, 5]), arr.shape, 8)
    assert corner.tolist() == [0, 0, 0]  # every side is shorter than the cube
    cube = cut_cube(arr, corner, 8)
    assert cube.shape == (8, 8, 8) and cube.dtype == np.float32
    np.testing.assert_array_equal(cube[:4, :5, :6], arr.astype(np.float32))
    assert not cube[4:].any() and not cube[:, 5:].any() and not cube[:, :, 6:].any()
    assert cube_corner(np.array([30, 2, 50]), (40, 40, 40), 8).tolist() == [26, 0, 32]


def test_patch_sampler_shapes_brain_and_determinism(tiny_store):
    store = tiny_store[1]
    ds = PatchDataset3D(store, "train", 16, 5, seed=0)
    assert len(ds) == 5 * len(ds.subjects) > 0
    inside = []
    for i in range(len(ds)):
        s = ds[i]
        assert s["input"].shape == s["target"].shape == s["mask"].shape == (1, 16, 16, 16)
        assert s["input"].dtype == np.float32 and s["subject"] == ds.subjects[i // 5]
        inside.append(s["mask"][0, 8, 8, 8] > 0 or s["mask"].mean() > 0.2)  # centred on brain (or shifted in)
        assert s["mask"].any()
    assert np.mean(inside) > 0.9
    again = PatchDataset3D(store, "train", 16, 5, seed=0)
    np.testing.assert_array_equal(ds[3]["input"], again[3]["input"])
    other = PatchDataset3D(store, "train", 16, 5, seed=1)
    assert any(not np.array_equal(ds[i]["corner"], other[i]["corner"]) for i in range(len(ds)))
    ds.set_epoch(1)
    assert any(not np.array_equal(ds[i]["corner"], again[i]["corner"]) for i in range(len(ds)))
    # larger than the volumes: zero-padded, still the brain
    big = PatchDataset3D(store, "val", 64, 1, seed=0, fixed=True)
    s = big[0]
    assert s["input"].shape == (1, 64, 64, 64) and s["mask"].any()
    big.set_epoch(5)
    np.testing.assert_array_equal(big[0]["corner"], s["corner"])  # validation cubes are fixed


def test_net_maps_a_volume_to_its_shape():
    net = UNet3D(UNet3DConfig(channels=(4, 8, 8), num_res_units=1)).eval()
    x = torch.rand(2, 1, 8, 16, 12)
    with torch.no_grad():
        y = net(x, torch.zeros(2, 7))  # covariates are ignored
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 1, 6, 8, 8))
    assert isinstance(build_generator({}), UNet) and isinstance(build_generator({"kind": "unet3d"}), UNet3D)
    assert build_generator(load_config("patch3d").model).count_parameters() == 4_738_058
    assert build_generator(load_config("tiny3d").model).count_parameters() == 34_371


@pytest.mark.parametrize(("over", "match"), [
    ({"data.patch3d": None}, "set data.patch3d"),
    ({"data.patch3d": 18}, "multiple of the model's down-sampling factor 4"),
    ({"data.patch": 32}, "does not apply to a 3-D model"),
    ({"critic": {"channels": 8, "n_layers": 2}}, "critic is 2-D"),
    ({"data.augment.gmm.enabled": True}, "augmentations are 2-D"),
    ({"model.kind": "unet4d"}, "unet4d"),
])
def test_3d_config_errors_are_one_line(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny3d", over)
    with pytest.raises(ConfigError, match="data.patch3d is for 3-D models"):
        load_config("tiny", {"data.patch3d": 32})


def test_tiny3d_trains_and_the_model_folder_rebuilds_it(model3d):
    cfg = json.loads((model3d / "config.json").read_text())
    assert cfg["model"]["kind"] == "unet3d" and cfg["patch3d"] == 16 and cfg["n_slices"] == 1
    assert cfg["covariates"] == "ignored" and cfg["input_standardization"]["method"] == "histmatch"
    metrics = json.loads((model3d / "metrics.json").read_text())
    assert metrics["steps"] == 6 and np.isfinite(metrics["val/psnr_brain"])
    card = (model3d / "model_card.md").read_text()
    assert "3-D residual U-net" in card and "covariates ignored" in card
    net, _ = load_generator(model3d)
    assert isinstance(net, UNet3D) and cfg["parameters"] == net.count_parameters()
    saved = load_file(str(model3d / "model.safetensors"))
    assert saved.keys() == net.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    # the 2.5D model's config.json keeps no "kind" (absent = the 2.5D U-net)
    assert "kind" not in load_config("tiny").model.model_dump(mode="json")


class _Kill:
    def __new__(cls, step: int):
        import lightning.pytorch as pl

        class Kill(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if trainer.global_step == step:
                    raise RuntimeError("simulated kill")

        return Kill()


def test_tiny3d_killed_run_resumes_exactly(tiny_store, tmp_path, fast_3d):
    store = tiny_store[1]
    over = {**fast_3d, "trainer.checkpoint_every_steps": 2, "trainer.max_epochs": 3, "model.dropout": 0.1}
    full = train(store, tmp_path / "full", preset="tiny3d", overrides=over, progress=False, device="cpu")
    out = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(store, out, preset="tiny3d", overrides=over, progress=False, device="cpu", extra_callbacks=[_Kill(5)])
    train(store, out, resume=True, progress=False, device="cpu")
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_3d_loss_applies_the_2d_perceptual_network_per_axial_slice(tiny_store, tmp_path, fast_3d):
    pytest.importorskip("deepbet")
    over = {**fast_3d, "loss.perceptual": "deepbet", "loss.perceptual_weight": 1e-3, "trainer.max_epochs": 1,
            "trainer.limit_train_batches": 2}
    out = train(tiny_store[1], tmp_path / "perc", preset="tiny3d", overrides=over, progress=False, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["perceptual"] == "deepbet"
    from synth7t.training.module import axial_slices

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5)
    s = axial_slices(x)
    assert s.shape == (6, 1, 4, 5) and torch.equal(s[4, 0], x[1, 0, 1])
