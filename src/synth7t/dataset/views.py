"""Slice views of a ``(Z, H, W)`` stack: axial, coronal and sagittal 2.5D samples from the one axial-first store.

A store's stacks are ``(Z, H, W) = (S, R, A)`` of the canonical RAS+ grid (docs/data-layout.md). A *view* is the
same stack with another axis first, so that its slices are the planes of that view; :data:`VIEW_AXES` is the
transpose, chosen so that the left-right axis R stays where the axial slices have it (their rows) whenever it is
in-plane:

========  ================  ===========================  =============================
view      slices along      a view stack ``(N, rows, cols)``  rows, cols of a slice
========  ================  ===========================  =============================
axial     S (stack axis 0)  ``(Z, H, W)``                R, A
coronal   A (stack axis 2)  ``(W, H, Z)``                R, S
sagittal  R (stack axis 1)  ``(H, Z, W)``                S, A
========  ================  ===========================  =============================

So a left-right mirror of a brain is the flip of the stack's axis H whatever the view: ``--tta`` flips the stack
before any view is cut from it (a mirrored brain's sagittal slices are its slices in reverse order).

Nothing here copies a whole volume: :func:`read_window` reads the ``S`` slices of one sample from a memmap (for
the coronal and sagittal views a strided read: every row of the stack contributes ``S`` values) and
:func:`extent` / :func:`slice_areas` scan a stack in chunks of axial slices.

The slice-position covariate of a view (:func:`positions`): axial, as before, ``(z - (Z - 1) / 2) / (Z / 2)`` over
the brain-cropped stack; coronal and sagittal ``(j - c) / (n / 2)`` with ``n`` the extent of the stack's non-zero
voxels along that view's axis and ``c`` its centre, so that the in-plane padding of the store (to a common size) or
of prediction (to the model's multiple) does not move it.
"""

from __future__ import annotations

import numpy as np

from synth7t.dataset import context as ctx

VIEWS = ("axial", "coronal", "sagittal")
#: transpose of a (Z, H, W) stack into a view stack (N, rows, cols); each is its own inverse
VIEW_AXES = {"axial": (0, 1, 2), "coronal": (2, 1, 0), "sagittal": (1, 0, 2)}
#: the stack axis a view slices along
SLICE_AXIS = {v: axes[0] for v, axes in VIEW_AXES.items()}
CHUNK = 16  # axial slices read at a time when a stack is scanned


def check_views(views) -> tuple[str, ...]:
    """A validated tuple of view names (no repeats, known names, at least one)."""
    views = tuple(views)
    if not views:
        raise ValueError("at least one view is needed")
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown view(s) {unknown}; expected some of {list(VIEWS)}")
    if len(set(views)) != len(views):
        raise ValueError(f"views {list(views)} repeat a view")
    return views


def view_code(view: str) -> np.ndarray:
    """One-hot ``[axial, coronal, sagittal]`` (float32, shape (3,)): what a shared multi-view network is told."""
    return np.asarray([1.0 if v == view else 0.0 for v in VIEWS], np.float32)


def to_view(stack: np.ndarray, view: str) -> np.ndarray:
    """(Z, H, W) -> the view stack (N, rows, cols), a transposed view of the same memory (no copy)."""
    return stack.transpose(VIEW_AXES[view])


def from_view(arr: np.ndarray, view: str) -> np.ndarray:
    """Inverse of :func:`to_view`: a view stack back to (Z, H, W)."""
    return arr.transpose(VIEW_AXES[view])  # every VIEW_AXES permutation is an involution


def view_shape(shape, view: str) -> tuple[int, int, int]:
    """Shape (N, rows, cols) of the view of a stack of shape (Z, H, W)."""
    return tuple(int(shape[a]) for a in VIEW_AXES[view])  # type: ignore[return-value]


