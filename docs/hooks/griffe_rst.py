"""Griffe extension for the API reference: synth7t's docstrings use Sphinx roles (``:func:`~a.b.f```) that Markdown
does not know; each becomes a code span (```f```, the last name when the role starts with ``~``), as the CLI and
config reference pages do (``reference.rst_roles``)."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def rst_roles(text: str) -> str:
    return ROLE.sub(lambda m: "`" + (m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)) + "`", text)


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite every loaded object's docstring once, before mkdocstrings renders it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_roles(obj.docstring.value)
