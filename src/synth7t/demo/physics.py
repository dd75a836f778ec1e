"""The demo's physics: one draw of 3T acquisition physics per subject (:class:`Physics3T`, from the ranges of
:class:`~synth7t.demo.spec.DemoSpec`), the monotone contrast curve, and the rendering of a 7T-like and a 3T-like
image from any anatomy map (:func:`render_pair`; :mod:`synth7t.transfer` uses it on real brains): bias fields,
Rician or Gaussian noise, motion stripes, Gibbs ringing and signal drop-out. The module doc of
:mod:`synth7t.demo` gives the model and its numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from synth7t.demo.geometry import grid_affine, grid_points, random_affine
from synth7t.demo.spec import ANATOMY_ANCHORS, DemoSpec, Range
from synth7t.io import Volume


@dataclass(frozen=True)
class Physics3T:
    """One draw of 3T acquisition physics (all lengths in mm; ``through_axis`` is 0, 1 or 2 of the RAS grid)."""

    voxel_inplane: float
    voxel_through: float
    through_axis: int
    psf_inplane: float
    psf_through: float
    tissue: tuple[float, float, float]  # CSF, GM, WM values
    gamma: float
    bias: float
    noise_pct: float
    rician: bool
    ringing_cutoff: float | None  # None: no ringing
    stripes: bool

    @property
    def voxel(self) -> np.ndarray:
        v = np.full(3, self.voxel_inplane)
        v[self.through_axis] = self.voxel_through
        return v

    @property
    def psf_fwhm(self) -> np.ndarray:
        f = np.full(3, self.psf_inplane)
        f[self.through_axis] = self.psf_through
        return f

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def draw_physics_3t(rng: np.random.Generator, spec: DemoSpec) -> Physics3T:
    """Draw one subject's 3T physics from the ranges of ``spec`` (see :class:`DemoSpec`)."""

    def u(r: Range) -> float:
        return float(rng.uniform(*r))

    csf, gm = u(spec.csf_3t), u(spec.gm_3t)
    wm_lo = max(spec.wm_3t[0], gm + spec.min_gm_wm_gap_3t)  # <= wm_3t[1] unless the spec's ranges contradict
    wm = u((wm_lo, max(wm_lo, spec.wm_3t[1])))
    return Physics3T(
        voxel_inplane=u(spec.voxel_3t_inplane_mm), voxel_through=u(spec.voxel_3t_through_mm),
        through_axis=int(rng.integers(3)), psf_inplane=u(spec.psf_inplane_mm), psf_through=u(spec.psf_through_mm),
        tissue=(csf, gm, wm), gamma=u(spec.gamma_3t), bias=u(spec.bias_3t), noise_pct=u(spec.noise_3t_pct),
        rician=bool(rng.random() < spec.p_rician_3t),
        ringing_cutoff=u(spec.ringing_cutoff_3t) if rng.random() < spec.p_ringing_3t else None,
        stripes=bool(rng.random() < spec.p_stripes_3t),
    )


def contrast_curve(a: np.ndarray, tissue: tuple[float, float, float], gamma: float = 1.0,
                   anchors: tuple[float, float, float] = ANATOMY_ANCHORS) -> np.ndarray:
    """Image intensity of anatomy values ``a``: monotone, piecewise linear through ``(0, 0)`` and
    ``(anchors[k], tissue[k])``, continued beyond WM with the GM->WM slope, then ``W * (x / W) ** gamma``
    (``W`` = the WM value). Increasing whenever ``tissue`` is, for any ``gamma > 0``."""
    xs = np.array([0.0, *anchors, 2.0])
    slope = (tissue[2] - tissue[1]) / (anchors[2] - anchors[1])
    ys = np.array([0.0, *tissue, tissue[2] + slope * (2.0 - anchors[2])])
    out = np.interp(np.asarray(a, np.float32), xs, ys).astype(np.float32)
    if gamma != 1.0:
        w = np.float32(tissue[2])
        out = w * np.power(np.maximum(out, 0) / w, np.float32(gamma))
    return out


def age_tissue(tissue: tuple[float, float, float], age: float, rng: np.random.Generator) -> tuple[float, ...]:
    """Tissue values of a subject: jittered by 1.5 %, GM/WM gap shrinking by 0.4 % per year over 70."""
    t = np.asarray(tissue, float) + rng.normal(0, 0.015, 3)
    t[2] = t[1] + (t[2] - t[1]) * (1 - 0.004 * (age - 70))
    return tuple(float(v) for v in t)


