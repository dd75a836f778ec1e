"""Augmentations: reproducibility (draw / apply / replay), GMM mapping continuity and monotonicity, each transform."""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest

from synth7t.dataset.augment import (
    AugmentConfig,
    Augmenter,
    BiasField,
    Blur,
    DropCovariates,
    ElasticDeformation,
    GMMAugment,
    GMMIntensity,
    IntensityScale,
    Noise,
    RandomGMMIntensity,
    dense_displacement,
    from_records,
    replay,
)
from synth7t.dataset.gmm import GMMFit, fit_gmm, gmm_map, gmm_map_table
from synth7t.dataset.slices import SliceDataset

ALL_ON = {k: {"enabled": True} for k in ("gmm", "elastic", "blur", "bias", "scale", "noise")}
ALL_ON["covariates"] = {"enabled": True, "p_drop": 1.0}


def _sample(rng, s=3, hw=(32, 40)):
    x = np.zeros((s, *hw), np.float32)
    x[:, 6:26, 8:30] = rng.uniform(0.05, 1.0, (s, 20, 22))
    mask = (x[s // 2 : s // 2 + 1] > 0).astype(np.float32)
    return {"input": x, "target": x[s // 2 : s // 2 + 1] * 0.9, "mask": mask, "context": np.zeros(7, np.float32),
            "subject": "a", "slice": 3, "augment": "[]"}


def _smoothness(x):
    """(empty bins, max ratio of adjacent bin counts) of a 100-bin histogram over the 0.5-99.5 % range."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    h, _ = np.histogram(x, bins=100, range=(lo, hi))
    r = np.maximum(h[1:], 1) / np.maximum(h[:-1], 1)
    return int((h == 0).sum()), float(max(r.max(), (1 / r).max()))


def test_gmm_monotone_and_soft_maps_are_continuous_and_hard_map_is_not():
    fit = GMMFit((0.2, 0.5, 0.75), (0.07, 0.06, 0.05), (0.3, 0.4, 0.3))
    rng = np.random.default_rng(0)
    k = rng.choice(3, 300_000, p=fit.weights)
    v = rng.normal(np.asarray(fit.means)[k], np.asarray(fit.stds)[k])
    v = v[(v > 0) & (v < 1)]
    new_means, new_stds = (0.17, 0.46, 0.83), (0.07, 0.05, 0.05)
    empty0, ratio0 = _smoothness(v)
    assert empty0 == 0 and ratio0 < 2.0  # the original histogram is smooth
    for method in ("monotone", "soft"):
        empty, ratio = _smoothness(gmm_map(v, fit, new_means, new_stds, method=method))
        assert empty == 0 and ratio < 2.0, method  # no gap, no spike
    empty_h, ratio_h = _smoothness(gmm_map(v, fit, new_means, new_stds, method="hard"))
    assert empty_h > 0 and ratio_h > 10  # the thesis' hard assignment leaves a gap (figure 16)
    fast = gmm_map_table(v, fit, new_means, new_stds)  # what GMMIntensity uses
    assert np.abs(fast - gmm_map(v, fit, new_means, new_stds)).max() < 1e-5
    assert _smoothness(fast)[0] == 0


def test_gmm_map_is_monotone_for_every_draw_of_a_seeded_sweep():
    # realistic fits (a 3T brain's GM and WM peaks are close, thesis fig. 14) and strong augmentation settings
    fits = [GMMFit((0.25, 0.55, 0.72), (0.1, 0.07, 0.05), (0.2, 0.45, 0.35)),
            GMMFit((0.3, 0.62, 0.68), (0.12, 0.05, 0.06), (0.2, 0.4, 0.4)),
            GMMFit((0.2, 0.5, 0.8), (0.05, 0.05, 0.05), (1 / 3, 1 / 3, 1 / 3))]
    random = RandomGMMIntensity(GMMAugment(enabled=True, mean_shift=0.15, std_scale=0.6))
    grid = np.linspace(-0.05, 1.05, 8001)
    soft_inversions = 0
    for i in range(300):
        fit = fits[i % len(fits)]
        t = random.draw(np.random.default_rng([7, i]), (8, 8), fit)
        mapped = gmm_map(grid, fit, t.new_means, t.new_stds)
        assert np.all(np.diff(mapped) >= 0), f"draw {i}: the monotone map decreases somewhere"
        sample = {"input": np.linspace(0.01, 1, 64, dtype=np.float32).reshape(1, 8, 8)}
        out = t(sample)["input"].ravel()  # the transform itself (grid table + interpolation)
        assert np.all(np.diff(out) >= 0)
        soft_inversions += np.any(np.diff(gmm_map(grid, fit, t.new_means, t.new_stds, method="soft")) < -1e-6)
    assert soft_inversions > 0  # the posterior-weighted map does invert contrast locally: the check can fail


def test_gmm_map_identity_and_component_formula():
    fit = GMMFit((0.2, 0.5, 0.8), (0.05, 0.05, 0.05), (1 / 3, 1 / 3, 1 / 3))
    v = np.linspace(0.0, 1.0, 101)
    assert np.allclose(gmm_map(v, fit, fit.means, fit.stds), v, atol=1e-6)
    # at a component's mean (far from the others) v' = mu'_k
    out = gmm_map(np.array([0.2, 0.8]), fit, (0.25, 0.5, 0.7), (0.05, 0.05, 0.1))
    assert out == pytest.approx([0.25, 0.7], abs=1e-4)
    # one sigma above the WM mean: about mu' + 1 * sigma' (the slope sigma'/sigma = 2 at the WM mean is limited
    # to ~1.8 by the monotonicity condition on the steep GM->WM piece, hence a looser tolerance)
    assert gmm_map(np.array([0.85]), fit, (0.2, 0.5, 0.7), (0.05, 0.05, 0.1))[0] == pytest.approx(0.8, abs=0.01)
    # without limiting (a gentle neighbour), exactly the thesis' mu' + sigma'
    assert gmm_map(np.array([0.85]), fit, (0.2, 0.5, 0.85), (0.05, 0.05, 0.1))[0] == pytest.approx(0.95, abs=1e-6)


def test_fit_gmm_recovers_sorted_components():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(0.7, 0.04, 40000), rng.normal(0.2, 0.05, 20000), rng.normal(0.45, 0.05, 30000)])
    v = np.concatenate([v, np.zeros(2000), np.ones(2000)])  # clipping spikes are ignored
    fit = fit_gmm(v, seed=0)
    assert fit.means == pytest.approx((0.2, 0.45, 0.7), abs=0.01)
    assert fit.stds == pytest.approx((0.05, 0.05, 0.04), abs=0.01)
    assert fit.weights == pytest.approx((2 / 9, 3 / 9, 4 / 9), abs=0.02)
    assert GMMFit.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit
    with pytest.raises(ValueError, match="too few"):
        fit_gmm(np.full(10, 0.5))


def test_defaults_are_off():
    cfg = AugmentConfig()
    assert not cfg.any_enabled
    s = _sample(np.random.default_rng(0))
    out = Augmenter(cfg)(s)
    assert out["augment"] == "[]" and np.array_equal(out["input"], s["input"])
    with pytest.raises(pydantic.ValidationError):
        AugmentConfig.model_validate({"gmm": {"enabled": True, "mean_shift": -1}})
    with pytest.raises(pydantic.ValidationError):
        AugmentConfig.model_validate({"sharpen": {"enabled": True}})
    with pytest.raises(pydantic.ValidationError):
        AugmentConfig.model_validate({"blur": {"enabled": True, "max_sigma": -1}})


def test_replay_is_identical_and_records_round_trip():
    rng = np.random.default_rng(2)
    s = _sample(rng)
    gmm = GMMFit((0.2, 0.5, 0.8), (0.08, 0.08, 0.08), (0.3, 0.4, 0.3))
    aug = Augmenter(AugmentConfig.model_validate(ALL_ON), seed=7)
    out = aug(s, gmm=gmm)
    records = json.loads(out["augment"])
    assert [r["name"] for r in records] == ["gmm", "elastic", "blur", "bias", "scale", "noise", "covariates"]
    again = replay(s, out["augment"])
    for key in ("input", "target", "mask"):
        assert np.array_equal(again[key], out[key]), key
    assert not np.array_equal(out["input"], s["input"])
    assert [t.record() for t in from_records(records)] == records
    out2 = aug(s, gmm=gmm)  # the augmenter's own generator moves on: new parameters
    assert out2["augment"] != out["augment"]


def test_dataset_augmentation_is_seeded_per_sample(packed):
    _, store = packed
    aug = Augmenter(AugmentConfig.model_validate(ALL_ON))
    ds = SliceDataset(store, "train", augment=aug, seed=3)
    a, b = ds[5], ds[5]
    assert a["augment"] == b["augment"] and np.array_equal(a["input"], b["input"])
    assert json.loads(a["augment"])[0]["means"] == ds.store.info(a["subject"])["gmm_t3"]["means"]
    assert np.array_equal(replay(ds.raw(5), a["augment"])["input"], a["input"])
    ds.set_epoch(1)
    assert ds[5]["augment"] != a["augment"]


def test_elastic_moves_input_target_mask_together():
    rng = np.random.default_rng(3)
    s = _sample(rng)
    s["target"] = s["input"][1:2].copy()
    zero = ElasticDeformation(tuple(tuple(tuple(0.0 for _ in range(5)) for _ in range(5)) for _ in range(2)))
    same = zero(s)
    assert np.allclose(same["input"], s["input"], atol=1e-6) and np.array_equal(same["mask"], s["mask"])
    d = np.zeros((2, 5, 5))
    d[:, 1:-1, 1:-1] = rng.uniform(-3, 3, (2, 3, 3))
    out = ElasticDeformation(tuple(map(tuple, (map(tuple, c) for c in d))))(s)
    assert np.array_equal(out["target"][0], out["input"][1])  # identical warp
    assert set(np.unique(out["mask"])) <= {0.0, 1.0}  # nearest neighbour keeps the mask binary
    assert not np.array_equal(out["mask"], s["mask"])
    # same as scipy's map_coordinates (linear / nearest, zero outside) on the dense field
    from scipy.ndimage import map_coordinates

    dense = dense_displacement(d, (32, 40))
    ii, jj = np.meshgrid(np.arange(32), np.arange(40), indexing="ij")
    coords = [ii + dense[0], jj + dense[1]]
    ref = map_coordinates(s["input"][0], coords, order=1, mode="constant")
    assert np.allclose(out["input"][0], ref, atol=1e-6)
    assert np.array_equal(out["mask"][0], map_coordinates(s["mask"][0], coords, order=0, mode="constant"))
    assert np.allclose(dense[:, ::31, ::39], 0)  # fixed border control points: corners do not move


def test_intensity_transforms_formulas():
    rng = np.random.default_rng(4)
    s = _sample(rng)
    brain = s["input"] > 0
    assert np.allclose(IntensityScale(1.1)(s)["input"], s["input"] * 1.1)
    order0 = BiasField(0, (0.2,))(s)["input"]
    assert np.allclose(order0, s["input"] * np.exp(0.2))
    lin = BiasField(1, (0.0, 0.3, 0.0))(s)["input"]  # terms (i, j): (0,0), (0,1), (1,0) -> c * v (along W)
    assert np.allclose(lin[:, 10, 29] / s["input"][:, 10, 29], np.exp(0.3 * np.linspace(-1, 1, 40)[29]))
    for kind in ("gaussian", "rician"):
        noisy = Noise(kind, 0.05, 11)(s)["input"]
        assert np.all(noisy[~brain] == 0)
        d = (noisy - s["input"])[brain]
        assert abs(d.std() - 0.05) < 0.01
    ctx = np.array([0.5, 1, 1, 0, 0, 1, 0.3], np.float32)  # age 75, F, ill, above the middle slice
    dropped = DropCovariates(True, False, True)({**s, "context": ctx})["context"]
    np.testing.assert_array_equal(dropped, np.float32([0, 0, 1, 0, 0, 0, 0.3]))  # age, group unknown; sex, position kept
    blurred = Blur((0.0, 1.5, 0.0))(s)["input"]  # along H only
    assert np.all(blurred[~brain] == 0)
    assert blurred[brain].std() < s["input"][brain].std()
    np.testing.assert_allclose(Blur((0.0, 0.0, 0.0))(s)["input"], s["input"])
    gm = GMMIntensity((0.2, 0.5, 0.8), (0.1,) * 3, (1 / 3,) * 3, (0.3, 0.5, 0.8), (0.1,) * 3)(s)["input"]
    assert np.all(gm[~brain] == 0) and np.all(gm >= 0)
    assert not np.array_equal(gm[brain], s["input"][brain])
