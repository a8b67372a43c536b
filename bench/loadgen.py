"""A closed-loop HTTP load generator: N concurrent clients, each sending its next request when the last returns.

aiohttp on uvloop, one keep-alive connection per client. Requests completed inside the measured window
(after a warm-up) count; throughput is those per second, latencies are theirs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import uvloop

from bench.stats import Sample, from_latencies

REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class HttpTarget:
    """Where to send, and the request bodies to cycle through (one per request)."""

    url: str
    bodies: Sequence[bytes]
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Window:
    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def record(self, sent: float, done: float, error: str | None) -> None:
        if sent < self.start or done > self.end:
            return
        if error is None:
            self.latencies.append(done - sent)
            return
        self.errors += 1
        self.first_error = self.first_error or error


async def _client(session: aiohttp.ClientSession, target: HttpTarget, window: _Window, first: int, step: int) -> None:
    index = first
    while True:
        sent = time.perf_counter()
        if sent >= window.end:
            return
        body = target.bodies[index % len(target.bodies)]
        index += step
        error: str | None = None
        try:
            async with session.post(target.url, data=body, headers=dict(target.headers)) as response:
                payload = await response.read()
                if response.status != 200:
                    error = f"HTTP {response.status}: {payload[:200].decode(errors='replace')}"
        except (aiohttp.ClientError, TimeoutError) as e:
            error = f"{type(e).__name__}: {e}"
        window.record(sent, time.perf_counter(), error)


async def _closed_loop(target: HttpTarget, concurrency: int, warmup_s: float, duration_s: float) -> Sample:
    start = time.perf_counter() + warmup_s
    window = _Window(start, start + duration_s)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(_client(session, target, window, i, concurrency) for i in range(concurrency)))
    sample = from_latencies(window.latencies, duration_s, errors=window.errors)
    if window.first_error:
        sample.extra["first_error"] = window.first_error
    return sample


def closed_loop(target: HttpTarget, concurrency: int, warmup_s: float, duration_s: float) -> Sample:
    """Run ``concurrency`` clients for ``warmup_s + duration_s`` seconds; requests per second and latencies."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_closed_loop(target, concurrency, warmup_s, duration_s))
