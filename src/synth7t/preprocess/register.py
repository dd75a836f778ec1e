"""Resampling and 3T -> 7T coregistration with ANTs SyN via antspyx (thesis 1.2.3).

Geometry conventions: a :class:`~synth7t.io.Volume` affine maps voxel indices to RAS+ millimetres; ANTs works
in LPS+ millimetres, so ``A_lps = diag(-1, -1, 1, 1) @ A_ras`` (:func:`to_ants` / :func:`from_ants`). Transforms
are physical (mm to mm), hence independent of the grids they were estimated on: SyN runs on both brains
resampled to ``resolution_mm`` (1 mm: 36 s instead of 149 s at 0.65 mm, DESIGN.md) and the result is applied to
the full-resolution images on the fixed (7T) grid.

antspyx writes its transforms to ``tempfile.mktemp()`` names and leaves them: :func:`register` always passes an
``outprefix`` inside a temporary folder it owns, copies the transforms to ``transforms_dir`` and removes the rest.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synth7t.errors import InputError
from synth7t.io import Volume
from synth7t.parallel import set_itk_threads as set_threads

log = logging.getLogger(__name__)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
INTERPOLATORS = {0: "genericLabel", 1: "linear", 3: "bSpline"}


@dataclass
class RegistrationResult:
    """Outcome of :func:`register`.

    ``forward``: transforms mapping moving onto fixed, in the order ``ants.apply_transforms`` wants
    (warp first, then affine); ``inverse`` the reverse mapping. ``warped``: the moving image on the fixed grid
    (linear). ``ncc``: Pearson correlation of ``warped`` and ``fixed`` inside the fixed mask (or the fixed
    image's nonzero voxels).
    """

    forward: list[Path]
    inverse: list[Path]
    warped: Volume
    ncc: float
    seconds: float = 0.0
    params: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# grids and resampling


def grid_for_zooms(vol: Volume, zooms: float | tuple[float, float, float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a grid covering ``vol``'s field of view with voxels of ``zooms`` mm.

    The outer corner of voxel 0 is kept: with ``s = new / old`` per axis, ``new_shape = round(shape / s)`` and
    ``A_new = A_old @ [[diag(s), (s - 1) / 2], [0, 1]]``.
    """
    new = np.broadcast_to(np.asarray(zooms, float), (3,))
    if np.any(new <= 0):
        raise ValueError(f"voxel sizes must be positive, got {zooms}")
    s = new / vol.zooms
    shape = tuple(int(max(1, round(n / si))) for n, si in zip(vol.shape, s, strict=True))
    scale = np.eye(4)
    scale[:3, :3] = np.diag(s)
    scale[:3, 3] = (s - 1) / 2
    return shape, vol.affine @ scale  # type: ignore[return-value]


def resample_to(vol: Volume, target: Volume | float | tuple[float, float, float] | tuple[tuple, np.ndarray],
                order: int = 1, *, antialias: bool = True, world: np.ndarray | None = None) -> Volume:
    """Resample ``vol`` onto a target grid: a Volume (its shape and affine), ``(shape, affine)``, or voxel
    size(s) in mm (same field of view, :func:`grid_for_zooms`).

    Each target voxel ``i`` reads ``vol`` at ``inv(A_src) @ W @ A_tgt @ i`` (spline order ``order``: 0 nearest for
    masks, 1 linear), where ``W`` (``world``, default the identity) is a 4x4 map of RAS+ mm points from the
    target's space to the source's (a registration's result: one resampling however many transforms were
    composed into it). Outside the source field of view the value is 0. With ``antialias`` and ``order >= 1``,
    a downsampling first blurs the source with a Gaussian of ``sigma = sqrt(max(0, t^2 - s^2)) / 2.355``
    (target/source voxel sizes in mm, per axis) so that it does not alias.
    """
    from scipy.ndimage import affine_transform, gaussian_filter

    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0, 1 or 3, got {order}")
    if isinstance(target, Volume):
        shape, aff = target.shape, target.affine
    elif isinstance(target, tuple) and len(target) == 2 and np.ndim(target[1]) == 2:
        shape, aff = tuple(target[0]), np.asarray(target[1], float)
    else:
        shape, aff = grid_for_zooms(vol, target)  # type: ignore[arg-type]
    data = np.asarray(vol.data, np.float32)
    if order >= 1 and antialias:
        tz = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        sigma_mm = np.sqrt(np.maximum(0.0, tz**2 - vol.zooms**2)) / 2.355
        if np.any(sigma_mm > 0.05 * vol.zooms):
            data = gaussian_filter(data, sigma_mm / vol.zooms)
    m = np.linalg.inv(vol.affine) @ (np.eye(4) if world is None else np.asarray(world, float)) @ aff
    out = affine_transform(data, m[:3, :3], m[:3, 3], output_shape=tuple(shape), order=order,
                           mode="constant", cval=0.0, prefilter=order > 1)
    return Volume(out.astype(np.float32), np.asarray(aff, float).copy(), vol.source)


# ---------------------------------------------------------------------------------------------------------
# ANTs conversion


def to_ants(vol: Volume):
    """Volume (RAS affine) -> ANTsImage (LPS origin/direction, float32)."""
    import ants

    a = LPS @ vol.affine
    zooms = vol.zooms
    return ants.from_numpy(np.ascontiguousarray(vol.data, np.float32), origin=[float(v) for v in a[:3, 3]],
                           spacing=[float(z) for z in zooms], direction=a[:3, :3] / zooms)


def from_ants(img, source: str | None = None) -> Volume:
    """ANTsImage -> Volume with a RAS affine."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(img.direction) * np.asarray(img.spacing)
    a[:3, 3] = img.origin
    return Volume(np.asarray(img.numpy(), np.float32), LPS @ a, source)


def read_itk_affine(path: str | Path) -> np.ndarray:
    """An ITK/ANTs linear transform file (``.mat``, ``.txt``, ``.tfm``) as a 4x4 map of RAS+ mm points.

    ITK transforms map points of the *fixed* space to the *moving* space, in LPS+ mm; the RAS+ matrix is
    ``LPS @ M_lps @ LPS``. The matrix is read off the transform by mapping the origin and the three unit points
    (whatever its type: Euler, similarity, affine, a composite of them) and checked to be affine on a fifth point;
    a non-linear transform is refused in one line."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: transform file not found")
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith("Description")), "")
        raise InputError(f"{p}: not an ITK transform file ({first or 'unreadable'})") from None
    if tx.GetDimension() != 3:
        raise InputError(f"{p}: a {tx.GetDimension()}-D transform; a 3-D one is needed")
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    mapped = np.array([tx.TransformPoint(tuple(map(float, q))) for q in pts])
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T
    probe = np.array([37.0, -21.0, 53.0])
    if not np.allclose(tx.TransformPoint(tuple(probe)), m[:3, :3] @ probe + m[:3, 3], atol=1e-4):
        raise InputError(f"{p}: not a linear (affine) transform")
    return LPS @ m @ LPS


