"""A fine-tuning start from a published model: `pack --like` lays a lab's pairs out as the authors' training did,
and `train --init` fine-tunes the imported network into a model folder that predicts the same way."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from synth7t.errors import ConfigError

HERE = Path(__file__).resolve().parent
FINETUNE = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "trainer.log_every_n_steps": 1,
            "loss.perceptual": "none", "data.batch_size": 4, "data.patch": 16, "trainer.threads": 1}


def _dataset_fixtures():
    spec = importlib.util.spec_from_file_location("synth7t_dataset_fixtures_ft", HERE.parent / "dataset" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def like_setup(thesis, tmp_path_factory):
    """(work, model, store): 6 synthetic pairs, a published-layout model whose template is one subject's 7T grid
    (40 x 48 x 30, slices along axis 1: 40 x 30 padded to 40 x 32), and the store packed like it."""
    from synth7t.io import load_volume, save_volume
    from synth7t.thesis import import_thesis, pack_like

    root = tmp_path_factory.mktemp("like")
    work = _dataset_fixtures().make_work(root, 6)
    params = {**thesis.SMALL, "slice_size": (40, 30), "n_slices": 48}
    ckpt = thesis.save_authors_checkpoint(thesis.reference_net(params), root / "ck.pt")
    (root / "p.txt").write_text(str(params))
    s0 = load_volume(work / "s000" / "t7.nii.gz")
    template = save_volume(root / "t7.nii.gz", s0)
    model = import_thesis(ckpt, root / "p.txt", template, root / "model")
    store = pack_like(work, root / "store", model, split=(4, 1, 1), seed=0, progress=False)
    return work, model, store.parent


def test_pack_like_lays_pairs_out_as_the_authors_trained(like_setup, thesis):
    from synth7t.dataset.slices import SliceDataset, SliceStore
    from synth7t.io import load_volume

    work, model, store_dir = like_setup
    store = SliceStore(store_dir)
    meta = store.meta
    assert store.on_template and meta["layout"] == "template" and store.hw == (40, 32)
    assert meta["context"] == {"tokens": ["Sex", "Age", "position"], "n_slices_position": 48}
    assert (store_dir / "template" / "template_7T.nii.gz").is_file()
    assert sorted(meta["splits"]["train"] + meta["splits"]["val"] + meta["splits"]["test"]) == store.subjects
    info = store.info("s000")
    assert info["shape"] == [48, 40, 32]
    # s000 is the template itself: its registration is (nearly) the identity
    assert np.allclose(info["template_to_subject"], np.eye(4), atol=0.05)
    t3 = np.asarray(store.array("s000", "t3"), np.float32)
    mask = np.asarray(store.array("s000", "mask")) > 0
    brain = t3[mask]
    assert abs(np.percentile(brain, 1)) < 0.02 and abs(np.percentile(brain, 99) - 1) < 0.02  # (x - p1)/(p99 - p1)
    assert (t3[:, :, 1:-1][~mask[:, :, 1:-1]] < 0).all()  # not clipped: the background is negative
    assert (t3[:, :, 0] == 0).all() and (t3[:, :, -1] == 0).all()  # the authors' zero padding, 30 -> 32
    t7 = np.asarray(store.array("s000", "t7"), np.float32)
    assert t7.max() <= 1.5
    # against the volume itself, by hand: slices along axis 1 of the template grid
    vol = load_volume(work / "s000" / "t3.nii.gz").data
    v = vol[vol > 0]
    want = (vol - np.percentile(v, 1)) / (np.percentile(v, 99) - np.percentile(v, 1))
    want = np.pad(np.transpose(want, (1, 0, 2)), ((0, 0), (0, 0), (1, 1)))
    inner = mask & (np.abs(want) < 5)
    assert np.median(np.abs(t3 - want)[inner]) < 0.05
    # a sample: the window j..j+2 and the 7T slice j, with the model's covariate tokens
    ds = SliceDataset(store, "train", n_slices=3)
    name, j = ds.locate(0)
    sample = ds[0]
    assert np.array_equal(sample["input"], np.asarray(store.array(name, "t3")[j:j + 3], np.float32))
    assert np.array_equal(sample["target"][0], np.asarray(store.array(name, "t7")[j], np.float32))
    sinfo = store.info(name)
    pos = 2 * (j - sinfo["z_mid"]) / 48
    assert np.allclose(sample["context"][:, 0], [1.0 if sinfo["sex"] == "F" else 0.0, sinfo["age"], pos])
    assert max(store.valid_slices(name)) <= 48 - 3


def test_train_init_fine_tunes_a_published_model(like_setup, thesis, tmp_path):
    from synth7t.inference import PredictOptions, predict
    from synth7t.io import save_volume
    from synth7t.model_folder import load_generator
    from synth7t.training import train

    work, model, store = like_setup
    out = train(store, tmp_path / "ft", preset="tiny", overrides=FINETUNE, init=model, progress=False, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["kind"] == "thesis_published" and cfg["init_from"]["preset"] == "thesis_published"
    assert cfg["template"]["file"] == "template_7T.nii.gz" and (out / "template_7T.nii.gz").is_file()
    assert cfg["requires_covariates"] == ["sex", "age"] and cfg["normalization"]["method"] == "published"
    assert cfg["train_config"]["data"]["standardize"] == "none"
    net, _ = load_generator(out)
    src, _ = load_generator(model)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(net.state_dict().values(), src.state_dict().values(),
                                                           strict=True))
    assert moved > 0  # the weights were trained
    # and it predicts the way the imported model does: on the template grid and back
    from synth7t.io import load_volume

    scan = save_volume(tmp_path / "x_T1w.nii.gz", load_volume(work / "s001" / "t3.nii.gz"))
    res = predict(out, [scan], tmp_path / "pred", PredictOptions(preprocessed=True, age=66, sex="M", device="cpu"),
                  progress=False)
    assert not res.failed, res.failed
    assert (tmp_path / "pred" / "x_T1w" / "syn7t_space-thesis7T.nii.gz").is_file()


def test_stores_and_models_must_match(like_setup, tmp_path, tiny_store):
    from synth7t.training import train

    work, model, store = like_setup
    with pytest.raises(ConfigError, match="pack the store onto it"):
        train(tiny_store[1], tmp_path / "a", preset="tiny", overrides=FINETUNE, init=model, progress=False,
              device="cpu")
    with pytest.raises(ConfigError, match="add --init"):
        train(store, tmp_path / "b", preset="tiny", overrides=FINETUNE, progress=False, device="cpu")
    with pytest.raises(ConfigError, match="data.standardize"):
        train(store, tmp_path / "c", preset="tiny", overrides={**FINETUNE, "data.standardize": "histmatch"},
              init=model, progress=False, device="cpu")


def test_evaluate_refuses_template_models_in_one_line(like_setup, tmp_path):
    from synth7t.errors import InputError
    from synth7t.evaluation.evaluate import evaluate

    work, model, store = like_setup
    with pytest.raises(InputError, match="not supported by it yet"):
        evaluate(model, store, tmp_path / "report", device="cpu", progress=False)
