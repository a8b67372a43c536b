"""SharedScan: one reading at a time, shared by those who ask meanwhile and soon after; a caller may ask for
one that starts after its arrival."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import models
from onnxserve.config import ServerConfig
from onnxserve.core.manager import Catalog
from onnxserve.core.shared_scan import SharedScan
from onnxserve.errors import ModelNotFoundError


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


def test_loads_of_names_without_a_folder_read_the_repository_no_more(tmp_path: Path) -> None:
    """Outside attack rt26: each load of an unknown name forced a fresh reading of the repository (one core
    busy with 3,000 folders from one client). A name without a folder is refused from the last reading; a
    folder copied in just before its load is still found."""

    class Counted(Catalog):
        readings = 0

        def read_for_control(self) -> ServerConfig:
            Counted.readings += 1
            return super().read_for_control()

    models.write_version(tmp_path, "present", 1, models.offset_model(1.0))
    catalog = Counted(repository=tmp_path)

    async def scenario() -> None:
        assert (await catalog.find("present")).name == "present"
        for _ in range(20):
            with pytest.raises(ModelNotFoundError):
                await catalog.find("absent")
        assert Counted.readings == 1  # before: 21
        (tmp_path / "notes").mkdir()
        time.sleep(1.1)  # past FILE_TIME_SLACK_SECONDS
        await catalog.scans.get(time.monotonic())  # a reading that saw "notes", a folder that holds no model
        for _ in range(20):
            with pytest.raises(ModelNotFoundError):
                await catalog.find("notes")
        assert Counted.readings == 2  # rt29: 22, a reading for each
        models.write_version(tmp_path, "late", 1, models.offset_model(2.0))
        assert (await catalog.find("late")).name == "late"  # looked for again: its folder is new
        assert Counted.readings == 3

    asyncio.run(scenario())
