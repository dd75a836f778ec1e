"""Golden regression test: a fixed model and a fixed input give a stored prediction.

The model is built inside the test, deterministically: ``torch.manual_seed(0)``, the ``tiny`` preset's U-net
on the CPU in float32 with one thread; its zero-initialised layers (which make an untrained residual U-net
return its middle input slice unchanged) are then filled from a seeded generator, so that every layer shapes the
output. The input is a synthetic 0.65 mm "brain" computed from formulas (no random numbers). The prediction runs
through the public inference path (:class:`synth7t.inference.Predictor` + :func:`synth7t.inference.predict_volume`,
as ``synth7t predict --preprocessed`` uses them: canonical reorientation, resampling, crop/pad, clipped min-max
normalization, the network, uncrop) and is compared with ``tests/data/golden_prediction.json``: the middle axial
slice at every second voxel plus whole-volume sums.

Tolerance: 1e-4 absolute on every stored value (the outputs lie in [0, 1]). Thread counts and BLAS/oneDNN
kernels change float32 sums in their last bits (around 1e-6 here); a change to the network, the
normalization, the resampling or the geometry moves values by far more than 1e-4.

When a change is *meant* to alter predictions, regenerate the golden file and commit it with the change::

    pytest tests/inference/test_golden.py --regen-golden
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_prediction.json"
TOLERANCE = 1e-4
SHAPE = (40, 48, 24)


def _golden_model(folder: Path) -> Path:
    import torch

    from synth7t.config import load_config
    from synth7t.model_folder import save_model_folder
    from synth7t.nn import UNet
    from synth7t.training import model_config

    cfg = load_config("tiny")
    torch.manual_seed(0)
    net = UNet(cfg.model).float()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            if not torch.any(p):  # zero-initialised (e.g. the last residual convolutions)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    config = model_config(cfg, None, net)  # untrained: 0.65 mm grid, no input standardization
    return save_model_folder(folder, net.state_dict(), config, {}, "# golden test model\n")


def _golden_input():
    from synth7t.io import Volume

    idx = np.indices(SHAPE).astype(np.float64)
    c = (np.asarray(SHAPE, np.float64) / 2)[:, None, None, None]
    r = np.asarray([16, 19, 10], np.float64)[:, None, None, None]
    d = np.sqrt((((idx - c) / r) ** 2).sum(0))
    tissue = np.where(d < 0.45, 900.0, np.where(d < 0.8, 600.0, 300.0))
    texture = 40 * np.sin(idx[0] / 2.3) * np.cos(idx[1] / 3.1) + 25 * np.sin(idx[2] / 1.7 + idx[0] / 5.0)
    data = ((tissue + texture) * (d < 1.0)).astype(np.float32)
    return Volume(data, np.diag([0.65, 0.65, 0.65, 1.0]), "golden-input")


def _summary(pred: np.ndarray) -> dict:
    mid = pred[:, :, pred.shape[2] // 2]
    return {"shape": list(pred.shape), "middle_axial_slice_every_2nd_voxel": mid[::2, ::2].round(7).tolist(),
            "sum": round(float(pred.astype(np.float64).sum()), 5),
            "sum_of_squares": round(float((pred.astype(np.float64) ** 2).sum()), 5)}


def test_golden_prediction(tmp_path, regen_golden):
    import torch

    from synth7t.inference import PredictOptions, Predictor, predict_volume

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = Predictor(_golden_model(tmp_path / "model"), "cpu", "32")
        res = predict_volume(predictor, _golden_input(), PredictOptions(preprocessed=True, device="cpu",
                                                                       precision="32"))
    finally:
        torch.set_num_threads(threads)
    pred = res["syn7t"].data
    got = _summary(pred)
    if regen_golden:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        rows = ",\n  ".join(json.dumps(row) for row in got["middle_axial_slice_every_2nd_voxel"])
        head = json.dumps({"tolerance_abs": TOLERANCE, **{k: v for k, v in got.items() if "slice" not in k}})
        GOLDEN.write_text(f'{head[:-1]},\n "middle_axial_slice_every_2nd_voxel": [\n  {rows}\n ]\n}}\n')
        pytest.skip(f"golden prediction regenerated: {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert got["shape"] == want["shape"]
    # the network changed the input: the test would not notice a network change if this were the identity
    assert 0.01 < np.abs(np.asarray(want["middle_axial_slice_every_2nd_voxel"])).mean() < 1
    np.testing.assert_allclose(got["middle_axial_slice_every_2nd_voxel"], want["middle_axial_slice_every_2nd_voxel"],
                               rtol=0, atol=TOLERANCE)
    # sums over ~10^4 brain voxels: the per-voxel tolerance scaled by the voxel count
    n = float(np.prod(want["shape"]))
    assert abs(got["sum"] - want["sum"]) <= TOLERANCE * n
    assert abs(got["sum_of_squares"] - want["sum_of_squares"]) <= 2 * TOLERANCE * n
