"""Finding prediction outputs under a folder: one finder per output layout, pluggable.

A finder takes the folder and yields :class:`Output` records (the synthetic 7T and where its siblings would be;
siblings may be missing, which the QC then flags). Two layouts are registered:

* ``plain``: what ``synth7t predict`` writes, ``OUT/<name>/syn7t.nii.gz`` with ``mask.nii.gz``,
  ``uncertainty.nii.gz`` and ``provenance.json`` next to it (a folder holding any of the image, the mask or the
  provenance counts, so that half-written outputs show up as failed rows); OUT itself may be one such folder.
* ``bids``: a BIDS derivatives dataset, ``sub-*/[ses-*/]anat/<base>_desc-synth7T_T1w.nii[.gz]``; the siblings
  are found by replacing ``desc-synth7T_T1w`` (:data:`BIDS_SIBLINGS`): ``<base>_desc-brain_mask``,
  ``<base>_desc-synth7TUncertainty_T1w`` and the JSON sidecar ``<base>_desc-synth7T_T1w.json`` as provenance.

Another layout is one :func:`register_layout` call away.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PLAIN_FILES = {"syn7t": "syn7t.nii.gz", "mask": "mask.nii.gz", "uncertainty": "uncertainty.nii.gz",
               "provenance": "provenance.json"}
BIDS_OUTPUT = "_desc-synth7T_T1w"
BIDS_SIBLINGS = {"mask": "_desc-brain_mask{ext}", "uncertainty": "_desc-synth7TUncertainty_T1w{ext}",
                 "provenance": "_desc-synth7T_T1w.json"}


@dataclass(frozen=True)
class Output:
    """One prediction output: its row name, layout and files (which need not exist)."""

    id: str
    layout: str
    syn7t: Path
    mask: Path
    uncertainty: Path
    provenance: Path


Finder = Callable[[Path], Iterable[Output]]
LAYOUTS: dict[str, Finder] = {}


def register_layout(name: str, finder: Finder) -> None:
    """Add (or replace) a layout: ``finder(root)`` yields the outputs of that layout under ``root``."""
    LAYOUTS[name] = finder


def _plain_output(folder: Path, name: str) -> Output:
    return Output(name, "plain", *(folder / PLAIN_FILES[k] for k in ("syn7t", "mask", "uncertainty", "provenance")))


def find_plain(root: Path) -> Iterator[Output]:
    """``OUT/<name>/syn7t.nii.gz`` and siblings (and OUT itself when it is one output folder)."""
    markers = (PLAIN_FILES["syn7t"], PLAIN_FILES["mask"], PLAIN_FILES["provenance"])
    if any((root / m).exists() for m in markers):
        yield _plain_output(root, root.name)
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith(".") and any(
                    os.path.exists(os.path.join(entry.path, m)) for m in markers):
                yield _plain_output(Path(entry.path), entry.name)


def find_bids(root: Path) -> Iterator[Output]:
    """``sub-*/[ses-*/]anat/<base>_desc-synth7T_T1w.nii[.gz]`` and siblings."""
    for pattern in ("sub-*/anat", "sub-*/ses-*/anat"):
        for anat in root.glob(pattern):
            for ext in (".nii.gz", ".nii"):
                for path in anat.glob(f"*{BIDS_OUTPUT}{ext}"):
                    base = path.name[: -len(BIDS_OUTPUT + ext)]
                    sib = {k: anat / (base + v.format(ext=ext)) for k, v in BIDS_SIBLINGS.items()}
                    yield Output(base, "bids", path, sib["mask"], sib["uncertainty"], sib["provenance"])


register_layout("plain", find_plain)
register_layout("bids", find_bids)


def discover(root: str | Path) -> list[Output]:
    """Every output of every registered layout under ``root``, sorted by name (each image once)."""
    root = Path(root)
    seen: dict[Path, Output] = {}
    for finder in LAYOUTS.values():
        for out in finder(root):
            seen.setdefault(out.syn7t, out)
    return sorted(seen.values(), key=lambda o: (o.id, str(o.syn7t)))
