"""Cohort manifests: CSV/TSV files or BIDS folders -> validated :class:`Subject` records.

A manifest is a CSV or TSV with the columns ``subject, t3, t7, age, sex, diagnosis`` (``t7`` may be empty or
absent for prediction-only cohorts; ``min_slice`` and ``exclude`` are optional QC overrides; any other column is
kept in :attr:`Subject.extra`). Relative paths are resolved against the manifest's folder. Validation reports
every bad row at once, with its row number (the header is row 1).

Several 3T scans of one person (issue 16): rows with the same ``subject`` and a ``session`` (or ``scan``: either
name, not both) column telling them apart, all with the same ``t7`` and covariates; an optional numeric
``gap_days`` (days between that 3T and the 7T) is kept on each record. One row per subject needs no session.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import hmac
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from synth7t.errors import InputError, ManifestError

REQUIRED_COLUMNS = ("subject", "t3")
KNOWN_COLUMNS = ("subject", "t3", "t7", "age", "sex", "diagnosis", "min_slice", "exclude", "session", "scan",
                 "gap_days")
SESSION_COLUMNS = ("session", "scan")  # either names the 3T scan of a subject with several
SEX_CODES = {"f": "F", "female": "F", "w": "F", "woman": "F", "m": "M", "male": "M", "man": "M"}
# thesis 1.1: healthy = cognitively normal or subjective cognitive decline; ill = MCI or dementia
DIAGNOSIS_GROUPS = {
    "normal": "healthy",
    "cn": "healthy",
    "hc": "healthy",
    "control": "healthy",
    "healthy": "healthy",
    "scd": "healthy",
    "mci": "ill",
    "dementia": "ill",
    "demented": "ill",
    "ad": "ill",
    "ill": "ill",
}
MISSING = {"", "na", "n/a", "nan", "none", "null", "-"}
TRUE = {"1", "true", "yes", "y", "x"}
FALSE = {"0", "false", "no", "n"} | MISSING


@dataclass
class Subject:
    """One row of a cohort: a 3T scan, optionally its paired 7T scan, and covariates.

    ``session`` tells apart several 3T scans of one subject (None: the subject's only row); ``gap_days`` is the
    time from that 3T to the 7T, recorded but not used by the network."""

    subject: str
    t3: Path
    t7: Path | None = None
    age: float | None = None
    sex: str | None = None  # "F", "M" or None
    diagnosis: str | None = None  # as given, lower case (e.g. "normal", "scd", "mci", "dementia")
    min_slice: int | None = None
    exclude: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    session: str | None = None
    gap_days: float | None = None

    @property
    def group(self) -> str | None:
        """Diagnosis group of thesis 1.1: "healthy", "ill" or None when unknown."""
        return diagnosis_group(self.diagnosis)

    def covariates(self) -> dict:
        return {"age": self.age, "sex": self.sex, "diagnosis": self.diagnosis, "group": self.group}


def diagnosis_group(diagnosis: str | None) -> str | None:
    if diagnosis is None:
        return None
    return DIAGNOSIS_GROUPS.get(diagnosis.strip().lower())


def parse_sex(value: str | None) -> str | None:
    """Map a sex code to "F"/"M"; None for missing; ValueError for an unknown code."""
    if value is None or value.strip().lower() in MISSING:
        return None
    key = value.strip().lower()
    if key not in SEX_CODES:
        raise ValueError(f"unknown sex code {value!r} (use F/M, female/male)")
    return SEX_CODES[key]


def _number(value: str | None, unparseable: str) -> float | None:
    """A float, None for a missing value; ValueError(``unparseable``) for text that is no number."""
    if value is None or value.strip().lower() in MISSING:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(unparseable) from None


def parse_age(value: str | None) -> float | None:
    age = _number(value, f"unparseable age {value!r}")
    if age is not None and (not math.isfinite(age) or age < 0 or age > 130):
        raise ValueError(f"age {value!r} out of range 0-130")
    return age


def parse_diagnosis(value: str | None) -> str | None:
    if value is None or value.strip().lower() in MISSING:
        return None
    key = value.strip().lower()
    if key not in DIAGNOSIS_GROUPS:
        known = ", ".join(sorted(DIAGNOSIS_GROUPS))
        raise ValueError(f"unknown diagnosis {value!r} (known: {known})")
    return key


def option_covariates(opts) -> dict:
    """``{"age", "sex", "diagnosis"}`` given as options (``opts``: anything with ``age``, ``sex`` and ``diagnosis``
    attributes, e.g. :class:`synth7t.inference.PredictOptions`) for every input that does not give its own, parsed;
    :class:`InputError` for a value that cannot be read."""
    try:
        return {"age": parse_age(None if opts.age is None else str(opts.age)), "sex": parse_sex(opts.sex),
                "diagnosis": parse_diagnosis(opts.diagnosis)}
    except ValueError as exc:
        raise InputError(f"covariates: {exc}") from None


def _parse_bool(value: str | None) -> bool:
    key = (value or "").strip().lower()
    if key in TRUE:
        return True
    if key in FALSE:
        return False
    raise ValueError(f"cannot read {value!r} as yes/no")


def _parse_int(value: str | None) -> int | None:
    if value is None or value.strip().lower() in MISSING:
        return None
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"min_slice {value!r} is not an integer") from None
    if out < 0:
        raise ValueError(f"min_slice {value!r} is negative")
    return out


def parse_gap_days(value: str | None) -> float | None:
    """Days between a 3T and the 7T (negative: the 3T came after); None when missing."""
    days = _number(value, f"gap_days {value!r} is not a number of days")
    if days is not None and not math.isfinite(days):
        raise ValueError(f"gap_days {value!r} is not finite")
    return days


def _resolve(base: Path, value: str) -> Path:
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else (base / p)


def read_manifest(path: str | Path, *, require_t7: bool = False, check_files: bool = True) -> list[Subject]:
    """Read and validate a CSV/TSV manifest.

    Raises :class:`ManifestError` listing every problem (with row numbers) when any row is bad.
    """
    p = Path(path)
    if not p.exists():
        raise ManifestError(p, ["file not found"])
    if p.is_dir():
        raise ManifestError(p, ["is a folder; give a CSV/TSV manifest or use --bids"])
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(p, ["not a text file (expected CSV or TSV)"]) from None
    if not text.strip():
        raise ManifestError(p, ["manifest is empty"])
    delimiter = "\t" if p.suffix.lower() == ".tsv" or text.splitlines()[0].count("\t") > 0 else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if require_t7 and "t7" not in columns:
        missing.append("t7")
    if missing:
        raise ManifestError(p, [f"missing column(s) {', '.join(missing)} (have: {', '.join(columns)})"])
    if all(c in columns for c in SESSION_COLUMNS):
        raise ManifestError(p, ["both a 'session' and a 'scan' column: give one of them"])
    subjects, problems, seen, rows = [], [], {}, {}
    for rowno, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
        if None in raw:
            problems.append(f"row {rowno}: more fields than columns")
            continue
        sub, errs = _parse_row(row, p.parent, require_t7=require_t7, check_files=check_files)
        key = None if sub is None else (sub.subject, sub.session)
        if key in seen:
            what = f" session {sub.session!r}" if sub.session is not None else ""
            errs.append(f"duplicate subject {sub.subject!r}{what} (first in row {seen[key]})")
        problems += [f"row {rowno}: {e}" for e in errs]
        if sub is not None and not errs:
            seen[key] = rowno
            subjects.append(sub)
            rows[id(sub)] = rowno
        elif sub is not None:
            seen.setdefault(key, rowno)
    problems += _check_scans(subjects, rows)
    if problems:
        raise ManifestError(p, problems)
    if not subjects:
        raise ManifestError(p, ["no subjects"])
    return subjects


def _check_scans(subjects: list[Subject], rows: dict[int, int]) -> list[str]:
    """One line per subject whose rows (several 3T scans) lack a session or disagree on the 7T or covariates."""
    by_id: dict[str, list[Subject]] = {}
    for s in subjects:
        by_id.setdefault(s.subject, []).append(s)
    problems = []
    for sid, group in by_id.items():
        if len(group) < 2:
            continue
        where = "rows " + ", ".join(str(rows[id(s)]) for s in group)
        if any(s.session is None for s in group):
            problems.append(f"{where}: subject {sid!r} has several rows; each needs its own session (or scan)")
            continue
        if all(s.t7 is None for s in group):
            problems.append(f"{where}: subject {sid!r} has several 3T scans but no 7T (they pair with one 7T)")
            continue
        differ = [c for c in ("t7", "age", "sex", "diagnosis")
                  if len({str(getattr(s, c)) for s in group}) > 1]
        if differ:
            problems.append(f"{where}: subject {sid!r} has different {', '.join(differ)} in its rows "
                            f"(one 7T and one set of covariates per subject)")
    return problems


def _parse_row(row: dict, base: Path, *, require_t7: bool, check_files: bool) -> tuple[Subject | None, list]:
    errs: list[str] = []
    sid = row.get("subject", "")
    if not sid:
        return None, ["empty subject"]
    if not re.fullmatch(r"[A-Za-z0-9._-]+", sid):
        errs.append(f"subject {sid!r} has characters other than letters, digits, '.', '_' or '-'")
    paths = {}
    for col in ("t3", "t7"):
        val = row.get(col, "")
        if not val:
            if col == "t3" or require_t7:
                errs.append(f"empty {col}")
            paths[col] = None
            continue
        paths[col] = _resolve(base, val)
        if check_files and not paths[col].is_file():
            errs.append(f"{col} file not found: {paths[col]}")
    values = {}
    for col, fn in (("age", parse_age), ("sex", parse_sex), ("diagnosis", parse_diagnosis),
                    ("min_slice", _parse_int), ("exclude", _parse_bool), ("gap_days", parse_gap_days)):
        try:
            values[col] = fn(row.get(col))
        except ValueError as exc:
            errs.append(str(exc))
            values[col] = None
    extra = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS}
    sub = Subject(subject=sid, t3=paths["t3"], t7=paths["t7"], age=values["age"], sex=values["sex"],
                  diagnosis=values["diagnosis"], min_slice=values["min_slice"],
                  exclude=bool(values["exclude"]), extra=extra,
                  session=(row.get("session") or row.get("scan") or None), gap_days=values["gap_days"])
    return sub, errs


def write_manifest(path: str | Path, subjects: list[Subject]) -> Path:
    """Write subjects as a CSV manifest (paths relative to the manifest's folder where possible)."""
    import io as _io

    from synth7t.io import write_text

    dest = Path(path)
    extras = sorted({k for s in subjects for k in s.extra})
    scans = ["session", "gap_days"] if any(s.session is not None for s in subjects) else []
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["subject", "t3", "t7", "age", "sex", "diagnosis", *scans, *extras])

    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        try:
            return str(Path(p).resolve().relative_to(dest.parent.resolve()))
        except ValueError:
            return str(p)

    for s in subjects:
        age = "" if s.age is None else f"{s.age:g}"
        gap = "" if s.gap_days is None else f"{s.gap_days:g}"
        writer.writerow([s.subject, rel(s.t3), rel(s.t7), age, s.sex or "", s.diagnosis or "",
                         *([s.session or "", gap] if scans else []), *[s.extra.get(k, "") for k in extras]])
    return write_text(dest, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# BIDS


@dataclass
class BidsMatch:
    """How 3T and 7T scans are told apart in a BIDS folder: a BIDS entity and its value for each field strength.

    The default matches ``ses-3T`` / ``ses-7T``; ``entity="acq", t3="3T", t7="7T"`` matches
    ``sub-01_acq-3T_T1w.nii.gz``. Values are compared case-insensitively. ``t3`` may also be a shell-style pattern
    or a comma-separated list of values and patterns (``"3T*"`` matches ``ses-3T1`` and ``ses-3T2``; ``"3Ta,3Tb"``):
    a person with several matching 3T scans gets one training pair per 3T with its one 7T (a value that also
    matches ``t7`` is a 7T).
    """

    entity: str = "ses"
    t3: str = "3T"
    t7: str = "7T"
    suffix: str = "T1w"

    def kind(self, value: str) -> str | None:
        """``"t7"``, ``"t3"`` or None for an entity value."""
        value = value.lower()
        if value == self.t7.lower():
            return "t7"
        patterns = [p.strip().lower() for p in self.t3.split(",") if p.strip()]
        return "t3" if any(fnmatch.fnmatchcase(value, p) for p in patterns) else None


def _entities(name: str) -> dict[str, str]:
    stem = re.sub(r"\.nii(\.gz)?$", "", name)
    parts = stem.split("_")
    return dict(p.split("-", 1) for p in parts[:-1] if "-" in p) | {"suffix": parts[-1]}


def read_bids(root: str | Path, match: BidsMatch | None = None, *, require_t7: bool = False) -> list[Subject]:
    """Discover 3T/7T T1w pairs in a BIDS folder (:class:`BidsMatch`); several 3T scans of one person with its one
    7T become one row each (``session``: the 3T's entity value). Covariates come from ``participants.tsv`` and, per
    session, the age from ``sub-<label>/sub-<label>_sessions.tsv`` where it has one (:func:`bids_covariates`)."""
    match = match or BidsMatch()
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, ["BIDS folder not found"])
    found: dict[str, dict[str, list[Path]]] = {}
    for f in sorted(root.glob("sub-*/**/anat/*.nii*")):
        ent = _entities(f.name)
        if ent.get("suffix") != match.suffix or "sub" not in ent:
            continue
        kind = match.kind(ent.get(match.entity) or "")
        if kind:
            found.setdefault(ent["sub"], {"t3": [], "t7": []})[kind].append(f)
    subjects, problems = [], []
    for sid, files in sorted(found.items()):
        if len(files["t7"]) > 1:
            problems.append(f"sub-{sid}: {len(files['t7'])} t7 scans match, expected one")
        if not files["t3"]:
            problems.append(f"sub-{sid}: no 3T scan ({match.entity}-{match.t3})")
            continue
        if require_t7 and not files["t7"]:
            problems.append(f"sub-{sid}: no 7T scan ({match.entity}-{match.t7})")
            continue
        several = len(files["t3"]) > 1
        if several and not files["t7"]:
            problems.append(f"sub-{sid}: {len(files['t3'])} 3T scans match but no 7T ({match.entity}-{match.t7}) "
                            "to pair them with")
            continue
        labels = _scan_labels(files["t3"], match.entity) if several else [None]
        for f, label in zip(files["t3"], labels, strict=True):
            try:
                cov = bids_covariates(root, f"sub-{sid}", _entities(f.name).get("ses"))
                subjects.append(Subject(subject=f"sub-{sid}", t3=f, t7=files["t7"][0] if files["t7"] else None,
                                        session=label, **cov))
            except ValueError as exc:
                problems.append(f"sub-{sid}: {exc}")
    if problems:
        raise ManifestError(root, problems)
    if not subjects:
        raise ManifestError(root, [f"no {match.suffix} scans with {match.entity}-{match.t3} found"])
    return subjects


def _scan_labels(files: list[Path], entity: str) -> list[str]:
    """A label per 3T scan of one person: its ``entity`` value, or all its entities but ``sub`` when two share it."""
    values = [_entities(f.name).get(entity, "") for f in files]
    if len(set(values)) == len(values):
        return values
    return ["_".join(f"{k}-{v}" for k, v in _entities(f.name).items() if k not in ("sub", "suffix")) for f in files]


def _read_tsv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    return list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines(), delimiter="\t"))


