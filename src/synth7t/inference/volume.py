"""One scan: resolve the preprocessing steps, prepare the input (steps 1-4 of :mod:`synth7t.inference`; the same
function runs inline or in a preprocessing worker), run the network on it and put the result back on a grid."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from synth7t.inference.predictor import PredictOptions, Predictor, PrepSpec
from synth7t.io import Volume, load_volume, to_canonical

log = logging.getLogger(__name__)


DEFAULT_STEPS = {"skullstrip": "deepbet", "n4": "3t"}


def _recipe_value(recipe: dict, key: str):
    """A step's value in the training recipe (``config.json`` ``preprocessing``), or None when unknown/mixed."""
    v = recipe.get(key)
    if key == "n4":
        v = recipe.get("n4_3t")
        if isinstance(v, str) and v.startswith("none"):
            return "none"
    if isinstance(v, dict) and "mixed" in v:
        return None
    return v


def resolve_steps(predictor: Predictor, opts: PredictOptions) -> tuple[dict, list[str]]:
    """The preprocessing steps of a prediction: ``{step: {"value", "source"}}`` with source ``option``,
    ``training`` or ``default``; and a warning per option that differs from the training recipe."""
    recipe = predictor.config.get("preprocessing") or {}
    steps, warnings = {}, []
    for key, option in (("skullstrip", opts.skullstrip), ("n4", opts.n4)):
        trained = _recipe_value(recipe, key)
        if option is not None:
            steps[key] = {"value": option, "source": "option"}
            if trained is not None and option != trained:
                warnings.append(f"{key} {option!r} differs from the model's training data ({trained!r}); "
                                "its predictions may suffer")
        elif trained is not None:
            steps[key] = {"value": trained, "source": "training"}
        else:
            steps[key] = {"value": DEFAULT_STEPS[key], "source": "default"}
    trained_vox = list(predictor.voxel_mm)
    if opts.voxel_size_mm is not None:
        vox = [float(opts.voxel_size_mm)] * 3
        steps["voxel_size_mm"] = {"value": vox, "source": "option"}
        if not np.allclose(vox, trained_vox, atol=1e-3):
            warnings.append(f"voxel size {opts.voxel_size_mm:g} mm differs from the model's training grid "
                            f"({', '.join(f'{v:g}' for v in trained_vox)} mm); its predictions may suffer")
    else:
        steps["voxel_size_mm"] = {"value": trained_vox,
                                  "source": "training" if "voxel_size_mm" in predictor.config else "default"}
    if opts.preprocessed:
        for key in ("skullstrip", "n4"):
            steps[key] = {"value": None, "source": "skipped: input is preprocessed"}
    if predictor.template is not None:
        t = predictor.template
        how = ("rigid to the 3T template, then the template affine" if t.get("template_3t")
               else "rigid + affine to the 7T template")
        steps["registration"] = {"value": f"{how}, onto the {t['name']} grid {tuple(t['shape'])} (none for a scan "
                                          "already on that grid)", "source": "model"}
        if opts.rescale:
            warnings.append("--rescale does not apply to this model: its output is in the units of its normalized "
                            "7T training targets")
    return steps, warnings


def prepare_input(vol: Volume, predictor: Predictor | PrepSpec, *, preprocessed: bool, skullstrip: str,
                  n4_preset: str | dict = "3t", voxel_mm: tuple[float, float, float] | None = None) -> dict:
    """Canonical 3T volume -> brain on the model's grid (``voxel_mm``, default the model's), its mask, the crop
    geometry and the normalized stack. ``n4_preset``: a preset name, N4 parameters, or ``"none"``.
    ``predictor``: the model, or its :class:`PrepSpec` (in a preprocessing worker)."""
    from synth7t.dataset.cropnorm import clipped_minmax, crop_box, crop_pad
    from synth7t.inference.steps import correct_and_strip, on_model_grid

    brain, mask, timings = correct_and_strip(vol, preprocessed=preprocessed, skullstrip=skullstrip,
                                             n4_preset=n4_preset)
    t1 = time.perf_counter()
    voxel_mm = voxel_mm or predictor.voxel_mm
    brain_r, mask_r = on_model_grid(vol, brain, mask, voxel_mm)
    m = mask_r.data > 0
    box = crop_box(m)
    stack, geom = crop_pad(brain_r.data, box, None, predictor.multiple)  # (Z, H, W)
    mstack, _ = crop_pad(m.astype(np.uint8), box, None, predictor.multiple)
    normed, limits = clipped_minmax(stack, mstack, predictor.lower_pct, predictor.upper_pct)
    timings["resample_crop_normalize"] = time.perf_counter() - t1
    return {"brain": brain_r, "mask": mask_r.with_data(m.astype(np.float32)), "geometry": geom, "stack": normed,
            "mask_stack": mstack, "limits": limits, "timings": timings}


