"""A loaded version whose folder an operator removed from disk, against a capped server (rt10 N3).

Model control mode ``none`` never reloads, so the version keeps serving from memory until a restart.
Its version page answered 500 (an HTML error page) and its graph, weights and diff documents 500 with
"<path>: cannot read the model file", each logged as a WARNING with the full path (any client could
add log lines at will). Now the page shows the version without its file's header and graph, the
documents answer 404 saying why, no answer holds a path, and the server logs it once per version.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import requests
from harness import CappedServer

from models import add_model, write_version

CAP = 3 * 1024**3
ROUNDS = 3


def test_a_version_whose_folder_was_removed_is_shown_without_its_file_and_never_answers_5xx(tmp_path: Path) -> None:
    repository, elsewhere = tmp_path / "repository", tmp_path / "elsewhere"
    for version in (1, 2):
        write_version(repository, "m", version, add_model())
    config = {"model_config_list": [{"name": "m", "base_path": "m", "model_version_policy": {"all": {}}}]}
    (repository / "config.json").write_text(json.dumps(config))
    with CappedServer(["--config", str(repository / "config.json")], cap_bytes=CAP) as server:
        web, api = server.http_url + "/models/m", server.http_url + "/web/api/models/m"
        assert requests.get(api + "/versions/2/graph", timeout=30).status_code == 200  # cached before the removal
        elsewhere.mkdir()
        shutil.move(repository / "m" / "2", elsewhere / "2")
        documents = [api + "/versions/2/graph", api + "/versions/2/weights?name=x", api + "/diff?a=1&b=2"]
        for _ in range(ROUNDS):
            page = requests.get(web + "/versions/2", timeout=30)
            assert page.status_code == 200, page.text
            assert "served from memory" in page.text
            assert "no longer on disk" in page.text
            assert 'id="graph"' not in page.text  # no graph view that would fetch a document that is gone
            assert str(tmp_path) not in page.text
            for url in documents:
                refused = requests.get(url, timeout=30)
                assert refused.status_code == 404, (url, refused.status_code, refused.text)
                message = refused.json()["error"]
                assert "version 2 of model 'm' is served from memory" in message
                assert "no longer on disk" in message
                assert str(tmp_path) not in message
                assert "<path>" not in message
        diff_page = requests.get(web + "/diff?a=1&b=2", timeout=30)  # its script shows the 404's message
        assert diff_page.status_code == 200
        assert requests.get(web, timeout=30).status_code == 200
        assert requests.get(web + "/versions/1", timeout=30).status_code == 200  # the other version is whole
        assert requests.get(api + "/versions/1/graph", timeout=30).status_code == 200
        body = {"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16} for n in "ab"]}
        served = requests.post(server.http_url + "/v2/models/m/versions/2/infer", json=body, timeout=30)
        assert served.status_code == 200, served.text  # the version still serves from memory
        assert server.probe_seconds("/v2/health/ready") < 1
        log = server.log()
        assert server.alive()
    gone_lines = [line for line in log.splitlines() if "no longer on disk" in line]
    assert len(gone_lines) == 1, gone_lines  # once per version, however many requests
    assert " INFO " in gone_lines[0]
    assert " WARNING " not in log
    assert " ERROR " not in log
