"""Watching a capped server while an attack runs: its slowest readiness probe and its peak RSS."""

from __future__ import annotations

import threading

import psutil
import requests
from harness import CappedServer


class Watch:
    """Probes readiness and samples RSS in a thread while the ``with`` block runs."""

    def __init__(self, server: CappedServer, every: float = 0.05) -> None:
        self.server = server
        self.every = every
        self.worst_probe = 0.0
        self.peak_rss = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.peak_rss = max(self.peak_rss, self.server.rss_bytes())
                self.worst_probe = max(self.worst_probe, self.server.probe_seconds(timeout=30))
            except (requests.RequestException, psutil.Error) as e:
                self.failures.append(repr(e))

    def __enter__(self) -> Watch:
        self.peak_rss = self.server.rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