def prepare_scan(scan: Volume | str | Path, spec: PrepSpec, steps: dict, *, preprocessed: bool,
                 keep_input: bool = True) -> dict:
    """The CPU half of a prediction, the same inline or in a preprocessing worker (:mod:`synth7t.inference.prefetch`):
    load ``scan`` (a path) or take it loaded, reorient it to canonical and :func:`prepare_input` it with the
    resolved ``steps``. ``keep_input``: keep the canonical input (for ``resample_to_input``)."""
    t0 = time.perf_counter()
    vol = scan if isinstance(scan, Volume) else load_volume(scan)
    canonical, info = to_canonical(vol)
    load_s = time.perf_counter() - t0
    if spec.template is not None:  # a model on a template grid (the published thesis models)
        from synth7t.inference.template import prepare_template_scan

        prep = prepare_template_scan(vol, canonical, spec, steps, preprocessed=preprocessed)
    else:
        prep = prepare_input(canonical, spec, preprocessed=preprocessed, skullstrip=steps["skullstrip"]["value"],
                             n4_preset=steps["n4"]["value"], voxel_mm=tuple(steps["voxel_size_mm"]["value"]))
    prep["timings"] = {"load": load_s, **prep["timings"]}
    prep["reorientation"], prep["canonical"], prep["steps"] = info, canonical if keep_input else None, steps
    return prep


def predict_volume(predictor: Predictor, vol: Volume, opts: PredictOptions, *, covariates: dict | None = None) -> dict:
    """Predict one loaded scan; returns Volumes ``syn7t``, ``mask`` (and ``uncertainty``) plus bookkeeping."""
    steps, _ = resolve_steps(predictor, opts)
    prep = prepare_scan(vol, predictor.prep_spec, steps, preprocessed=opts.preprocessed)
    return finish_prediction(predictor, prep, opts, covariates=covariates)


def finish_prediction(predictor: Predictor, prep: dict, opts: PredictOptions, *,
                      covariates: dict | None = None) -> dict:
    """The network half of a prediction: a :func:`prepare_scan` result -> the outputs of :func:`predict_volume`."""
    from synth7t.dataset.cropnorm import denormalize, uncrop
    from synth7t.manifest import diagnosis_group

    cov = covariates or {}
    if predictor.template is not None:
        from synth7t.inference.template import finish_template_prediction

        return finish_template_prediction(predictor, prep, opts, covariates=cov)
    t0 = time.perf_counter()
    pred, unc = predictor.predict_stack(prep["stack"], age=cov.get("age"), sex=cov.get("sex"),
                                        group=diagnosis_group(cov.get("diagnosis")), batch_size=opts.batch_size,
                                        tta=opts.tta, fusion=opts.fusion)
    prep["timings"]["network"] = time.perf_counter() - t0
    pred = pred * (prep["mask_stack"] > 0)
    if opts.rescale:
        pred = np.where(prep["mask_stack"] > 0, denormalize(pred, prep["limits"]), 0.0)
    grid = prep["brain"]
    out = {"syn7t": grid.with_data(uncrop(pred.astype(np.float32), prep["geometry"])), "mask": prep["mask"],
           "limits": prep["limits"], "timings": prep["timings"], "reorientation": prep["reorientation"],
           "canonical": prep["canonical"], "steps": prep["steps"],
           "input": prep["brain"]}  # input: the preprocessed input on the output grid (QC thumbnails)
    if unc is not None:
        out["uncertainty"] = grid.with_data(uncrop((unc * (prep["mask_stack"] > 0)).astype(np.float32),
                                                   prep["geometry"]))
    return out


def on_input_grid(pred: Volume, canonical: Volume, info) -> Volume:
    """The prediction resampled (linear) onto the input's own voxel grid and orientation."""
    from synth7t.io import from_canonical
    from synth7t.preprocess.register import resample_to

    return from_canonical(resample_to(pred, canonical, order=1), info)
