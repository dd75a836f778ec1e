"""Seeded, stratified subject-level splits (train / val / test) of a slice store (thesis 3.1.5)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from synth7t.errors import ConfigError


def split_counts(n: int, split: Sequence[float] | Sequence[int]) -> tuple[int, int, int]:
    """Number of subjects per split from fractions (largest remainder) or explicit counts.

    Fractions must be >= 0 and sum to 1; each non-zero fraction gets at least one subject when there are
    enough subjects. Counts (all ints) must sum to ``n``.
    """
    if len(split) != 3:
        raise ConfigError(f"split needs 3 values (train, val, test), got {list(split)}")
    if all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in split):
        counts = tuple(int(s) for s in split)
        if min(counts) < 0 or sum(counts) != n:
            raise ConfigError(f"split counts {list(counts)} must be >= 0 and sum to {n} (subjects with a 7T)")
        return counts  # type: ignore[return-value]
    fracs = [float(s) for s in split]
    if min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions {fracs} must be >= 0 and sum to 1")
    raw = [f * n for f in fracs]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i in range(3):  # give an empty but requested split one subject, taken from the largest
        if fracs[i] > 0 and counts[i] == 0:
            j = int(np.argmax(counts))
            if counts[j] > 1:
                counts[j] -= 1
                counts[i] += 1
    return tuple(counts)  # type: ignore[return-value]


def assign_splits(
    names: Sequence[str],
    groups: Sequence[str | None],
    split: Sequence[float] | Sequence[int] = (0.7, 0.15, 0.15),
    *,
    seed: int = 0,
    stratify: bool = True,
) -> dict[str, list[str]]:
    """Seeded subject-level split into train / val / test.

    Stratified: each group (healthy / ill / unknown) is shuffled, every subject gets the key
    ``(rank + 0.5) / group size`` and the subjects sorted by key are cut into consecutive train / val / test
    runs, so each split receives about its fraction of every group.
    """
    if len(set(names)) != len(names):
        raise ValueError("subject names must be unique")
    n_train, n_val, _ = split_counts(len(names), split)
    rng = np.random.default_rng(seed)
    if stratify:
        keys: dict[str, tuple[float, float]] = {}
        strata: dict[str, list[str]] = {}
        for name, group in zip(names, groups, strict=True):
            strata.setdefault(group or "unknown", []).append(name)
        for label in sorted(strata):
            members = sorted(strata[label])
            perm = rng.permutation(len(members))
            for rank, idx in enumerate(perm):
                keys[members[idx]] = ((rank + 0.5) / len(members), float(rng.random()))
        order = sorted(keys, key=lambda s: keys[s])
    else:
        ordered = sorted(names)
        order = [ordered[i] for i in rng.permutation(len(ordered))]
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }
