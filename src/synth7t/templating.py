"""Jinja2 rendering of synth7t's HTML pages from template files shipped inside the package.

One environment per package folder (``synth7t.evaluation``: report and viewer; ``synth7t.cohortqc``: the cohort
QC page), each loading from that package's ``templates/``. Autoescaping is on for every template: subject names,
titles and ``extra_info`` lines are user data. Figures reach the templates as base64 text or file paths and tables
as plain rows of strings, so no template needs ``|safe``; data for a ``<script>`` goes through ``|tojson``.
Undefined names are an error, so a template and its caller cannot drift apart silently.
"""

from __future__ import annotations

from functools import cache

import jinja2


@cache
def environment(package: str = "synth7t.evaluation") -> jinja2.Environment:
    """The environment of ``package``'s ``templates/`` folder: autoescaped, undefined names an error."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, *, package: str = "synth7t.evaluation", **context) -> str:
    """Render ``<package>/templates/<name>`` with ``context``."""
    return environment(package).get_template(name).render(**context)
