"""Control requests read the model catalog on a worker thread, one reading shared by all who ask.

Outside attack rt25 F7: under explicit model control, every repository index (REST and gRPC) and the name
lookup of every load rescanned the repository on the event loop: 0.3 to 0.85 s for 3,000 model folders, and
eight clients asking for the index in a loop held probes 9 to 17.9 s and a small inference 19.4 s. No token
is needed for the index on a server without ``--auth-tokens``.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import onnx
import requests
from harness import serve_capped
from onnx import TensorProto, helper

FOLDERS = 3000
CLIENTS = 8
FLOOD_SECONDS = 6.0
PROBE_BOUND = 1.0


def _identity(folder: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")


def test_index_floods_share_one_reading_and_a_model_copied_in_just_before_its_load_is_found(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    _identity(repository / "tiny" / "1")
    for i in range(FOLDERS):  # a large repository of models loaded on demand (their files not there yet)
        (repository / f"m{i:04d}" / "1").mkdir(parents=True)
    with serve_capped(repository, "--model-control-mode", "explicit", "--load-model", "tiny") as server:
        index = f"{server.http_url}/v2/repository/index"
        listed = requests.post(index, timeout=60).json()
        assert {"name": "m0000", "version": "", "state": "UNAVAILABLE", "reason": "not loaded"} in listed
        assert len(listed) == FOLDERS + 1

        stop = time.monotonic() + FLOOD_SECONDS
        statuses: list[int] = []

        def flood() -> None:
            with requests.Session() as session:
                while time.monotonic() < stop:
                    statuses.append(session.post(index, timeout=60).status_code)

        threads = [threading.Thread(target=flood) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        probes = []
        while time.monotonic() < stop:
            probes.append(server.probe_seconds())
            time.sleep(0.2)
        for thread in threads:
            thread.join(60)
        assert statuses, "no index request was answered"
        assert set(statuses) == {200}
        assert max(probes) < PROBE_BOUND, probes  # before: 9 to 17.9 s

        # The flood's last reading is fresh, and lacks a model copied in now: its load looks again.
        shutil.copytree(repository / "tiny", repository / "late")
        answer = requests.post(f"{server.http_url}/v2/repository/models/late/load", timeout=60)
        assert answer.status_code == 200, answer.text
        missing = requests.post(f"{server.http_url}/v2/repository/models/absent/load", timeout=60)
        assert missing.status_code == 404, missing.text
        assert server.probe_seconds() < PROBE_BOUND
