"""A cohort's outputs on a cluster: staged, installed whole, fingerprinted, and a machine-readable run record.

What a long ``synth7t predict`` run on shared nodes needs when things break in the middle of it:

* **Staging.** Every file of a scan (volumes, sidecars, thumbnails) is written into a hidden folder inside OUT,
  ``OUT/.synth7t-staging/<run>/<scan>/`` (``<run>``: ``all`` or ``shard-K-of-N``, so that array tasks sharing
  OUT never touch each other's files), then renamed into place (:func:`install`), the provenance record last: a
  killed run leaves no partial or temporary file among the outputs, and a scan's record exists only when all of
  its files do. Each run clears its own staging folder when it starts (:func:`clear_staging`), and removes what a
  run killed during the renames could have left: output files of a scan without its record, and the temporary
  files of atomic writes (:func:`remove_partial`).
* **Checksums.** The record lists the sha256 of every file of the scan (``checksums``), so that a finished output
  can be verified (:func:`verify`).
* **Fingerprints.** The record holds the sha256 of the input (``input_sha256``) and of the settings that make the
  output (``settings_sha256``: the model's sha256, the prediction parameters, the preprocessing steps); a rerun
  redoes a scan whose input or settings changed, and never rewrites one whose did not (unless ``--overwrite``).
* **Run record.** ``OUT/logs/predict[_shard-K-of-N].json`` (:func:`write_run_record`): the counts, the cores, and
  one entry per failed scan (its input relative to the BIDS root or its file name, and the one-line reason), for
  a scheduler or a script to act on; the exit status says the same (0 all done, 1 some failed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from synth7t.io import read_json, write_json

log = logging.getLogger(__name__)
STAGING = ".synth7t-staging"
LOGS = "logs"
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_TEMP = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9.]+)?$")  # synth7t.io.atomic_path's temporary files


def run_name(shard: tuple[int, int] | None) -> str:
    """``all``, or ``shard-K-of-N`` (K counted from 1) for one task of an array."""
    return "all" if shard is None else f"shard-{shard[0] + 1}-of-{shard[1]}"


def staging_root(out: Path, shard: tuple[int, int] | None) -> Path:
    return Path(out) / STAGING / run_name(shard)


def clear_staging(out: Path, shard: tuple[int, int] | None) -> Path:
    """Remove what an earlier (killed) run of the same shard left in its staging folder; returns the folder."""
    root = staging_root(out, shard)
    if root.exists():
        log.info("removing the staged files of an interrupted run (%s)", root)
        shutil.rmtree(root)
    return root


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def settings_sha256(model_sha256: str, parameters: dict, steps: dict) -> str:
    """The fingerprint of everything but the input that makes an output."""
    blob = json.dumps({"model": model_sha256, "parameters": parameters, "preprocessing": steps}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_record(path: Path) -> dict | None:
    """A scan's provenance record (``provenance.json``, or the ``Provenance`` of a BIDS sidecar); None when it is
    missing or unreadable."""
    try:
        rec = read_json(path)
    except Exception:  # noqa: BLE001 - a torn or foreign file: the scan is not finished
        return None
    if not isinstance(rec, dict):
        return None
    prov = rec.get("Provenance", rec)
    return prov if isinstance(prov, dict) else None


def up_to_date(record: dict | None, input_sha: str, settings_sha: str) -> bool:
    """Whether a finished scan's record matches its input and settings now (a record written before fingerprints
    existed counts as matching: nothing says it changed)."""
    if record is None:
        return False
    if "input_sha256" not in record:
        return True
    return record["input_sha256"] == input_sha and record.get("settings_sha256") == settings_sha


def output_files(paths: dict[str, Path]) -> list[Path]:
    """The files a scan's outputs can have (volumes and their sidecars, thumbnails, the record)."""
    from synth7t.cohortqc.thumbs import qc_paths
    from synth7t.io import nifti_stem

    files = {p for k, p in paths.items() if k != "folder"}
    files |= {p.with_name(nifti_stem(p) + ".json") for k, p in paths.items()
              if k not in ("folder", "record") and p.name.endswith((".nii", ".nii.gz"))}
    files |= {p for k, p in qc_paths(paths["syn7t"]).items() if k != "summary"}
    return sorted(files)


def remove_partial(paths: dict[str, Path]) -> int:
    """Remove a scan's output files when its record is missing (a run killed while renaming them into place), and
    the temporary files of atomic writes beside them; returns how many files went."""
    files = output_files(paths)
    gone = 0
    if not paths["record"].exists():
        for f in files:
            if f.is_file():
                f.unlink()
                gone += 1
    for folder in {f.parent for f in files}:
        if not folder.is_dir():
            continue
        names = {f.name for f in files}
        for f in folder.iterdir():
            if f.is_file() and _TEMP.match(f.name) and any(f.name.startswith(f".{n}.") for n in names):
                f.unlink()
                gone += 1
    return gone


def staged_paths(paths: dict[str, Path], stage: Path) -> dict[str, Path]:
    """Where each output of a scan is written before :func:`install`: the same names in ``stage``."""
    return {k: (stage if k == "folder" else stage / p.name) for k, p in paths.items()}


def checksums(stage: Path) -> dict[str, str]:
    """``{path relative to the scan's stage: sha256}`` of every staged file."""
    return {f.relative_to(stage).as_posix(): file_sha256(f) for f in sorted(stage.rglob("*")) if f.is_file()}


def install(stage: Path, paths: dict[str, Path]) -> None:
    """Rename a scan's staged files into place, its thumbnails (``stage/qc/``) to their QC folder and the record
    last; an older record goes first, so that a scan is never marked finished with a mix of old and new files."""
    from synth7t.cohortqc.thumbs import qc_paths

    record = paths["record"]
    if record.exists():
        record.unlink()
    folder = record.parent
    qc_folder = qc_paths(paths["syn7t"])["planes"].parent
    moves = []
    for f in sorted(stage.rglob("*")):
        if f.is_file() and f.name != record.name:
            dest = (qc_folder if f.parent != stage else folder) / f.name
            moves.append((f, dest))
    for src, dest in moves:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
    os.replace(stage / record.name, record)
    shutil.rmtree(stage, ignore_errors=True)


def verify(paths: dict[str, Path]) -> list[str]:
    """What is wrong with a finished scan's outputs (empty when nothing): record missing, a file missing or whose
    sha256 differs from the record's."""
    from synth7t.cohortqc.thumbs import qc_paths

    rec = read_record(paths["record"])
    if rec is None:
        return ["record missing or unreadable"]
    problems = []
    qc_folder = qc_paths(paths["syn7t"])["planes"].parent
    for rel, digest in (rec.get("checksums") or {}).items():
        f = (qc_folder / Path(rel).name) if rel.startswith("qc/") else paths["record"].parent / rel
        if not f.is_file():
            problems.append(f"{rel} missing")
        elif file_sha256(f) != digest:
            problems.append(f"{rel} differs from its checksum")
    if not rec.get("checksums"):
        problems.append("no checksums in the record")
    return problems


def is_disk_full(exc: BaseException) -> bool:
    """An error that every later scan would hit too: no space, file too large (a file-size limit), over quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_run_record(out: Path, shard: tuple[int, int] | None, record: dict) -> Path | None:
    """``OUT/logs/predict[_shard-K-of-N].json``; a run whose disk is full may fail to write it (logged)."""
    name = "predict.json" if shard is None else f"predict_{run_name(shard)}.json"
    path = Path(out) / LOGS / name
    try:
        return write_json(path, record)
    except OSError as exc:
        log.error("%s: run record not written (%s)", path, exc)
        return None
