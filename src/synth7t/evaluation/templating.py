"""Jinja2 rendering of the evaluation's HTML pages from the template files in ``evaluation/templates/``.

Autoescaping is on for every template: subject names, titles and the ``extra_info`` lines are user data.
Figures reach the templates as base64 text (no character of it is escaped) and tables as plain rows of
strings, so no template needs ``|safe``; data for a ``<script>`` goes through Jinja's ``|tojson``.
"""

from __future__ import annotations

from functools import cache

import jinja2


@cache
def environment() -> jinja2.Environment:
    """The shared environment: templates loaded from the package, autoescaped, undefined names an error."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("synth7t.evaluation", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context) -> str:
    """Render the template ``evaluation/templates/<name>`` with ``context``."""
    return environment().get_template(name).render(**context)
