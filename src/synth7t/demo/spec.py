"""The demo cohort's ranges: :class:`DemoSpec` (size, anatomy variety, 3T physics ranges, fixed 7T physics) and
the tissue anchors every part of the simulator shares."""

from __future__ import annotations

from dataclasses import dataclass

# Tissue positions on the anatomy scale (the template's intensity / its maximum; read off its histogram and
# off the ventricles / cortex / white matter): CSF, GM, WM.
ANATOMY_ANCHORS = (0.25, 0.75, 0.98)

TISSUE_7T = (0.10, 0.42, 0.88)  # 7T-like values of CSF, GM, WM (fixed: the domain we synthesize)

Range = tuple[float, float]


@dataclass(frozen=True)
class DemoSpec:
    """Size, anatomy variety and physics of the demo cohort. Ranges are ``(low, high)``, drawn uniformly.

    3T physics ranges (each subject draws one :class:`Physics3T` from them):

    * ``voxel_3t_inplane_mm`` / ``voxel_3t_through_mm``: voxel size in-plane and along the through-plane axis
      (one of the three axes, drawn); anisotropic voxels arise when the two differ.
    * ``psf_inplane_mm`` / ``psf_through_mm``: FWHM of the Gaussian point-spread function.
    * ``csf_3t``, ``gm_3t``, ``wm_3t``: tissue values (WM - GM >= ``min_gm_wm_gap_3t``); ``gamma_3t``: exponent
      of the gamma-like curve applied after the piecewise-linear tissue map.
    * ``bias_3t``: strength of the smooth multiplicative bias field (0.3 = the field spans about +-30 %).
    * ``noise_3t_pct``: noise sigma in % of the WM value; Rician with probability ``p_rician_3t``, else Gaussian.
    * ``p_ringing_3t`` with ``ringing_cutoff_3t`` (fraction of the k-space kept along one axis), ``p_stripes_3t``
      (mild motion stripes).

    The 7T physics is fixed: ``voxel_7t``, :data:`TISSUE_7T`, central bias field, Rician noise at ``snr_7t``.
    """

    n_subjects: int = 10
    seed: int = 0
    voxel_7t: float = 0.65  # mm
    slab_mm: float = 40.0  # axial extent of the simulated field of view
    slab_center_z: float = -8.0  # world z (template/MNI mm) of the slab centre
    fov_xy_mm: tuple[float, float] = (150.0, 184.0)  # in-plane field of view of the 7T grid
    # anatomy
    warp_mm: float = 4.0  # typical displacement of the random diffeomorphism
    rotation_deg: float = 6.0
    scale_pct: float = 6.0
    translation_mm: float = 3.0
    p_flip_lr: float = 0.5
    atrophy: float = 1.0  # strength of the age-dependent atrophy (0: none); full effect at age 85
    texture_pct: tuple[float, float] = (1.0, 3.0)  # std of the tissue texture (1 mm scale), % of the anatomy
    sharpen: bool = True
    # 3T physics ranges
    voxel_3t_inplane_mm: Range = (0.8, 1.3)
    voxel_3t_through_mm: Range = (0.8, 1.3)
    psf_inplane_mm: Range = (0.9, 1.8)
    psf_through_mm: Range = (0.9, 1.8)
    csf_3t: Range = (0.08, 0.25)
    gm_3t: Range = (0.38, 0.62)
    wm_3t: Range = (0.70, 0.92)
    min_gm_wm_gap_3t: float = 0.12
    gamma_3t: Range = (0.7, 1.4)
    bias_3t: Range = (0.0, 0.3)
    noise_3t_pct: Range = (1.0, 6.0)
    p_rician_3t: float = 0.5
    p_ringing_3t: float = 0.2
    ringing_cutoff_3t: Range = (0.6, 0.85)
    p_stripes_3t: float = 0.2
    # 7T physics (fixed) and 7T events
    snr_7t: float = 60.0  # WM signal / noise sigma
    p_corrupt_cerebellum: float = 0.25
    motion_subject: int | None = 3  # index of a subject with heavy 7T motion stripes (QC should reject it)
