"""``store.json``'s ``preprocessing``: the preprocessing recipe the packed subjects share (docs/data-layout.md).

Each subject's recipe comes from its ``provenance.json`` (:func:`subject_recipe`); :func:`preprocessing_record`
checks that the subjects packed together share it (or records the mix) and adds how the store normalizes. The
model folder copies the record, and prediction prepares raw inputs by it.
"""

from __future__ import annotations

import json
import logging

from synth7t.errors import ConfigError

log = logging.getLogger(__name__)


def normalization_record(lower_pct: float, upper_pct: float) -> dict:
    """The store's (and model's) ``normalization`` entry: clipped min-max with its percentiles."""
    return {"method": "clipped_minmax", "lower_pct": lower_pct, "upper_pct": upper_pct}


# the preprocessing settings that describe what a model's inputs look like: subjects packed together must share
# them (the other settings of provenance.json, e.g. QC thresholds or the seed, do not change the images' kind)
RECIPE_KEYS = ("pipeline_version", "skullstrip", "t3_already_corrected", "n4_3t", "n4_7t_first", "n4_7t",
               "registration_resolution_mm", "registration_transform", "voxel_size_mm")
CSF_HANDLING = ("t3/t7.nii.gz keep the CSF (cut to the brain+CSF mask); the store zeroes everything outside the "
                "brain mask (mask.nii.gz)")


def _n4_label(params: dict | None) -> str | dict | None:
    from synth7t.preprocess.bias import preset_name

    return preset_name(params) or params


def subject_recipe(cand, voxel_size_mm: list[float]) -> dict | None:
    """The preprocessing recipe of one subject (a pack candidate: ``provenance``, ``has_t7``) from its
    ``provenance.json`` (None when it has none)."""
    params = (cand.provenance or {}).get("params")
    if not isinstance(params, dict):
        return None
    n4_3t = "none (already corrected)" if params.get("t3_already_corrected") else _n4_label(params.get("n4_3t"))
    rec = {"pipeline_version": params.get("pipeline_version"), "skullstrip": params.get("skullstrip"),
           "t3_already_corrected": params.get("t3_already_corrected"), "n4_3t": n4_3t,
           "n4_7t_first": _n4_label(params.get("n4_7t_first")) if cand.has_t7 else None,
           "n4_7t": _n4_label(params.get("n4_7t")) if cand.has_t7 else None,
           "registration_resolution_mm": params.get("registration_resolution_mm") if cand.has_t7 else None,
           "registration_transform": params.get("registration_transform") if cand.has_t7 else None,
           "voxel_size_mm": voxel_size_mm}
    return rec


def preprocessing_record(recipes: dict[str, dict | None], methods: dict[str, list[str]], normalization: dict,
                         *, allow_mixed: bool) -> dict:
    """``store.json``'s ``preprocessing``: the recipe the packed subjects share (see docs/data-layout.md).

    Settings that differ between subjects raise a :class:`ConfigError` naming them, or with ``allow_mixed`` are
    recorded as ``{"mixed": {value: [subjects]}}`` with a warning. Subjects without ``provenance.json`` are
    listed under ``unknown`` (with a warning).
    """
    known = {n: r for n, r in recipes.items() if r is not None}
    unknown = sorted(n for n, r in recipes.items() if r is None)
    rec: dict = {}
    mixed: dict[str, dict[str, list[str]]] = {}
    for key in RECIPE_KEYS:
        values: dict[str, list[str]] = {}
        for name, r in known.items():
            if r.get(key) is None and key in ("n4_7t_first", "n4_7t", "registration_resolution_mm",
                                              "registration_transform"):
                continue  # prediction-only subjects have no 7T steps
            values.setdefault(json.dumps(r.get(key), sort_keys=True), []).append(name)
        if len(values) == 1:
            rec[key] = json.loads(next(iter(values)))
        elif len(values) > 1:  # keys: the value as written (strings unquoted)
            mixed[key] = {(json.loads(k) if k.startswith('"') else k): sorted(v) for k, v in values.items()}
            rec[key] = {"mixed": mixed[key]}
    if mixed:
        lines = "; ".join(f"{k}: " + ", ".join(f"{v} ({len(n)} subject(s), e.g. {n[0]})" for v, n in d.items())
                          for k, d in mixed.items())
        if not allow_mixed:
            raise ConfigError(f"subjects were preprocessed with different settings ({lines}); re-run "
                              "`synth7t preprocess` on them with one setting, or pack with "
                              "--allow-mixed-preprocessing to accept a mixed store")
        log.warning("packing subjects preprocessed with different settings: %s", lines)
    if unknown:
        log.warning("%d subject(s) have no provenance.json (preprocessing unknown): %s", len(unknown),
                    ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
        rec["unknown"] = unknown
    if known:
        rec["csf"] = CSF_HANDLING
        used: dict[str, int] = {}
        for ms in methods.values():
            for m in ms:
                used[m] = used.get(m, 0) + 1
        rec["skullstrip_used"] = dict(sorted(used.items()))  # masks per method actually used (fallbacks show)
    rec["normalization"] = normalization
    return rec
