"""One budget of request bytes held in memory at once, shared by every protocol (``--max-inflight-bytes``).

An HTTP request reserves its ``Content-Length`` before a byte of its body is read (a chunked or
compressed body reserves as it grows); a gRPC call reserves the largest message it may send before
its message is received, then keeps only the size that arrived. Each reservation is released when its
request ends. A request that does not fit is refused at once (HTTP 503 / TF Serving 429 with
``Retry-After``; gRPC RESOURCE_EXHAUSTED): the server never holds more than the budget of bodies that
are still arriving, whatever the clients announce.
"""

from __future__ import annotations

import asyncio

from onnxserve.errors import ResourceExhaustedError

DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
"""Four bodies of the default largest size (64 MiB) at once."""


def over_budget(limit: int) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"the server holds its limit of {limit} request bytes in flight (--max-inflight-bytes); retry later"
    )


class InflightBytes:
    """The bytes of request bodies and messages held now, at most ``limit`` (0: no limit).

    Every method runs on the event loop (HTTP and gRPC share it), so no lock is needed.
    """

    def __init__(self, limit: int = DEFAULT_MAX_INFLIGHT_BYTES) -> None:
        self.limit = limit
        self.held = 0
        self._freed = asyncio.Event()

    def reserve(self, size: int) -> bool:
        """Hold ``size`` more bytes if they fit; False (and nothing held) if they do not."""
        if self.limit and self.held + size > self.limit:
            return False
        self.held += size
        return True

    async def reserve_within(self, size: int, seconds: float) -> bool:
        """``reserve``, waiting up to ``seconds`` for other requests to release enough."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.reserve(size):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                return False
        return True

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)
        self._freed.set()
