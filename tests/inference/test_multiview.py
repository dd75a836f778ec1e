"""Multi-view models: a folder of one network per view round-trips, the fusions (mean, median, learned), a shared
multi-view network trained end to end with its learned fusion, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synth7t.errors import ConfigError, InputError

SMALL = {"model.channels": 8, "model.n_groups": 4, "model.head_dim": 8}
VIEWS3 = "[axial,coronal,sagittal]"


def _stack(shape=(12, 16, 24), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, h, w = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (z**2 + h**2 + w**2) < 0.8
    return (inside * (0.4 + 0.4 * rng.random(shape))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# fusion


def test_fusion_of_identical_views_is_that_view():
    from synth7t.inference.fusion import apply_fusion, fuse
    from synth7t.nn.fusion import FusionConfig, FusionNet

    p = _stack()
    same = np.stack([p, p, p])
    np.testing.assert_allclose(fuse(same, "mean"), p, rtol=0, atol=1e-7)  # float32 rounding of (3 p) / 3
    np.testing.assert_array_equal(fuse(same, "median"), p)
    untrained = FusionNet(FusionConfig(n_views=3)).eval()  # its last convolution starts at zero: the mean
    np.testing.assert_allclose(apply_fusion(untrained, same), p, atol=1e-6)
    np.testing.assert_array_equal(fuse(p[None], "learned"), p)  # one view: nothing to fuse
    with pytest.raises(ConfigError, match="train-fusion"):
        fuse(same, "learned", None)
    with pytest.raises(ConfigError, match="expected one of"):
        fuse(same, "max")


def test_learned_fusion_in_slabs_equals_the_whole_volume():
    from synth7t.inference.fusion import apply_fusion
    from synth7t.nn.fusion import FusionConfig, FusionNet

    torch.manual_seed(0)
    net = FusionNet(FusionConfig(n_views=3, channels=4, layers=3)).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.normal_(0, 0.2)
    preds = np.stack([_stack(seed=s) for s in range(3)])
    whole = apply_fusion(net, preds, slab=1000)
    np.testing.assert_allclose(apply_fusion(net, preds, slab=5), whole, atol=1e-5)
    assert not np.allclose(whole, np.clip(preds.mean(0), 0, 1), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# a folder of one network per view, written without training


@pytest.fixture(scope="module")
def three_view_folder(tmp_path_factory):
    """A per_view model folder assembled (training.card.write_per_view_folder) from three untrained single-view
    folders with different weights."""
    from synth7t.config import load_config
    from synth7t.model_folder import save_model_folder
    from synth7t.nn import build_generator
    from synth7t.training.card import model_config, write_per_view_folder

    root = tmp_path_factory.mktemp("three")
    cfg = load_config("tiny", {**SMALL, "data.views": VIEWS3, "data.view_design": "per_view"})
    runs = {}
    for i, view in enumerate(cfg.data.views):
        one = load_config("tiny", {**SMALL, "data.views": [view]})
        torch.manual_seed(i)
        net = build_generator(one.model.model_dump(mode="json"))
        config = model_config(one, None, net)
        config["training_data"] = {"n_train": 0, "n_val": 0, "n_test": 0, "simulated": True}
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        runs[view] = save_model_folder(root / "views" / view, state, config, {"steps": 1, "train_seconds": 1.0},
                                       "card")
    return write_per_view_folder(root / "model", cfg, runs), runs


def test_three_view_folder_round_trips(three_view_folder):
    from safetensors.torch import load_file

    from synth7t.model_folder import load_generator, load_networks, verify_model_folder

    folder, runs = three_view_folder
    cfg = verify_model_folder(folder)
    assert cfg["views"] == ["axial", "coronal", "sagittal"] and cfg["view_design"] == "per_view"
    assert cfg["fusion"] == "mean" and not (folder / "model.safetensors").exists()
    listed = (folder / "checksums.sha256").read_text()
    for view in cfg["views"]:
        assert f"model_{view}.safetensors" in listed
        assert cfg["networks"][view]["weights"] == f"model_{view}.safetensors"
    nets, _, digest = load_networks(folder)
    assert list(nets) == ["axial", "coronal", "sagittal"] and len({id(n) for n in nets.values()}) == 3
    for view, net in nets.items():
        saved = load_file(str(runs[view] / "model.safetensors"))
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, saved[k])
    assert len(digest) == 64
    assert "Views: axial, coronal, sagittal" in (folder / "model_card.md").read_text()
    with pytest.raises(InputError, match="one network per view"):
        load_generator(folder)


def test_three_view_prediction_runs_each_view_and_fuses(three_view_folder):
    from synth7t.inference import Predictor

    folder, runs = three_view_folder
    p = Predictor(folder, "cpu")
    stack = _stack()
    views = p.predict_views(stack, age=70, sex="F")
    assert views.shape == (1, 3, *stack.shape)
    axial_only, _ = Predictor(runs["axial"], "cpu").predict_stack(stack, age=70, sex="F")
    np.testing.assert_allclose(views[0, 0], axial_only, atol=1e-5)  # the axial network is the axial run's
    mean, unc = p.predict_stack(stack, age=70, sex="F")
    np.testing.assert_allclose(mean, views[0].mean(0), atol=1e-6)
    np.testing.assert_allclose(unc, views[0].std(0), atol=1e-6)  # the views' disagreement
    median, _ = p.predict_stack(stack, age=70, sex="F", fusion="median")
    np.testing.assert_allclose(median, np.median(views[0], 0), atol=1e-6)
    flipped = p.predict_views(stack[:, ::-1, :].copy(), age=70, sex="F")  # --tta mirrors R-L whatever the view
    both, unc2 = p.predict_stack(stack, age=70, sex="F", tta=True)
    np.testing.assert_allclose(both, (views[0].mean(0) + flipped[0, :, :, ::-1, :].mean(0)) / 2, atol=1e-5)
    assert unc2.shape == stack.shape


def test_a_tampered_view_network_is_refused(three_view_folder, tmp_path):
    import shutil

    from synth7t.model_folder import load_networks

    folder = tmp_path / "copy"
    shutil.copytree(three_view_folder[0], folder)
    with (folder / "model_coronal.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(InputError, match="model_coronal.safetensors: checksum mismatch"):
        load_networks(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["networks"]["axial"]["weights"] = "../x.safetensors"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="networks name weights files"):
        load_networks(folder)


# ---------------------------------------------------------------------------------------------------------
# configuration


def test_views_config_is_checked_in_one_line():
    from synth7t.config import load_config

    shared = load_config("tiny", {"data.views": VIEWS3})
    assert shared.view_coded and shared.model.context_dim == 10
    assert load_config("tiny", {"data.views": VIEWS3, "data.view_design": "per_view"}).model.context_dim == 7
    for preset, over, match in (
        ("tiny3d", {"data.views": "[coronal]"}, "is for synth7t's 2.5D U-net"),
        ("tiny", {"data.views": VIEWS3, "model.covariates": False}, "needs model.covariates"),
        ("tiny", {"data.views": "[axial, axial]"}, "repeat a view"),
        ("tiny", {"model.context_dim": 10}, "reads 7 context values"),
    ):
        with pytest.raises(ConfigError, match=match) as err:
            load_config(preset, over)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# a shared multi-view network trained on the tiny store, and its learned fusion


@pytest.fixture(scope="module")
def shared_model(tiny_store, fast_training, tmp_path_factory):
    from synth7t.training import train

    out = tmp_path_factory.mktemp("shared") / "run"
    return train(tiny_store[1], out, preset="tiny", overrides={**fast_training, "data.views": VIEWS3},
                 progress=False, device="cpu")


def test_shared_multiview_model_trains_predicts_and_learns_a_fusion(shared_model, tiny_store, tmp_path):
    import shutil

    from synth7t.dataset.slices import SliceStore
    from synth7t.inference import Predictor
    from synth7t.inference.fusion_fit import set_fusion, train_fusion
    from synth7t.model_folder import verify_model_folder

    cfg = verify_model_folder(shared_model)
    assert cfg["views"] == ["axial", "coronal", "sagittal"] and cfg["model"]["context_dim"] == 10
    assert cfg["view_design"] == "shared" and cfg["fusion"] == "mean"
    st = SliceStore(tiny_store[1])
    stack = np.asarray(st.array(st.split_subjects("test")[0], "t3"), np.float32)
    p = Predictor(shared_model, "cpu")
    assert p.view_coded and p.fusion_net is None
    views = p.predict_views(stack)
    assert views.shape == (1, 3, *stack.shape) and not np.allclose(views[0, 0], views[0, 1])
    model = tmp_path / "model"
    shutil.copytree(shared_model, model, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    train_fusion(model, tiny_store[1], steps=3, cube=8, progress=False, device="cpu")
    cfg = verify_model_folder(model)
    assert cfg["fusion"] == "learned" and cfg["fusion_network"]["trained_on"]["split"] == "val"
    assert "fusion.safetensors" in (model / "checksums.sha256").read_text()
    assert "Fusion of the views: learned" in (model / "model_card.md").read_text()
    learned = Predictor(model, "cpu")
    assert learned.fusion == "learned" and learned.fusion_net is not None
    assert learned.checksum != p.checksum  # the fusion is part of what the outputs depend on
    fused, unc = learned.predict_stack(stack)
    assert fused.shape == stack.shape and unc is not None and np.isfinite(fused).all()
    set_fusion(model, "median")
    assert Predictor(model, "cpu").fusion == "median"
    (model / "fusion.safetensors").write_bytes(b"broken")
    with pytest.raises(InputError, match="checksum mismatch"):
        Predictor(model, "cpu")


def test_cli_train_fusion_and_fusion_options_fail_in_one_line(tiny_model, tiny_store, tmp_path):
    from typer.testing import CliRunner

    from synth7t.cli import app

    runner = CliRunner()
    single = runner.invoke(app, ["train-fusion", str(tiny_model), str(tiny_store[1])])
    assert single.exit_code != 0 and "nothing to fuse" in single.output and "--single-view" in single.output
    assert len(single.output.strip().splitlines()) == 1
    import shutil

    copy = tmp_path / "refined"
    shutil.copytree(tiny_model, copy, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    refined = runner.invoke(app, ["train-fusion", str(copy), str(tiny_store[1]), "--single-view", "--steps", "2",
                                  "--cube", "8", "--device", "cpu"])
    assert refined.exit_code == 0, refined.output
    assert json.loads((copy / "config.json").read_text())["fusion_network"]["views"] == ["axial"]
    bad = runner.invoke(app, ["evaluate", str(tiny_model), str(tiny_store[1]), "-o", str(tmp_path / "r"),
                              "--fusion", "max"])
    assert bad.exit_code != 0 and "fusion 'max'" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_per_view_training_writes_one_network_per_view(tiny_store, fast_training, tmp_path):
    from synth7t.inference import Predictor
    from synth7t.model_folder import verify_model_folder
    from synth7t.training import train

    out = train(tiny_store[1], tmp_path / "run", preset="tiny", progress=False, device="cpu",
                overrides={**fast_training, "data.views": "[coronal,sagittal]", "data.view_design": "per_view",
                           "trainer.max_steps": 6})
    cfg = verify_model_folder(out)
    assert cfg["views"] == ["coronal", "sagittal"] and set(cfg["networks"]) == {"coronal", "sagittal"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["per_view"]["coronal"]["steps"] == 3 and metrics["steps"] == 6  # an equal share each
    assert (out / "views" / "coronal" / "checksums.sha256").exists()
    pred, unc = Predictor(out, "cpu").predict_stack(np.ones((8, 16, 16), np.float32) * 0.5)
    assert pred.shape == (8, 16, 16) and unc is not None


def test_single_view_learned_refinement_is_the_fusion_network_on_one_view(tiny_model, tiny_store, tmp_path):
    """train_fusion(..., single_view=True), the benchmark's control of the learned fusion: the same 3-D CNN trained on
    a one-view model's validation predictions refines that view (its output is the network applied to the one
    view, no longer the view itself); without the keyword a one-view model is refused."""
    import shutil

    from synth7t.dataset.slices import SliceStore
    from synth7t.inference import Predictor
    from synth7t.inference.fusion import apply_fusion
    from synth7t.inference.fusion_fit import train_fusion

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    with pytest.raises(ConfigError, match="nothing to fuse"):
        train_fusion(model, tiny_store[1], steps=2, cube=8, progress=False, device="cpu")
    train_fusion(model, tiny_store[1], steps=3, cube=8, lr=0.05, progress=False, device="cpu", single_view=True)
    st = SliceStore(tiny_store[1])
    stack = np.asarray(st.array(st.split_subjects("test")[0], "t3"), np.float32)
    plain, refined = Predictor(tiny_model, "cpu"), Predictor(model, "cpu")
    assert refined.fusion == "learned" and refined.fusion_net is not None and refined.fusion_net.cfg.n_views == 1
    view = plain.predict_stack(stack)[0]
    out, unc = refined.predict_stack(stack)
    assert unc is None and not np.allclose(out, view, atol=1e-4)
    np.testing.assert_allclose(out, apply_fusion(refined.fusion_net, view[None]), atol=1e-6)
