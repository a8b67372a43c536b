"""The soak (``bench/soak.py``): its verdict on made-up runs, and a one-minute real run (``long``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import soak  # noqa: E402

MINUTE = 60.0


def steady_run(rss: list[int] | None = None, latency: float = 0.005, late_latency: float | None = None) -> soak.Run:
    """One minute: a request a second of kind ``v2_json``, one RSS sample a second (MiB given)."""
    run = soak.Run()
    for second in range(60):
        seconds = late_latency if late_latency is not None and second >= 45 else latency
        run.add(soak.Record("v2_json", float(second), seconds, True))
        run.rss.append((float(second), (rss[second] if rss else 200) * 2**20))
    return run


def test_a_flat_run_passes() -> None:
    summary, failures = soak.analyse(steady_run(), MINUTE, soak.Limits())
    assert failures == []
    assert summary["passed"]
    assert summary["rss_mib"]["second_half_growth"] == 0


def test_rss_growth_in_the_second_half_fails() -> None:
    growing = [200 + max(0, s - 30) * 5 for s in range(60)]  # +5 MiB a second after warm-up
    _, failures = soak.analyse(steady_run(rss=growing), MINUTE, soak.Limits(max_rss_growth_mib=64))
    assert len(failures) == 1
    assert "RSS grew by" in failures[0]


def test_growth_during_warm_up_only_passes() -> None:
    warming = [100 + min(s, 25) * 4 for s in range(60)]  # grows in the first half, then flat
    _, failures = soak.analyse(steady_run(rss=warming), MINUTE, soak.Limits())
    assert failures == []


def test_p99_drift_fails() -> None:
    _, failures = soak.analyse(steady_run(late_latency=0.2), MINUTE, soak.Limits(max_p99_ratio=2, p99_slack_ms=20))
    assert len(failures) == 1
    assert "drifted from 5.0 ms (second quarter) to 200.0 ms (last quarter)" in failures[0]


def test_a_failed_request_fails_the_run() -> None:
    run = steady_run()
    run.add(soak.Record("bad", 10.0, 0.001, False, "/v2/models/add/infer: 500 internal server error"))
    _, failures = soak.analyse(run, MINUTE, soak.Limits())
    assert failures == ["bad: 1 of 1 requests failed, e.g. /v2/models/add/infer: 500 internal server error"]


@pytest.mark.long
def test_a_one_minute_soak_passes(tmp_path: Path) -> None:
    output = tmp_path / "soak.json"
    # one minute on a shared machine: latency noise is not drift, so the p99 bound is loose here
    command = [sys.executable, "-m", "bench.soak", "--minutes", "1", "--reload-secs", "3", "--p99-slack-ms", "150"]
    done = subprocess.run(
        [*command, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = orjson.loads(output.read_bytes())
    assert summary["passed"]
    assert summary["reloads"] >= 10
    assert {"v2_json", "v2_binary", "v2_grpc", "tf_serving", "flip", "bad"} <= set(summary["kinds"])
    assert all(kind["failed"] == 0 for kind in summary["kinds"].values())
