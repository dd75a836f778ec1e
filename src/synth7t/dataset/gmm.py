"""The 3-component Gaussian mixture of a 3T brain and its monotone intensity map (thesis 1.3.1).

GMM intensity augmentation (Meyer et al. 2021, thesis 1.3.1): the normalized 3T brain intensities are
modelled by a 3-component mixture (CSF, GM, WM sorted by mean; fitted at pack time, :func:`fit_gmm`). The
augmentation shifts the means (``mu_k -> mu'_k``) and scales the spreads (``sigma_k -> sigma'_k``). The thesis
maps a voxel of component k by ``v' = mu'_k + (v - mu_k) / sigma_k * sigma'_k``; with a hard assignment this jumps
where the most likely component changes (the spike / gap of thesis figure 16), and with soft
(posterior-weighted) assignments it is continuous but can still *decrease* locally between two components
(a local contrast inversion: a darker voxel becomes brighter than a brighter one), in about a quarter of draws.

The map used here (:func:`gmm_map`, ``method="monotone"``) is monotone by construction: a cubic Hermite spline
through ``(mu_k, mu'_k)`` with slope ``sigma'_k / sigma_k`` at each mean (the thesis' local stretch), through
``(0, f(0))`` and ``(1, f(1))`` continued linearly from the outer components, with the means kept in order
(each gap at least a quarter of the original) and the slopes limited by the Fritsch-Carlson condition
(``alpha^2 + beta^2 <= 9``), which makes every piece non-decreasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GMMFit:
    """A 1-D Gaussian mixture sorted by mean (for brain MRI: CSF, GM, WM)."""

    means: tuple[float, ...]
    stds: tuple[float, ...]
    weights: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"means": list(self.means), "stds": list(self.stds), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, d: dict) -> GMMFit:
        means, stds, weights = (tuple(map(float, d[k])) for k in ("means", "stds", "weights"))
        return cls(means, stds, weights)


def fit_gmm(values: np.ndarray, n_components: int = 3, max_samples: int = 100_000, seed: int = 0) -> GMMFit:
    """Fit a ``n_components`` GaussianMixture to normalized brain intensities, sorted by mean.

    Values at the clipping limits (exactly 0 or 1) are left out: they are point masses made by the
    clipping, not tissue. At most ``max_samples`` voxels (seeded random subset) are used.
    """
    from sklearn.mixture import GaussianMixture

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[(v > 0) & (v < 1)]
    if v.size < 20 * n_components:
        raise ValueError(f"{v.size} brain intensities are too few to fit a {n_components}-component mixture")
    rng = np.random.default_rng(seed)
    if v.size > max_samples:
        v = rng.choice(v, size=max_samples, replace=False)
    gm = GaussianMixture(n_components, covariance_type="full", random_state=seed, max_iter=200)
    gm.fit(v[:, None])
    means = gm.means_.ravel()
    order = np.argsort(means)
    stds = np.sqrt(gm.covariances_.reshape(n_components))
    return GMMFit(
        tuple(means[order].tolist()), tuple(stds[order].tolist()), tuple(gm.weights_[order].tolist())
    )


def responsibilities(values: np.ndarray, fit: GMMFit) -> np.ndarray:
    """Posterior ``r_k(v) = pi_k N(v; mu_k, sigma_k) / sum_j pi_j N(v; mu_j, sigma_j)``; shape (N, K)."""
    mu, s, w = (np.asarray(a, dtype=np.float64) for a in (fit.means, fit.stds, fit.weights))
    z = (np.asarray(values, dtype=np.float64).reshape(-1, 1) - mu) / s  # (N, K)
    logp = np.log(w) - np.log(s) - 0.5 * z**2
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


MIN_GAP_FRACTION = 0.25  # a mapped gap between adjacent means keeps at least this fraction of the original


def monotone_knots(fit: GMMFit, new_means, new_stds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Knots ``(x, y, slopes)`` of the monotone GMM map (module docstring); ``x`` strictly increasing in [0, 1].

    ``y`` is strictly increasing (the new means are pushed apart to keep at least :data:`MIN_GAP_FRACTION` of
    each original gap) and the slopes satisfy the Fritsch-Carlson condition on every interval.
    """
    mu, s = np.asarray(fit.means, np.float64), np.asarray(fit.stds, np.float64)
    new_mu, new_s = np.asarray(new_means, np.float64), np.asarray(new_stds, np.float64)
    if new_mu.shape != mu.shape or new_s.shape != s.shape:
        raise ValueError(f"need {mu.size} new means and stds, got {new_mu.size} and {new_s.size}")
    if np.any(s <= 0) or np.any(new_s <= 0) or np.any(np.diff(mu) <= 0):
        raise ValueError("GMM stds must be > 0 and the means strictly increasing")
    y_mu = new_mu.copy()
    for k in range(1, mu.size):
        y_mu[k] = max(y_mu[k], y_mu[k - 1] + MIN_GAP_FRACTION * (mu[k] - mu[k - 1]))
    slope = new_s / s
    lo, hi = min(0.0, mu[0] - 1e-3), max(1.0, mu[-1] + 1e-3)
    x = np.array([lo, *mu, hi])
    y = np.array([y_mu[0] - slope[0] * (mu[0] - lo), *y_mu, y_mu[-1] + slope[-1] * (hi - mu[-1])])
    d = np.array([slope[0], *slope, slope[-1]])
    for i in range(x.size - 1):  # Fritsch-Carlson limiter, interval by interval
        delta = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
        a, b = d[i] / delta, d[i + 1] / delta
        r = a * a + b * b
        if r > 9:
            tau = 3 / np.sqrt(r)
            d[i], d[i + 1] = tau * a * delta, tau * b * delta
    return x, y, d


