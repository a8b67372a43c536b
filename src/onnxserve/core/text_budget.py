"""How much text the server tokenizes, and holds as tokens, at once.

A tokenizer's memory grows with the tokens it makes, and it makes them all before truncation keeps
the first ``max_length``: the rest stays with each encoding as its overflow until the request ends.
Measured with the demo model's WordPiece tokenizer, a text of punctuation (one token per character)
costs about 165 bytes per character, so one request of a million such characters holds about 170 MB
while it is tokenized and run. The request size limits bound one request; this budget bounds them all
together: a text request holds its characters (each text cut as ``pipeline.bounded`` cuts it) from
before it is tokenized until it has run, and one that does not fit waits, in arrival order, for the
requests ahead of it (within its time limit). Requests of at most ``INLINE_TOKENIZE_CHARACTERS`` are
tokenized on the event loop, one at a time, and do not count.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

TEXT_CHARACTERS_AT_ONCE = 2 * 1024 * 1024
"""The most characters of text requests tokenized or held as tokens at once, server-wide: two requests
of the largest size (``pipeline.MAX_REQUEST_CHARACTERS``), about 350 MB at the worst (one token per
character), a few times less for ordinary text."""


class CharacterBudget:
    """Characters held at once, up to ``limit``; those that do not fit wait in arrival order."""

    def __init__(self, limit: int = TEXT_CHARACTERS_AT_ONCE) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most held at once so far
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def held(self, characters: int) -> AsyncIterator[None]:
        """Hold ``characters`` (at most ``limit``) for the block, after any request that waits already."""
        characters = min(characters, self.limit)
        if self._waiting or self.used + characters > self.limit:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (characters, turn)
            self._waiting.append(entry)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self.used -= characters  # its room was given just as it went away
                    self._wake()
                else:
                    if entry in self._waiting:
                        self._waiting.remove(entry)
                    self._wake()  # a smaller request behind it may fit now
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
        """Give room to the waiting requests at the head of the line, as many as fit."""
        while self._waiting:
            characters, turn = self._waiting[0]
            if turn.done():
                self._waiting.popleft()
                continue
            if self.used + characters > self.limit:
                return
            self._waiting.popleft()
            self.used += characters
            turn.set_result(None)
