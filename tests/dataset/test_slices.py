"""2.5D samples: contents, edge replication, workers, pickling, memory."""

from __future__ import annotations

import gc
import json
import pickle

import numpy as np
import pytest

from synth7t.dataset.augment import AugmentConfig, Augmenter
from synth7t.dataset.context import CONTEXT_DIM, encode_context, slice_position
from synth7t.dataset.slices import SliceDataset, SliceStore, VolumeSlices, neighbour_indices
from synth7t.errors import InputError

from .conftest import write_store


def _rss_anon_kib() -> int:
    """Anonymous resident memory (heap) of this process; file-backed memmap pages are not counted."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    pytest.skip("no RssAnon in /proc/self/status")


def test_neighbour_indices_replicate_edges():
    assert neighbour_indices(0, 3, 10).tolist() == [0, 0, 1]
    assert neighbour_indices(9, 5, 10).tolist() == [7, 8, 9, 9, 9]
    assert neighbour_indices(np.array([0, 5]), 3, 10).tolist() == [[0, 0, 1], [4, 5, 6]]
    with pytest.raises(ValueError, match="odd"):
        neighbour_indices(0, 2, 10)


def test_sample_matches_the_store(packed):
    _, store_dir = packed
    store = SliceStore(store_dir)
    ds = SliceDataset(store, "train", n_slices=5)
    meta = json.loads((store_dir / "store.json").read_text())
    expected = sum(len(meta["subjects"][n]["valid_slices"]) for n in meta["splits"]["train"])
    assert len(ds) == expected
    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        name, z = item["subject"], item["slice"]
        t3 = np.load(store_dir / name / "t3.npy")
        Z, H, W = t3.shape
        assert item["input"].shape == (5, H, W) and item["input"].dtype == np.float32
        assert item["target"].shape == item["mask"].shape == (1, H, W)
        assert np.array_equal(item["input"][2], t3[z].astype(np.float32))  # middle slice = packed slice z
        assert np.array_equal(item["input"][0], t3[max(z - 2, 0)].astype(np.float32))
        assert np.array_equal(item["target"][0], np.load(store_dir / name / "t7.npy")[z].astype(np.float32))
        info = meta["subjects"][name]
        ctx = encode_context(info["age"], info["sex"], info["group"], slice_position(z, (Z - 1) / 2, Z))
        assert item["context"].shape == (CONTEXT_DIM,) and np.array_equal(item["context"], ctx)
        assert z in info["valid_slices"] and item["augment"] == "[]"


def test_edge_slice_is_replicated(tmp_path):
    write_store(tmp_path / "st", 1, shape=(4, 32, 32))
    ds = SliceDataset(tmp_path / "st", "train", n_slices=3)
    t3 = np.load(tmp_path / "st" / "m0000" / "t3.npy").astype(np.float32)
    first, last = ds[0], ds[3]
    assert (first["slice"], last["slice"]) == (0, 3)
    assert np.array_equal(first["input"], t3[[0, 0, 1]])
    assert np.array_equal(last["input"], t3[[2, 3, 3]])


def test_predict_split_has_no_target(packed):
    _, store_dir = packed
    ds = SliceDataset(store_dir, "predict", n_slices=3)
    item = ds[0]
    assert item["subject"] == "znot7" and "target" not in item
    with pytest.raises(InputError, match="no t7 array"):
        ds.store.array("znot7", "t7")
    with pytest.raises(ValueError, match="split must be"):
        SliceDataset(store_dir, "training")


def test_store_pickles_without_open_memmaps(packed):
    _, store_dir = packed
    store = SliceStore(store_dir)
    a = store.array("s000", "t3")
    assert isinstance(a, np.memmap)
    blob = pickle.dumps(store)
    assert len(blob) < 200_000 and b"memmap" not in blob
    copy = pickle.loads(blob)
    assert copy._open == {} and np.array_equal(copy.array("s000", "t3"), a)


def test_dataloader_with_two_workers(packed):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    _, store_dir = packed
    aug = Augmenter(AugmentConfig.model_validate({"noise": {"enabled": True}, "elastic": {"enabled": True}}))
    ds = SliceDataset(store_dir, "train", n_slices=3, augment=aug, seed=1)
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(b["input"].shape[0] for b in batches) == len(ds)
    b = batches[1]
    assert b["input"].dtype == torch.float32 and b["input"].shape[1] == 3
    assert b["context"].shape == (4, CONTEXT_DIM) and len(b["augment"]) == 4
    # per-sample generators: the workers' samples equal the main process' ones
    for j in range(4):
        assert torch.equal(b["input"][j], torch.from_numpy(ds[4 + j]["input"]))
        assert b["augment"][j] == ds[4 + j]["augment"]


def test_epoch_over_many_subjects_does_not_load_them(tmp_path):
    write_store(tmp_path / "big", 150, shape=(20, 64, 96))  # 150 x 20 x 64 x 96 x 5 B = 92 MB
    ds = SliceDataset(tmp_path / "big", "train", n_slices=3)
    assert len(ds) == 3000
    gc.collect()
    before = _rss_anon_kib()
    total = 0.0
    for i in range(len(ds)):
        total += float(ds[i]["input"][1, 0, 0])
    gc.collect()
    grown_mib = (_rss_anon_kib() - before) / 1024
    store_mib = 150 * 20 * 64 * 96 * 5 / 2**20
    assert isinstance(ds.store.array("m0000", "t3"), np.memmap)
    assert len(ds.store._open) <= ds.store.max_open
    assert grown_mib < 0.1 * store_mib, (grown_mib, store_mib)


def test_volume_slices_batches(tmp_path):
    stack = np.arange(5 * 2 * 3, dtype=np.float16).reshape(5, 2, 3)
    vs = VolumeSlices(stack, 3, batch_size=2, age=80, sex="M", group=None)
    batches = list(vs)
    assert len(vs) == len(batches) == 3
    assert [b["slice"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[0]["input"].shape == (2, 3, 2, 3) and batches[0]["input"].dtype == np.float32
    assert np.array_equal(batches[0]["input"][0], stack[[0, 0, 1]].astype(np.float32))
    assert np.array_equal(batches[2]["input"][0], stack[[3, 4, 4]].astype(np.float32))
    assert batches[2]["context"][0].tolist() == pytest.approx([1.0, 1.0, 0, 1, 0, 0, (4 - 2) / 2.5])


def test_standardized_sample_is_the_predictors_map(packed):
    """A training sample's standardized input (float16 table look-up) equals standardize_input of its slices,
    the function predict and evaluate apply to a whole stack."""
    from synth7t.intensity import quantiles, standardization_table, standardize_input

    _, store_dir = packed
    store = SliceStore(store_dir)
    rng = np.random.default_rng(3)
    record = {"method": "histmatch", "reference_quantiles": quantiles(rng.beta(5, 2, 4000))}
    ds = SliceDataset(store, "train", n_slices=3, standardize=record)
    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        name, z = item["subject"], item["slice"]
        t3 = np.load(store_dir / name / "t3.npy").astype(np.float32)
        table = standardization_table(record, store.brain_values(name, "t3"))
        expected = standardize_input(t3[neighbour_indices(z, 3, t3.shape[0])], record, table=table)
        assert item["input"].dtype == np.float32 and np.array_equal(item["input"], expected)
        assert not np.array_equal(item["input"], t3[neighbour_indices(z, 3, t3.shape[0])])  # it did map
