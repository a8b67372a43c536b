"""One peer server (Infinity, MLServer) for the text workload: its own virtual environment, its process
group on loopback, the check that it computes our embedding, and its points in the rounds.

A peer that cannot run (its virtual environment is missing because make bench's pip install failed, it
does not start, or its embedding differs from ours) is reported as "not run: <why>" in its rows; the
rest of the bench goes on. Every process it starts is stopped at the end, on an error and on a signal:
SIGTERM to the group, SIGKILL after a grace period (MLServer with adaptive batching ignores SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import loadgen, workloads
from bench.peers.similarity import MIN_COSINE, SimilarityError, check_embeddings
from bench.report import Row
from bench.server import log_tail, stop_process_group
from bench.settings import BENCH_DIR, Settings

STOP_GRACE_S = 5.0
"""Seconds a peer gets to exit on SIGTERM before its process group is killed."""
HEALTH_POLL_S = 0.5


class PeerError(RuntimeError):
    """A peer could not be prepared, started or checked; the message says which and why."""


def venv_missing(venv: Path, pip_log: Path) -> str | None:
    """Why the peer's virtual environment cannot be used, or None when it is installed."""
    if (venv / ".installed").is_file() and (venv / "bin" / "python").exists():
        return None
    said = ""
    if pip_log.is_file():
        lines = [line for line in pip_log.read_text(errors="replace").splitlines() if line.strip()]
        said = f"; its pip install said: {lines[-1][:300] if lines else '(nothing)'} (all of it: {pip_log})"
    return f"{venv.relative_to(BENCH_DIR.parent)} is not installed (make bench's set-up creates it){said}"


class PeerProcess:
    """A peer's server as a process group of its own, ready when ``health_url`` answers 200."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        cwd: Path,
        env: Mapping[str, str],
        log: Path,
        health_url: str,
        start_timeout_s: float,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.cwd = cwd
        self.env = dict(env)
        self.log = log
        self.health_url = health_url
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self._process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:  # not ready, or interrupted (deadline, SIGTERM): nothing of it may outlive this
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PeerError(
                    f"{self.name} exited with status {self._process.returncode} while starting:\n{log_tail(self.log)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.health_url, timeout=1.0).status_code == 200:
                    return
            time.sleep(HEALTH_POLL_S)
        raise PeerError(f"{self.name} was not ready after {self.start_timeout_s:.0f} s:\n{log_tail(self.log)}")

    def stop(self) -> None:
        if self._process is not None:
            stop_process_group(self._process, timeout_s=STOP_GRACE_S)
            self._process = None


class Peer(ABC):
    """What a peer module provides: where it lives, how it starts, how it is asked for embeddings."""

    side: str  # its name in the report's rows
    protocol: str  # how the text workload reaches it

    @abstractmethod
    def missing(self) -> str | None:
        """Why this peer cannot run here (before anything starts), or None."""

    @abstractmethod
    def settings_label(self) -> str:
        """The settings it runs with, for the report."""

    @abstractmethod
    def start(self, workdir: Path, log: workloads.Log) -> PeerProcess:
        """Prepare its files under ``workdir`` and start it; raises PeerError. The caller stops the process."""

    @abstractmethod
    def body(self, sentence: str) -> bytes:
        """The request that embeds one sentence."""

    @abstractmethod
    def embeddings(self, answer: Any) -> list[list[float]]:
        """The embeddings in the decoded JSON answer to a ``body`` request."""

    @abstractmethod
    def url(self) -> str:
        """Where the text workload posts (after ``start``)."""

    def target(self, sentences: Sequence[str]) -> loadgen.HttpTarget:
        return loadgen.HttpTarget(self.url(), [self.body(s) for s in sentences], {"Content-Type": "application/json"})

    def embed(self, sentences: Sequence[str]) -> list[list[float]]:
        """The peer's embeddings of ``sentences``, one request each (as the workload sends them)."""
        rows: list[list[float]] = []
        for sentence in sentences:
            response = httpx.post(
                self.url(), content=self.body(sentence), headers={"Content-Type": "application/json"}, timeout=60.0
            )
            if response.status_code != 200:
                raise PeerError(f"{self.side} answered {response.status_code}: {response.text[:300]}")
            rows.extend(self.embeddings(response.json()))
        return rows


