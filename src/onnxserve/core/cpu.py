"""How many CPUs this process may use."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU quota (a container's
    CPU limit), which ``os.cpu_count()`` does not see."""
    budget = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            budget = min(budget, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return budget
