"""The JSON error document that both REST protocols answer a refused request with: ``{"error": message}``."""

from __future__ import annotations

import httpx


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    """``response`` is ``status`` with a JSON document holding only a non-empty ``error`` message that
    names every one of ``words`` (case aside); returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert isinstance(doc, dict)
    assert set(doc) == {"error"}
    message = doc["error"]
    assert isinstance(message, str)
    assert message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in error {message!r}"
    return message
