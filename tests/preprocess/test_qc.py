"""QC finds an injected drop-out and an injected stripe pattern, and leaves clean images alone."""

import numpy as np
import pytest

from synth7t.io import Volume
from synth7t.preprocess import qc


def _dropout(brain):
    """Multiply an ellipsoid at the bottom-back of the brain by 0.05."""
    d = brain.data.copy()
    zs = np.nonzero(d.any(axis=(0, 1)))[0]
    ys = np.nonzero(d.any(axis=(0, 2)))[0]
    c = np.array([d.shape[0] / 2, ys[0] + 0.25 * (ys[-1] - ys[0]), zs[0] + 3])
    idx = np.indices(d.shape).transpose(1, 2, 3, 0)
    inside = (((idx - c) / np.array([10, 8, 5])) ** 2).sum(-1) <= 1
    d[inside] *= 0.05
    return d, int(np.nonzero(inside.any(axis=(0, 1)))[0].max())


def _stripes(data, axis=1, n_lines=6, gain=4.0, seed=0):
    """Corrupt ``n_lines`` phase-encode lines (k-space along ``axis``) by a gain and a random phase."""
    rng = np.random.default_rng(seed)
    k = np.fft.fftshift(np.fft.fft(data, axis=axis), axes=axis)
    n = data.shape[axis]
    lines = rng.choice(np.arange(n // 2 - n // 4, n // 2 + n // 4), n_lines, replace=False)
    sl = [slice(None)] * 3
    sl[axis] = lines
    k[tuple(sl)] *= gain * np.exp(1j * rng.uniform(-np.pi, np.pi))
    return np.abs(np.fft.ifft(np.fft.ifftshift(k, axes=axis), axis=axis)).astype(np.float32)


def test_clean_brain_passes(brain):
    mask = brain.data > 0
    rep = qc.corruption_min_slice(brain.data, mask, brain.zooms)
    assert rep.min_slice == 0 and rep.reasons == []
    assert qc.motion_score(brain.data, mask) < qc.MOTION_THRESHOLD


def test_dropout_found(brain):
    data, top = _dropout(brain)
    rep = qc.corruption_min_slice(data, brain.data > 0, brain.zooms)
    assert rep.dropout_ml > 1.0
    assert top - 3 <= rep.min_slice <= top + 2, (rep.min_slice, top)
    assert "drop-out" in rep.reasons[0]


def test_stripes_found(brain):
    mask = brain.data > 0
    striped = _stripes(brain.data)
    scores = qc.line_spike_spectrum(striped, mask)
    assert scores.argmax() == 1
    assert qc.motion_score(striped, mask) > qc.MOTION_THRESHOLD > qc.motion_score(brain.data, mask)


def test_decide_overrides():
    r = qc.decide(min_slice_detected=5, motion=0.1, ncc=0.95, n_slices=60, min_slice_override=9)
    assert r["min_slice"] == 9 and not r["rejected"] and not r["flagged"]
    r = qc.decide(min_slice_detected=0, motion=0.9, ncc=0.5, n_slices=60)
    assert r["rejected"] and r["flagged"] and len(r["reasons"]) == 2
    assert qc.decide(min_slice_detected=0, motion=0.0, ncc=None, n_slices=60, exclude=True)["rejected"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        qc.corruption_min_slice(np.zeros((4, 4, 4)), np.ones((4, 4, 3)), 1.0)
    with pytest.raises(ValueError, match="unknown QC parameter"):
        qc.corruption_min_slice(np.ones((8, 8, 8)), np.ones((8, 8, 8)), 1.0, bogus=1)


def test_figure(brain, tmp_path):
    qc.qc_figure(tmp_path / "qc.png", {"3T": brain.data, "7T": brain.data}, brain.data > 0, 4, "t")
    assert (tmp_path / "qc.png").read_bytes()[:4] == b"\x89PNG"


def test_csf_shell_of_a_loose_mask_is_not_dropout(brain):
    """A mask that keeps a dark CSF layer under the brain (a loosely stripped brain or template) is a thin
    shell of low signal at the surface: not cut (the former criterion, without a depth, cut it)."""
    from synth7t.preprocess.skullstrip import dilate_mm

    data = brain.data.copy()
    tight = data > 0
    zs = np.nonzero(tight.any(axis=(0, 1)))[0]
    ys = np.nonzero(tight.any(axis=(0, 2)))[0]
    box = np.zeros_like(tight)  # 5 mm of CSF around the inferior-posterior brain (cerebellum, occipital lobes)
    box[:, : ys[0] + int(0.4 * (ys[-1] - ys[0])), : zs[0] + int(0.35 * (zs[-1] - zs[0]))] = True
    loose = tight | (dilate_mm(tight, brain.zooms, 5.0) & box)
    data[loose & ~tight] = 0.03 * np.median(data[tight])  # CSF, as dark as T1-weighted CSF gets
    rep = qc.corruption_min_slice(data, loose, brain.zooms)
    assert rep.min_slice == 0 and rep.dropout_ml == 0, rep
    old = qc.corruption_min_slice(data, loose, brain.zooms, dropout_ratio=0.2, min_volume_ml=1.0, min_depth_mm=0)
    assert old.min_slice > 0  # what the former defaults did
    # the same image with a real drop-out under that mask is still cut
    bad, top = _dropout(Volume(data, brain.affine))
    assert qc.corruption_min_slice(bad, loose, brain.zooms).min_slice >= top - 3


def test_demo_dropout_profile_found(brain):
    """The demo's 'corrupt_cerebellum' profile (demo._dropout: ``1 - 0.9 exp(-d^4)``, radii 28 x 22 x 10-16 mm)
    in the cerebellum of the test brain (2.5 mm) is cut above it, for several draws."""
    mask = brain.data > 0
    zs = np.nonzero(mask.any(axis=(0, 1)))[0]
    ys = np.nonzero(mask.any(axis=(0, 2)))[0]
    z = np.asarray(brain.zooms)
    g = np.indices(brain.shape).transpose(1, 2, 3, 0) * z
    rng = np.random.default_rng(0)
    for _ in range(3):
        c = np.array([brain.shape[0] / 2 * z[0] + rng.uniform(-15, 15), ys[0] * z[1] + 40 + rng.uniform(-6, 6),
                      zs[0] * z[2] + 20 + rng.uniform(0, 12)])
        radii = np.array([28.0, 22.0, 10.0 + rng.uniform(0, 6)])
        factor = 1 - 0.9 * np.exp(-((((g - c) / radii) ** 2).sum(-1) ** 2))
        rep = qc.corruption_min_slice(brain.data * factor, mask, brain.zooms)
        assert rep.dropout_ml > 1.0 and "drop-out" in rep.reasons[0]
        assert rep.min_slice * z[2] >= c[2], (rep, c)  # the cut is above the drop-out's centre


def test_depth_ignores_the_field_of_view_edge():
    mask = np.ones((20, 20, 10), bool)
    d = qc.depth_mm(mask, (1.0, 1.0, 2.0))
    assert d.min() > 100  # no outside at all: the edges of the array are not the brain's surface
    mask[:, :, 5:] = False
    d = qc.depth_mm(mask, (1.0, 1.0, 2.0))
    assert d[10, 10, 4] == 2.0 and d[10, 10, 0] == 10.0


def test_exact_zero_holes_are_outside_the_mask(brain):
    """Exact zeros under a filled mask (a hole an earlier skull strip cut) are not drop-out; the same region
    with a measured, if tiny, signal is."""
    data, top = _dropout(brain)
    mask = brain.data > 0
    hole = (data < brain.data) & mask  # the ellipsoid at the bottom-back of the brain
    holed = np.where(hole, 0.0, brain.data).astype(np.float32)
    assert qc.corruption_min_slice(holed, mask, brain.zooms).min_slice == 0
    faint = np.where(hole, 0.01 * brain.data, brain.data).astype(np.float32)
    assert qc.corruption_min_slice(faint, mask, brain.zooms).min_slice >= top - 3
    with pytest.raises(ValueError, match="0 everywhere"):
        qc.corruption_min_slice(np.zeros(brain.shape, np.float32), mask, brain.zooms)
