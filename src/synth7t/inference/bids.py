"""BIDS in, BIDS derivatives out: what ``synth7t predict MODEL --bids BIDS_DIR -o DERIV`` finds and writes.

Discovery (:func:`collect_bids`): every ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` of a BIDS dataset (a folder with a
``dataset_description.json``), optionally only some participants (labels with or without ``sub-``) and sessions
(with or without ``ses-``). Covariates (age, sex, diagnosis) come from ``participants.tsv`` where it has those
columns, read as manifests are (:mod:`synth7t.manifest`), the age at a session from ``sub-X/sub-X_sessions.tsv``
where it gives one; a value the model cannot use is logged and left unknown;
``--age``/``--sex``/``--diagnosis`` fill what the table leaves empty.

Layout (:class:`BidsLayout`), after the BIDS derivatives specification (common derivatives for imaging data):
outputs go to ``DERIV/sub-X/[ses-Y/]anat/`` and keep every entity of their source (``ses``, ``acq``, ``ce``,
``rec``, ``run``, ...), adding a ``desc`` entity:

* ``<source entities>_desc-synth7T_T1w.nii.gz``: the synthetic 7T brain (sidecar ``SkullStripped: true``);
* ``<source entities>_desc-brain_mask.nii.gz``: the brain mask, the specification's ``mask`` suffix with the
  conventional ``desc-brain`` (sidecar ``Type: "Brain"``);
* ``<source entities>_desc-synth7TUncertainty_T1w.nii.gz``: with ``--tta``, the per-voxel standard deviation;
* ``<source entities>_desc-synth7TInputGrid_T1w.nii.gz``: with ``--resample-to-input``, on the source's grid.

Each has a JSON sidecar: ``Description``, ``Sources`` and ``SpatialReference`` (BIDS URIs ``bids:raw:<path in the
raw dataset>``), the model's sha256 and preset, and the prediction settings; the synthetic T1w's sidecar also holds
the whole provenance record and is written last, so that its presence marks a finished scan (reruns skip those).
No sidecar holds an absolute path or anything read from an input's header. ``DERIV/dataset_description.json``
says ``DatasetType: derivative``, ``GeneratedBy: synth7t`` and links ``raw`` to the raw dataset (:func:`raw_link`):
by relative path when DERIV is inside it (``../..``), else by its ``DatasetDOI``; a path that climbs out of the raw
dataset's folder would name the folders above it, so it is never written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from synth7t import __version__
from synth7t.errors import InputError
from synth7t.io import nifti_stem, read_json, write_json, write_text
from synth7t.manifest import (
    Subject,
    _entities,
    _participants,
    bids_covariates,
    option_covariates,
    parse_age,
    parse_diagnosis,
    parse_sex,
)

log = logging.getLogger(__name__)
BIDS_VERSION = "1.10.0"
PIPELINE = "synth7t"
PATTERNS = ("sub-*/anat/*_T1w.nii", "sub-*/anat/*_T1w.nii.gz", "sub-*/ses-*/anat/*_T1w.nii",
            "sub-*/ses-*/anat/*_T1w.nii.gz")
TEMPLATE_OUTPUTS = ("syn7t", "mask", "uncertainty")  # also written on a template model's grid (space- entity)
OUTPUTS = {  # output key -> (desc, suffix, description)
    "syn7t": ("synth7T", "T1w", "Synthetic 7T-like T1w brain predicted by synth7t from the source 3T T1w scan"),
    "mask": ("brain", "mask", "Brain mask of the prediction (1 = brain), on the grid of the synthetic T1w"),
    "uncertainty": ("synth7TUncertainty", "T1w", "Per-voxel standard deviation of synth7t's predictions over "
                    "left-right flip test-time augmentation, in the synthetic T1w's units"),
    "on_input_grid": ("synth7TInputGrid", "T1w", "The synthetic 7T-like T1w resampled (linear) onto the voxel "
                      "grid of the source scan"),
}


@dataclass
class BidsQuery:
    """Which T1w scans of the BIDS dataset ``root`` to predict: all, or those of some participants/sessions."""

    root: Path
    participants: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root)
        self.participants = [_label(p, "sub") for p in self.participants]
        self.sessions = [_label(s, "ses") for s in self.sessions]

    def describe(self) -> str:
        parts = [f"--participant-label {' '.join(self.participants)}"] if self.participants else []
        parts += [f"--session {' '.join(self.sessions)}"] if self.sessions else []
        return f" with {' and '.join(parts)}" if parts else ""


# what synth7t qc adds to a derivatives dataset, and predict's run records
BIDSIGNORE = ("*/figures", "qc.html", "qc.csv", "qc.json", "logs/")


def _label(value: str, entity: str) -> str:
    value = str(value).strip()
    return value[len(entity) + 1:] if value.startswith(f"{entity}-") else value


def find_t1w(query: BidsQuery) -> list[Path]:
    """The T1w scans ``query`` selects, sorted; one-line errors for a missing or non-BIDS folder, no match."""
    root = query.root
    if not root.is_dir():
        raise InputError(f"{root}: BIDS folder not found")
    if not (root / "dataset_description.json").is_file():
        raise InputError(f"{root}: no dataset_description.json, so not a BIDS dataset")
    found = []
    for f in sorted({f for pattern in PATTERNS for f in root.glob(pattern)}):
        parts = f.relative_to(root).parts  # sub-X/[ses-Y/]anat/name
        sub, ses = _label(parts[0], "sub"), _label(parts[1], "ses") if len(parts) == 4 else None
        if query.participants and sub not in query.participants:
            continue
        if query.sessions and ses not in query.sessions:
            continue
        found.append(f)
    if not found:
        raise InputError(f"{root}: no T1w scan (sub-*/[ses-*/]anat/*_T1w.nii[.gz]) found{query.describe()}")
    for label in query.participants:
        if not any(f.relative_to(root).parts[0] == f"sub-{label}" for f in found):
            log.warning("sub-%s: no T1w scan found%s", label, query.describe())
    return found


def collect_bids(query: BidsQuery, opts) -> list[Subject]:
    """BIDS T1w scans -> jobs named by file (``sub-01_ses-1_T1w``), with covariates; ``opts``'s fill gaps."""
    default = option_covariates(opts)
    table = _participants(query.root)
    tables: dict = {"participants": {}}  # sessions.tsv cache; participants.tsv read leniently above
    jobs, seen = [], set()
    for f in find_t1w(query):
        rel = f.relative_to(query.root).as_posix()
        name = nifti_stem(f)
        if name in seen:
            raise InputError(f"{f.parent}: {name} exists as .nii and .nii.gz; keep one")
        seen.add(name)
        participant = f.relative_to(query.root).parts[0]
        row = table.get(participant, {})
        cov = {}
        for key, parse in (("age", parse_age), ("sex", parse_sex), ("diagnosis", parse_diagnosis)):
            try:
                cov[key] = parse(row.get(key))
            except ValueError as exc:
                log.warning("%s: participants.tsv: %s; predicted with %s unknown", rel, exc, key)
                cov[key] = None
        session = _entities(f.name).get("ses")
        if session is not None:  # the age at this session (sessions.tsv) before the participant's
            try:
                age = bids_covariates(query.root, participant, session, tables=tables)["age"]
            except ValueError as exc:
                log.warning("%s: %s; its age from participants.tsv", rel, exc)
            else:
                cov["age"] = age if age is not None else cov["age"]
        cov = {k: default[k] if v is None else v for k, v in cov.items()}
        jobs.append(Subject(name, f, **cov, extra={"bids_path": rel}))
    return jobs


