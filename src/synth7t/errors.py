"""User-facing errors.

Every error a user can cause (bad scan, bad manifest, bad config) is raised as a :class:`Synth7tError`
whose message is one line naming the file and the problem. The CLI prints that line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class Synth7tError(Exception):
    """An error caused by the user's input; its message is shown as one line."""

    exit_code = 2


class InputError(Synth7tError):
    """A scan or file that cannot be used (missing, corrupt, wrong shape, non-finite, ...)."""


class ManifestError(Synth7tError):
    """A cohort manifest with one or more bad rows; the message lists every one of them."""

    def __init__(self, path: object, problems: list[str]):
        self.problems = list(problems)
        joined = "; ".join(self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s): {joined}")


class ConfigError(Synth7tError):
    """An invalid configuration value or preset."""


class NotBuiltError(Synth7tError):
    """A stage of the pipeline that this version does not provide yet."""

    exit_code = 3
