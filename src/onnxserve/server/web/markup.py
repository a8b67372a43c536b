"""HTML built escape-by-default: every value put into a template is escaped unless it is already markup.

Model names, tensor names, labels, metadata and error messages all come from users or model files; a
page built only through :func:`render` cannot be made to carry their markup.
"""

from __future__ import annotations

import html
from collections.abc import Iterable


class Markup(str):
    """A string that is already safe HTML (built by :func:`render` or :func:`join`)."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """``value`` as HTML text: markup passes through, anything else is converted to text and escaped."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def render(template: str, **values: object) -> Markup:
    """``template`` (``str.format`` syntax, trusted) with every value escaped."""
    return Markup(template.format(**{k: escape(v) for k, v in values.items()}))


def join(parts: Iterable[Markup], separator: str = "") -> Markup:
    """Several pieces of markup as one (the separator is trusted markup)."""
    return Markup(separator.join(escape(p) for p in parts))
