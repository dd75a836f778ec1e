"""Fixtures of the published-model tests: the authors' layout at small settings, saved as their script saved it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent

# the authors' settings format (a dict literal with tuples), at small settings
SMALL = {"n_epochs": 4, "n_channels": 16, "num_groups": 4, "use_mid_attention": True, "n_res_block": 1,
         "channel_mult": (1, 2, 2), "attention_res": [2, 4], "size_batch": 56, "n_in_slices": 3,
         "lr": 0.0001, "decay": (1, 0.5), "conditions": ["Sex", "Age", "position"], "block_method": "slices",
         "normalization_method": "min_max", "clip": (1, 99), "test_size": 1, "train_size": 5, "n_slices": 14,
         "c_dim": 1, "slice_dim": 1, "slice_size": (24, 22), "use_initial_down": False, "use_ada": True,
         "use_spatial_transformer": True, "padding": None}
TEMPLATE_SHAPE = (24, 14, 22)  # axis 1 is the slice axis: slices of 24 x 22, padded to 24 x 24


def reference_module():
    spec = importlib.util.spec_from_file_location("synth7t_thesis_reference", HERE / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_net(params: dict = SMALL, seed: int = 0):
    ref = reference_module()
    net = ref.ReferenceUNet(in_ch=params["n_in_slices"], ch=params["n_channels"], mult=params["channel_mult"],
                            n_res=params["n_res_block"], attn=tuple(params["attention_res"]),
                            groups=params["num_groups"], ctx_dim=params["c_dim"],
                            mid_attention=params["use_mid_attention"])
    return ref.randomize(net, seed).eval()


class Payload:
    """Something a pickle would run on loading: it must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_authors_checkpoint(net, path: Path, payload_marker: Path | None = None) -> Path:
    """As the authors' training script saves (an nn.DataParallel state dict, Adam state, a DataFrame of losses)."""
    import pandas as pd

    wrapped = torch.nn.DataParallel(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    ckpt = {"epoch": 4, "model_state_dict": wrapped.state_dict(), "opti_state_dict": opt.state_dict(),
            "saved_losses": pd.DataFrame({"train_l1": [0.1, 0.09], "train_perc": [1.0, 0.9]}),
            "idx_test": np.array([3, 7])}
    if payload_marker is not None:
        ckpt["payload"] = Payload(payload_marker)
    torch.save(ckpt, path)
    return path


def template_volume(shape=TEMPLATE_SHAPE, seed: int = 0):
    """A smooth 'brain' on an oblique 0.65 mm grid: non-zero inside an ellipsoid."""
    from synth7t.io import Volume

    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    c = (np.array(shape, np.float32) - 1) / 2
    d = sum(((idx[i] - c[i]) / (0.42 * shape[i])) ** 2 for i in range(3))
    data = np.where(d < 1, 80 + 40 * np.sin(idx[0] / 3) * np.cos(idx[2] / 4) + rng.normal(0, 3, shape), 0)
    aff = np.array([[0.0, 0.65, 0.0, -5.0], [-0.65, 0.0, 0.0, 8.0], [0.0, 0.0, 0.65, -4.0], [0, 0, 0, 1]])
    return Volume(data.astype(np.float32), aff)


@pytest.fixture(scope="session")
def authors_files(tmp_path_factory):
    """(checkpoint, params, template_7T, template_3T, template affine, reference net) at small settings."""
    from synth7t.io import save_volume
    from synth7t.preprocess.register import write_itk_affine

    root = tmp_path_factory.mktemp("authors")
    net = reference_net()
    ckpt = save_authors_checkpoint(net, root / "my_unet_small.pt")
    params = root / "params_small.txt"
    params.write_text(str(SMALL) + "\n")
    t7 = save_volume(root / "template_7T.nii.gz", template_volume())
    t3v = template_volume(seed=1)
    t3 = save_volume(root / "template_3T.nii.gz", t3v.with_data(t3v.data * 0.8))
    aff = write_itk_affine(np.eye(4), root / "template_3T_to_7T.mat")
    return {"checkpoint": ckpt, "params": params, "template_7t": t7, "template_3t": t3, "affine": aff, "net": net,
            "root": root}


@pytest.fixture(scope="session")
def imported_model(authors_files, tmp_path_factory):
    from synth7t.thesis import import_thesis

    out = tmp_path_factory.mktemp("imported") / "model"
    f = authors_files
    return import_thesis(f["checkpoint"], f["params"], f["template_7t"], out, template_3t=f["template_3t"],
                         template_affine=f["affine"])


@pytest.fixture(scope="session")
def thesis():
    """This module's helpers (tests run with --import-mode=importlib: a test cannot import its conftest)."""
    import sys

    return sys.modules[__name__]