def write_itk_affine(matrix_ras: np.ndarray, path: str | Path) -> Path:
    """Write a 4x4 RAS+ point map as an ITK affine transform file (the inverse of :func:`read_itk_affine`)."""
    import SimpleITK as sitk

    m = LPS @ np.asarray(matrix_ras, float) @ LPS
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in m[:3, :3].ravel()))
    tx.SetTranslation(tuple(float(v) for v in m[:3, 3]))
    sitk.WriteTransform(tx, str(path))
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# correlation


def masked_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation ``sum(a' b') / sqrt(sum(a'^2) sum(b'^2))`` with ``x' = x - mean(x)`` over ``mask``
    (all voxels when None). 0.0 when either image is constant there."""
    m = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    if a.shape != b.shape or m.shape != a.shape:
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, {m.shape}")
    x = np.asarray(a, np.float64)[m]
    y = np.asarray(b, np.float64)[m]
    if x.size < 2:
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# registration


def apply_transforms(moving: Volume, fixed: Volume | tuple[tuple, np.ndarray], transforms: list[Path] | list[str],
                     order: int = 1) -> Volume:
    """Resample ``moving`` onto ``fixed``'s grid through ``transforms`` (``RegistrationResult.forward``).

    ``order`` 1: linear (images); 0: ``genericLabel`` (masks).
    """
    import ants

    if order not in INTERPOLATORS:
        raise ValueError(f"order must be one of {sorted(INTERPOLATORS)}")
    grid = fixed if isinstance(fixed, Volume) else Volume(np.zeros(fixed[0], np.float32), np.asarray(fixed[1]))
    out = ants.apply_transforms(fixed=to_ants(grid.with_data(np.zeros(grid.shape, np.float32))),
                                moving=to_ants(moving), transformlist=[str(t) for t in transforms],
                                interpolator=INTERPOLATORS[order])
    res = from_ants(out, moving.source)
    return Volume(res.data, grid.affine.copy(), moving.source)


def ants_seed(seed: int | None) -> int | None:
    """The ``--random-seed`` given to antsRegistration for our ``seed``: never 0, which ANTs takes as "use the
    clock" (two registrations of one pair then differ). ``seed >= 0`` -> ``seed + 1``; negative seeds as they are."""
    if seed is None:
        return None
    return int(seed) + 1 if int(seed) >= 0 else int(seed)


