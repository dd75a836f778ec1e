"""The demo's anatomy: the deepmriprep 0.5 mm template sharpened once per cohort (:func:`shock_sharpen`), then per
subject age-dependent atrophy (:func:`widen_sulci`, larger ventricles), a random tissue texture
(:meth:`Anatomy.subject`) and a random smooth diffeomorphic warp with an affine and a left-right flip
(:func:`warp_sampler`). The module doc of :mod:`synth7t.demo` gives the model and its numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synth7t.demo.geometry import grid_points, random_affine
from synth7t.demo.spec import ANATOMY_ANCHORS, DemoSpec
from synth7t.io import Volume


def template_path() -> Path:
    import deepmriprep

    return Path(deepmriprep.__file__).parent / "data" / "templates" / "Template_05mm_bet.nii.gz"


def load_template() -> Volume:
    """The 0.5 mm skull-stripped template, intensities scaled to [0, 1] (the anatomy scale)."""
    from synth7t.io import load_volume

    vol = load_volume(template_path())
    return vol.with_data(vol.data / float(vol.data.max()))


def _velocity_field(rng: np.random.Generator, shape: tuple[int, int, int], amplitude: float) -> np.ndarray:
    """Smooth random stationary velocity field (3, *shape) in mm, on a coarse grid."""
    from scipy.ndimage import gaussian_filter

    v = rng.standard_normal((3, *shape))
    v = np.stack([gaussian_filter(c, sigma=1.5, mode="wrap") for c in v])
    return v * (amplitude / (v.std() + 1e-8))


def _integrate(v: np.ndarray, spacing: float, steps: int = 5) -> np.ndarray:
    """Displacement field of exp(v) by scaling and squaring (Arsigny 2006): diffeomorphic for smooth v."""
    from scipy.ndimage import map_coordinates

    disp = v / (2**steps)
    idx = np.indices(v.shape[1:], dtype=np.float64)
    for _ in range(steps):
        coords = idx + disp / spacing
        disp = disp + np.stack([map_coordinates(c, coords, order=1, mode="nearest") for c in disp])
    return disp


def shock_sharpen(u: np.ndarray, steps: int = 6, dt: float = 0.25, sigma: float = 2.0,
                  smooth: float = 0.6) -> np.ndarray:
    """Osher-Rudin shock filter: ``u -= dt * sign(LoG_sigma(u)) * |grad u|`` (minmod upwind gradient), ``steps``
    times, then a Gaussian of ``smooth`` voxels. Steepens edges, keeps plateaus, creates no overshoot."""
    from scipy import ndimage

    u = np.asarray(u, np.float32).copy()
    for _ in range(steps):
        sign = np.sign(ndimage.gaussian_laplace(u, sigma))
        g2 = np.zeros_like(u)
        for ax in range(u.ndim):
            fwd = np.roll(u, -1, ax) - u
            bwd = u - np.roll(u, 1, ax)
            mm = np.where(fwd * bwd > 0, np.minimum(np.abs(fwd), np.abs(bwd)), 0)
            g2 += mm * mm
        u -= np.float32(dt) * sign * np.sqrt(g2)
    return ndimage.gaussian_filter(u, smooth) if smooth > 0 else u


def widen_sulci(a: np.ndarray, strength: float, anchors=ANATOMY_ANCHORS) -> np.ndarray:
    """Push CSF/GM partial-volume values towards CSF: on ``[csf, gm]``, ``csf + (gm - csf) s**(1 + strength)``
    with ``s`` the position in the interval (monotone; CSF and GM plateaus unchanged). Sulci look wider."""
    if strength <= 0:
        return a
    lo, hi = anchors[0], anchors[1]
    s = np.clip((a - lo) / (hi - lo), 0, 1)
    inside = (a > lo) & (a < hi)
    out = a.copy()
    out[inside] = lo + (hi - lo) * s[inside] ** (1 + strength)
    return out


@dataclass
class Anatomy:
    """The template cropped around the slab (sharpened), and where its ventricles are."""

    template: Volume
    ventricle_center: np.ndarray  # world mm

    @classmethod
    def build(cls, spec: DemoSpec, margin_mm: float = 25.0) -> Anatomy:
        t = load_template()
        z_world = t.affine[2, 3] + t.affine[2, 2] * np.arange(t.shape[2])
        keep = np.flatnonzero(np.abs(z_world - spec.slab_center_z) <= spec.slab_mm / 2 + margin_mm)
        aff = t.affine.copy()
        aff[:3, 3] = t.affine[:3, :3] @ np.array([0, 0, keep[0]]) + t.affine[:3, 3]
        data = np.ascontiguousarray(t.data[:, :, keep[0] : keep[-1] + 1], dtype=np.float32)
        if spec.sharpen:
            brain = data > 0.02
            data = np.clip(shock_sharpen(data), 0, 1) * brain
        template = Volume(data, aff)
        # ventricles: CSF-valued voxels near the brain centre
        xyz = grid_points(data.shape, aff).reshape(*data.shape, 3)
        box = (np.abs(xyz[..., 0]) < 20) & (xyz[..., 1] > -40) & (xyz[..., 1] < 20) & (xyz[..., 2] > -10)
        csf = box & (data > 0.02) & (data < (ANATOMY_ANCHORS[0] + ANATOMY_ANCHORS[1]) / 2)
        center = xyz[csf].mean(0) if csf.any() else np.array([0.0, -10.0, 10.0])
        return cls(template, center.astype(np.float64))

    def subject(self, rng: np.random.Generator, spec: DemoSpec, age: float) -> tuple[Volume, dict]:
        """One subject's anatomy map (atrophy remap and tissue texture applied) and what was drawn."""
        from scipy.ndimage import gaussian_filter, zoom

        a = self.template.data
        strength = spec.atrophy * float(np.clip((age - 55) / 30, 0, 1))
        a = widen_sulci(a, 1.5 * strength)
        fine_pct = float(rng.uniform(*spec.texture_pct))
        fine = gaussian_filter(rng.standard_normal(a.shape, dtype=np.float32), 2.0)
        fine *= np.float32(fine_pct / 100 / (fine.std() + 1e-8))
        coarse_shape = tuple(max(2, s // 8) for s in a.shape)
        coarse = gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32), 1.0)
        coarse = zoom(coarse, np.asarray(a.shape) / np.asarray(coarse_shape), order=1, grid_mode=True, mode="nearest")
        coarse *= np.float32(0.5 * fine_pct / 100 / (coarse.std() + 1e-8))
        a = a * (1 + fine + coarse)
        drawn = {"atrophy": round(strength, 3), "texture_pct": round(fine_pct, 3)}
        return Volume(a.astype(np.float32), self.template.affine), drawn


