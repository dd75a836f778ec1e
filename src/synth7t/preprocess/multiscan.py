"""Several 3T scans of one person paired with the same 7T (issue 16, "many 3T per 7T").

A subject whose manifest rows carry a ``session`` (or ``scan``) label is processed here instead of by
``subject.process_subject`` (the cohort runner, ``pipeline.process_unit``, dispatches). The 7T (the expensive
part: two N4 passes at 0.65 mm) is processed once per subject; every 3T is then registered onto it and becomes
its own training pair. Layout (docs/data-layout.md):

```
WORK/<pseudonym>/               t7.nii.gz, mask.nii.gz, mask_csf.nii.gz, subject.json (+ "scans"),
                                qc_7t.json (the 7T's QC facts), provenance.json (the 7T's), .done
WORK/<pseudonym>/scans/<code>/  t3.nii.gz, qc.json, qc.png, transforms/, provenance.json, .done
```

``<code>`` is a keyed hash (6 hex digits) of the subject ID and the session label: session labels are often
dates, so they never appear in the work folder, and unlike a running index a code stays the same when scans are
added to or removed from the manifest, so resuming never mistakes one scan's folder for another's.

Both levels follow the pipeline's contract: built in a ``.partial`` folder, ``.done`` (with the parameter hash)
written last, then renamed into place. A rerun reuses a done 7T and skips done scans; a 7T redone (new
parameters) replaces the subject folder and with it all its scans. QC is per scan: a rejected 3T drops only its
pair (the 7T's own drop-out and motion enter every scan's decision, as for single pairs).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from synth7t.errors import ConfigError, Synth7tError
from synth7t.io import load_volume, read_json, save_volume, write_json
from synth7t.manifest import Subject, pseudonym
from synth7t.preprocess import anonymize, qc
from synth7t.preprocess.subject import (
    PreprocessConfig,
    install,
    is_done,
    process_7t,
    register_3t,
    versions,
    write_qc,
)

log = logging.getLogger(__name__)

CODE_DIGITS = 6


def scan_codes(rows: list[Subject], key: bytes) -> dict[str, str]:
    """``{session label: code}`` for one subject's rows: keyed hashes, unique within the subject."""
    codes = {r.session: pseudonym(f"{r.subject}\0{r.session}", key, prefix="")[:CODE_DIGITS] for r in rows}
    if len(set(codes.values())) != len(codes):
        raise ConfigError(f"two scans of one subject got the same code ({len(codes)} scans); use another key")
    return codes  # type: ignore[return-value]


def group_rows(subjects: list[Subject]) -> list[list[Subject]]:
    """Rows grouped by subject ID (in first-seen order); :class:`ConfigError` for rows that cannot pair."""
    groups: dict[str, list[Subject]] = {}
    for s in subjects:
        groups.setdefault(s.subject, []).append(s)
    for sid, rows in groups.items():
        sessions = [r.session for r in rows]
        if len(rows) > 1 and (None in sessions or len(set(sessions)) != len(rows)
                              or len({str(r.t7) for r in rows}) > 1 or rows[0].t7 is None):
            raise ConfigError(f"subject {sid}: {len(rows)} rows need distinct sessions and one common 7T")
    return list(groups.values())


def row_label(s: Subject) -> str:
    """The subject ID, with ``/<session>`` for one of several 3T scans (keys of :class:`PreprocessResult`)."""
    return s.subject if s.session is None or s.t7 is None else f"{s.subject}/{s.session}"



def is_multi(rows: list[Subject]) -> bool:
    """True for a subject processed here: its row(s) carry a session and it has a 7T."""
    return rows[0].session is not None and rows[0].t7 is not None


def scan_names(units: list[list[Subject]], names: dict[str, str], key: bytes) -> dict[str, str]:
    """``{"<id>/<session>": "<pseudonym>_<code>"}`` for the multi-scan subjects (added to the ID mapping)."""
    out = {}
    for rows in units:
        if is_multi(rows):
            for session, code in scan_codes(rows, key).items():
                out[f"{rows[0].subject}/{session}"] = f"{names[rows[0].subject]}_{code}"
    return out


