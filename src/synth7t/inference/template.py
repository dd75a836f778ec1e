"""Prediction with a model that works on a template grid: the thesis authors' published models
(``model.kind: thesis_published``, imported by ``synth7t import-thesis``), run as their weights were trained.

For each scan (:func:`prepare_template_scan`, the CPU half, inline or in a preprocessing worker):

1. N4 and skull stripping as for every synth7t model (:func:`~synth7t.inference.volume.correct_and_strip`; the
   model's recipe: deepbet, and N4 with the authors' iteration counts);
2. registration onto the 7T template grid, one resampling (linear) through ``W``, the 4x4 map of RAS+ mm points
   from the template's space to the scan's: ``W = R @ A`` with ``R`` a rigid registration (ANTs, mutual
   information) of the brain to the 3T template and ``A`` the template affine (3T template -> 7T template grid);
   without a 3T template, ``W`` is a rigid + affine registration straight to the 7T template; an input already
   on the template grid (same shape and affine) is not moved (``W`` = identity);
3. the authors' normalization: ``(x - p1) / (p99 - p1)`` with the 1st and 99th percentiles of the voxels > 0 of
   the registered brain, not clipped (the background keeps its negative value).

Then (:func:`finish_template_prediction`): the volume is cut along the model's slice axis *in the template's
voxel order* (no reorientation); the window of slices ``j .. j+S-1`` (S = 3) predicts slice ``j``, with the
covariate tokens of the model's ``conditions`` (age in years, sex 1 = F, diagnosis 1 = cognitively normal or
SCD, slice position ``2 (j - mid) / n_slices`` with ``mid`` the centre of the non-zero extent along the slice axis);
slices are padded with zeros in-plane to the model's multiple (half before, the rest after) and the padding cut
from the output. The output is not clamped; it is masked to the registered brain and written on the template
grid, and, through ``W^-1``, on the model's voxel grid over the input (so that it overlays the raw scan).
``tta``: the mean of the predictions of the volume and of its mirror along the template axis closest to
left-right (mirrored back), their standard deviation as the uncertainty.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from synth7t.dataset.template_store import (
    extent_mid,
    normalize_published,
    pad_amounts,
    same_grid,
    template_tokens,
    to_slices,
)
from synth7t.errors import InputError
from synth7t.io import Volume, load_volume
from synth7t.progress import progress_bar

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _template(path: str) -> Volume:
    return load_volume(path)


def register_to_template(brain: Volume, template: dict, raw: Volume, *, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``W`` (template RAS+ mm -> scan RAS+ mm) and a record of how it was found (module docstring, step 2)."""
    from synth7t.preprocess.register import read_itk_affine, register

    tmpl7 = _template(template["file"])
    if same_grid(raw, tmpl7.shape, tmpl7.affine):
        return np.eye(4), {"method": "none: the input is on the template grid",
                           "template7T_to_scan": np.eye(4).tolist()}
    with tempfile.TemporaryDirectory(prefix="synth7t-template-") as tmp:
        if template.get("template_3t"):
            res = register(brain, _template(template["template_3t"]), transform="Rigid", resolution_mm=1.0,
                           transforms_dir=Path(tmp), seed=seed)
            rigid = read_itk_affine(res.forward[0])
            to_7t = read_itk_affine(template["affine_file"])
            record = {"method": "rigid to the 3T template (ANTs, mutual information, 1 mm), then the template affine",
                      "rigid_template3T_to_scan": rigid.tolist(), "template7T_to_template3T": to_7t.tolist(),
                      "ncc_with_template3T": round(res.ncc, 4)}
            world = rigid @ to_7t
        else:
            res = register(brain, tmpl7, transform="Affine", resolution_mm=1.0, transforms_dir=Path(tmp), seed=seed)
            world = read_itk_affine(res.forward[0])
            record = {"method": "rigid + affine to the 7T template (ANTs, mutual information, 1 mm)",
                      "ncc_with_template7T": round(res.ncc, 4)}
    record["template7T_to_scan"] = world.tolist()
    return world, record


