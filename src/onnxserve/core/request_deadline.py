"""The server's time limit for the request being answered, counted from its arrival.

``--request-timeout`` bounds a whole inference request, not only its run: a large JSON body may wait
for a decoding worker and take seconds to decode before the model sees it. The scope of one request
(``InferenceCall``) starts the clock; the decoding steps and the run take what is left of it.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

_deadline: ContextVar[float | None] = ContextVar("onnxserve_request_deadline", default=None)


def start(limit_s: float) -> Token[float | None]:
    """From now until :func:`stop`, the request has ``limit_s`` seconds (0: no limit)."""
    return _deadline.set(time.monotonic() + limit_s if limit_s > 0 else None)


def stop(token: Token[float | None]) -> None:
    _deadline.reset(token)


def seconds_left() -> float | None:
    """Seconds left to the request being answered (at least 0), or None when nothing limits it."""
    deadline = _deadline.get()
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def bounded(limit: float | None) -> float | None:
    """``limit`` (seconds, None: none), or less when the request has less time left."""
    left = seconds_left()
    if left is None:
        return limit
    return left if limit is None else min(limit, left)
