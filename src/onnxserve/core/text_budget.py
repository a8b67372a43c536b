"""How much text the server tokenizes, and holds as tokens, at once.

A tokenizer's memory grows with the tokens it makes, and it makes them all before truncation keeps
the first ``max_length``: the rest stays with each encoding as its overflow until the request ends.
Measured with the demo model's WordPiece tokenizer, a text of punctuation (one token per character)
costs about 165 bytes per character, so one request of a million such characters holds about 170 MB
while it is tokenized and run. The request size limits bound one request; this budget bounds them all
together: a text request holds its characters (each text cut as ``pipeline.bounded`` cuts it) from
before it is tokenized until it has run and its tokenizer thread has returned.

Two pools, so that a small request never waits behind large ones: requests of more than
``SMALL_REQUEST_CHARACTERS`` share ``TEXT_CHARACTERS_AT_ONCE``, smaller ones ``SMALL_CHARACTERS_AT_ONCE``.
In each, a request that does not fit waits; waiting requests are served per client in turn
(``core.fairness``), each client's in arrival order, within their time limits. Requests of at most
``INLINE_TOKENIZE_CHARACTERS`` (core/service.py) are tokenized on the event loop, one at a time, and do
not count.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from onnxserve.core.fairness import FairQueue

TEXT_CHARACTERS_AT_ONCE = 2 * 1024 * 1024
"""The most characters of large text requests tokenized or held as tokens at once, server-wide: two
requests of the largest size (``pipeline.MAX_REQUEST_CHARACTERS``), about 350 MB at the worst (one token
per character), a few times less for ordinary text."""

SMALL_REQUEST_CHARACTERS = 64 * 1024
"""A text request of at most this many characters is small: it holds room in the small pool."""

SMALL_CHARACTERS_AT_ONCE = 256 * 1024
"""The small pool: four small requests of the largest size at once (about 45 MB at the worst)."""


class CharacterBudget:
    """Characters held at once, up to ``limit``; those that do not fit wait, clients served in turn."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most held at once so far
        self._waiting: FairQueue[tuple[int, asyncio.Future[None]]] = FairQueue()

    @contextlib.asynccontextmanager
    async def held(self, characters: int, client: str = "") -> AsyncIterator[None]:
        """Hold ``characters`` (at most ``limit``) for the block, once the requests ahead have had room."""
        characters = min(characters, self.limit)
        if self._waiting or self.used + characters > self.limit:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (characters, turn)
            self._waiting.push(client, entry)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self.used -= characters  # its room was given just as it went away
                else:
                    self._waiting.remove(client, entry)
                self._wake()  # a request behind it may fit now
                raise
        else:
            self.used += characters
        self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            self.used -= characters
            self._wake()

    def _wake(self) -> None:
        """Give room to waiting requests in fair order, as long as the next one fits."""
        while self._waiting:
            characters, turn = self._waiting.peek()
            if not turn.done() and self.used + characters > self.limit:
                return
            self._waiting.pop()
            if not turn.done():
                self.used += characters
                turn.set_result(None)


class TextBudget:
    """The two pools: small requests never wait behind large ones."""

    def __init__(self, large: int = TEXT_CHARACTERS_AT_ONCE, small: int = SMALL_CHARACTERS_AT_ONCE) -> None:
        self.large = CharacterBudget(large)
        self.small = CharacterBudget(small)

    def held(self, characters: int, client: str = "") -> contextlib.AbstractAsyncContextManager[None]:
        pool = self.small if characters <= SMALL_REQUEST_CHARACTERS else self.large
        return pool.held(characters, client)
