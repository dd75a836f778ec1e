"""NIfTI input/output: validated loading, canonical RAS+ orientation, atomic and scrubbed writing.

The one small interface of the package to images on disk:

* :func:`load_volume` reads ``.nii``, ``.nii.gz`` or ``.mgz`` and returns a :class:`Volume`
  (float32 array + 4x4 voxel-to-world affine). It refuses unusable input with one clear line.
* :func:`to_canonical` / :func:`from_canonical` reorient to RAS+ and back exactly (a pure axis
  permutation/flip: no resampling, so the round trip is lossless).
* :func:`save_volume` writes atomically (temporary file in the same folder + ``os.replace``) with a
  scrubbed header: no description, db name, aux file or intent name from any input survives, and
  qform and sform are set to the same affine.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synth7t.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz")
MAX_VOXEL_MM = 10.0


@dataclass
class Volume:
    """A 3-D image and its geometry.

    ``data`` has shape (X, Y, Z); ``affine`` maps voxel indices (i, j, k, 1) to world millimetres.
    ``source`` is the file it came from (or ``None``), used in error messages only.
    """

    data: np.ndarray
    affine: np.ndarray
    source: str | None = field(default=None, compare=False)

    @property
    def zooms(self) -> np.ndarray:
        """Voxel sizes in mm along the three array axes."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def with_data(self, data: np.ndarray) -> Volume:
        """Same geometry, new voxel values."""
        if data.shape != self.data.shape:
            raise ValueError(f"shape {data.shape} does not match the volume's {self.data.shape}")
        return Volume(data, self.affine.copy(), self.source)


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``.nii.gz``, ``.nii``, ``.mgz``, any case): ``sub-01_T1w`` for
    ``sub-01_T1w.nii.gz``; ``Path.stem`` for any other name."""
    name = Path(path).name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):  # .nii.gz before .nii
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _name(path: str | os.PathLike) -> str:
    return str(path)


def _check_gzip(path: Path) -> None:
    """Read a gzip file to its end so that a truncated or corrupt stream is reported clearly."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{_name(path)}: truncated or corrupt gzip stream ({exc})") from None


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Keep nibabel's header-repair warnings (its logger and, by propagation, ours) out of the output."""
    import nibabel as nib

    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(max(level, 40))  # logging.ERROR
    try:
        yield
    finally:
        logger.setLevel(level)


def load_volume(path: str | os.PathLike, *, check_finite: bool = True) -> Volume:
    """Load and validate one 3-D scan.

    Refuses, with an :class:`InputError` naming the file: a missing file, a corrupt or truncated
    gzip, a file nibabel cannot read as NIfTI/MGH, a 2-D or a multi-volume 4-D image (a 4-D image
    with one volume is squeezed), NaN/Inf voxels, an all-zero image, and a bad header (see
    :func:`check_header`: header voxel sizes that are not finite, <= 0 or > 10 mm, no sform and no qform, a NaN or
    singular sform, a NaN qform), then the same checks on the affine nibabel builds. The file is opened
    read-only and never written to.
    """
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise InputError(f"{_name(p)}: file not found")
    if p.is_dir():
        raise InputError(f"{_name(p)}: is a folder, expected a NIfTI file")
    if not is_nifti_path(p):
        raise InputError(f"{_name(p)}: not a NIfTI/MGH file (expected .nii, .nii.gz or .mgz)")
    if p.stat().st_size == 0:
        raise InputError(f"{_name(p)}: file is empty")
    if str(p).lower().endswith((".gz", ".mgz")):
        _check_gzip(p)
    try:
        with _quiet_nibabel():  # nibabel logs the header "fixes" it makes silently; check_header refuses them
            img = nib.load(str(p))
            data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt headers/data
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{_name(p)}: cannot be read as NIfTI/MGH ({msg})") from None
    check_header(p, img)
    affine = np.asarray(img.affine, dtype=np.float64)
    data = _check_shape(p, data)
    data = np.asarray(data, dtype=np.float32)
    vol = Volume(data, affine, str(p))
    validate_volume(vol, check_finite=check_finite)
    return vol


def _raw_header(p: Path, img):
    """The header exactly as stored: nibabel's loader silently "fixes" pixdim 0 (to 1) and negative pixdim (to
    its absolute value), so the header of ``img`` no longer says what the file says."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return img.header
    try:
        with ImageOpener(str(p), "rb") as fh:
            return img.header_class.from_fileobj(fh, check=False)
    except Exception as exc:  # noqa: BLE001 - nibabel read it once already; report rather than crash
        raise InputError(f"{_name(p)}: header cannot be read ({exc})") from None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.3g}" for v in values) + ")"


def check_header(path: str | os.PathLike, img) -> None:
    """Refuse a header whose voxel sizes or orientation fields are unusable, naming the field.

    NIfTI: ``pixdim[1..3]`` must be finite, > 0 and <= 10 mm; at least one of ``sform_code``/``qform_code`` must
    be set (otherwise nibabel makes a grid up); a used sform (``srow_x/y/z``) must be finite and non-singular; a
    used qform (``quatern_b/c/d``, ``qoffset_x/y/z``) must be finite. MGH: ``delta`` as ``pixdim``.
    """
    import nibabel as nib

    p = Path(path)
    hdr = _raw_header(p, img)
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        zooms, field_name = np.asarray(hdr["pixdim"][1:4], dtype=np.float64), "pixdim[1:4]"
    elif "delta" in getattr(hdr, "keys", lambda: ())():
        zooms, field_name = np.asarray(hdr["delta"][:3], dtype=np.float64), "delta"
    else:
        return
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0) or np.any(zooms > MAX_VOXEL_MM):
        raise InputError(f"{_name(p)}: header field {field_name} gives absurd voxel size {_fmt(zooms)} mm; "
                         f"expected finite sizes with 0 < size <= {MAX_VOXEL_MM:g} mm")
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return
    sform_code, qform_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    if sform_code == 0 and qform_code == 0:
        raise InputError(f"{_name(p)}: header fields sform_code and qform_code are both 0 (no orientation: the "
                         "voxel-to-world mapping would be made up)")
    if sform_code > 0:
        srow = np.stack([np.asarray(hdr[k], dtype=np.float64) for k in ("srow_x", "srow_y", "srow_z")])
        bad = [k for k, row in zip(("srow_x", "srow_y", "srow_z"), srow, strict=True) if not np.all(np.isfinite(row))]
        if bad:
            raise InputError(f"{_name(p)}: header field {'/'.join(bad)} (sform) contains NaN/Inf")
        if abs(np.linalg.det(srow[:, :3])) < 1e-9:
            raise InputError(f"{_name(p)}: header fields srow_x/srow_y/srow_z (sform) give a singular affine "
                             "(voxel axes are degenerate)")
    if qform_code > 0:
        keys = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
        bad = [k for k in keys if not np.isfinite(float(hdr[k]))]
        if bad:
            raise InputError(f"{_name(p)}: header field {'/'.join(bad)} (qform) contains NaN/Inf")


def _check_shape(p: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    elif data.ndim == 5 and data.shape[3] == 1 and data.shape[4] == 1:
        data = data[..., 0, 0]
    if data.ndim == 4:
        raise InputError(f"{_name(p)}: 4-D image with {data.shape[3]} volumes; give one 3-D volume")
    if data.ndim != 3:
        raise InputError(f"{_name(p)}: {data.ndim}-D image of shape {data.shape}; expected a 3-D volume")
    if min(data.shape) < 2:
        raise InputError(f"{_name(p)}: image of shape {data.shape} is a single slice, expected a 3-D volume")
    return data


def validate_volume(vol: Volume, *, check_finite: bool = True) -> None:
    """Raise :class:`InputError` if the volume's values or geometry are unusable."""
    where = vol.source or "<volume>"
    if not np.all(np.isfinite(vol.affine)):
        raise InputError(f"{where}: affine contains NaN/Inf")
    if abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise InputError(f"{where}: singular affine (voxel axes are degenerate)")
    zooms = vol.zooms
    if np.any(zooms <= 0) or np.any(zooms > MAX_VOXEL_MM):
        z = ", ".join(f"{v:.3g}" for v in zooms)
        raise InputError(f"{where}: absurd voxel size ({z}) mm; expected 0 < size <= {MAX_VOXEL_MM:g} mm")
    if check_finite:
        bad = int(np.count_nonzero(~np.isfinite(vol.data)))
        if bad:
            raise InputError(f"{where}: {bad} NaN/Inf voxel(s)")
    if not np.any(vol.data):
        raise InputError(f"{where}: image is all zeros")