@dataclass
class PeerRun:
    """A peer, started and checked; or why it could not run."""

    peer: Peer
    status: str = "not run"
    reason: str = ""
    process: PeerProcess | None = None
    target: loadgen.HttpTarget | None = None
    start_s: float | None = None
    cosines: list[float] = field(default_factory=list)
    stop_s: float | None = None  # how long stopping took (SIGTERM, then SIGKILL after STOP_GRACE_S)
    log_file: Path | None = None

    @property
    def note(self) -> str:
        if self.target is not None:
            return self.peer.settings_label()
        return f"not run: {self.reason}"

    def point(self, concurrency: int, settings: Settings) -> workloads.Point:
        if self.target is None:
            row = Row("text", self.peer.side, self.peer.protocol, concurrency, "aiohttp closed loop", "texts")
            return workloads.failed_point(row, self.note)
        return workloads.text_point(self.target, self.peer.side, self.peer.protocol, concurrency, settings)

    def stop(self) -> None:
        if self.process is not None:
            began = time.monotonic()
            self.process.stop()
            self.stop_s = time.monotonic() - began
            self.log_file = self.process.log
            self.process = None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "settings": self.peer.settings_label(),
            "start_s": None if self.start_s is None else round(self.start_s, 1),
            "embedding_check": {"min_cosine_required": MIN_COSINE, "cosines": [round(c, 6) for c in self.cosines]},
            "stop_s": None if self.stop_s is None else round(self.stop_s, 1),
            "log": str(self.process.log if self.process is not None else self.log_file or "") or None,
        }


def start_peer(
    peer: Peer,
    enabled: bool,
    workdir: Path,
    sentences: Sequence[str],
    reference: np.ndarray[Any, np.dtype[np.float32]] | None,
    log: workloads.Log,
) -> PeerRun:
    """Start ``peer`` and check its embeddings of the first sentences against ``reference`` (ours, in-process).
    The caller stops ``result`` (also when this raises an interruption)."""
    result = PeerRun(peer)

    def give_up(status: str, reason: str) -> PeerRun:
        result.status, result.reason = status, reason
        log(f"{peer.side}: {status}: {reason.splitlines()[0] if reason else ''}")
        return result

    if not enabled:
        return give_up("skipped", f"BENCH_{peer.side.upper()}=0")
    missing = peer.missing()
    if missing is not None:
        return give_up("unavailable", missing)
    if reference is None:
        return give_up("unavailable", "no reference embedding to check it against (the in-process Pipeline failed)")
    started = time.monotonic()
    try:
        result.process = peer.start(workdir, log)
        result.start_s = time.monotonic() - started
        log(f"{peer.side}: up in {result.start_s:.1f} s ({peer.settings_label()}; log {result.process.log})")
        got = peer.embed(sentences[: len(reference)])
        result.cosines = check_embeddings(reference, np.asarray(got, dtype=np.float32))
    except (PeerError, SimilarityError, httpx.HTTPError, KeyError, ValueError, TypeError, OSError) as e:
        result.stop()
        return give_up("failed", f"{type(e).__name__}: {e}" if not isinstance(e, PeerError) else str(e))
    except BaseException:  # interrupted (deadline, SIGTERM): the peer must not outlive the bench
        result.stop()
        raise
    log(f"{peer.side}: embeddings match ours (cosine >= {min(result.cosines):.5f})")
    result.status, result.target = "ran", peer.target(sentences)
    return result


def peer_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The bench's environment without the project's venv on PATH or PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}