def read_window(arr: np.ndarray, view: str, idx: np.ndarray) -> np.ndarray:
    """The slices ``idx`` (S,) of ``view`` from a (Z, H, W) array or memmap: (S, rows, cols), in the array's dtype.

    Reads only those slices: an axial window is S contiguous slices; a coronal one ``arr[:, :, idx]`` and a
    sagittal one ``arr[:, idx, :]``, S values of every row (W) or S rows of every slice (H)."""
    axis = SLICE_AXIS[view]
    idx = np.asarray(idx)
    if view == "axial":
        part = arr[idx]  # (S, H, W)
    elif axis == 1:
        part = arr[:, idx, :]  # (Z, S, W)
    else:
        part = arr[:, :, idx]  # (Z, H, S)
    return np.ascontiguousarray(part.transpose(VIEW_AXES[view]))  # the S slices first: (S, rows, cols)


def slice_areas(arr: np.ndarray, view: str) -> np.ndarray:
    """Non-zero voxels per slice of ``view`` (int64, (N,)), scanning the stack ``CHUNK`` axial slices at a time."""
    axis = SLICE_AXIS[view]
    z = arr.shape[0]
    if axis == 0:
        return np.asarray([int(np.count_nonzero(arr[k])) for k in range(z)], np.int64)
    out = np.zeros(arr.shape[axis], np.int64)
    other = 2 if axis == 1 else 1
    for k in range(0, z, CHUNK):
        out += np.count_nonzero(np.asarray(arr[k:k + CHUNK]), axis=(0, other))
    return out


def extent(areas: np.ndarray) -> tuple[int, int]:
    """Half-open range ``[b0, b1)`` of the slices with non-zero voxels; the whole range if none has any."""
    nz = np.flatnonzero(np.asarray(areas) > 0)
    return (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, int(len(areas)))


def positions(view: str, n_slices: int, brain: tuple[int, int] | None = None) -> np.ndarray:
    """The slice-position covariate of each of the ``n_slices`` slices of ``view`` (float32, (N,)).

    Axial: :func:`synth7t.dataset.context.slice_position` over the whole (brain-cropped) stack, as a single-view
    model always had. Coronal and sagittal: relative to ``brain`` = ``[b0, b1)``, the slices holding brain
    (:func:`extent`): ``(j - (b0 + b1 - 1) / 2) / ((b1 - b0) / 2)``."""
    j = np.arange(n_slices, dtype=np.float64)
    if view == "axial" or brain is None:
        mid, n = ctx.middle_slice(n_slices), n_slices
    else:
        b0, b1 = brain
        mid, n = (b0 + b1 - 1) / 2.0, max(b1 - b0, 1)
    return ((j - mid) / (n / 2.0)).astype(np.float32)


def pad_to(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Centre-pad the last two axes of ``x`` with zeros to ``rows x cols`` (before = (rows - r) // 2); never crops."""
    r, c = x.shape[-2:]
    if r > rows or c > cols:
        raise ValueError(f"slices of {r}x{c} do not fit in {rows}x{cols}")
    if (r, c) == (rows, cols):
        return x
    out = np.zeros((*x.shape[:-2], rows, cols), x.dtype)
    r0, c0 = (rows - r) // 2, (cols - c) // 2
    out[..., r0:r0 + r, c0:c0 + c] = x
    return out


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // max(int(multiple), 1)) * max(int(multiple), 1)


def slice_shapes(hw: tuple[int, int], depth: int) -> dict[str, tuple[int, int]]:
    """In-plane (rows, cols) of each view's slices for a store of in-plane size ``hw`` whose stacks are padded along
    Z to ``depth`` (see :func:`sample_shape`)."""
    h, w = hw
    return {"axial": (h, w), "coronal": (h, depth), "sagittal": (depth, w)}


def sample_shape(hw: tuple[int, int], depth: int, views, minimum: int = 0) -> tuple[int, int]:
    """The one (rows, cols) every training sample of ``views`` is padded to: the largest of the views' slice sizes
    (:func:`slice_shapes`; ``depth``: the store's largest Z rounded up to the model's multiple, so that no brain is
    cropped), and at least ``minimum`` (a patch side) on each axis. One shape, so that samples of several views
    batch together."""
    shapes = slice_shapes(hw, depth)
    rows = max([shapes[v][0] for v in views] + [minimum])
    cols = max([shapes[v][1] for v in views] + [minimum])
    return rows, cols