def cohort_entry(rows: list[Subject], entries: dict[str, dict], prev: dict | None, key: bytes) -> dict:
    """``cohort.json``'s entry for a multi-scan subject: ``{"status", "reason", "scans": {code: {"status",
    "reason"}}}``; the subject is "done" when one of its pairs is. Skipped scans keep their previous entry."""
    codes = scan_codes(rows, key)
    per = {}
    for r in rows:
        e = entries[row_label(r)]
        if e["status"] == "skipped":
            e = ((prev or {}).get("scans") or {}).get(codes[r.session]) or {"status": "done", "reason": e["reason"]}
        per[codes[r.session]] = e
    statuses = {e["status"] for e in per.values()}
    status = next(st for st in ("done", "rejected", "failed") if st in statuses)
    reasons = sorted({e["reason"] for e in per.values() if e["reason"] and e["status"] == status})
    return {"status": status, "reason": "; ".join(reasons), "scans": dict(sorted(per.items()))}


def _scrub(msg: str, rows: list[Subject], pseudo: str) -> str:
    for r in rows:
        for name, p in (("<t3>", r.t3), ("<t7>", r.t7)):
            if p is not None:
                msg = msg.replace(str(p), name).replace(str(Path(p).resolve()), name)
        if r.session and len(r.session) >= 4:  # a date-like label; short ones ("1", "a") would mangle text
            msg = msg.replace(r.session, "<session>")
    return msg.replace(rows[0].subject, pseudo)


def _error(exc: Exception) -> str:
    if not isinstance(exc, Synth7tError):
        log.debug("multi-scan subject failed", exc_info=True)
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg if isinstance(exc, Synth7tError) else f"{type(exc).__name__}: {msg}"


def _subject_json(rows: list[Subject], pseudo: str, codes: dict[str, str]) -> dict:
    """subject.json of a person: its covariates, and per scan the gap to the 7T and, when the scans' ages differ
    (a BIDS sessions.tsv), the (rounded) age at that scan."""
    rec = anonymize.subject_record(rows[0], pseudo)
    per_scan_age = len({r.age for r in rows}) > 1
    rec["scans"] = {codes[r.session]: {"gap_days": r.gap_days,
                                       **({"age": anonymize.round_age(r.age)} if per_scan_age else {})}
                    for r in sorted(rows, key=lambda r: codes[r.session])}
    return rec


def _make_7t(rows: list[Subject], pseudo: str, work: Path, cfg: PreprocessConfig, threads: int | None) -> dict:
    """Process the subject's 7T into ``work/<pseudo>`` (replacing an older folder); returns the reference."""
    final, tmp = work / pseudo, work / f".{pseudo}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        timings: dict[str, float] = {}
        ref = process_7t(rows[0].t7, cfg, threads, timings)  # type: ignore[arg-type]
        save_volume(tmp / "t7.nii.gz", ref["t7"], dtype=np.float32)
        save_volume(tmp / "mask.nii.gz", ref["mask"], dtype=np.uint8)
        save_volume(tmp / "mask_csf.nii.gz", ref["mask_csf"], dtype=np.uint8)
        corr = ref["corr"]
        write_json(tmp / "qc_7t.json", {"min_slice": corr.min_slice, "dropout_ml": corr.dropout_ml,
                                        "smooth_ml": corr.smooth_ml, "reasons": corr.reasons,
                                        "motion_7t": ref["motion"], "mask_method_7t": ref["method"]})
        write_json(tmp / "provenance.json", {"versions": versions(), "params": cfg.method_params(),
                                              "params_hash": cfg.params_hash(), "timings_s": timings})
        if cfg.keep_head and cfg.private_dir is not None:
            save_volume(Path(cfg.private_dir) / pseudo / "t7_head.nii.gz", ref["head"])
        write_json(tmp / ".done", {"params_hash": cfg.params_hash()})
        install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: 7T processed once for %d scan(s) (%.1f s)", pseudo, len(rows), sum(timings.values()))
    return ref


def _load_7t(final: Path) -> dict:
    """The reference of a done subject folder: the saved 7T and masks and the 7T's QC facts."""
    facts = read_json(final / "qc_7t.json")
    corr = qc.CorruptionReport(int(facts["min_slice"]), float(facts["dropout_ml"]), float(facts["smooth_ml"]),
                               list(facts.get("reasons", [])))
    return {"t7": load_volume(final / "t7.nii.gz"), "mask": load_volume(final / "mask.nii.gz"),
            "mask_csf": load_volume(final / "mask_csf.nii.gz"), "method": facts.get("mask_method_7t"),
            "corr": corr, "motion": float(facts["motion_7t"])}


def _scan(r: Subject, code: str, pseudo: str, ref: dict, final: Path, cfg: PreprocessConfig,
          threads: int | None) -> dict:
    """Register one 3T onto the subject's 7T into ``final/scans/<code>``; returns its qc record."""
    dest = final / "scans" / code
    tmp = final / "scans" / f".{code}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        out = register_3t(r.t3, ref, cfg, tmp, threads, {})
        save_volume(tmp / "t3.nii.gz", out["t3"], dtype=np.float32)
        record = write_qc(out, r, f"{pseudo}_{code}", cfg, tmp)
        if cfg.keep_head and cfg.private_dir is not None:
            save_volume(Path(cfg.private_dir) / pseudo / f"t3_head_{code}.nii.gz", out["heads"]["t3_head"])
        write_json(tmp / ".done", {"params_hash": cfg.params_hash()})
        install(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def process_scans(rows: list[Subject], pseudo: str, work: Path, cfg: PreprocessConfig, key: bytes,
                  threads: int | None = None) -> list[tuple[Subject, str, str, dict | None]]:
    """Preprocess one subject's 3T scans (``rows``, one 7T) into ``work/<pseudo>``; never raises for bad data.

    Returns ``(row, status, reason, cut)`` per row, status as for ``process_subject``."""
    final = Path(work) / pseudo
    h = cfg.params_hash()
    codes = scan_codes(rows, key)
    results: list[tuple[Subject, str, str, dict | None]] = []
    todo = []
    fresh = not (is_done(final, h) and (final / "qc_7t.json").is_file())  # no qc_7t.json: a single-pair folder
    for r in rows:
        scan_dir = final / "scans" / codes[r.session]
        if r.exclude:
            results.append((r, "rejected", "excluded in the manifest", None))
        elif not fresh and is_done(scan_dir, h):
            record = read_json(scan_dir / "qc.json")
            reason = "; ".join(record.get("reasons", [])) if record.get("rejected") else ""
            results.append((r, "skipped", reason, record.get("cut")))
        else:
            todo.append(r)
    if not todo:
        return results
    try:
        ref = _make_7t(rows, pseudo, work, cfg, threads) if fresh else _load_7t(final)
        write_json(final / "subject.json", _subject_json(rows, pseudo, codes))
    except Exception as exc:  # the 7T failed: every pair of this subject fails with it
        reason = _scrub(f"7T: {_error(exc)}", rows, pseudo)
        return results + [(r, "failed", reason, None) for r in todo]
    for r in todo:
        try:
            record = _scan(r, codes[r.session], pseudo, ref, final, cfg, threads)
        except Exception as exc:  # one bad 3T must not stop the subject's other scans
            results.append((r, "failed", _scrub(_error(exc), rows, pseudo), None))
            continue
        status = "rejected" if record["rejected"] else "done"
        results.append((r, status, "; ".join(record["reasons"]), record["cut"]))
    return results
