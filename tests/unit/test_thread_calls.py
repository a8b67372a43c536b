"""``service._until_returned``: a call on a worker thread, cancelled as its caller goes away.

A call still waiting for a thread is dropped at once (an outside attack saw a shutdown wait 11 s while
abandoned requests' queued tokenizations ran one after another); a running one is waited for, so that
what its thread holds stays counted until it returns.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from onnxserve.core.service import _until_returned


def test_a_waiting_call_is_dropped_and_a_running_one_waited_for() -> None:
    release = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        ran.append("blocker started")
        release.wait(10)
        ran.append("blocker returned")

    def queued() -> None:
        ran.append("queued ran")

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            running = asyncio.create_task(_until_returned(executor, blocker))
            while not ran:
                await asyncio.sleep(0.001)
            waiting = asyncio.create_task(_until_returned(executor, queued))
            await asyncio.sleep(0.01)
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)  # at once: the thread is still busy
            assert waiting.cancelled()
            running.cancel()
            await asyncio.sleep(0.05)
            assert not running.done(), "a running call's caller must wait for its thread"
            release.set()
            await asyncio.gather(running, return_exceptions=True)
            assert running.cancelled()

    asyncio.run(scenario())
    assert ran == ["blocker started", "blocker returned"]  # the dropped call never ran
