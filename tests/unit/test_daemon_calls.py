"""Calls on daemon threads: awaited like ``to_thread``, never waited for at exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from onnxserve.core.daemon_calls import call_in_daemon_thread


def test_the_result_and_the_exception_come_back() -> None:
    async def scenario() -> None:
        assert await call_in_daemon_thread(lambda: 6 * 7, "answer") == 42
        with pytest.raises(ZeroDivisionError):
            await call_in_daemon_thread(lambda: 1 // 0, "fails")

    asyncio.run(scenario())


def test_a_call_that_never_returns_does_not_keep_the_process_from_exiting() -> None:
    """With ``asyncio.to_thread`` the interpreter joins the executor's thread at exit: it never ends."""
    script = textwrap.dedent(
        """
        import asyncio, threading
        from onnxserve.core.daemon_calls import call_in_daemon_thread

        async def main() -> None:
            stuck = threading.Event()
            try:
                await asyncio.wait_for(call_in_daemon_thread(stuck.wait, "stuck"), 0.2)
            except TimeoutError:
                print("gave up waiting", flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "gave up waiting" in done.stdout
