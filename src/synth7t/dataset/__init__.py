"""Slice store, 2.5D samples and augmentations.

* :mod:`synth7t.dataset.pack`: preprocessed work folder -> slice store (crop, pad, normalize, float16 memmaps,
  valid slices, splits) and the pure-array helpers used at predict time (``crop_box``, ``crop_pad``,
  ``uncrop``, ``clipped_minmax``, ``denormalize``).
* :mod:`synth7t.dataset.slices`: ``SliceStore``, ``SliceDataset`` (training samples), ``VolumeSlices``
  (inference batches).
* :mod:`synth7t.dataset.context`: the context vector (covariates + slice position).
* :mod:`synth7t.dataset.augment`: reproducible augmentations (GMM intensity, elastic, bias, scale, noise).
"""

from __future__ import annotations

from synth7t.dataset.augment import AugmentConfig, Augmenter, replay
from synth7t.dataset.context import CONTEXT_DIM, encode_context, slice_position
from synth7t.dataset.pack import (
    CropGeometry,
    clipped_minmax,
    crop_box,
    crop_pad,
    denormalize,
    pack,
    uncrop,
    unpack,
)
from synth7t.dataset.slices import SliceDataset, SliceStore, VolumeSlices

__all__ = [
    "CONTEXT_DIM",
    "AugmentConfig",
    "Augmenter",
    "CropGeometry",
    "SliceDataset",
    "SliceStore",
    "VolumeSlices",
    "clipped_minmax",
    "crop_box",
    "crop_pad",
    "denormalize",
    "encode_context",
    "pack",
    "replay",
    "slice_position",
    "uncrop",
    "unpack",
]
