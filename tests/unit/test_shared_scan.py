"""SharedScan: one reading at a time, shared by those who ask meanwhile and soon after; a caller may ask for
one that starts after its arrival."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from onnxserve.core.shared_scan import SharedScan


class Counted:
    """A blocking read that counts its calls and takes ``seconds``."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.calls = 0
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            self.calls += 1
            call = self.calls
        time.sleep(self.seconds)
        return call


def test_callers_share_a_reading_and_one_that_must_see_now_gets_a_later_one() -> None:
    read = Counted()
    scans = SharedScan(read)

    async def scenario() -> None:
        results = await asyncio.gather(*(scans.get() for _ in range(20)))
        assert results == [1] * 20  # twenty callers, one reading
        assert await scans.get() == 1  # fresh: answered from it
        asked = time.monotonic()
        assert await scans.get(asked) == 2  # a reading that started after the call
        assert read.calls == 2

    asyncio.run(scenario())


def test_a_reading_that_fails_raises_to_its_callers_and_is_not_kept() -> None:
    calls = [0]

    def failing() -> int:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError("the repository is gone")
        return calls[0]

    scans = SharedScan(failing)

    async def scenario() -> None:
        outcomes = await asyncio.gather(scans.get(), scans.get(), return_exceptions=True)
        assert all(isinstance(o, OSError) for o in outcomes), outcomes
        assert await scans.get() == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("callers", [1, 5])
def test_a_caller_that_arrives_during_an_older_reading_waits_for_a_newer_one(callers: int) -> None:
    read = Counted(seconds=0.2)
    scans = SharedScan(read)

    async def scenario() -> None:
        first = asyncio.ensure_future(scans.get())
        await asyncio.sleep(0.05)  # the first reading is under way
        asked = time.monotonic()
        later = await asyncio.gather(*(scans.get(asked) for _ in range(callers)))
        assert await first == 1
        assert later == [2] * callers  # one newer reading, shared
        assert read.calls == 2

    asyncio.run(scenario())
