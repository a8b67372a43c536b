"""Answered errors let go of what their frames held, without touching requests still handling the same error."""

from __future__ import annotations

import asyncio
import gc
import weakref

from onnxserve.core.memory import release_frames


class Payload:
    """Stands for a request's body and tensors."""


def test_an_answered_error_no_longer_keeps_its_frames_data() -> None:
    def handler() -> None:
        body = Payload()
        probe.append(weakref.ref(body))
        refused = ValueError("refused")
        raise refused  # the frame keeps ``refused``, whose traceback keeps the frame: a cycle

    probe: list[weakref.ref[Payload]] = []
    gc.disable()
    try:
        try:
            handler()
        except ValueError as e:
            release_frames(e)
        assert probe[0]() is None  # freed at once, not when the collector runs
    finally:
        gc.enable()


def test_one_error_answered_in_one_request_leaves_the_others_handling_it_alone() -> None:
    """A stopped scheduler raises one error object in every waiting request. Clearing its traceback's frames
    finalized the coroutines of the other requests still handling it: their tasks never finished (a drain
    that timed out left requests unanswered and logged 'cannot reuse already awaited coroutine')."""

    async def scenario() -> list[str]:
        shared = RuntimeError("the scheduler stopped")
        handled = asyncio.Event()

        async def request(first: bool) -> str:
            try:
                await asyncio.sleep(0)
                raise shared
            except RuntimeError as e:
                if first:
                    await handled.wait()  # still answering it, suspended
                    return "answered"
                release_frames(e)
                handled.set()
                return "released"

        return await asyncio.wait_for(asyncio.gather(request(True), request(False)), 10)

    assert asyncio.run(scenario()) == ["answered", "released"]
