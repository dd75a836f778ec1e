"""Slice store, 2.5D samples and augmentations.

* :mod:`synth7t.dataset.pack`: preprocessed work folder -> slice store (crop, pad, normalize, float16 memmaps,
  valid slices, splits, recipe), and ``unpack``.
* :mod:`synth7t.dataset.cropnorm`: the crop/pad layout and clipped min-max normalization that packing and
  prediction share (``crop_box``, ``crop_pad``, ``uncrop``, ``clipped_minmax``, ``denormalize``).
* :mod:`synth7t.dataset.splits`: seeded, stratified train / val / test splits.
* :mod:`synth7t.dataset.recipe`: ``store.json``'s ``preprocessing`` record.
* :mod:`synth7t.dataset.slices`: ``SliceStore``, ``SliceDataset`` (training samples), ``VolumeSlices``
  (inference batches).
* :mod:`synth7t.dataset.context`: the context vector (covariates + slice position).
* :mod:`synth7t.dataset.augment`: reproducible augmentations (GMM intensity, elastic, bias, scale, noise).
"""

from __future__ import annotations

from synth7t.dataset.augment import AugmentConfig, Augmenter, replay
from synth7t.dataset.context import CONTEXT_DIM, encode_context, slice_position
from synth7t.dataset.cropnorm import CropGeometry, clipped_minmax, crop_box, crop_pad, denormalize, uncrop
from synth7t.dataset.pack import pack, unpack
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
