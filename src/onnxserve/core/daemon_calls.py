"""Blocking calls that the process must never wait for when it exits.

``asyncio.to_thread`` runs a call on the loop's default executor, whose threads the interpreter joins
at exit: a call that never returns (ONNX Runtime stuck creating a session) would keep a drained server
from exiting. A call given to :func:`call_in_daemon_thread` runs on a daemon thread of its own instead,
so the process exits whatever it is doing; its caller awaits it like ``to_thread``.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def call_in_daemon_thread(call: Callable[[], T], name: str) -> T:
    """``call()`` on a new daemon thread (``name`` says what for, in errors); its result or exception.

    Cancelling the await does not stop the call (no thread can be stopped); its outcome is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(outcome)  # type: ignore[arg-type]  # None only when error is set

    def run() -> None:
        outcome: T | None = None
        error: BaseException | None = None
        try:
            outcome = call()
        except BaseException as e:  # handed to the awaiting task, which decides
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed while the call ran (the process exits)
            loop.call_soon_threadsafe(settle, outcome, error)

    # ``_thread``, not ``threading.Thread.start``: that one waits on the caller's thread (here the event
    # loop) until the new thread has started, for good when it cannot (MemoryError as it starts, seen
    # under an address-space limit). This one returns at once, or raises if no thread can be made.
    try:
        _thread.start_new_thread(run, ())
    except RuntimeError as e:  # no thread can be made now (threads or memory exhausted)
        raise RuntimeError(f"{name}: cannot start a thread: {e}") from None
    return await done
