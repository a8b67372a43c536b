"""bench/replicas.py as a test: three replicas behind HAProxy, one drained (SIGTERM) and one killed
(SIGKILL) under steady load; the script exits 1 if any request failed or the drained replica did not
exit 0. Short phases keep it to about half a minute."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.long  # 20 s, and a request whose answer was being sent at the SIGKILL is lost now and then
def test_replicas_survive_a_drain_and_a_kill(tmp_path: Path) -> None:
    if not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        pytest.skip("haproxy is not installed (make deploy-deps installs it with apt when root)")
    out = tmp_path / "replicas.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replicas.py"), "--seconds", "3", "--clients", "4", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    failover = results["failover"]
    assert failover["failed"] == {}
    assert failover["drained_exit_status"] == 0
    assert [e.split()[1:] for e in failover["events"]] == [["SIGTERM", "r1"], ["SIGKILL", "r2"]]
    haproxy = failover["haproxy"]
    assert haproxy["r0"]["status"] == "UP"
    assert haproxy["r1"]["status"] != "UP"  # the readiness check took the drained replica out
    assert haproxy["r2"]["status"] != "UP"
    assert haproxy["r1"]["answered"] > 0  # all three took traffic before the failures
    assert haproxy["r2"]["answered"] > 0
    for phase in ("throughput_1", "throughput_3"):
        assert results[phase]["failed"] == 0
        assert results[phase]["ok"] > 0
