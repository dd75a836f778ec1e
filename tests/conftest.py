"""Shared fixtures: small synthetic volumes written as NIfTI."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """The developers' folder of real public heads (../shared/data), or None where absent."""
    env = os.environ.get("SYNTH7T_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def blob_volume():
    """A 24x28x20 ellipsoid 'brain' with an oblique, LPS-like affine."""
    from synth7t.io import Volume

    idx = np.indices((24, 28, 20)).astype(np.float32)
    c = np.array([12, 14, 10], dtype=np.float32)[:, None, None, None]
    r = np.array([9, 11, 7], dtype=np.float32)[:, None, None, None]
    d = (((idx - c) / r) ** 2).sum(0)
    data = np.where(d < 1, 100 + 50 * idx[0] / 24, 0).astype(np.float32)
    data[15, 9, 12] = 500.0  # a unique landmark
    theta = np.deg2rad(12)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    lin = rot @ np.diag([-1.2, -0.9, 1.5])  # L and P flips: LPS-oriented, oblique
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = [30.0, 20.0, -15.0]
    return Volume(data, aff)


def _tests_module(relpath: str, name: str):
    """A helper module of tests/ loaded by path (tests run with --import-mode=importlib: tests/ is not on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset_fixtures():
    """The synthetic work-folder builders of tests/dataset/conftest.py (one source for both suites)."""
    return _tests_module("dataset/conftest.py", "synth7t_dataset_fixtures")


@pytest.fixture(scope="session")
def browser_helper():
    """tests/browser.py: ``chromium()``, ``artifact_dir()``."""
    return _tests_module("browser.py", "synth7t_test_browser")


@pytest.fixture(scope="session")
def chromium(browser_helper):
    """One headless Chromium for the session (tests/browser.py); skips where absent, fails under CI=true."""
    with browser_helper.chromium() as browser:
        yield browser


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """(work, store): 8 synthetic subjects, packed with in-plane sizes divisible by 8."""
    from synth7t.dataset.pack import pack

    root = tmp_path_factory.mktemp("tiny")
    work = _dataset_fixtures().make_work(root, 8)
    store = root / "store"
    pack(work, store, multiple=8, seed=0, split=(5, 1, 2), progress=False)
    return work, store


# a small, quick configuration of the tiny preset: 2 epochs of 6 batches
FAST_TRAINING = {"trainer.max_epochs": 2, "loss.perceptual": "none", "data.batch_size": 8,
                 "trainer.log_every_n_steps": 1, "trainer.limit_train_batches": 6, "model.channels": 8,
                 "model.n_groups": 4, "model.head_dim": 8, "data.patch": 16}


@pytest.fixture(scope="session")
def fast_training():
    return dict(FAST_TRAINING)


@pytest.fixture(scope="session")
def tiny_model(tiny_store, tmp_path_factory):  # noqa: D401
    """A model folder trained briefly (FAST_TRAINING) on the tiny store."""
    from synth7t.training import train

    out = tmp_path_factory.mktemp("model") / "run"
    return train(tiny_store[1], out, preset="tiny", overrides=FAST_TRAINING, progress=False)


# the tiny3d preset, smaller still: 16^3 cubes, 2 epochs of 3 batches of 2, validation each epoch
FAST_3D = {"data.patch3d": 16, "data.batch_size": 2, "data.patches_per_subject": 2, "data.val_patches": 2,
           "trainer.max_epochs": 2, "trainer.limit_train_batches": 3, "trainer.val_every_n_epochs": 1,
           "trainer.log_every_n_steps": 1, "trainer.threads": 1}


@pytest.fixture(scope="session")
def fast_3d():
    return dict(FAST_3D)


@pytest.fixture(scope="session")
def tiny3d_model(tiny_store, tmp_path_factory):
    """A 3-D patch model folder (tiny3d preset, FAST_3D) trained briefly on the tiny store."""
    from synth7t.training import train

    out = tmp_path_factory.mktemp("model3d") / "run"
    return train(tiny_store[1], out, preset="tiny3d", overrides=FAST_3D, progress=False, device="cpu")


def shared_heads() -> list[Path]:
    """Every NIfTI head in ../shared/data/heads (empty where the folder is absent)."""
    root = shared_data()
    return sorted((root / "heads").glob("*.nii.gz")) if root else []


def pytest_generate_tests(metafunc):
    """Tests taking a ``real_head`` argument run once per real head, or are skipped where there are none."""
    if "real_head" in metafunc.fixturenames:
        heads = shared_heads()
        params = heads or [pytest.param(None, marks=pytest.mark.skip(reason="../shared/data/heads not present"))]
        metafunc.parametrize("real_head", params, ids=lambda p: p.name if p else "absent")


def pytest_addoption(parser):
    parser.addoption("--regen-golden", action="store_true", default=False,
                     help="Rewrite tests/data/golden_*.json from the current code instead of comparing with them "
                          "(tests/inference/test_golden.py); review and commit the diff with the change that "
                          "caused it.")


@pytest.fixture
def regen_golden(request) -> bool:
    return bool(request.config.getoption("--regen-golden"))
