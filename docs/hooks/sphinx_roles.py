"""Griffe extension for the API reference: Sphinx roles in the docstrings become cross-references.

The docstrings use Google sections with Sphinx-style roles in places (``:class:`SWAGModule```,
``:meth:`should_update```, ``:mod:`lightning_swag.sharding```) and reST literal-block markers
(``text::``). Markdown knows neither, so after the package is loaded every docstring is rewritten:

* ``:role:`target``` becomes an *optional* autorefs link, ``<autoref identifier=... optional>``: a
  link when the target is documented on the site, plain code otherwise (never a broken reference
  under ``mkdocs build --strict``). ``~a.b.C`` shows ``C``; functions and methods get ``()``.
  A bare name is resolved in the docstring's own scope (``save`` in a ``SWAGPosterior`` docstring is
  ``SWAGPosterior.save``).
* a line ending in ``::`` ends in ``:`` (the indented block after it is a Markdown code block).

Used by mkdocs.yml (``mkdocstrings`` > ``handlers`` > ``python`` > ``options`` > ``extensions``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|exc|obj|const):`([^`]+)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::[ \t]*$", re.M)
CALLABLE_ROLES = {"func", "meth"}


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj``'s docstring (``target`` itself if unknown)."""
    scope: griffe.Object | None = obj
    head = target.split(".", 1)[0]
    while scope is not None:
        try:
            resolved = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError, KeyError, ValueError):
            scope = scope.parent
            continue
        return resolved + target[len(head) :]
    return target


def _rewrite(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        role, target = match.group(1), match.group(2).strip()
        explicit = re.fullmatch(r"(.+?)\s*<(.+)>", target)  # :func:`title <target>`
        if explicit:
            title, target = explicit.group(1), explicit.group(2)
        else:
            short = target.startswith("~")
            target = target.lstrip("~.")
            title = target.rsplit(".", 1)[-1] if short else target
            if role in CALLABLE_ROLES and not title.endswith(")"):
                title += "()"
        identifier = _identifier(obj, target)
        return (
            f'<autoref identifier="{html.escape(identifier, quote=True)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )

    return LITERAL_BLOCK.sub(":", ROLE.sub(link, text))


class SphinxRoles(griffe.Extension):
    """Rewrite the docstrings of a whole package once it is loaded (every name can be resolved then)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
