"""A held-out-anatomy ("transfer") test set: real high-resolution brains degraded by unseen 3T recipes.

A model trained on the demo cohort has seen one template's anatomy and 3T physics drawn from the ranges of
:class:`~synth7t.demo.DemoSpec`. This set asks whether it holds on anatomy and physics it never saw:

* **Anatomy**: real high-resolution brains that the simulator never uses (``TRANSFER_BRAINS``: the MNI152
  template at 0.8 mm and Colin27, one person scanned 27 times, at 0.5 mm; both public, in
  ``../shared/data/highres``). They are **test-only**: nothing trains, tunes or calibrates on them.
* Each brain's intensities are mapped monotonically onto the simulator's anatomy scale by quantile matching to
  the template's brain intensities in the same slab. A monotone map keeps the real brain's edges and texture.
  Colin27's provider removed its CSF (sulci and ventricles are 0), while synth7t's skull stripping keeps the CSF
  (thesis 1.2.1): its tissue is matched to the template's grey and white matter, and the CSF spaces (what a
  3 mm closing of the tissue mask and a hole filling add) get the CSF value, so that it is a brain as the
  pipeline sees brains.
* **7T-like truth**: the demo's fixed 7T physics (:func:`synth7t.demo.render_pair`).
* **3T-like input**: :data:`RECIPES`, each drawn from the training ranges and then pushed outside them on at
  least one axis (thicker slices and a wider PSF; a contrast curve and tissue values outside the ranges; more
  noise and a stronger bias field). What is outside is recorded per subject in ``truth/<subject>.json``.

:func:`build_transfer_cohort` writes raw pairs and a manifest in the layout of the demo cohort, so that they go
through the same preprocessing, packing and evaluation as the held-out demo subjects.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from synth7t.demo import (
    ANATOMY_ANCHORS,
    TISSUE_7T,
    DemoSpec,
    Physics3T,
    draw_physics_3t,
    load_template,
    render_pair,
)
from synth7t.demo.geometry import sample_at
from synth7t.errors import InputError
from synth7t.io import Volume, load_volume, read_json, save_volume, to_canonical, write_json, write_text
from synth7t.manifest import Subject, write_manifest

log = logging.getLogger(__name__)

# name -> (brain file, mask file or None (= non-zero voxels), whether the brain keeps its CSF)
TRANSFER_BRAINS = {
    "mni152": ("hcp_MNI152_T1_0.8mm_brain.nii.gz", "hcp_MNI152_T1_0.8mm_brain_mask.nii.gz", True),
    "colin27": ("debmricron_ch2better.nii.gz", None, False),
}


def _thick_blurred(p: Physics3T, rng: np.random.Generator) -> tuple[Physics3T, list[str]]:
    return replace(p, voxel_through=float(rng.uniform(1.45, 1.8)), psf_through=float(rng.uniform(2.0, 2.6))), [
        "voxel_3t_through_mm", "psf_through_mm"]


def _other_contrast(p: Physics3T, rng: np.random.Generator) -> tuple[Physics3T, list[str]]:
    gm = float(rng.uniform(0.45, 0.55))
    tissue = (float(rng.uniform(0.28, 0.34)), gm, gm + float(rng.uniform(0.07, 0.10)))
    gamma = float(rng.choice([rng.uniform(0.5, 0.62), rng.uniform(1.5, 1.8)]))
    return replace(p, tissue=tissue, gamma=gamma), ["csf_3t", "min_gm_wm_gap_3t", "gamma_3t"]


def _noisy_biased(p: Physics3T, rng: np.random.Generator) -> tuple[Physics3T, list[str]]:
    return replace(p, noise_pct=float(rng.uniform(7.0, 9.0)), bias=float(rng.uniform(0.35, 0.45))), [
        "noise_3t_pct", "bias_3t"]


RECIPES = {"thick": _thick_blurred, "contrast": _other_contrast, "noisy": _noisy_biased}
"""Recipe name -> function (in-range draw, rng) -> (physics outside the training ranges, the names of the
:class:`~synth7t.demo.DemoSpec` ranges it leaves)."""


def default_highres_dir() -> Path | None:
    """Where the test-only brains are: ``$SYNTH7T_HIGHRES``, else ``shared/data/highres`` beside the checkout
    (or beside the current folder). None when absent."""
    env = os.environ.get("SYNTH7T_HIGHRES")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[3] / "shared" / "data" / "highres",
                   Path.cwd().parent / "shared" / "data" / "highres"]
    for c in candidates:
        if all((c / files[0]).is_file() for files in TRANSFER_BRAINS.values()):
            return c
    return None


def _template_slab_values(spec: DemoSpec, margin_mm: float = 10.0) -> np.ndarray:
    t = load_template()
    z = t.affine[2, 3] + t.affine[2, 2] * np.arange(t.shape[2])
    keep = np.abs(z - spec.slab_center_z) <= spec.slab_mm / 2 + margin_mm
    v = t.data[:, :, keep]
    return v[v > 0.02]


def anatomy_from_brain(brain: Volume, mask: np.ndarray, keeps_csf: bool, reference: np.ndarray,
                       spec: DemoSpec, margin_mm: float = 10.0) -> Volume:
    """Map a real brain's intensities onto the anatomy scale by quantile matching (module docstring).

    The quantiles are taken in the slab (``spec``) of both brains; ``reference`` are the template's brain
    values there. Without CSF (``keeps_csf=False``), the tissue is matched to the reference values above the
    CSF/GM midpoint and the CSF spaces (:func:`csf_spaces`) get the CSF anatomy value.
    """
    if not keeps_csf:
        reference = reference[reference > (ANATOMY_ANCHORS[0] + ANATOMY_ANCHORS[1]) / 2]
    z = brain.affine[2, 3] + brain.affine[2, 2] * np.arange(brain.shape[2])
    slab = np.abs(z - spec.slab_center_z) <= spec.slab_mm / 2 + margin_mm
    m = mask > 0
    values = brain.data[:, :, slab][m[:, :, slab]]
    q = np.linspace(0, 100, 1001)
    src, dst = np.percentile(values, q), np.percentile(reference, q)
    src, keep = np.unique(src, return_index=True)  # strictly increasing for np.interp
    a = np.interp(brain.data, src, dst[keep]).astype(np.float32) * m
    if not keeps_csf:
        a = np.where(csf_spaces(m, brain.zooms), np.float32(ANATOMY_ANCHORS[0]), a)
    return brain.with_data(a.astype(np.float32))


def csf_spaces(tissue: np.ndarray, zooms, closing_mm: float = 3.0) -> np.ndarray:
    """Voxels outside ``tissue`` that a ``closing_mm`` closing of it and a hole filling add: sulci, ventricles."""
    from scipy import ndimage

    n = max(1, int(round(closing_mm / float(np.min(zooms)))))
    cross = ndimage.generate_binary_structure(3, 1)
    closed = ndimage.binary_erosion(ndimage.binary_dilation(tissue, cross, iterations=n), cross, iterations=n,
                                    border_value=1)
    return ndimage.binary_fill_holes(closed | tissue) & ~tissue


def load_transfer_brain(root: Path, name: str) -> tuple[Volume, np.ndarray, bool]:
    """(brain in canonical RAS, boolean mask, keeps_csf) of one of :data:`TRANSFER_BRAINS`."""
    brain_file, mask_file, keeps_csf = TRANSFER_BRAINS[name]
    brain = to_canonical(load_volume(root / brain_file))[0]
    mask = to_canonical(load_volume(root / mask_file))[0].data > 0.5 if mask_file else brain.data > 0
    return brain, mask, keeps_csf


def build_transfer_cohort(out: str | Path, highres: str | Path | None = None, *, seed: int = 1000,
                          spec: DemoSpec | None = None, brains: tuple[str, ...] = tuple(TRANSFER_BRAINS),
                          recipes: tuple[str, ...] = tuple(RECIPES)) -> Path:
    """Write one raw 3T-like/7T-like pair per (brain, recipe) and ``manifest.csv`` under ``out``.

    Layout as :func:`synth7t.demo.build_demo_cohort` (``raw/``, ``truth/``, ``manifest.csv``); subjects are named
    ``tr-<brain>-<recipe>``, with unknown covariates. Existing complete subjects are kept. Returns the manifest.
    """
    root = Path(highres) if highres is not None else default_highres_dir()
    if root is None or not root.is_dir():
        raise InputError(f"{highres or 'shared/data/highres'}: the test-only high-resolution brains are not here")
    spec = spec or DemoSpec()
    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    center = np.array([0.0, -18.0, spec.slab_center_z])
    reference = None
    subjects = []
    for b, brain_name in enumerate(brains):
        anatomy = None
        for r, recipe in enumerate(recipes):
            sid = f"tr-{brain_name}-{recipe}"
            paths = {k: out / "raw" / f"{sid}_{k[1]}T.nii.gz" for k in ("t3", "t7")}
            meta = out / "truth" / f"{sid}.json"
            if not (all(p.exists() for p in paths.values()) and meta.exists()):
                if anatomy is None:
                    reference = reference if reference is not None else _template_slab_values(spec)
                    brain, mask, keeps_csf = load_transfer_brain(root, brain_name)
                    anatomy = anatomy_from_brain(brain, mask, keeps_csf, reference, spec)
                rng = np.random.default_rng([seed, b, r])
                physics, outside = RECIPES[recipe](draw_physics_3t(rng, spec), rng)
                sim = render_pair(lambda w, vol=anatomy: sample_at(vol, w), spec, physics, TISSUE_7T, center, rng,
                                  {"corrupt_cerebellum": False, "motion_7t": False})
                save_volume(paths["t7"], sim["t7"], dtype=np.int16)
                save_volume(paths["t3"], sim["t3"], dtype=np.int16)
                save_volume(out / "truth" / f"{sid}_7T_clean.nii.gz", sim["t7_clean"])
                write_json(meta, {"brain": brain_name, "recipe": recipe, "outside_training_ranges": outside,
                                  "physics_3t": physics.to_dict(), "tissue_7t": list(TISSUE_7T)})
            info = read_json(meta)
            log.info("%s: 3T recipe %s (outside the training ranges: %s)", sid, recipe,
                     ", ".join(info["outside_training_ranges"]))
            subjects.append(Subject(subject=sid, t3=paths["t3"], t7=paths["t7"],
                                    extra={"simulated": "yes", "brain": brain_name, "recipe": recipe}))
    write_text(out / "TRANSFER.txt", "Test-only transfer set: real high-resolution brains (never used for\n"
               "training, tuning or calibration) rendered with the demo's 7T physics and 3T recipes outside its\n"
               "training ranges.\n")
    write_json(out / "transfer.json", {"spec": asdict(spec), "seed": seed, "brains": list(brains),
                                       "recipes": list(recipes)})
    return write_manifest(out / "manifest.csv", subjects)
