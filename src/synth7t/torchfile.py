"""Read the tensors of a foreign PyTorch checkpoint without running any of its pickled code.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` (a pickle of the saved object, whose tensors point at
storages by key), ``<name>/data/<key>`` (each storage's raw bytes) and ``<name>/byteorder``. A pickle is a
program: unpickling calls whatever functions and classes it names (``os.system`` as readily as
``torch._utils._rebuild_tensor_v2``), which is why ``torch.load(weights_only=True)`` refuses files holding other
objects, such as the pandas DataFrame of losses inside the thesis authors' checkpoints.

:func:`read_tensors` unpickles ``data.pkl`` with an unpickler whose only way to reach a Python callable,
``find_class``, never returns one of the file's choosing: a tensor's rebuild function becomes a record
(storage key, dtype, offset, size, stride) built by our own code; a storage class becomes its dtype; a plain
``OrderedDict`` stays one; every other name (pandas, numpy, ``os.system``, ...) becomes an inert placeholder
class that accepts any arguments and state and does nothing. No object the file describes is ever constructed
beyond dicts, lists, tuples, strings and numbers. Only then are the wanted storages read from the archive,
byte for byte, into tensors.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from synth7t.errors import InputError

LFS_POINTER = b"version https://git-lfs.github.com/spec/"

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class Skipped:
    """Stands for any object the pickle would construct: takes any arguments and state, keeps only its name."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # SETITEM(S) on a skipped mapping
        pass

    def append(self, value):  # APPEND(S) on a skipped list
        pass

    def extend(self, values):
        pass

    def __repr__(self) -> str:
        return f"<skipped {self.qualname}>"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRecord:
    """Where a tensor's values are: a storage of the archive, an element offset, a size and a stride."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype


def _rebuild_tensor(storage, offset, size, stride, *rest):
    if not isinstance(storage, _Storage):
        return Skipped()
    return TensorRecord(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *rest):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves every global to inert values (module docstring); storages become :class:`_Storage` records."""

    def __init__(self, fh, skipped: set[str]):
        super().__init__(fh)
        self.skipped = skipped

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        qualname = f"{module}.{name}"
        self.skipped.add(qualname)
        return type(f"Skipped_{name}", (Skipped,), {"qualname": qualname})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType):
            return _Storage(str(pid[2]), pid[1].dtype, int(pid[4]))
        self.skipped.add(f"persistent id {pid[0] if isinstance(pid, tuple) and pid else '?'}")
        return Skipped()


@dataclass
class Checkpoint:
    """The unpickled structure of a checkpoint (tensors as :class:`TensorRecord`), and how to read them."""

    path: Path
    root: object
    skipped: set[str]
    _prefix: str
    _byteorder: str

    def load(self, record: TensorRecord) -> torch.Tensor:
        """The tensor a record describes, read from the archive (a copy owning its memory)."""
        st = record.storage
        with zipfile.ZipFile(self.path) as zf:
            try:
                raw = zf.read(f"{self._prefix}data/{st.key}")
            except (KeyError, zipfile.BadZipFile, OSError, EOFError) as exc:
                raise InputError(f"{self.path}: storage {st.key} cannot be read ({exc}); the file is damaged") from None
        itemsize = torch.empty((), dtype=st.dtype).element_size()
        if len(raw) < st.numel * itemsize:
            raise InputError(f"{self.path}: storage {st.key} holds {len(raw)} bytes, {st.numel * itemsize} expected; "
                             "the file is truncated or damaged")
        flat = torch.frombuffer(bytearray(raw[: st.numel * itemsize]), dtype=st.dtype) if st.numel else \
            torch.empty(0, dtype=st.dtype)
        if self._byteorder == "big" and itemsize > 1:
            flat = _byteswap(flat)
        needed = record.offset + sum((s - 1) * t for s, t in zip(record.size, record.stride, strict=True)) + 1 \
            if all(record.size) else 0
        if needed > st.numel:
            raise InputError(f"{self.path}: a tensor reaches past its storage {st.key}; the file is damaged")
        return torch.as_strided(flat, record.size, record.stride, record.offset).clone()


def _byteswap(t: torch.Tensor) -> torch.Tensor:
    import numpy as np

    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    swapped = t.view(as_int).numpy().byteswap()
    return torch.from_numpy(np.ascontiguousarray(swapped)).view(t.dtype)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Unpickle a ``torch.save`` zip checkpoint's structure safely (module docstring); one-line errors for a Git
    LFS pointer, a file that is not a zip checkpoint, or a damaged one."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: checkpoint not found")
    with p.open("rb") as fh:
        head = fh.read(64)
    if head.startswith(LFS_POINTER):
        raise InputError(f"{p}: this is a Git LFS pointer file ({p.stat().st_size} bytes), not the checkpoint; "
                         "run git lfs pull in the repository it came from")
    if not zipfile.is_zipfile(p):
        raise InputError(f"{p}: not a PyTorch zip checkpoint (torch.save of torch >= 1.6); truncated or another format")
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise InputError(f"{p}: a zip file without data.pkl, not a PyTorch checkpoint")
            prefix = pkl[: -len("data.pkl")]
            byteorder = zf.read(f"{prefix}byteorder").decode().strip() if f"{prefix}byteorder" in names else "little"
            data = zf.read(pkl)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{p}: the checkpoint cannot be read ({exc}); truncated or damaged") from None
    skipped: set[str] = set()
    try:
        root = _RestrictedUnpickler(io.BytesIO(data), skipped).load()
    except Exception as exc:  # a malformed pickle: never a traceback
        raise InputError(f"{p}: the checkpoint's data.pkl cannot be read ({type(exc).__name__}: {exc})") from None
    return Checkpoint(p, root, skipped, prefix, byteorder)


def read_state_dict(path: str | Path, key: str = "model_state_dict",
                    strip_prefix: str = "module.") -> tuple[dict[str, torch.Tensor], Checkpoint]:
    """The tensors of ``checkpoint[key]`` (or of the checkpoint itself when it is a flat dict of tensors), with
    ``strip_prefix`` (``nn.DataParallel``'s ``module.``) removed from every key that has it; entries that are not
    tensors are left out. Returns ``(state_dict, checkpoint)``; ``checkpoint.skipped`` names what was skipped."""
    ckpt = open_checkpoint(path)
    root = ckpt.root
    if isinstance(root, dict) and key in root:
        sd = root[key]
    elif isinstance(root, dict) and root and all(isinstance(v, TensorRecord) for v in root.values()):
        sd = root
    else:
        keys = ", ".join(map(str, list(root)[:8])) if isinstance(root, dict) else type(root).__name__
        raise InputError(f"{ckpt.path}: no {key!r} in the checkpoint (it holds: {keys})")
    if not isinstance(sd, dict):
        raise InputError(f"{ckpt.path}: {key!r} is not a dict of tensors")
    out = {}
    for k, rec in sd.items():
        if isinstance(rec, TensorRecord):
            name = k[len(strip_prefix):] if strip_prefix and str(k).startswith(strip_prefix) else str(k)
            out[name] = ckpt.load(rec)
    if not out:
        raise InputError(f"{ckpt.path}: {key!r} holds no tensors")
    return out, ckpt