def raw_link(raw: Path, deriv: Path) -> str | None:
    """``DatasetLinks.raw`` of the derivatives: the relative path up from ``deriv`` when it lies inside ``raw``
    (``../..`` for ``raw/derivatives/synth7t``), else the raw dataset's ``DatasetDOI`` (``doi:...``), else None
    (the link is left out: a path from elsewhere would reveal the folders above the raw dataset)."""
    raw_r, deriv_r = Path(raw).resolve(), Path(deriv).resolve()
    if deriv_r.is_relative_to(raw_r):
        return Path(os.path.relpath(raw_r, deriv_r)).as_posix()
    try:
        doi = read_json(raw_r / "dataset_description.json").get("DatasetDOI")
    except InputError:
        doi = None
    if isinstance(doi, str) and doi.strip():
        return doi.strip() if doi.strip().startswith("doi:") else f"doi:{doi.strip()}"
    log.info("%s is outside the raw dataset and it has no DatasetDOI: DatasetLinks.raw is left out (a relative "
             "path would name the folders above it)", deriv)
    return None


def derivative_name(source: str, desc: str, suffix: str, space: str | None = None) -> str:
    """``sub-01_ses-1_acq-mp_T1w.nii.gz`` -> ``sub-01_ses-1_acq-mp[_space-<space>]_desc-<desc>_<suffix>.nii.gz``."""
    entities = [f"{k}-{v}" for k, v in _entities(source).items() if k not in ("suffix", "desc", "space")]
    return "_".join([*entities, *([f"space-{space}"] if space else []), f"desc-{desc}", suffix]) + ".nii.gz"