def gmm_map(
    values: np.ndarray, fit: GMMFit, new_means, new_stds, *, method: str = "monotone"
) -> np.ndarray:
    """Map intensities with shifted GMM means and scaled spreads (module docstring); float32, shape of ``values``.

    ``method``: ``"monotone"`` (the default, what :class:`GMMIntensity` uses), or for comparison ``"soft"``
    (``v' = sum_k r_k(v) (mu'_k + (v - mu_k) / sigma_k * sigma'_k)``, posterior weights ``r_k``) and ``"hard"``
    (the thesis' argmax assignment, discontinuous).
    """
    v = np.asarray(values, dtype=np.float64)
    if method == "monotone":
        from scipy.interpolate import CubicHermiteSpline

        x, y, d = monotone_knots(fit, new_means, new_stds)
        inside = np.clip(v, x[0], x[-1])
        out = CubicHermiteSpline(x, y, d)(inside)
        out += np.where(v < x[0], (v - x[0]) * d[0], 0.0) + np.where(v > x[-1], (v - x[-1]) * d[-1], 0.0)
        return out.reshape(v.shape).astype(np.float32)
    if method not in ("soft", "hard"):
        raise ValueError(f"method must be 'monotone', 'soft' or 'hard', got {method!r}")
    mu, s = np.asarray(fit.means), np.asarray(fit.stds)
    new_mu, new_s = np.asarray(new_means, dtype=np.float64), np.asarray(new_stds, dtype=np.float64)
    if new_mu.shape != mu.shape or new_s.shape != s.shape:
        raise ValueError(f"need {mu.size} new means and stds, got {new_mu.size} and {new_s.size}")
    r = responsibilities(v, fit)  # (N, K)
    if method == "hard":
        r = np.eye(mu.size)[np.argmax(r, axis=1)]
    per_k = new_mu + (v.reshape(-1, 1) - mu) / s * new_s  # (N, K)
    return (r * per_k).sum(axis=1).reshape(v.shape).astype(np.float32)


def gmm_map_table(values: np.ndarray, fit: GMMFit, new_means, new_stds, n_grid: int = 4097) -> np.ndarray:
    """:func:`gmm_map` evaluated on ``n_grid`` points over ``[min, max]`` of ``values`` and interpolated linearly.

    The map is smooth, so the interpolation error is ~ (step^2 / 8) |f''|, below 1e-5 in normalized units,
    at a fraction of the cost (one small evaluation plus linear interpolation); monotone like :func:`gmm_map`.
    """
    v = np.asarray(values, dtype=np.float32)
    if v.size == 0:
        return v.copy()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.full(v.shape, gmm_map(np.array([lo]), fit, new_means, new_stds)[0], np.float32)
    grid = np.linspace(lo, hi, n_grid)
    table = gmm_map(grid, fit, new_means, new_stds)  # (n_grid,) float32
    t = (v - np.float32(lo)) * np.float32((n_grid - 1) / (hi - lo))  # position on the uniform grid
    i = np.clip(t.astype(np.intp), 0, n_grid - 2)
    frac = t - i
    return table[i] * (1 - frac) + table[i + 1] * frac
