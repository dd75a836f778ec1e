"""Anonymization (thesis 1.2.4): keyed pseudonyms, rounded ages, scrubbed headers, an ID mapping kept apart.

* **Pseudonyms** are ``synth7t.manifest.pseudonym(id, key)`` (HMAC-SHA256, 10 hex digits): no part of the ID
  appears in them and they cannot be linked back without the key.
* **The key.** A pseudonym must be the same on every rerun, or resuming would redo every subject under a new
  name. So when no key is given, a random 32-byte key is created once and stored in a *key file* outside the
  work folder (default ``<WORK>/../.<WORK name>.synth7t-key``, mode 0600; ``key_file`` chooses another place).
  Whoever holds the key file can re-identify subjects from their IDs: keep it with the raw data, not with the
  work folder you share.
* **Mapping.** With ``mapping_file`` the ID -> pseudonym table is written there (merged, atomically, under a
  lock so that shards can share it) and never inside the work folder.
* **Ages** are rounded to whole years; headers are scrubbed by :func:`synth7t.io.save_volume`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from synth7t.errors import ConfigError, InputError
from synth7t.io import atomic_path, write_json
from synth7t.manifest import Subject, pseudonym

KEY_BYTES = 32


def default_key_file(work: Path) -> Path:
    """``<WORK>/../.<WORK name>.synth7t-key``: beside the work folder, not in it."""
    work = Path(work).resolve()
    return work.parent / f".{work.name}.synth7t-key"


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def load_or_create_key(key_file: Path, *, work: Path | None = None) -> bytes:
    """Read the hex key in ``key_file``, creating it (random, mode 0600, atomically) when absent."""
    key_file = Path(key_file)
    if work is not None and _inside(key_file, work):
        raise ConfigError(f"{key_file}: the pseudonym key file must not be inside the work folder {work}")
    if key_file.exists():
        text = key_file.read_text(encoding="utf-8").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise InputError(f"{key_file}: not a hex pseudonym key") from None
        if len(key) < 16:
            raise InputError(f"{key_file}: pseudonym key shorter than 16 bytes")
        return key
    return write_key(key_file, secrets.token_bytes(KEY_BYTES))


def write_key(key_file: Path, key: bytes) -> bytes:
    """Write ``key`` as hex into ``key_file`` (mode 0600, atomically); returns it."""
    with atomic_path(key_file) as tmp:
        tmp.write_text(key.hex() + "\n", encoding="utf-8")
        os.chmod(tmp, 0o600)
    return key


def resolve_key(work: Path, pseudonym_key: bytes | None = None, key_file: Path | None = None) -> bytes:
    """The explicit key, else the one in ``key_file`` (default :func:`default_key_file`), created if needed."""
    if pseudonym_key is not None:
        if len(pseudonym_key) < 16:
            raise ConfigError("pseudonym_key must be at least 16 bytes")
        return bytes(pseudonym_key)
    return load_or_create_key(key_file or default_key_file(work), work=work)


def pseudonyms(subjects: list[Subject], key: bytes) -> dict[str, str]:
    """``{subject id: pseudonym}``; raises :class:`ConfigError` on a (astronomically unlikely) collision."""
    out = {s.subject: pseudonym(s.subject, key) for s in subjects}
    if len(set(out.values())) != len(out):
        raise ConfigError("two subjects got the same pseudonym; use another key")
    return out


def round_age(age: float | None) -> int | None:
    """Age in whole years, half up: ``floor(age + 0.5)``; None stays None."""
    return None if age is None else int(math.floor(float(age) + 0.5))


def subject_record(subject: Subject, pseudo: str) -> dict:
    """The ``subject.json`` content: pseudonym and coarse covariates only (no ID, no paths, no extra columns)."""
    return {"id": pseudo, "age": round_age(subject.age), "sex": subject.sex, "diagnosis": subject.diagnosis,
            "group": subject.group}


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock`` (shards of a SLURM array may update the same file)."""
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_mapping(mapping_file: Path, mapping: dict[str, str], *, work: Path) -> Path:
    """Merge ``{id: pseudonym}`` into ``mapping_file`` (JSON) atomically; refuses a path inside ``work``."""
    mapping_file = Path(mapping_file)
    if _inside(mapping_file, work):
        raise ConfigError(f"{mapping_file}: the ID mapping must not be written inside the work folder {work}")
    with locked(mapping_file):
        old = {}
        if mapping_file.exists():
            try:
                old = json.loads(mapping_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise InputError(f"{mapping_file}: existing mapping is not valid JSON") from None
        write_json(mapping_file, {**old, **mapping})
    return mapping_file