# ---------------------------------------------------------------------------------------------------------
# orientation


@dataclass(frozen=True)
class Reorientation:
    """What :func:`to_canonical` did, so that :func:`from_canonical` can undo it exactly."""

    ornt: np.ndarray  # nibabel orientation (source axes -> RAS)
    shape: tuple[int, int, int]  # source array shape
    affine: np.ndarray  # source affine


def to_canonical(vol: Volume) -> tuple[Volume, Reorientation]:
    """Return the volume in the closest canonical RAS+ orientation (axis permutation and flips only)."""
    import nibabel as nib
    from nibabel import orientations as no

    ornt = no.io_orientation(vol.affine)
    data = no.apply_orientation(vol.data, ornt)
    affine = vol.affine @ no.inv_ornt_aff(ornt, vol.data.shape)
    info = Reorientation(ornt=ornt, shape=vol.shape, affine=vol.affine.copy())
    out = Volume(np.ascontiguousarray(data), affine, vol.source)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    return out, info


def from_canonical(vol: Volume, info: Reorientation) -> Volume:
    """Undo :func:`to_canonical`: back to the source's axis order, with the source's affine.

    ``vol`` must be on the canonical grid that :func:`to_canonical` produced (same shape).
    """
    from nibabel import orientations as no

    inverse = no.ornt_transform(no.axcodes2ornt(("R", "A", "S")), info.ornt)
    data = no.apply_orientation(vol.data, inverse)
    if tuple(data.shape) != tuple(info.shape):
        raise ValueError(f"volume of shape {vol.shape} is not on the canonical grid of a {info.shape} source")
    return Volume(np.ascontiguousarray(data), info.affine.copy(), vol.source)


def load_canonical(path: str | os.PathLike) -> tuple[Volume, Reorientation]:
    """:func:`load_volume` followed by :func:`to_canonical`."""
    return to_canonical(load_volume(path))


# ---------------------------------------------------------------------------------------------------------
# writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; on success rename it onto ``path``.

    A crash or exception leaves the destination as it was (absent or old) and removes the temporary file.
    The temporary name keeps the destination's suffix so that format-sniffing writers still work.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(dest.suffixes[-2:]) if dest.name.endswith(".nii.gz") else dest.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: object) -> Path:
    """Write JSON atomically (sorted keys, indented, numpy scalars converted)."""

    def default(o: object) -> object:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, with a one-line error for a missing or malformed file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: malformed JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{p}: expected a JSON object")
    return obj


def _scrubbed_image(vol: Volume, dtype: np.dtype | type):
    import nibabel as nib

    data = np.asarray(vol.data)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    img = nib.Nifti1Image(data.astype(dtype, copy=False), vol.affine)
    hdr = img.header
    for key in ("descrip", "db_name", "aux_file", "intent_name"):
        hdr[key] = b""
    hdr.set_sform(vol.affine, code=1)
    hdr.set_qform(vol.affine, code=1)
    if not np.allclose(hdr.get_qform(), vol.affine, atol=1e-4):
        hdr.set_qform(None, code=0)  # a sheared affine has no quaternion form: the sform alone carries it
    hdr.set_xyzt_units("mm", "sec")
    return img


def save_volume(
    path: str | os.PathLike,
    vol: Volume,
    *,
    dtype: np.dtype | type = np.float32,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write ``vol`` as NIfTI-1 atomically, with a scrubbed header and matching qform/sform.

    ``inputs`` lists the files this output was derived from: writing over one of them is refused.
    """
    dest = Path(path)
    if not str(dest).lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"{dest}: output must end in .nii or .nii.gz")
    for src in inputs:
        if Path(src).exists() and dest.exists() and os.path.samefile(src, dest):
            raise InputError(f"{dest}: refusing to write over an input file")
    if vol.data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {vol.data.shape}")
    img = _scrubbed_image(vol, dtype)
    with atomic_path(dest) as tmp:
        img.to_filename(str(tmp))
    return dest


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map (N, 3) voxel coordinates to (N, 3) world coordinates."""
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map (N, 3) world coordinates to (N, 3) voxel coordinates."""
    return voxel_to_world(np.linalg.inv(affine), xyz)
