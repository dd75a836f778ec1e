"""3-D patch samples for the 3-D U-net (issue 16), cut from the slice store's volumes: no second store format.

The store's ``STORE/<pseudonym>/{t3,t7,mask}.npy`` are whole brain-cropped (Z, H, W) memmaps; a
:class:`PatchDataset3D` sample is a ``patch``-sided cube of them centred on a brain voxel drawn uniformly from the
subject's mask (a slice is drawn with probability proportional to its brain voxels, then a brain pixel in it), on
the subject's valid slices, shifted to stay inside the volume and zero-padded where the volume is smaller than
the cube. The draw is a function of ``(seed, epoch, index)`` (or of ``(seed, index)`` with ``fixed``: validation
sees the same cubes every epoch), so samples do not depend on the number of workers or on a resume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synth7t.dataset.slices import SliceStore, input_table, standardization_record
from synth7t.intensity import standardize_input


def cube_corner(center: np.ndarray, shape: tuple[int, ...], size: int) -> np.ndarray:
    """Corner of the ``size`` cube around ``center``, shifted inside ``shape`` (0 where the side is shorter)."""
    lim = np.maximum(np.asarray(shape) - size, 0)
    return np.clip(np.asarray(center) - size // 2, 0, lim).astype(np.int64)


def cut_cube(arr: np.ndarray, corner: np.ndarray, size: int) -> np.ndarray:
    """``arr[corner : corner + size]`` (3-D) as float32, zero-padded at the far end where ``arr`` is shorter."""
    z, y, x = (int(c) for c in corner)
    part = np.asarray(arr[z : z + size, y : y + size, x : x + size], np.float32)
    pad = [(0, size - s) for s in part.shape]
    return np.pad(part, pad) if any(p[1] for p in pad) else part


class PatchDataset3D:
    """Map-style dataset of ``per_subject`` random cubes per subject of a split (with a 7T).

    Sample ``i`` belongs to subject ``i // per_subject``. Items: ``input``, ``target``, ``mask`` as float32
    (1, patch, patch, patch), ``corner`` int64 (3,) (the cube's first voxel in the (Z, H, W) volume), ``subject``.
    ``standardize``: the model folder's ``input_standardization`` record (or bare ``histmatch`` reference
    quantiles), applied as the 2.5D :class:`SliceDataset` applies it.
    """

    def __init__(self, store: SliceStore | str | Path, split: str, patch: int, per_subject: int, *, seed: int = 0,
                 fixed: bool = False, standardize: dict | np.ndarray | None = None):
        self.store = store if isinstance(store, SliceStore) else SliceStore(store)
        self.patch, self.per_subject, self.seed, self.fixed, self.epoch = int(patch), int(per_subject), seed, fixed, 0
        self.subjects = [s for s in self.store.split_subjects(split) if self.store.info(s).get("has_t7")]
        self.standardize = standardization_record(standardize)
        self._tables: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self._counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per subject: (valid slices, brain voxels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.subjects) * self.per_subject

    def _slice_counts(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._counts:
            z = self.store.valid_slices(name)
            mask = self.store.array(name, "mask")
            self._counts[name] = (z, np.array([np.count_nonzero(mask[k]) for k in z], np.float64))
        return self._counts[name]

    def center(self, name: str, rng: np.random.Generator) -> np.ndarray:
        """A brain voxel (z, y, x) of ``name``, uniform over its mask on the valid slices (the middle if none)."""
        zs, counts = self._slice_counts(name)
        shape = self.store.array(name, "mask").shape
        if counts.sum() == 0:
            return np.asarray(shape) // 2
        z = int(zs[rng.choice(len(zs), p=counts / counts.sum())])
        yx = np.argwhere(np.asarray(self.store.array(name, "mask")[z]) > 0)
        return np.array([z, *yx[rng.integers(len(yx))]])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        name = self.subjects[index // self.per_subject]
        key = [self.seed, index, 3] if self.fixed else [self.seed, self.epoch, index, 3]
        rng = np.random.default_rng(key)
        t3 = self.store.array(name, "t3")
        corner = cube_corner(self.center(name, rng), t3.shape, self.patch)
        x = cut_cube(t3, corner, self.patch)
        if self.standardize is not None:
            if name not in self._tables:
                self._tables[name] = input_table(self.store, name, self.standardize)
            x = standardize_input(x, self.standardize, table=self._tables[name])
        return {"input": x[None], "target": cut_cube(self.store.array(name, "t7"), corner, self.patch)[None],
                "mask": cut_cube(self.store.array(name, "mask"), corner, self.patch)[None], "corner": corner,
                "subject": name}
