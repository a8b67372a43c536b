"""Benchmark settings, read from ``BENCH_*`` environment variables.

The defaults fit ``make bench`` (three onnxserve configurations, TorchServe, Infinity, MLServer) into
25 minutes on a 2-core machine. Every measured point is run
``BENCH_REPEATS`` times and reported as the median of those runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (bench/ lives in it)."""

BENCH_DIR = ROOT / "bench"

T = TypeVar("T")


class SettingsError(ValueError):
    """A ``BENCH_*`` variable that cannot be used, named with what was expected."""


@dataclass(frozen=True)
class Settings:
    repeats: int = 3
    """Runs of every measured point; the report shows their medians."""
    duration_s: float = 3.0
    """Measured seconds of one load-generator run (text workloads, TorchServe, in-process loops)."""
    warmup_s: float = 1.0
    """Unmeasured seconds before each load-generator run."""
    pa_window_ms: int = 1500
    """perf_analyzer's measurement window; each perf_analyzer run measures 3 such windows (or more)."""
    concurrency: tuple[int, ...] = (1, 8, 32)
    """Client concurrencies of the tensors and text workloads (overhead always runs at 1)."""
    batch_delay_us: int | None = None
    """Overrides ``max_queue_delay_us`` of bench/configs/batching_on.json when set."""
    torchserve: bool = True
    """Run the TorchServe comparison (set BENCH_TORCHSERVE=0 to skip it)."""
    infinity: bool = True
    """Run the Infinity comparison (BENCH_INFINITY=0 skips it)."""
    mlserver: bool = True
    """Run the MLServer comparison (BENCH_MLSERVER=0 skips it)."""
    torchserve_settings: tuple[tuple[int, int, int, int], ...] = ()
    """TorchServe (workers, threads, batch_size, max_batch_delay_ms) candidates; empty: the built-in list."""
    models: Path = field(default_factory=lambda: ROOT / "models")
    """The demo model repository (``make serve`` / ``make demo`` prepares it)."""
    output: Path = field(default_factory=lambda: BENCH_DIR / "results" / "latest.json")
    deadline_s: int = 1320
    """The whole run stops (servers included) after this many seconds, whatever it is doing."""

    @property
    def results_dir(self) -> Path:
        return self.output.parent

    @property
    def minilm(self) -> Path:
        return self.models / "minilm" / "1"


def _int(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _float(raw: str, name: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def _ints(raw: str, name: str) -> tuple[int, ...]:
    values = tuple(_int(part.strip(), name) for part in raw.split(",") if part.strip())
    if not values or any(v < 1 for v in values):
        raise SettingsError(f"{name} must be a comma-separated list of positive integers, got {raw!r}")
    return values


def _bool(raw: str, name: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 1 or 0, got {raw!r}")


def _torchserve_settings(raw: str, name: str) -> tuple[tuple[int, int, int, int], ...]:
    candidates: list[tuple[int, int, int, int]] = []
    for part in raw.split(";"):
        if not part.strip():
            continue
        numbers = _ints(part.replace(":", ","), name)
        if len(numbers) != 4:
            raise SettingsError(f"{name}: each candidate is WORKERS:THREADS:BATCH_SIZE:DELAY_MS, got {part!r}")
        candidates.append((numbers[0], numbers[1], numbers[2], numbers[3]))
    return tuple(candidates)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``BENCH_*`` variables; anything unset keeps its default."""
    source = os.environ if env is None else env
    defaults = Settings()

    def get(name: str, parse: Callable[[str, str], T], default: T) -> T:
        raw = source.get(name)
        return default if raw is None or raw.strip() == "" else parse(raw, name)

    settings = Settings(
        repeats=get("BENCH_REPEATS", _int, defaults.repeats),
        duration_s=get("BENCH_DURATION_S", _float, defaults.duration_s),
        warmup_s=get("BENCH_WARMUP_S", _float, defaults.warmup_s),
        pa_window_ms=get("BENCH_PA_WINDOW_MS", _int, defaults.pa_window_ms),
        concurrency=get("BENCH_CONCURRENCY", _ints, defaults.concurrency),
        batch_delay_us=get("BENCH_BATCH_DELAY_US", _int, None),
        torchserve=get("BENCH_TORCHSERVE", _bool, defaults.torchserve),
        infinity=get("BENCH_INFINITY", _bool, defaults.infinity),
        mlserver=get("BENCH_MLSERVER", _bool, defaults.mlserver),
        torchserve_settings=get("BENCH_TORCHSERVE_SETTINGS", _torchserve_settings, ()),
        models=get("BENCH_MODELS", lambda raw, _: Path(raw).resolve(), defaults.models),
        output=get("BENCH_OUTPUT", lambda raw, _: Path(raw).resolve(), defaults.output),
        deadline_s=get("BENCH_DEADLINE_S", _int, defaults.deadline_s),
    )
    if settings.repeats < 1:
        raise SettingsError(f"BENCH_REPEATS must be at least 1, got {settings.repeats}")
    if settings.duration_s <= 0 or settings.warmup_s < 0:
        raise SettingsError("BENCH_DURATION_S must be > 0 and BENCH_WARMUP_S >= 0")
    if settings.pa_window_ms < 100:
        raise SettingsError(f"BENCH_PA_WINDOW_MS must be at least 100, got {settings.pa_window_ms}")
    if settings.batch_delay_us is not None and settings.batch_delay_us < 0:
        raise SettingsError(f"BENCH_BATCH_DELAY_US must be >= 0, got {settings.batch_delay_us}")
    return settings


ENV_HELP = {
    "BENCH_REPEATS": "runs per measured point (median reported)",
    "BENCH_DURATION_S": "measured seconds per load-generator / in-process run",
    "BENCH_WARMUP_S": "unmeasured seconds before each load-generator run",
    "BENCH_PA_WINDOW_MS": "perf_analyzer measurement window (3 windows per run)",
    "BENCH_CONCURRENCY": "client concurrencies for tensors and text, e.g. 1,8,32",
    "BENCH_BATCH_DELAY_US": "override max_queue_delay_us of bench/configs/batching_on.json",
    "BENCH_TORCHSERVE": "0 skips the TorchServe comparison",
    "BENCH_INFINITY": "0 skips the Infinity comparison",
    "BENCH_MLSERVER": "0 skips the MLServer comparison",
    "BENCH_TORCHSERVE_SETTINGS": "TorchServe candidates WORKERS:THREADS:BATCH:DELAY_MS;... (best at c8 is measured)",
    "BENCH_MODELS": "the demo model repository (default models/)",
    "BENCH_OUTPUT": "where the JSON goes (default bench/results/latest.json)",
    "BENCH_DEADLINE_S": "hard limit for the whole run",
}
