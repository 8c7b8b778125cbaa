"""Griffe extension: show the docstrings' Sphinx roles as inline code.

The docstrings use ``:class:`~runguard.Trip``` and the like, which mkdocstrings' Google
parser leaves as raw text. This turns each role into plain inline code (```Trip```),
keeping the text after ``~`` short the way Sphinx would. It only changes the rendered
docs; the source is untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|exc|mod|obj|const):`([^`]+)`")


def _text(match: re.Match[str]) -> str:
    target = match.group(1)
    explicit = re.fullmatch(r"(.+?)\s*<[^>]+>", target)  # :mod:`store <runguard.stores>`
    if explicit:
        target = explicit.group(1)
    elif target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_text, obj.docstring.value)
