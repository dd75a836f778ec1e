"""The preprocessing steps every prediction shares, whatever grid its model works on (steps 2-3 of
:mod:`synth7t.inference`): N4 and skull stripping, and the brain on the model's voxel grid over the scan."""

from __future__ import annotations

import time

import numpy as np

from synth7t.errors import InputError
from synth7t.io import Volume


def correct_and_strip(vol: Volume, *, preprocessed: bool, skullstrip: str, n4_preset: str | dict = "3t"
                      ) -> tuple[Volume, Volume, dict]:
    """Steps 2 of prediction: (brain, mask, timings). N4 (``n4_preset``: a preset name, N4 parameters or
    ``"none"``), then skull stripping; a ``preprocessed`` input is its own brain, its mask its non-zero voxels."""
    timings = {}
    t0 = time.perf_counter()
    if preprocessed:
        from synth7t.preprocess.skullstrip import clean_mask

        return vol, vol.with_data(clean_mask(vol.data > 0).astype(np.float32)), timings
    from synth7t.preprocess.bias import N4Params, n4
    from synth7t.preprocess.skullstrip import strip

    params = N4Params(**n4_preset) if isinstance(n4_preset, dict) else n4_preset
    corrected = vol if params == "none" else n4(vol, params)
    timings["n4"] = time.perf_counter() - t0
    mask, _ = strip(corrected, skullstrip)
    brain = corrected.with_data(corrected.data * (mask.data > 0))
    timings["skullstrip"] = time.perf_counter() - t0 - timings["n4"]
    return brain, mask, timings


def on_model_grid(vol: Volume, brain: Volume, mask: Volume, voxel_mm) -> tuple[Volume, Volume]:
    """Step 3: the brain (linear) and its mask (nearest neighbour) on the model's voxel grid over the scan's own
    canonical frame; one line when no brain is left."""
    from synth7t.preprocess.register import resample_to

    brain_r = resample_to(brain, voxel_mm, order=1)
    mask_r = resample_to(mask, (brain_r.shape, brain_r.affine), order=0)
    if not (mask_r.data > 0).any():
        raise InputError(f"{vol.source}: no brain left after resampling to {voxel_mm} mm")
    return brain_r, mask_r
