"""Client-supplied text as error messages repeat it: cut short, so an answer never echoes a megabyte.

Leaf module (it imports nothing of onnxserve): the protocols use it without loading the registry or
ONNX Runtime.
"""

from __future__ import annotations

SHOWN_CHARACTERS = 40
"""How much of a client's version string an error message repeats."""
LOGGED_CHARACTERS = 300
"""How much of a client's text (a request path, a message quoting a name) a log line repeats."""


def clipped(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """A client-supplied string cut to ``limit`` characters for an error message (with how long it was)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def logged(text: str) -> str:
    """Client text as a log line quotes it: cut to ``LOGGED_CHARACTERS`` (a path-like name of 1,000
    characters made each refusal's WARNING line 2,000 characters long)."""
    return clipped(text, LOGGED_CHARACTERS)


def shown(text: str) -> str:
    """A client-supplied string as an error message quotes it: digits as they are, anything else quoted,
    cut to ``SHOWN_CHARACTERS`` (a 5,000-character "version" is not worth echoing)."""
    cut = clipped(text)
    return cut if text.isascii() and text.isdigit() else repr(cut)