def prepare_template_scan(raw: Volume, canonical: Volume, spec, steps: dict, *, preprocessed: bool) -> dict:
    """The CPU half of a template model's prediction (module docstring, steps 1-3)."""
    from synth7t.inference.steps import correct_and_strip, on_model_grid
    from synth7t.preprocess.register import resample_to

    brain, mask, timings = correct_and_strip(canonical, preprocessed=preprocessed,
                                             skullstrip=steps["skullstrip"]["value"], n4_preset=steps["n4"]["value"])
    t0 = time.perf_counter()
    template = spec.template
    world, record = register_to_template(brain, template, raw)
    timings["registration"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    tmpl7 = _template(template["file"])
    on_template = resample_to(brain, tmpl7, order=1, world=world, antialias=False)
    inside = on_template.data > 0
    if not inside.any():
        raise InputError(f"{raw.source}: no brain on the template grid after registration")
    try:
        normed, limits = normalize_published(on_template.data, spec.lower_pct, spec.upper_pct)
    except ValueError as exc:
        raise InputError(f"{raw.source}: {exc} on the template grid") from None
    brain_r, mask_r = on_model_grid(canonical, brain, mask, tuple(steps["voxel_size_mm"]["value"]))
    timings["resample_normalize"] = time.perf_counter() - t1
    return {"template_stack": normed, "template_mask": inside, "template_affine": tmpl7.affine,
            "world": world, "registration": record, "limits": limits, "brain": brain_r,
            "mask": mask_r.with_data((mask_r.data > 0).astype(np.float32)), "timings": timings}


def missing_covariates(config: dict, covariates: dict) -> list[str]:
    """The covariates a model requires (``config.json`` ``requires_covariates``) that a scan lacks."""
    return [k for k in config.get("requires_covariates", []) if covariates.get(k) is None]


@torch.inference_mode()
def run_windows(predictor, volume: np.ndarray, inside: np.ndarray, covariates: dict, *, batch_size: int,
                progress: str | None = None) -> np.ndarray:
    """The network over every window of a template-grid volume (module docstring); returns the volume of slice
    predictions in the template's voxel order (the last ``S - 1`` slices along the slice axis are 0)."""
    from synth7t.manifest import diagnosis_group

    cfg = predictor.net.cfg
    axis, s = predictor.template["slice_dim"], cfg.in_slices
    n, a, b = np.moveaxis(volume, axis, 0).shape
    pa0, pb0 = pad_amounts(a, cfg.downsample_factor)[0], pad_amounts(b, cfg.downsample_factor)[0]
    padded = to_slices(volume, axis, cfg.downsample_factor)  # (N, A', B'), zero-padded as in training
    mid = extent_mid(inside, axis)
    info = {"age": covariates.get("age"), "sex": covariates.get("sex"),
            "group": diagnosis_group(covariates.get("diagnosis"))}
    out = np.zeros((n, a, b), np.float32)
    starts = np.arange(max(0, n - s + 1))
    batches = [starts[lo:lo + batch_size] for lo in range(0, len(starts), batch_size)]
    for js in progress_bar(batches, progress or "", enabled=progress is not None):
        x = torch.from_numpy(np.stack([padded[j:j + s] for j in js])).to(predictor.device)
        pos = 2.0 * (js.astype(np.float64) - mid) / cfg.n_slices_position
        ctx = torch.from_numpy(template_tokens(cfg.conditions, info, pos)).to(predictor.device)
        y = predictor.forward(x, ctx)[:, 0]
        out[js] = y[:, pa0:pa0 + a, pb0:pb0 + b].float().cpu().numpy()
    return np.moveaxis(out, 0, axis)


def lr_axis(affine: np.ndarray) -> int:
    """The voxel axis of a grid closest to the left-right (RAS x) direction."""
    return int(np.argmax(np.abs(np.asarray(affine)[0, :3]) / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))


def finish_template_prediction(predictor, prep: dict, opts, *, covariates: dict) -> dict:
    """The network half (module docstring): outputs on the template grid and on the model grid over the input."""
    from synth7t.preprocess.register import resample_to

    missing = missing_covariates(predictor.config, covariates)
    if missing:
        raise InputError(f"this model needs {' and '.join(missing)} (missing); give --age/--sex"
                         f"{'/--diagnosis' if 'diagnosis' in missing else ''} or a manifest with them")
    t0 = time.perf_counter()
    x, inside = prep["template_stack"], prep["template_mask"]
    bs = predictor.batch_size(tuple(s for i, s in enumerate(x.shape) if i != predictor.template["slice_dim"]),
                              opts.batch_size)
    bar = f"slices ({bs} a batch)" if predictor.show_progress else None
    preds = [run_windows(predictor, x, inside, covariates, batch_size=bs, progress=bar)]
    if opts.tta:
        flip = lr_axis(prep["template_affine"])
        mirrored = run_windows(predictor, np.flip(x, flip).copy(), np.flip(inside, flip).copy(), covariates,
                               batch_size=bs, progress=bar and f"mirrored {bar}")
        preds.append(np.flip(mirrored, flip))
    prep["timings"]["network"] = time.perf_counter() - t0
    pred = np.mean(preds, axis=0) * inside
    unc = np.std(preds, axis=0) * inside if len(preds) > 1 else None
    grid = Volume(np.zeros(x.shape, np.float32), prep["template_affine"])
    back = np.linalg.inv(prep["world"])
    native_mask = prep["mask"].data > 0

    def to_input(data: np.ndarray) -> Volume:
        v = resample_to(grid.with_data(data.astype(np.float32)), prep["brain"], order=1, world=back, antialias=False)
        return v.with_data(v.data * native_mask)

    out = {"syn7t": to_input(pred), "syn7t_template": grid.with_data(pred.astype(np.float32)),
           "mask_template": grid.with_data(inside.astype(np.float32)), "mask": prep["mask"],
           "limits": prep["limits"], "timings": prep["timings"], "reorientation": prep["reorientation"],
           "canonical": prep["canonical"], "steps": prep["steps"], "input": prep["brain"],
           "registration": prep["registration"]}
    if unc is not None:
        out["uncertainty"] = to_input(unc)
        out["uncertainty_template"] = grid.with_data(unc.astype(np.float32))
    return out
