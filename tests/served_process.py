"""``onnxserve serve`` as a child process, for tests that must start it the way a user does (no flags,
environment variables, an installed wheel): its log goes to a file (a pipe nobody reads could block
the server), the URL comes from its start-up line, and it is ready when /v2/health/ready answers 200."""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

LISTENING = re.compile(r"HTTP \(.*\) on http://([\d.]+:\d+)")


class ServedProcess:
    def __init__(self, command: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(list(command), stderr=self.log, env=dict(env), cwd=cwd)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> str:
        """The server's base URL, once it answers ready; fails with its log if it exits or never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            found = LISTENING.search(self.output())
            if found:
                url = f"http://{found.group(1)}"
                try:
                    if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                        return url
                except requests.ConnectionError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not become ready:\n{self.output()}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()