def warp_sampler(rng: np.random.Generator, spec: DemoSpec, center: np.ndarray, ventricles: np.ndarray,
                  ventricle_scale: float, flip: bool) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping world points (N, 3) of the subject to template world points (N, 3)."""
    from scipy.ndimage import map_coordinates

    coarse_spacing = 8.0
    shape = (24, 28, 24)  # 192 x 224 x 192 mm around the brain centre
    origin = center - coarse_spacing * (np.asarray(shape) - 1) / 2
    disp = _integrate(_velocity_field(rng, shape, spec.warp_mm), coarse_spacing)
    affine = random_affine(rng, spec.rotation_deg, spec.scale_pct, spec.translation_mm, center)
    vc = ventricles.astype(np.float32)

    def sample(xyz: np.ndarray) -> np.ndarray:
        p = xyz @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
        c = ((p - origin.astype(np.float32)) / coarse_spacing).T
        p = p + np.stack([map_coordinates(comp, c, order=1, mode="nearest") for comp in disp], axis=1)
        if ventricle_scale > 0:  # radial contraction towards the ventricles: they look larger in the subject
            d = p - vc
            w = np.exp(-(d * d).sum(1, keepdims=True) / np.float32(2 * 18.0**2))
            p = vc + d * (1 - np.float32(ventricle_scale) * w)
        if flip:
            p[:, 0] = -p[:, 0]
        return p

    return sample
