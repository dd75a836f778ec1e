"""Prediction: a raw 3T T1w scan in, a synthetic 7T brain out, in the scan's own world space.

For each input (:func:`predict_volume`):

1. load and validate, reorient to canonical RAS+ (an axis permutation: no resampling);
2. unless ``preprocessed``: N4, then skull stripping, both as the model's training data were prepared (the
   model folder's ``config.json`` ``preprocessing``: the 3T N4 preset, ``none`` when its 3T scans came
   bias-corrected, and the skull-strip method; ``3t`` and deepbet for a model folder that does not say);
   a preprocessed input's brain mask is its non-zero voxels;
3. resample the brain to the model's voxel size (that of its training grid, 0.65 mm by default) *in the scan's
   own canonical frame* (linear for the image, nearest neighbour for the mask): no template, no 7T needed;
4. crop to the brain box, pad in-plane to a multiple of the model's down-sampling factor, clipped min-max
   normalization with the model's percentiles, and the model's input standardization if it was trained with
   one (brain intensities mapped onto the training split's 7T histogram, :mod:`synth7t.intensity`);
5. slice-wise 2.5D inference in batches (axial slices, covariates in the context vector), optionally with
   left-right flip test-time augmentation (mean; the per-voxel standard deviation across the flips is written
   as an uncertainty map);
6. reassembly, inverse crop/pad, masking to the brain.

Outputs (per input, in ``OUT/<name>/``): ``syn7t.nii.gz`` (float32, model units [0, 1] = the input brain's
clipped 1st-99th percentile range, or the input's intensity units with ``rescale``), ``mask.nii.gz``,
``uncertainty.nii.gz`` (with ``tta``), ``syn7t_on_input_grid.nii.gz`` (with ``resample_to_input``) and
``provenance.json`` (which records each preprocessing step, its value and where the value came from: the
training recipe, an option, or the default). Options (``skullstrip``, ``n4``, ``voxel_size_mm``) override the
training recipe, with a logged warning when they differ from it. Every output volume's affine is that of the
resampled canonical grid, which covers the same world space as the input: the output overlays the input in any
viewer.

Cohorts (:func:`predict`): the jobs can be a shard of the list (``shard``); steps 1-4 of the next scans run in
worker processes while the network predicts the current one (:mod:`synth7t.inference.prefetch`); with ``bids``,
inputs and outputs follow BIDS and BIDS derivatives (:mod:`synth7t.inference.bids`).

The package: :mod:`~synth7t.inference.predictor` (options, results, the loaded model),
:mod:`~synth7t.inference.volume` (one scan, steps 1-6), :mod:`~synth7t.inference.cohort` (many scans),
:mod:`~synth7t.inference.prefetch` (preprocessing workers) and :mod:`~synth7t.inference.bids` (BIDS in and out).
Everything a caller needs is importable from ``synth7t.inference``; nothing here imports Lightning or
``synth7t.training``.
"""

from synth7t.inference.cohort import PlainLayout, collect_inputs, predict, provenance
from synth7t.inference.predictor import (
    OUTPUT_NAME,
    RUN_TIME_OPTIONS,
    PredictOptions,
    Predictor,
    PredictResult,
    PrepSpec,
)
from synth7t.inference.prefetch import failure_message
from synth7t.inference.volume import (
    DEFAULT_STEPS,
    finish_prediction,
    on_input_grid,
    predict_volume,
    prepare_input,
    prepare_scan,
    resolve_steps,
)
from synth7t.manifest import option_covariates  # re-exported: where covariates given as options are parsed

__all__ = [
    "DEFAULT_STEPS", "OUTPUT_NAME", "RUN_TIME_OPTIONS", "PlainLayout", "PredictOptions", "PredictResult", "Predictor",
    "PrepSpec", "collect_inputs", "failure_message", "finish_prediction", "on_input_grid", "option_covariates",
    "predict", "predict_volume", "prepare_input", "prepare_scan", "provenance", "resolve_steps",
]