def sidecar(path: Path) -> Path:
    return path.with_name(nifti_stem(path) + ".json")


class BidsLayout:
    """Where the outputs of a BIDS job go in the derivatives dataset ``deriv``, and their sidecars."""

    def __init__(self, raw: str | Path, deriv: str | Path):
        self.raw, self.deriv = Path(raw), Path(deriv)
        self.space: str | None = None  # a template model's grid: its outputs there carry a space- entity

    def begin(self, predictor, opts) -> None:
        """Check that ``deriv`` is not the raw dataset nor another pipeline's; write dataset_description.json."""
        self.space = predictor.template["name"] if getattr(predictor, "template", None) else None
        if self.deriv.resolve() == self.raw.resolve():
            raise InputError(f"{self.deriv}: the output folder is the raw BIDS dataset; give a derivatives folder "
                             f"such as {self.raw / 'derivatives' / PIPELINE}")
        desc = self.deriv / "dataset_description.json"
        if desc.exists():
            old = read_json(desc)
            names = [g.get("Name") for g in old.get("GeneratedBy", []) if isinstance(g, dict)]
            if old.get("DatasetType") != "derivative" or PIPELINE not in names:
                raise InputError(f"{desc}: this folder holds another dataset; give an empty or synth7t folder")
        write_json(desc, {
            "Name": "synth7t: synthetic 7T-like T1w brains",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": PIPELINE, "Version": __version__,
                             "Description": "3T T1w -> synthetic 7T-like T1w brain (2.5D attention residual U-net)"}],
            **({"DatasetLinks": {"raw": link}} if (link := raw_link(self.raw, self.deriv)) else {}),
        })
        if not (self.deriv / "README.md").exists():
            write_text(self.deriv / "README.md", "# synth7t derivatives\n\nSynthetic 7T-like T1w brains predicted "
                       "by synth7t from the T1w scans of the raw dataset (DatasetLinks `raw`); see each output's "
                       "JSON sidecar for its source, model and settings.\n")
        # synth7t qc's thumbnails sit where fMRIPrep puts its figures, its page and tables at the root
        ignore = self.deriv / ".bidsignore"
        lines = ignore.read_text().splitlines() if ignore.exists() else []
        missing = [p for p in BIDSIGNORE if p not in lines]
        if missing:
            write_text(ignore, "\n".join([*lines, *missing]) + "\n")

    def paths(self, job: Subject) -> dict[str, Path]:
        rel = Path(job.extra["bids_path"])
        folder = self.deriv / rel.parent
        paths = {key: folder / derivative_name(rel.name, desc, suffix) for key, (desc, suffix, _) in OUTPUTS.items()}
        if self.space:
            paths |= {f"{key}_template": folder / derivative_name(rel.name, desc, suffix, self.space)
                      for key, (desc, suffix, _) in OUTPUTS.items() if key in TEMPLATE_OUTPUTS}
        return {**paths, "record": sidecar(paths["syn7t"])}

    def complete(self, job: Subject) -> bool:
        paths = self.paths(job)
        return paths["syn7t"].exists() and paths["record"].exists()

    def record(self, job: Subject, prov: dict, written: dict[str, Path]) -> None:
        """A sidecar per written volume; the synthetic T1w's (with the provenance record) last."""
        source = f"bids:raw:{job.extra['bids_path']}"
        common = {"Sources": [source], "SpatialReference": source,
                  "Model": {"sha256": prov["model"]["sha256"], "preset": prov["model"]["preset"]},
                  "PredictionSettings": {**prov["parameters"], "preprocessing": prov["preprocessing"]}}
        for key in sorted(written, key=lambda k: k == "syn7t"):
            base = key.removesuffix("_template")
            meta = {"Description": OUTPUTS[base][2], **common}
            if key != base:  # on the template grid of a template model (its space- entity)
                meta["Description"] += f", on the model's template grid ({self.space})"
                meta["SpatialReference"] = f"{self.space}: {prov['template']['file']} of the model folder"
            if base == "mask":
                meta["Type"] = "Brain"
            else:
                meta["SkullStripped"] = True
            if key == "syn7t":
                meta["Provenance"] = prov
            write_json(sidecar(written[key]), meta)