def _participants(root: Path) -> dict[str, dict[str, str]]:
    return {r.get("participant_id", ""): r for r in _read_tsv(root / "participants.tsv")}


def _sessions(root: Path, participant: str) -> dict[str, dict[str, str]]:
    """``sub-<label>/sub-<label>_sessions.tsv`` by ``session_id`` (``ses-<label>``); empty where absent."""
    rows = _read_tsv(root / participant / f"{participant}_sessions.tsv")
    return {r.get("session_id", ""): r for r in rows}


def bids_covariates(root: Path, participant: str, session: str | None, *, tables: dict | None = None) -> dict:
    """``{"age", "sex", "diagnosis"}`` of one scan of a BIDS dataset: sex and diagnosis from ``participants.tsv``,
    the age from the session's row of ``sub-<label>_sessions.tsv`` when it gives one (ages change between
    sessions), else from ``participants.tsv``. ``ValueError`` names the table of a value that cannot be read.
    ``tables``: a cache (dict) shared by the calls of one dataset."""
    tables = {} if tables is None else tables
    if "participants" not in tables:
        tables["participants"] = _participants(root)
    row = tables["participants"].get(participant, {})
    out = {}
    for key, parse in (("age", parse_age), ("sex", parse_sex), ("diagnosis", parse_diagnosis)):
        try:
            out[key] = parse(row.get(key))
        except ValueError as exc:
            raise ValueError(f"participants.tsv: {exc}") from None
    if session is not None:
        key = f"sessions:{participant}"
        if key not in tables:
            tables[key] = _sessions(root, participant)
        ses_row = tables[key].get(f"ses-{session}", {})
        try:
            age = parse_age(ses_row.get("age"))
        except ValueError as exc:
            raise ValueError(f"{participant}_sessions.tsv: ses-{session}: {exc}") from None
        if age is not None:
            out["age"] = age
    return out


def load_cohort(source: str | Path, *, bids: BidsMatch | None = None, require_t7: bool = False) -> list[Subject]:
    """A manifest file, or a BIDS folder (when ``bids`` is given or ``source`` is a folder)."""
    source = Path(source)
    if bids is not None or source.is_dir():
        return read_bids(source, bids, require_t7=require_t7)
    return read_manifest(source, require_t7=require_t7)


# ---------------------------------------------------------------------------------------------------------
# pseudonyms (thesis 1.2.4)


def pseudonym(subject_id: str, key: bytes, *, prefix: str = "s") -> str:
    """Keyed pseudonym: HMAC-SHA256 of the subject ID under a secret key, 10 hex digits.

    Without the key the pseudonym cannot be linked back to the ID; the digits are a hash, so no part of the
    original ID appears in it.
    """
    digest = hmac.new(key, subject_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:10]}"