def _bias_field(shape: tuple[int, int, int], affine: np.ndarray, center: np.ndarray, strength: float,
                rng: np.random.Generator, central: bool) -> np.ndarray:
    """Smooth multiplicative field: a central brightening (7T B1+ profile) or a random smooth field spanning
    about ``1 +- strength`` (exp of a random second-order polynomial, normalised to that span)."""
    xyz = grid_points(shape, affine).reshape(*shape, 3) - center
    if central:
        r2 = (xyz**2).sum(-1) / (70.0**2)
        tilt = xyz @ rng.uniform(-1, 1, 3) / 300.0
        field = 1 + strength * (np.exp(-r2) - 0.5) + strength * tilt
        return np.clip(field, 0.3, 3.0).astype(np.float32)
    c = rng.uniform(-1, 1, 9)
    x, y, z = (xyz[..., i] / 90.0 for i in range(3))
    log_b = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * z + c[6] * x * x \
        + c[7] * y * y + c[8] * z * z
    span = float(np.abs(log_b).max()) or 1.0
    return np.exp(log_b * np.float32(np.log1p(strength) / span)).astype(np.float32)


def _noise(img: np.ndarray, sigma: float, rng: np.random.Generator, rician: bool = True) -> np.ndarray:
    """Rician (magnitude of signal + complex Gaussian noise) or Gaussian noise of ``sigma``."""
    re = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    if not rician:
        return np.maximum(re, 0)
    im = rng.normal(0, sigma, img.shape).astype(np.float32)
    return np.sqrt(re * re + im * im)


