"""How deeply a JSON request may nest.

orjson itself refuses documents nested deeper than 1024 levels (without recursing on the C stack);
onnxserve refuses anything deeper than :data:`MAX_JSON_DEPTH` before a codec walks the document, so
no later step (numpy's conversion, an error message's ``repr``) meets a pathologically deep value.
"""

from __future__ import annotations

from typing import Any

from onnxserve.errors import InvalidInputError

MAX_JSON_DEPTH = 64
"""Arrays and objects inside one another. A V2 input's ``data`` of rank r sits at depth 3 + r."""


def depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests arrays and objects more than ``limit`` deep (walked level by level, no recursion)."""
    level: list[Any] = [doc] if type(doc) in (list, dict) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            items = container.values() if type(container) is dict else container
            kinds = set(map(type, items))  # in C: arrays of numbers are passed over quickly
            if list in kinds or dict in kinds:
                below.extend(x for x in items if type(x) is list or type(x) is dict)
        level = below
    return False


def check_depth(doc: Any, what: str = "the request body", source: bytes | None = None) -> Any:
    """``doc`` itself, or InvalidInputError when it nests deeper than :data:`MAX_JSON_DEPTH`.

    With ``source``, the JSON text ``doc`` was parsed from, a document with no more opening brackets
    than the limit is passed without a walk: each level of nesting opens one (counting the brackets
    inside strings too only makes the count larger)."""
    if source is not None and source.count(b"[") + source.count(b"{") <= MAX_JSON_DEPTH:
        return doc
    if depth_exceeds(doc, MAX_JSON_DEPTH):
        raise too_deep(what)
    return doc


def too_deep(what: str = "the request body") -> InvalidInputError:
    """The refusal of a document that nests deeper than :data:`MAX_JSON_DEPTH` (also for a parser that
    gave up on it: Python's own reports its recursion limit)."""
    return InvalidInputError(
        f"{what} nests JSON arrays and objects more than {MAX_JSON_DEPTH} levels deep; that is the limit"
    )
