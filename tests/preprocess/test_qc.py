"""QC finds an injected drop-out and an injected stripe pattern, and leaves clean images alone."""

import numpy as np
import pytest

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
