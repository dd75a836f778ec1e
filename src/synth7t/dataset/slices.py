"""2.5D samples from a slice store (thesis 3.1.3): S = 2k + 1 neighbouring 3T slices -> the middle 7T slice.

* :class:`SliceStore` reads ``store.json`` and opens each subject's ``.npy`` arrays lazily with
  ``np.load(mmap_mode="r")``. Open memmaps are never pickled and are reopened in a new process (the cache
  remembers the pid that filled it), so the store survives being sent to DataLoader workers, forked or
  spawned. At most ``max_open`` subjects are kept open (LRU) to bound file descriptors.
  Slices read through the memmaps show in RSS as file-backed page cache (clean, reclaimable by the
  kernel); anonymous memory does not grow with the store or the epoch.
* :class:`SliceDataset` indexes the valid slices of one split; ``dataset[i]`` is the sample of
  ``docs/data-layout.md`` (numpy float32 arrays; torch's default collate makes tensors of them; with
  ``standardize``, the 3T input standardized as the model folder's ``input_standardization`` record says,
  :func:`synth7t.intensity.standardize_input`; with ``match_target``, the 7T target's brain histogram-matched to
  that input's) plus ``"augment"`` (JSON string of the augmentation records, ``"[]"`` without augmentation).
  Subjects without a 7T (split ``"predict"``) give samples without ``"target"``.
* :class:`VolumeSlices` yields the 2.5D inputs of a whole ``(Z, H, W)`` stack in batches (inference).

Edge slices: a neighbour outside the stack is replaced by the nearest edge slice (index clamped to
``[0, Z - 1]``), so slice 0 with S = 3 reads slices (0, 0, 1). The store's stacks are cropped to the brain's
bounding box, so edge slices are (near) empty and replication adds no spurious anatomy.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from synth7t.dataset import context as ctx
from synth7t.dataset.augment import Augmenter
from synth7t.dataset.cropnorm import CropGeometry
from synth7t.dataset.gmm import GMMFit
from synth7t.dataset.pack import KINDS, MIN_AREA_FRAC, PREDICT_SPLIT, SPLITS, read_store_meta
from synth7t.dataset.views import (
    check_views,
    extent,
    pad_to,
    positions,
    read_window,
    round_up,
    sample_shape,
    slice_areas,
    view_code,
    view_shape,
)
from synth7t.errors import InputError
from synth7t.intensity import (
    float16_lookup,
    nyul_landmarks,
    nyul_standard,
    quantile_table,
    quantiles,
    standardization_table,
    standardize,
    standardize_input,
)


def neighbour_indices(z: int | np.ndarray, n_slices: int, depth: int) -> np.ndarray:
    """Indices ``clip(z + (-k..k), 0, depth - 1)`` of the ``n_slices = 2k + 1`` slices around ``z``.

    ``z`` scalar -> shape (S,); ``z`` of shape (B,) -> (B, S).
    """
    if n_slices < 1 or n_slices % 2 == 0:
        raise ValueError(f"n_slices must be a positive odd number, got {n_slices}")
    k = n_slices // 2
    offsets = np.arange(-k, k + 1)
    return np.clip(np.asarray(z)[..., None] + offsets, 0, depth - 1)


class SliceStore:
    """Read access to a slice store folder (see :mod:`synth7t.dataset.pack`)."""

    def __init__(self, path: str | Path, max_open: int = 64):
        path = Path(path)
        self.root = path.parent if path.suffix == ".json" else path
        self.meta = read_store_meta(self.root)
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._pid = os.getpid()
        self._open: OrderedDict[str, dict[str, np.memmap]] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # never pickle open memmaps
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_cache()

    @property
    def subjects(self) -> list[str]:
        return sorted(self.meta["subjects"])

    @property
    def splits(self) -> dict[str, list[str]]:
        return self.meta["splits"]

    @property
    def hw(self) -> tuple[int, int]:
        return tuple(self.meta["hw"])  # type: ignore[return-value]

    @property
    def on_template(self) -> bool:
        """A store packed onto a template model's grid (``pack --like``, :mod:`.template_store`): windows
        ``j .. j+S-1`` predict slice ``j`` and the context is that model's covariate tokens."""
        return self.meta.get("layout") == "template"

    def window(self, z: int, n_slices: int, depth: int) -> np.ndarray:
        """The slice indices of sample ``z``'s input: centred (clamped at the edges), or on a template store the
        window starting at ``z``."""
        if self.on_template:
            return np.arange(z, z + n_slices)
        return neighbour_indices(z, n_slices, depth)

    def info(self, subject: str) -> dict:
        try:
            return self.meta["subjects"][subject]
        except KeyError:
            raise InputError(f"{self.root}: subject {subject!r} is not in the slice store") from None

    def split_subjects(self, split: str) -> list[str]:
        """Subjects of ``split`` ("train", "val", "test", "predict") or ``"all"``."""
        if split == "all":
            return self.subjects
        if split not in (*SPLITS, PREDICT_SPLIT):
            raise ValueError(f"split must be one of {(*SPLITS, PREDICT_SPLIT, 'all')}, got {split!r}")
        return list(self.splits.get(split, []))

    def array(self, subject: str, kind: str) -> np.memmap:
        """The ``(Z, H, W)`` memmap of ``kind`` ("t3", "t7", "mask"), opened on first use in this process."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if os.getpid() != self._pid:  # forked: do not share the parent's open maps
            self._reset_cache()
        arrays = self._open.get(subject)
        if arrays is None:
            arrays = self._open_subject(subject)
            self._open[subject] = arrays
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(subject)
        if kind not in arrays:
            raise InputError(f"{self.root}: subject {subject!r} has no {kind} array (prediction only?)")
        return arrays[kind]

    def _open_subject(self, subject: str) -> dict[str, np.memmap]:
        info = self.info(subject)
        arrays = {}
        for kind in KINDS if info.get("has_t7") else ("t3", "mask"):
            path = self.root / subject / f"{kind}.npy"
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(f"{path}: cannot open ({exc})") from None
            if list(arr.shape) != list(info["shape"]):
                raise InputError(f"{path}: shape {arr.shape} differs from store.json's {info['shape']}")
            arrays[kind] = arr
        return arrays

    def limits(self, subject: str, kind: str) -> tuple[float, float]:
        """Normalization limits ``(lo, hi)`` of ``kind`` ("t3" or "t7"), for :func:`~.cropnorm.denormalize`."""
        return tuple(self.info(subject)["limits"][kind])  # type: ignore[return-value]

    def geometry(self, subject: str) -> CropGeometry:
        return CropGeometry.from_dict(self.info(subject)["geometry"])

    def gmm(self, subject: str) -> GMMFit | None:
        d = self.info(subject).get("gmm_t3")
        return GMMFit.from_dict(d) if d else None

    def valid_slices(self, subject: str) -> np.ndarray:
        return np.asarray(self.info(subject)["valid_slices"], dtype=np.int64)

    def brain_values(self, subject: str, kind: str = "t3", *, whole: bool = False) -> np.ndarray:
        """The non-zero brain values of ``kind`` (normalized units, float32): inside the mask on the subject's
        valid slices, or (``whole``) every non-zero voxel of the whole stack, as ``predict`` and ``evaluate``
        see it (the store zeroes everything outside the brain mask)."""
        if whole:
            x = np.asarray(self.array(subject, kind), np.float32)
            return x[x > 0]
        z = self.valid_slices(subject)
        x = np.asarray(self.array(subject, kind)[z], np.float32)
        m = np.asarray(self.array(subject, "mask")[z]) > 0
        return x[m & (x > 0)]

    def brain_quantiles(self, subject: str, kind: str = "t3") -> np.ndarray:
        """Quantile function (:data:`synth7t.intensity.QUANTILE_LEVELS`) of the non-zero brain values of
        ``kind`` on the subject's valid slices (normalized units). Reads that subject's stack once."""
        return quantiles(self.brain_values(subject, kind))

    def standard_landmarks(self, split: str, percentiles) -> np.ndarray | None:
        """Nyúl standard landmarks learned from the 3T inputs of ``split`` only (each whole stack's non-zero
        voxels, as ``predict`` sees a stack; :func:`synth7t.intensity.nyul_standard`). None for an empty split."""
        marks = [nyul_landmarks(self.brain_values(s, "t3", whole=True), percentiles)
                 for s in self.split_subjects(split)]
        return nyul_standard(marks) if marks else None

    def target_quantiles(self, split: str = "train") -> np.ndarray | None:
        """Quantile function of the mean 7T brain histogram of ``split`` (valid slices, every subject weighing the
        same): the reference of input standardization and of the ``histmatch_population`` baseline. None when the
        split has no subject with a 7T. Reads one subject at a time."""
        from synth7t.intensity import brain_histogram, population_quantiles

        hists = []
        for s in self.split_subjects(split):
            if not self.info(s).get("has_t7"):
                continue
            z = self.valid_slices(s)
            t7, mask = self.array(s, "t7")[z], self.array(s, "mask")[z]
            hists.append(brain_histogram(np.asarray(t7, np.float32)[np.asarray(mask) > 0]))
        return population_quantiles(hists) if hists else None

    def context(self, subject: str, z: int) -> np.ndarray:
        """Context vector (CONTEXT_DIM,) of slice ``z`` of ``subject``; on a template store the (T, 1) covariate
        tokens of its model (:func:`~.template_store.template_tokens`)."""
        info = self.info(subject)
        if self.on_template:
            from synth7t.dataset.template_store import template_tokens

            c = self.meta["context"]
            return template_tokens(c["tokens"], info, np.array([2.0 * (z - info["z_mid"]) / c["n_slices_position"]]))[0]
        pos = ctx.slice_position(z, info["z_mid"], info["shape"][0])
        return ctx.encode_context(info.get("age"), info.get("sex"), info.get("group"), pos)


def standardization_record(standardize: dict | np.ndarray | None) -> dict | None:
    """A dataset's input standardization: the model folder's record, or bare reference quantiles (``histmatch``);
    None when there is none (``method: none``)."""
    if standardize is not None and not isinstance(standardize, dict):  # reference quantiles: histmatch
        standardize = {"method": "histmatch", "reference_quantiles": np.asarray(standardize, np.float64)}
    return None if (standardize or {}).get("method", "none") == "none" else standardize


def input_table(store: SliceStore, name: str, record: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """A subject's input standardization map (the 2.5D and the 3-D datasets'). ``histmatch`` takes the source
    quantiles on the valid slices (as models trained before ``nyul`` did); ``nyul`` the whole stack's non-zero
    voxels, exactly what ``predict`` and ``evaluate`` see of a stack."""
    whole = record["method"] != "histmatch"
    return standardization_table(record, store.brain_values(name, "t3", whole=whole))


class SliceDataset:
    """Map-style dataset of the valid slices of one split (works with ``torch.utils.data.DataLoader``).

    Augmentations use a generator seeded by ``(seed, epoch, index)``: the same sample is augmented the same
    way whatever the number of workers; call :meth:`set_epoch` each epoch to draw new parameters
    (``seed=None`` draws fresh, non-reproducible parameters every time).
    """

    def __init__(
        self,
        store: SliceStore | str | Path,
        split: str = "train",
        n_slices: int = 3,
        augment: Augmenter | None = None,
        seed: int | None = 0,
        standardize: dict | np.ndarray | None = None,
        match_target: bool = False,
        views: tuple[str, ...] | list[str] = ("axial",),
        view_code: bool = False,
        multiple: int = 1,
        min_size: int = 0,
    ):
        self.store = store if isinstance(store, SliceStore) else SliceStore(store)
        self.views = check_views(views)
        self.view_code = bool(view_code)
        if self.store.on_template and self.views != ("axial",):
            raise InputError(f"{self.store.root}: a store on a template grid is sliced along its template axis only "
                             "(data.views is for synth7t's own U-net)")
        self.standardize = standardization_record(standardize)
        self.match_target = bool(match_target)
        self._tables: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}  # per subject: its 3T input map
        self._lookups: dict[str, np.ndarray | None] = {}  # per subject: its input map over the float16 values
        self._target_tables: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}  # per subject: its 7T -> 3T
        neighbour_indices(0, n_slices, 1)  # validates n_slices
        self.split = split
        self.n_slices = n_slices
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.subjects = self.store.split_subjects(split)
        # one fixed (rows, cols) for every sample when a view other than axial is cut: the store pads only
        # in-plane, so Z is padded here to the store's largest (rounded up to the model's multiple)
        self.shape: tuple[int, int] | None = None
        self._brain: dict[tuple[str, str], tuple[int, int]] = {}  # (subject, view) -> slices holding brain
        if self.views != ("axial",):
            depth = round_up(max(int(self.store.info(s)["shape"][0]) for s in self.store.subjects), multiple)
            self.depth = depth
            self.shape = sample_shape(self.store.hw, depth, self.views, min_size)
        subj, zs, vs = [], [], []
        for k, view in enumerate(self.views):
            for i, name in enumerate(self.subjects):
                v = self._valid(name, view)
                subj.append(np.full(v.size, i, dtype=np.int32))
                zs.append(v.astype(np.int32))
                vs.append(np.full(v.size, k, dtype=np.int8))
        self._subject = np.concatenate(subj) if subj else np.zeros(0, np.int32)  # (N,)
        self._z = np.concatenate(zs) if zs else np.zeros(0, np.int32)  # (N,)
        self._view = np.concatenate(vs) if vs else np.zeros(0, np.int8)  # (N,) index into self.views

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self._z.size)

    def _valid(self, name: str, view: str) -> np.ndarray:
        """The slices of ``view`` a sample is cut at: axial, the store's valid slices; coronal and sagittal, those
        whose brain area (mask) is at least :data:`~synth7t.dataset.pack.MIN_AREA_FRAC` of the largest (one scan
        of the subject's mask, in chunks), with the slices holding 3T signal recorded for the position covariate."""
        if view == "axial":
            return self.store.valid_slices(name)
        areas = slice_areas(self.store.array(name, "mask"), view)
        self._brain[(name, view)] = extent(slice_areas(self.store.array(name, "t3"), view))
        return np.flatnonzero(areas > MIN_AREA_FRAC * max(int(areas.max()), 1)).astype(np.int64)

    def locate(self, index: int) -> tuple[str, int]:
        """(subject, slice) of sample ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.subjects[int(self._subject[index])], int(self._z[index])

    def view_of(self, index: int) -> str:
        """The view ("axial", "coronal", "sagittal") of sample ``index``."""
        return self.views[int(self._view[index])]

    def raw(self, index: int) -> dict:
        """The un-augmented sample ``index`` (for :func:`augment.replay`)."""
        if self.shape is not None:
            return self._raw_view(index)
        name, z = self.locate(index)
        t3 = self.store.array(name, "t3")  # (Z, H, W) memmap
        zs = self.store.window(z, self.n_slices, t3.shape[0])
        x = np.asarray(t3[zs])  # (S, H, W): reads S slices only
        if self.standardize is not None and x.dtype == np.float16:  # the store's dtype: exact table look-up
            lookup = self._input_lookup(name)
            x = x.astype(np.float32) if lookup is None else lookup[x.view(np.uint16)]
        elif self.standardize is not None:
            x = standardize_input(x.astype(np.float32), self.standardize, table=self._input_table(name))
        else:
            x = x.astype(np.float32)
        sample = {
            "input": x,
            "mask": np.asarray(self.store.array(name, "mask")[z : z + 1], dtype=np.float32),  # (1, H, W)
            "context": self.store.context(name, z),  # (CONTEXT_DIM,)
            "subject": name,
            "slice": z,
            "augment": "[]",
        }
        if self.store.info(name).get("has_t7"):
            t7 = self.store.array(name, "t7")
            y = np.asarray(t7[z : z + 1], dtype=np.float32)  # (1, H, W)
            if self.match_target and (table := self._target_table(name)) is not None:
                y = standardize(y, table=table)
            sample["target"] = y
        if self.view_code:
            sample["context"] = np.concatenate([sample["context"], view_code("axial")])
        return sample

    def _raw_view(self, index: int) -> dict:
        """A sample of any view, padded to :attr:`shape` (centred). Its 3T input is the window of ``n_slices``
        slices of that view around slice ``j`` (clamped at the edges), its target and mask slice ``j``; the rows of
        a coronal or sagittal slice below the subject's ``min_slice`` (7T slices QC cut as corrupted) are zero in
        input, target and mask, as the axial view leaves those slices out. Context: the covariates, the view's
        slice position (:func:`~synth7t.dataset.views.positions`) and, with ``view_code``, the view's one-hot."""
        name, j = self.locate(index)
        view = self.view_of(index)
        t3 = self.store.array(name, "t3")  # (Z, H, W) memmap
        n = view_shape(t3.shape, view)[0]
        x = read_window(t3, view, neighbour_indices(j, self.n_slices, n))  # (S, rows, cols)
        x = self._standardized(name, x)
        mask = read_window(self.store.array(name, "mask"), view, [j]).astype(np.float32)  # (1, rows, cols)
        info = self.store.info(name)
        y = None
        if info.get("has_t7"):
            y = read_window(self.store.array(name, "t7"), view, [j]).astype(np.float32)  # (1, rows, cols)
            if self.match_target and (table := self._target_table(name)) is not None:
                y = standardize(y, table=table)
        cut = int(info.get("min_slice") or 0)
        if view != "axial" and cut > 0:  # Z is the cols of a coronal slice, the rows of a sagittal one
            rows = (slice(None), slice(None), slice(0, cut)) if view == "coronal" else (slice(None), slice(0, cut))
            for arr in (x, mask) if y is None else (x, mask, y):
                arr[rows] = 0
        pos = positions(view, n, self._brain.get((name, view)))[j]
        context = ctx.encode_context(info.get("age"), info.get("sex"), info.get("group"), float(pos))
        if self.view_code:
            context = np.concatenate([context, view_code(view)])
        rows, cols = self.shape
        sample = {"input": pad_to(x, rows, cols), "mask": pad_to(mask, rows, cols), "context": context,
                  "subject": name, "slice": j, "view": view, "augment": "[]"}
        if y is not None:
            sample["target"] = pad_to(y, rows, cols)
        return sample

    def _standardized(self, name: str, x: np.ndarray) -> np.ndarray:
        """The 3T window in the dataset's input units (float32): standardized when the dataset standardizes."""
        if self.standardize is not None and x.dtype == np.float16:  # the store's dtype: exact table look-up
            lookup = self._input_lookup(name)
            return x.astype(np.float32) if lookup is None else lookup[x.view(np.uint16)]
        if self.standardize is not None:
            return standardize_input(x.astype(np.float32), self.standardize, table=self._input_table(name))
        return x.astype(np.float32)

    def _input_table(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The subject's input standardization map, built once per process. ``histmatch`` takes the source
        quantiles on the valid slices (as models trained before ``nyul`` did); ``nyul`` the whole stack's
        non-zero voxels, exactly what ``predict`` and ``evaluate`` see of a stack."""
        if name not in self._tables:
            self._tables[name] = input_table(self.store, name, self.standardize)
        return self._tables[name]

    def _input_lookup(self, name: str) -> np.ndarray | None:
        """:func:`~synth7t.intensity.float16_lookup` of the subject's input map (256 KiB), built once per process."""
        if name not in self._lookups:
            self._lookups[name] = float16_lookup(self._input_table(name))
        return self._lookups[name]

    def _target_table(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Quantile map of the subject's 7T brain onto its 3T input brain as the network sees it (standardized
        if the dataset standardizes), on the valid slices inside the mask; None without brain voxels."""
        if name not in self._target_tables:
            t7, t3 = self.store.brain_values(name, "t7"), self.store.brain_values(name, "t3")
            if self.standardize is not None:
                t3 = standardize_input(t3, self.standardize, table=self._input_table(name))
                t3 = t3[t3 > 0]
            self._target_tables[name] = (quantile_table(quantiles(t7), quantiles(t3))
                                         if t7.size and t3.size else None)
        return self._target_tables[name]

    def __getitem__(self, index: int) -> dict:
        sample = self.raw(index)
        if self.augment is None:
            return sample
        if self.seed is None:
            rng = np.random.default_rng()
        else:
            rng = np.random.default_rng([self.seed, self.epoch, int(index) % len(self)])
        return self.augment(sample, rng=rng, gmm=self.store.gmm(sample["subject"]))


class VolumeSlices:
    """Batches of 2.5D inputs covering a whole ``(Z, H, W)`` stack, in slice order (for inference).

    Iterating yields dicts ``{"slice": int64 (B,), "input": float32 (B, S, H, W), "context": float32
    (B, CONTEXT_DIM)}``; the context uses ``age``, ``sex``, ``group`` and each slice's position in the stack
    (or ``positions``, one per slice: another view's, :func:`~synth7t.dataset.views.positions`); ``extra`` (a
    float32 vector, e.g. a view's one-hot) is appended to every context vector.
    """

    def __init__(
        self,
        stack: np.ndarray,
        n_slices: int = 3,
        *,
        batch_size: int = 8,
        age: float | None = None,
        sex: str | None = None,
        group: str | None = None,
        positions: np.ndarray | None = None,
        extra: np.ndarray | None = None,
    ):
        if stack.ndim != 3:
            raise ValueError(f"expected a (Z, H, W) stack, got shape {stack.shape}")
        if positions is not None and len(positions) != stack.shape[0]:
            raise ValueError(f"{len(positions)} slice positions for a stack of {stack.shape[0]} slices")
        self.positions, self.extra = positions, extra
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        neighbour_indices(0, n_slices, 1)
        self.stack, self.n_slices, self.batch_size = stack, n_slices, batch_size
        self.covariates = (age, sex, group)

    def __len__(self) -> int:
        return -(-self.stack.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        Z = self.stack.shape[0]
        z_mid = ctx.middle_slice(Z)
        for start in range(0, Z, self.batch_size):
            zs = np.arange(start, min(start + self.batch_size, Z))  # (B,)
            idx = neighbour_indices(zs, self.n_slices, Z)  # (B, S)
            inputs = np.asarray(self.stack[idx.ravel()], dtype=np.float32)  # (B * S, H, W)
            inputs = inputs.reshape(idx.shape + self.stack.shape[1:])  # (B, S, H, W)
            if self.positions is None:
                pos = [ctx.slice_position(z, z_mid, Z) for z in zs]
            else:
                pos = [float(self.positions[z]) for z in zs]
            context = np.stack([ctx.encode_context(*self.covariates, p) for p in pos])  # (B, CONTEXT_DIM)
            if self.extra is not None:
                context = np.concatenate([context, np.broadcast_to(self.extra, (len(zs), len(self.extra)))], 1)
            yield {"slice": zs.astype(np.int64), "input": inputs, "context": context}
