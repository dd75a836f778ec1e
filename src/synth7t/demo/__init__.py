"""The embedded demo cohort: simulated 3T/7T pairs made from real anatomy that ships in a dependency.

No paired 3T/7T scans can be distributed with a tool, so ``synth7t demo`` simulates them. The anatomy is the
0.5 mm skull-stripped T1 template of the ``deepmriprep`` wheel (MIT). A model trained on one simulator learns
that simulator; so every subject's anatomy and 3T physics are *drawn from ranges* (documented in
:class:`DemoSpec`), while the 7T-like target keeps one fixed physics, the domain we synthesize. All randomness
comes from one seed, so a cohort is reproducible bit for bit.

Anatomy (one "anatomy map" ``a`` on the template's intensity scale: CSF ~0.25, GM ~0.75, deep GM ~0.85,
WM ~0.98; :data:`ANATOMY_ANCHORS`):

1. **Sharper than a population average.** The template is an average of many brains, blurrier than one
   person. Once per cohort it is sharpened by a shock filter (Osher & Rudin 1990; a few steps of
   ``u -= dt sign(LoG u) |grad u|``, which steepens edges without overshoot and keeps plateaus such as the deep
   grey matter), then smoothed by 0.3 mm: boundaries about as sharp as a 0.65 mm acquisition of one person.
2. **Per subject:** a random smooth *diffeomorphic* warp (stationary velocity field integrated by scaling and
   squaring) and a random affine, a left-right flip (probability ``p_flip_lr``), age-dependent atrophy (a
   radial expansion of the ventricles and a widening of sulci: partial-volume voxels between CSF and GM are
   pushed towards CSF), and a random multiplicative tissue texture (Gaussian random fields smoothed by 1 mm and
   by 4 mm) in the subject's own anatomy, so that 7T and 3T of a subject share it and the 3T shows it blurred.

Images are rendered from ``a`` with a monotone contrast curve (piecewise linear through the tissue anchors,
:func:`contrast_curve`), in anatomical space, before any blur:

3. **7T-like image** (fixed physics): 0.65 mm, contrast CSF 0.10 / GM 0.42 / WM 0.88 (GM/WM gap shrinking
   slightly with age), a smooth central bias field (7T transmit profile, thesis fig. 5; preprocessing removes
   it), Rician noise at SNR 60. Some subjects get a *corrupted inferior region* (signal drop-out over the
   cerebellum, thesis fig. 9); one gets strong *motion stripes* (thesis fig. 11; QC should reject it).
4. **3T-like image** (physics drawn per subject, :class:`Physics3T`): another head pose (a separate session),
   random tissue values and a gamma-like curve, rendered on a 0.6 mm grid in the 3T frame, blurred by an
   anisotropic Gaussian PSF (in-plane and through-plane FWHM drawn separately, through-plane along a random
   axis), sampled on a grid of random, possibly anisotropic voxel size, multiplied by a random smooth bias field,
   optionally given Gibbs ringing (k-space truncation) and motion stripes, and Rician or Gaussian noise.

:func:`render_pair` renders any anatomy map with these physics; :mod:`synth7t.transfer` uses it to degrade
real high-resolution brains by 3T recipes drawn outside the training ranges.

To fit the time budget of the whole demo chain on a 2-core laptop, each subject covers an axial *slab* of the
brain (``slab_mm``, by default 40 mm from the upper cerebellum to the lateral ventricles) rather than the whole
brain. Everything here is SIMULATED DATA: it is for trying the tool, not for any scientific or clinical use.

The package: :mod:`~synth7t.demo.spec` (:class:`DemoSpec`: every range above in one place, so the numbers a
reader checks against each other stay together), :mod:`~synth7t.demo.geometry` (grids and sampling),
:mod:`~synth7t.demo.anatomy` (steps 1-2), :mod:`~synth7t.demo.physics` (steps 3-4) and
:mod:`~synth7t.demo.cohort` (:func:`build_demo_cohort` writes the cohort). The ``demo`` command's chain is in
``pipeline_demo.py``. Everything below is importable from ``synth7t.demo``.
"""

from synth7t.demo.anatomy import Anatomy, load_template, shock_sharpen, template_path, widen_sulci
from synth7t.demo.cohort import (
    DIAGNOSES,
    DIAGNOSIS_P,
    SIMULATED_NOTE,
    build_demo_cohort,
    draw_covariates,
    simulate_subject,
)
from synth7t.demo.physics import (
    RENDER_SPACING_3T,
    Physics3T,
    age_tissue,
    contrast_curve,
    draw_physics_3t,
    grids,
    render_3t,
    render_7t,
    render_pair,
)
from synth7t.demo.spec import ANATOMY_ANCHORS, TISSUE_7T, DemoSpec, Range

__all__ = [
    "ANATOMY_ANCHORS", "DIAGNOSES", "DIAGNOSIS_P", "RENDER_SPACING_3T", "SIMULATED_NOTE", "TISSUE_7T", "Anatomy",
    "DemoSpec", "Physics3T", "Range", "age_tissue", "build_demo_cohort", "contrast_curve", "draw_covariates",
    "draw_physics_3t", "grids", "load_template", "render_3t", "render_7t", "render_pair", "shock_sharpen",
    "simulate_subject", "template_path", "widen_sulci",
]
