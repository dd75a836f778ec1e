"""Preprocessing (thesis 1.2): N4 bias correction, skull stripping, 3T -> 7T coregistration, QC, anonymization.

Per-volume functions (reused by inference): :func:`n4`, :func:`strip`, :func:`register`, :func:`resample_to`.
Cohort entry point: :func:`preprocess` with :class:`PreprocessConfig`.
"""

from synth7t.preprocess.bias import N4_PRESETS, N4Params, n4, n4_preset
from synth7t.preprocess.pipeline import PreprocessResult, preprocess
from synth7t.preprocess.register import RegistrationResult, apply_transforms, register, resample_to
from synth7t.preprocess.skullstrip import strip, strip_with_info
from synth7t.preprocess.subject import PreprocessConfig

__all__ = ["N4_PRESETS", "N4Params", "PreprocessConfig", "PreprocessResult", "RegistrationResult",
           "apply_transforms", "n4", "n4_preset", "preprocess", "register", "resample_to", "strip",
           "strip_with_info"]