def register(moving: Volume, fixed: Volume, *, resolution_mm: float | None = 1.0,
             transform: str = "SyN", transforms_dir: Path | None = None, fixed_mask: Volume | None = None,
             syn_iterations: tuple[int, ...] = (40, 20, 0), affine_iterations: tuple[int, ...] = (2100, 1200, 1200, 10),
             seed: int | None = 0, threads: int | None = None) -> RegistrationResult:
    """Register ``moving`` (3T brain) to ``fixed`` (7T brain) with ANTs ``transform`` (default SyN: rigid+affine
    then a symmetric diffeomorphic stage, mutual information).

    Both images are first resampled to ``resolution_mm`` isotropic (None: no resampling; never finer than the
    coarser image's smallest voxel size). The transforms are
    copied into ``transforms_dir`` as ``0GenericAffine.mat``, ``1Warp.nii.gz``, ``1InverseWarp.nii.gz``; when it
    is None nothing is kept (``forward``/``inverse`` are then empty and only ``warped`` and ``ncc`` remain).
    """
    import time

    import ants

    if resolution_mm is not None and resolution_mm <= 0:
        raise ValueError(f"resolution_mm must be positive, got {resolution_mm}")
    set_threads(threads)
    t0 = time.perf_counter()
    if resolution_mm:  # never finer than the coarser image's finest axis: upsampling adds no information
        resolution_mm = max(float(resolution_mm), float(max(moving.zooms.min(), fixed.zooms.min())))
    mov_r = resample_to(moving, resolution_mm) if resolution_mm else moving
    fix_r = resample_to(fixed, resolution_mm) if resolution_mm else fixed
    from ants import config as ants_config

    # --random-seed for antsRegistration, never 0 (threads left as set); None clears an earlier call's seed
    ants_config.set_ants_deterministic(on=False, seed_value=ants_seed(seed))
    with tempfile.TemporaryDirectory(prefix="synth7t-ants-") as tmp:
        reg = ants.registration(fixed=to_ants(fix_r), moving=to_ants(mov_r), type_of_transform=transform,
                                outprefix=str(Path(tmp) / "reg_"), reg_iterations=tuple(syn_iterations),
                                aff_iterations=tuple(affine_iterations))
        warped = apply_transforms(moving, fixed, reg["fwdtransforms"], order=1)
        forward: list[Path] = []
        inverse: list[Path] = []
        if transforms_dir is not None:
            Path(transforms_dir).mkdir(parents=True, exist_ok=True)
            forward = _keep_files(reg["fwdtransforms"], Path(transforms_dir))
            inverse = _keep_files(reg["invtransforms"], Path(transforms_dir))
    mask = fixed_mask.data > 0 if fixed_mask is not None else fixed.data > 0
    ncc = masked_ncc(warped.data, fixed.data, mask)
    dt = time.perf_counter() - t0
    log.debug("%s registration at %s mm: %.1f s, NCC %.3f", transform, resolution_mm, dt, ncc)
    params = {"transform": transform, "resolution_mm": resolution_mm, "syn_iterations": list(syn_iterations),
              "affine_iterations": list(affine_iterations), "seed": seed}
    return RegistrationResult(forward, inverse, warped, ncc, dt, params)


def _keep_files(paths: list[str], dest: Path) -> list[Path]:
    """Copy ANTs output transforms to ``dest`` with stable names (prefix ``reg_`` removed)."""
    out = []
    for p in paths:
        src = Path(p)
        target = dest / src.name.replace("reg_", "", 1)
        if not target.exists() or not target.samefile(src):
            shutil.copyfile(src, target)
        out.append(target)
    return out
