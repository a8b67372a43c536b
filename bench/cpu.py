"""How much CPU the rest of the machine used while a run measured (the noise next to each number), and
how the benchmark's own CPU split between its client and the servers it measured.

Busy CPU time of the whole machine (``/proc/stat``) minus that of this process and every process it
started (servers, perf_analyzer, TorchServe's Java frontend and Python workers), over the run, in
cores. On a quiet machine it is close to 0; 1.0 means another program took a whole core of the two.
Of the benchmark's own: this process (the HTTP load generator and the in-process baselines run in it)
and the processes it started (the server being measured; perf_analyzer for the tensor workloads).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def _machine_busy_ticks() -> int:
    fields = (PROC / "stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks of the process and of its waited-for children)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        table[int(entry.name)] = (ppid, utime + stime + cutime + cstime)
    return table


def _our_ticks() -> int:
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [os.getpid()]
    while stack:
        pid = stack.pop()
        if pid in table:
            total += table[pid][1]
        stack.extend(children.get(pid, []))
    return total


def _own_ticks() -> int:
    """CPU ticks of this process alone (all its threads), not of its children."""
    raw = (PROC / "self" / "stat").read_text()
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


@dataclass(frozen=True)
class Cores:
    """CPU used over a run, in cores: by processes outside the benchmark, by this process, by its children."""

    others: float
    this_process: float
    children: float


class CpuMeter:
    """Started at construction; ``cores()`` is the CPU used since, in cores (None without ``/proc``)."""

    def __init__(self) -> None:
        self._available = (PROC / "stat").is_file()
        self._start = self._read() if self._available else (0.0, 0, 0, 0)

    @staticmethod
    def _read() -> tuple[float, int, int, int]:
        return time.monotonic(), _machine_busy_ticks(), _our_ticks(), _own_ticks()

    def cores(self) -> Cores | None:
        if not self._available:
            return None
        now, busy, ours, own = self._read()
        start, busy0, ours0, own0 = self._start
        seconds = now - start
        if seconds <= 0:
            return None
        per_second = os.sysconf("SC_CLK_TCK") * seconds

        def share(ticks: int) -> float:
            return round(max(0.0, ticks / per_second), 2)

        return Cores(share((busy - busy0) - (ours - ours0)), share(own - own0), share((ours - ours0) - (own - own0)))

    def other_cores(self) -> float | None:
        found = self.cores()
        return None if found is None else found.others
