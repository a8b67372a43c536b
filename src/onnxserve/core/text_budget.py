"""How much text the server tokenizes, and holds as tokens, at once: server-wide while it is
tokenized, and per model version while it waits for its model and runs.

A tokenizer's memory grows with the tokens it makes, and it makes them all before truncation keeps
the first ``max_length``: the rest stays with each encoding as its overflow until the request ends.
Measured with the demo model's WordPiece tokenizer, a text of punctuation (one token per character)
costs about 165 bytes per character, so one request of a million such characters holds about 170 MB
while it is tokenized. The request size limits bound one request; these budgets bound them
all together, counted in characters (each text cut as ``pipeline.bounded`` cuts it, and
``TEXT_CHARACTERS`` more per text: ``charged``):

- ``TextBudget()`` (the service's): server-wide, held only while a request is tokenized, from before
  its tokenizer thread starts until it has returned (a caller that leaves cannot stop the thread);
- ``model_room()`` (each text model version's ``ModelVersion.text_room``): held from before the request is
  tokenized until it has run, so a request queued at its model holds only its own model's room. It is
  taken first: a request that cannot get its model's room waits untokenized (holding only its text) and
  holds nothing of the server-wide budget, so a busy model delays its own requests only. It makes room for
  one request of the largest size (``pipeline.MAX_REQUEST_CHARACTERS``) beside the small pool. Once
  tokenized, a request holds its kept tokens only (``core.tokens``: the tokenizer's overflow dropped), a
  few bytes per character of long texts, about 60 bytes per text of short ones. Unloading the version closes
  it: its waiting requests fail as the version's removal fails them (``CharacterBudget.close``).

Each budget has two pools, so that a small request never waits behind large ones: requests of more
than ``SMALL_REQUEST_CHARACTERS`` share the large pool, smaller ones the small pool
(``SMALL_CHARACTERS_AT_ONCE``). In each pool, a request that does not fit waits; waiting requests are
served per client in turn (``core.fairness``), each client's in arrival order, within their time
limits. Requests of at most ``INLINE_TOKENIZE_CHARACTERS`` and ``INLINE_TOKENIZE_TEXTS`` (core/service.py)
are tokenized on the event loop, one at a time, and count in neither.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from onnxserve.core.fairness import FairQueue
from onnxserve.core.pipeline import MAX_REQUEST_CHARACTERS, TextBatch
from onnxserve.core.progress import Progress

TEXT_CHARACTERS = 32
"""What each text (and each text of a pair) counts in the budgets beyond its own characters: a text costs
its tokenizer call and its kept tokens' place however short it is (about 60 bytes kept for a text of one
character, 140 with positions, where a character of a long text keeps 1.5 to 3.6), so a request of a
million one-character texts is counted as 33 million characters: it takes a whole pool, alone."""


def charged(text: TextBatch) -> int:
    """The characters a text request is counted at in the budgets: its own, and ``TEXT_CHARACTERS`` per text."""
    return text.characters + TEXT_CHARACTERS * (len(text.texts) + len(text.pairs or ()))


TEXT_CHARACTERS_AT_ONCE = 2 * 1024 * 1024
"""The most characters of large text requests tokenized at once, server-wide: two requests of the largest
size (``pipeline.MAX_REQUEST_CHARACTERS``), about 350 MB at the worst (one token per character), a few
times less for ordinary text."""

SMALL_REQUEST_CHARACTERS = 64 * 1024
"""A text request of at most this many characters is small: it holds room in the small pool."""

SMALL_CHARACTERS_AT_ONCE = 256 * 1024
"""The small pool (server-wide and per model version): four small requests of the largest size at once
(about 45 MB at the worst)."""

MODEL_CHARACTERS_AT_ONCE = MAX_REQUEST_CHARACTERS
"""A model version's large pool: the characters of large requests it holds as tokens (tokenized, queued
or running) at once: one request of the largest size (as kept tokens, ``core.tokens``: a few MB of long
texts, about 60 bytes per text of short ones)."""

Refusal = Callable[[], BaseException]
"""Makes the error that a closed budget's waiting and later requests fail with."""


class CharacterBudget:
    """Characters held at once, up to ``limit``; those that do not fit wait, clients served in turn."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most held at once so far
        self._waiting: FairQueue[tuple[int, asyncio.Future[None]]] = FairQueue()
        self._closed: Refusal | None = None

    def waiting(self) -> int:
        """Requests waiting for room."""
        return len(self._waiting)

    def check_open(self) -> None:
        """Raise what a closed budget's requests fail with (``close``), if it was closed: a request that holds
        room and does its work in steps stops between them."""
        if self._closed is not None:
            raise self._closed()

    def close(self, refusal: Refusal) -> None:
        """No more room is given: every waiting request fails with ``refusal()``, and so does every later
        one; requests that hold room keep it until they end."""
        self._closed = refusal
        while self._waiting:
            _, turn = self._waiting.pop()
            if not turn.done():
                turn.set_exception(refusal())

    @contextlib.asynccontextmanager
    async def held(self, characters: int, client: str = "", progress: Progress | None = None) -> AsyncIterator[None]:
        """Hold ``characters`` (at most ``limit``) for the block, once the requests ahead have had room
        (``progress``: the request's, marked waiting meanwhile)."""
        if self._closed is not None:
            raise self._closed()
        characters = min(characters, self.limit)
        if self._waiting or self.used + characters > self.limit:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (characters, turn)
            self._waiting.push(client, entry)
            try:
                with progress.waiting() if progress is not None else contextlib.nullcontext():
                    await turn
            except BaseException:
                if turn.done() and not turn.cancelled() and turn.exception() is None:
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

    def held(
        self, characters: int, client: str = "", progress: Progress | None = None
    ) -> contextlib.AbstractAsyncContextManager[None]:
        pool = self.small if characters <= SMALL_REQUEST_CHARACTERS else self.large
        return pool.held(characters, client, progress)

    def check_open(self) -> None:
        """``CharacterBudget.check_open`` of both pools."""
        self.large.check_open()
        self.small.check_open()

    def close(self, refusal: Refusal) -> None:
        """Both pools closed (``CharacterBudget.close``)."""
        self.large.close(refusal)
        self.small.close(refusal)


def model_room() -> TextBudget:
    """A model version's own budget of text held as tokens, from before tokenizing until it has run."""
    return TextBudget(large=MODEL_CHARACTERS_AT_ONCE, small=SMALL_CHARACTERS_AT_ONCE)
