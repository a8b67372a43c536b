"""How far one inference request has got: only waiting, or started.

A request **only waits** while it is queued at its model's scheduler or waits for room for its text
(``core.text_budget``), and no execution of it has begun: dropping it then loses no work, and each of
those waits gives its place back when its caller goes away (the way a client that disconnects is
dropped). It has **started** once an execution of it (of any of its chunks) has begun; from then on it
counts as started for good, so it is never dropped in favour of anyone, since its run would be lost.
While it does anything else (its body decoded, its texts tokenized, its answer encoded) it is neither.

The schedulers and the text budgets mark these on the request's ``Progress`` (``Work.progress``, shared
with the request's ``InferenceCall``); a front end that must make room (``server.connections``: the
HTTP connection slots) may withdraw a request that only waits (``InferenceCall.withdraw``). Core knows
nothing of why.
"""

from __future__ import annotations


class Progress:
    """One request's state: how many waits it is in, and whether an execution of it has begun."""

    __slots__ = ("_waits", "started")

    def __init__(self) -> None:
        self._waits = 0
        self.started = False

    def waiting(self) -> Progress:
        """The request waits (queued, or for room) for the ``with`` block (a plain context manager, not a
        generator: every queued request enters one)."""
        return self

    def __enter__(self) -> None:
        self._waits += 1

    def __exit__(self, *exc: object) -> None:
        self._waits -= 1

    def start(self) -> None:
        """An execution of the request begins (called before it is handed to its instance's thread)."""
        self.started = True

    @property
    def only_waiting(self) -> bool:
        """Waiting, and nothing of it has run: withdrawing it loses no work."""
        return self._waits > 0 and not self.started