def _stripes(img: np.ndarray, rng: np.random.Generator, n_lines: int, strength: float) -> np.ndarray:
    """Motion-like stripes: corrupt a few phase-encode lines of each axial slice's k-space (axis 1)."""
    k = np.fft.fftshift(np.fft.fft2(img, axes=(0, 1)), axes=(0, 1))
    ny = img.shape[1]
    lines = rng.choice(np.arange(ny // 2 - ny // 4, ny // 2 + ny // 4), size=n_lines, replace=False)
    phase = np.exp(1j * rng.uniform(-np.pi, np.pi, size=(1, n_lines, 1)) * strength)
    k[:, lines, :] *= phase * (1 + strength)
    out = np.abs(np.fft.ifft2(np.fft.ifftshift(k, axes=(0, 1)), axes=(0, 1)))
    return out.astype(np.float32)


def _ringing(img: np.ndarray, axis: int, keep: float) -> np.ndarray:
    """Gibbs ringing: keep the central ``keep`` fraction of k-space along ``axis`` (hard cut-off)."""
    k = np.fft.fftshift(np.fft.fft(img, axis=axis), axes=axis)
    n = img.shape[axis]
    half = max(1, int(round(n * keep / 2)))
    window = np.zeros(n, np.float32)
    window[n // 2 - half : n // 2 + half] = 1
    shape = [1, 1, 1]
    shape[axis] = n
    k *= window.reshape(shape)
    return np.abs(np.fft.ifft(np.fft.ifftshift(k, axes=axis), axis=axis)).astype(np.float32)


def _dropout(img: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signal drop-out over the inferior-posterior (cerebellar) part of the slab (thesis fig. 9)."""
    shape = img.shape
    xyz = grid_points(shape, affine).reshape(*shape, 3)
    zmin = affine[2, 3]
    center = np.array([rng.uniform(-15, 15), -62.0 + rng.uniform(-6, 6), zmin + rng.uniform(0, 6)])
    radii = np.array([28.0, 22.0, 10.0 + rng.uniform(0, 6)])
    d2 = (((xyz - center) / radii) ** 2).sum(-1)
    factor = 1 - 0.9 * np.exp(-(d2**2))
    return (img * factor).astype(np.float32)


def _to_int16(img: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(img * scale), 0, 32767).astype(np.int16)


RENDER_SPACING_3T = 0.6  # mm: the 3T is rendered and blurred on this grid before sampling


def render_7t(anatomy: Callable[[np.ndarray], np.ndarray], shape: tuple[int, int, int], affine: np.ndarray,
              tissue: tuple[float, float, float], center: np.ndarray, rng: np.random.Generator, *, snr: float,
              dropout: bool = False, motion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(7T-like image, clean image) on the grid (``shape``, ``affine``); ``anatomy`` maps world points to ``a``."""
    a = anatomy(grid_points(shape, affine)).reshape(shape)
    clean = contrast_curve(a, tissue) * (a > 0.01)
    img = clean * _bias_field(shape, affine, center, 0.6, rng, central=True)
    if dropout:
        img = _dropout(img, affine, rng)
    if motion:
        img = _stripes(img, rng, n_lines=12, strength=1.5)
    return _noise(img, tissue[2] / snr, rng), clean


def render_3t(anatomy: Callable[[np.ndarray], np.ndarray], shape: tuple[int, int, int], affine: np.ndarray,
              physics: Physics3T, center: np.ndarray, pose: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """3T-like image on the grid (``shape``, ``affine``), the head in ``pose`` (world -> world, 4x4).

    The anatomy is rendered with the 3T contrast on a ``RENDER_SPACING_3T`` grid covering the same field of
    view, blurred by the anisotropic Gaussian PSF, sampled (linearly) at the grid's voxel centres; then bias
    field, optional ringing and stripes, and noise.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    voxel = np.sqrt((affine[:3, :3] ** 2).sum(0))
    extent = np.asarray(shape) * voxel  # mm
    fine_shape = tuple(int(np.ceil(e / RENDER_SPACING_3T)) for e in extent)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    fine_aff = grid_affine(fine_shape, RENDER_SPACING_3T, centre)
    pts = grid_points(fine_shape, fine_aff)
    pts = pts @ pose[:3, :3].T.astype(np.float32) + pose[:3, 3].astype(np.float32)
    a = anatomy(pts).reshape(fine_shape)
    img = contrast_curve(a, physics.tissue, physics.gamma) * (a > 0.01)
    sigma = physics.psf_fwhm / 2.3548 / RENDER_SPACING_3T
    img = gaussian_filter(img, sigma, mode="constant")
    # voxel centres of the target grid in fine-grid voxel coordinates
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    to_fine = np.linalg.inv(fine_aff) @ affine
    coords = to_fine[:3, :3].astype(np.float32) @ ijk + to_fine[:3, 3:4].astype(np.float32)
    img = map_coordinates(img, coords, order=1, mode="nearest").reshape(shape).astype(np.float32)
    img *= _bias_field(shape, affine, center, physics.bias, rng, central=False)
    if physics.ringing_cutoff is not None:
        img = _ringing(img, physics.through_axis, physics.ringing_cutoff)
    if physics.stripes:
        img = _stripes(img, rng, n_lines=4, strength=0.25)  # mild: QC must not reject the subject for it
    return _noise(img, physics.noise_pct / 100 * physics.tissue[2], rng, physics.rician)


def grids(spec: DemoSpec, physics: Physics3T, center: np.ndarray):
    """(7T shape, 7T affine, 3T shape, 3T affine): the 3T grid covers the 7T one plus a margin (12 mm along z)
    so that, despite another head pose, it covers the 7T brain."""
    nz7 = int(round(spec.slab_mm / spec.voxel_7t))
    shape7 = (int(round(spec.fov_xy_mm[0] / spec.voxel_7t)), int(round(spec.fov_xy_mm[1] / spec.voxel_7t)), nz7)
    aff7 = grid_affine(shape7, spec.voxel_7t, center)
    extent = np.asarray(shape7) * spec.voxel_7t + np.array([4, 4, 12])
    shape3 = tuple(int(np.ceil(e / v)) for e, v in zip(extent, physics.voxel, strict=True))
    aff3 = grid_affine(shape3, physics.voxel, center)
    return shape7, aff7, shape3, aff3


def render_pair(anatomy: Callable[[np.ndarray], np.ndarray], spec: DemoSpec, physics: Physics3T,
                tissue_7t: tuple[float, float, float], center: np.ndarray, rng: np.random.Generator,
                events: dict) -> dict:
    """Render a (3T-like, 7T-like) pair of one anatomy: Volumes ``t3``, ``t7``, ``t7_clean`` (see module doc)."""
    shape7, aff7, shape3, aff3 = grids(spec, physics, center)
    img7, clean7 = render_7t(anatomy, shape7, aff7, tissue_7t, center, rng, snr=spec.snr_7t,
                             dropout=events.get("corrupt_cerebellum", False), motion=events.get("motion_7t", False))
    # voxel (i, j, k) of the 3T shows the anatomy at pose(aff3 @ ijk) but is saved at aff3 @ ijk: the head sits
    # in another pose than in the 7T session, which coregistration must undo
    pose = random_affine(rng, 6.0, 0.0, 5.0, center)
    img3 = render_3t(anatomy, shape3, aff3, physics, center, pose, rng)
    return {"t7": Volume(_to_int16(img7, 3000.0).astype(np.float32), aff7),
            "t3": Volume(_to_int16(img3, 1000.0).astype(np.float32), aff3),
            "t7_clean": Volume(clean7, aff7)}
