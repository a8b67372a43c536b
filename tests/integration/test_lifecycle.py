"""Versions, hot reload, model control and draining: what operators and Kubernetes rely on."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import models
from onnxserve.config import load_config
from onnxserve.core import registry
from onnxserve.core.manager import Catalog
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from waiting import wait_until

ONNXSERVE = [sys.executable, "-m", "onnxserve.cli"]
LISTENING = re.compile(r"HTTP \(.*\) on http://([\d.]+):(\d+)")


def infer_body(x: float = 0.0) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [x]}]}


def write_config(
    path: Path,
    labels: dict[str, int] | None = None,
    extra: list[dict[str, Any]] | None = None,
    **keys: Any,
) -> None:
    entry: dict[str, Any] = {"name": "m", "base_path": "m", "max_batch_size": 4, **keys}
    if labels:
        entry["version_labels"] = labels
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"model_config_list": [entry, *(extra or [])]}))
    partial.replace(path)


def add_version(repo: Path, name: str, version: int, offset: float) -> None:
    """Write a version beside the model, then move it in (how a careful operator deploys)."""
    staging = repo / f".staging-{name}-{version}"
    models.write_version(staging, name, version, models.offset_model(offset))
    (staging / name / str(version)).rename(repo / name / str(version))
    shutil.rmtree(staging)


@pytest.fixture
def polled(tmp_path: Path) -> Iterator[tuple[RunningServer, Path, Path]]:
    repo = tmp_path / "repo"
    models.write_version(repo, "m", 1, models.offset_model(100.0))
    config_file = repo / "config.json"
    write_config(config_file)
    settings = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="poll", repository_poll_secs=0.1
    )
    server = start_in_background(load_config(config_file), settings, Catalog(config_file=config_file))
    yield server, repo, config_file
    server.stop()


class Load:
    """Steady requests from two threads, recording (version answered, offset seen) or the failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[str, float]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(2)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                response = client.post(self.url, json=infer_body(0.0))
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text}")
                    continue
                doc = response.json()
                self.results.append((doc["model_version"], doc["outputs"][0]["data"][0]))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def latest(self) -> str:
        return self.results[-1][0] if self.results else ""


def served_versions(server: RunningServer) -> list[str]:
    versions: list[str] = httpx.get(f"{server.http_url}/v2/models/m").json()["versions"]
    return versions


def test_rollout_under_load_loses_no_request(polled: tuple[RunningServer, Path, Path]) -> None:
    server, repo, config_file = polled
    with Load(f"{server.http_url}/v2/models/m/infer") as load:
        wait_until(lambda: len(load.results) > 20, what="traffic")

        add_version(repo, "m", 2, 200.0)  # a new version: served once loaded and warm
        wait_until(lambda: load.latest() == "2", what="version 2 taking traffic")
        wait_until(lambda: served_versions(server) == ["2"], what="version 1 unloaded")

        broken = repo / "m" / "3"
        broken.mkdir()
        (broken / "model.onnx").write_bytes(b"not a model")  # fails to load: 2 keeps serving
        wait_until(
            lambda: any(e["version"] == "3" and e["state"] == "UNAVAILABLE" for e in index(server)),
            what="version 3 reported as failed",
        )
        reason = next(e["reason"] for e in index(server) if e["version"] == "3")
        assert "not an ONNX model" in reason

        write_config(config_file, labels={"stable": 2})  # a label moves
        wait_until(lambda: label_version(server, "stable") == "2", what="label stable -> 2")

        shutil.rmtree(broken)
        shutil.rmtree(repo / "m" / "2")  # removed: version 1 comes back before 2 goes
        write_config(config_file)
        wait_until(lambda: served_versions(server) == ["1"], what="back to version 1")
        count = len(load.results)
        wait_until(lambda: len(load.results) > count + 20, what="traffic after the rollback")
    assert load.failures == []
    # every answer came from the version it names, and versions moved 1 -> 2 -> 1 in that order
    assert all(offset == float(version) * 100 for version, offset in load.results)
    phases = [v for i, (v, _) in enumerate(load.results) if i == 0 or load.results[i - 1][0] != v]
    assert phases[0] == "1"
    assert phases[-1] == "1"
    assert "2" in phases


def index(server: RunningServer) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = httpx.post(f"{server.http_url}/v2/repository/index", json={}).json()
    return entries


def label_version(server: RunningServer, label: str) -> str:
    response = httpx.post(f"{server.http_url}/v2/models/m/versions/{label}/infer", json=infer_body())
    if response.status_code != 200:
        return ""
    tf = httpx.get(f"{server.http_url}/v1/models/m/labels/{label}")
    assert tf.status_code == 200
    version: str = response.json()["model_version"]
    return version


def test_a_half_written_version_is_not_taken(polled: tuple[RunningServer, Path, Path]) -> None:
    server, repo, _ = polled
    folder = repo / "m" / "2"
    folder.mkdir()
    data = models.offset_model(200.0).SerializeToString()
    with (folder / "model.onnx").open("wb") as f:
        for i in range(0, len(data), 16):  # still being written across several polls
            f.write(data[i : i + 16])
            f.flush()
            os.utime(folder / "model.onnx")
            time.sleep(0.02)
            assert served_versions(server) == ["1"]
    wait_until(lambda: served_versions(server) == ["2"], what="the finished version")
    assert not any(e["state"] == "UNAVAILABLE" for e in index(server))


def test_a_version_replaced_while_it_loads_is_loaded_again_once_stable(
    polled: tuple[RunningServer, Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A version replaced while it loads (the documented deploy, a staged folder moved over it) is a load error;
    the poll then skipped the version for good, its files as they were after the swap recorded as a failed
    version's (outside attack rt37: the finished deploy never served). It is loaded at the next stable look."""
    server, repo, _ = polled
    staged = repo.parent / "staged"
    models.write_version(staged, "m", 2, models.offset_model(300.0))
    made = registry.ModelSession
    swapped: list[bool] = []

    def session(model_file: Path, *args: Any, **kwargs: Any) -> Any:
        real = made(model_file, *args, **kwargs)
        if model_file.parent == repo / "m" / "2" and not swapped:
            (repo / "m" / "2").rename(repo.parent / "replaced")
            (staged / "m" / "2").rename(repo / "m" / "2")
            swapped.append(True)
        return real

    monkeypatch.setattr(registry, "ModelSession", session)
    with caplog.at_level(logging.INFO, logger="onnxserve.core.manager"):
        add_version(repo, "m", 2, 200.0)
        wait_until(lambda: served_versions(server) == ["2"], what="version 2, loaded again")
    assert swapped
    assert "version 2 failed to load: m/2: the version folder was replaced while it loaded" in caplog.text
    answer = httpx.post(f"{server.http_url}/v2/models/m/infer", json=infer_body(0.0), timeout=30).json()
    assert answer["outputs"][0]["data"][0] == 300.0  # the staged folder's, whole


def test_an_invalid_new_config_is_refused_and_serving_goes_on(polled: tuple[RunningServer, Path, Path]) -> None:
    server, _, config_file = polled
    config_file.write_text(json.dumps({"model_config_list": [{"name": "m", "base_path": "m", "bogus": 1}]}))
    time.sleep(0.5)  # several polls
    response = httpx.post(f"{server.http_url}/v2/models/m/infer", json=infer_body(1.0))
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"] == [101.0]


def test_a_config_file_replaced_by_a_fifo_or_dev_zero_is_refused_and_polling_goes_on(
    polled: tuple[RunningServer, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO in the config file's place stalled the poll for good with nothing logged (a blocking open and
    read), and a symbolic link to /dev/zero was read until memory ran out, each poll (outside attack rt43).
    Now each is refused by name, once, the running configuration keeps serving, and the poll goes on."""
    server, repo, config_file = polled
    valid = config_file.read_text()
    models.write_version(repo, "late", 1, models.offset_model(7.0))
    fifo = repo / "fifo"
    os.mkfifo(fifo)
    with caplog.at_level(logging.DEBUG, logger="onnxserve.core.manager"):
        try:
            fifo.replace(config_file)
            wait_until(lambda: "not a regular file" in caplog.text, what="the FIFO refused")
            assert answer(server) == 101.0
            config_file.unlink()
            config_file.symlink_to("/dev/zero")
            wait_until(lambda: caplog.text.count("not a regular file") >= 3, what="more refusals")  # DEBUG: (still)
            assert answer(server) == 101.0
            config_file.unlink()
            write_config(config_file, extra=[{"name": "late", "base_path": "late"}])  # added while it was refused
            wait_until(lambda: httpx.get(f"{server.http_url}/v2/models/late/ready").status_code == 200, what="late")
        finally:
            with contextlib.suppress(OSError):  # a poll stuck opening the FIFO (before the fix) gets its EOF
                os.close(os.open(config_file, os.O_WRONLY | os.O_NONBLOCK))
    assert answer(server, "late") == 8.0
    refusals = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert f"{config_file}: the config file is not a regular file" in refusals[0].getMessage()
    assert [r.levelno for r in refusals].count(logging.ERROR) == 1  # the same reason for FIFO and device
    assert "this round failed" not in caplog.text
    assert valid  # (the file it replaced was valid)


def test_a_changed_entry_loads_its_versions_again_and_a_refused_one_is_said_once(
    polled: tuple[RunningServer, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A changed max_batch_size, queue size or instance count of a loaded model was silently not applied
    until a new version folder came (outside attack rt12 F2), and an invalid config file logged an ERROR
    on every poll (F3)."""
    server, repo, config_file = polled
    url = f"{server.http_url}/v2/models/m"
    three_rows = {"inputs": [{"name": "x", "shape": [3, 1], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert httpx.post(f"{url}/infer", json=three_rows).status_code == 200
    with caplog.at_level(logging.DEBUG, logger="onnxserve.core.manager"), Load(f"{url}/infer") as load:
        wait_until(lambda: len(load.results) > 20, what="traffic")
        write_config(config_file, max_batch_size=2, allow_hardlinks=True)
        wait_until(lambda: httpx.get(f"{url}/config").json()["max_batch_size"] == 2, what="the new entry")
        refused = httpx.post(f"{url}/infer", json=three_rows)
        assert refused.status_code == 400
        assert "max_batch_size 2" in refused.json()["error"]

        # an entry the version cannot load with: the loaded one keeps serving, and is not tried every poll
        os.link(repo / "m" / "1" / "model.onnx", repo / "model-link.onnx")
        write_config(config_file, max_batch_size=3)  # allow_hardlinks back to false: the file has 2 links
        wait_until(lambda: "failed to load" in caplog.text, what="the failed load")
        time.sleep(0.5)  # several polls
        assert httpx.get(f"{url}/config").json()["max_batch_size"] == 2

        config_file.write_text("{not json")
        time.sleep(0.5)
        write_config(config_file, max_batch_size=2, allow_hardlinks=True)  # as loaded: nothing to do
        wait_until(lambda: "valid again" in caplog.text, what="the valid config")
        time.sleep(0.3)
        count = len(load.results)
        wait_until(lambda: len(load.results) > count + 20, what="traffic after the changes")
    assert load.failures == []
    assert all(version == "1" and offset == 100.0 for version, offset in load.results)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "onnxserve.core.manager"]
    again = [m for _, m in said if "loads again" in m]
    assert len(again) == 2, again  # max_batch_size 4 -> 2, then 2 -> 3 (tried once)
    assert "max_batch_size" in again[0]
    refusals = [level for level, m in said if "reload refused" in m]
    assert refusals[0] == logging.ERROR
    assert set(refusals[1:]) <= {logging.DEBUG}
    assert len(refusals) > 1
    assert any("valid again" in m for _, m in said)


def test_a_layout_of_thousands_of_threads_is_refused_with_its_count(polled: tuple[RunningServer, Path, Path]) -> None:
    """An entry asking for 5,000 intra-op and inter-op threads made ONNX Runtime's pool creation hang
    for good under an address-space cap: the load never returned, reloads stopped and SIGTERM could not
    end the process (outside attack rt12 F4)."""
    server, _, config_file = polled
    threads = {"intra_op_num_threads": 5000, "inter_op_num_threads": 5000, "execution_mode": "parallel"}
    write_config(config_file, extra=[{"name": "t", "base_path": "m", "session_options": threads}])
    wait_until(lambda: any(e["name"] == "t" for e in index(server)), what="the new entry in the index")
    (entry,) = [e for e in index(server) if e["name"] == "t"]
    assert entry["state"] == "UNAVAILABLE"
    assert "asks for 10,000 ONNX Runtime threads" in entry["reason"]
    # reloads go on, and the same file loads for another entry
    write_config(config_file, extra=[{"name": "after", "base_path": "m"}])
    wait_until(lambda: httpx.get(f"{server.http_url}/v2/models/after/ready").status_code == 200, what="after")
    assert httpx.post(f"{server.http_url}/v2/models/m/infer", json=infer_body(1.0)).status_code == 200


def test_a_version_being_loaded_is_in_the_index_as_loading(polled: tuple[RunningServer, Path, Path]) -> None:
    """A load that never returned left its version out of the index: nothing said it was loading (rt12 F4)."""
    server, repo, config_file = polled
    slow = models.warm_up_loop_model(3000, 256)  # its warm-up: 3,000 products of 256 x 256, a few seconds
    models.write_version(repo, "slowload", 1, slow)
    write_config(config_file, extra=[{"name": "slowload", "base_path": "slowload"}])
    states: list[tuple[str, str]] = []

    def seen() -> bool:
        states.extend((e["state"], e.get("reason", "")) for e in index(server) if e["name"] == "slowload")
        return bool(states) and states[-1][0] == "READY"

    wait_until(seen, what="the slow version ready")
    loading = [reason for state, reason in states if state == "LOADING"]
    assert loading, states
    assert loading[0].startswith("loading for ")


def answer(server: RunningServer, model: str = "m") -> float:
    """What model ``model`` answers for x = 1: its version's offset + 1."""
    response = httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=infer_body(1.0))
    assert response.status_code == 200, response.text
    value: float = response.json()["outputs"][0]["data"][0]
    return value


def test_a_served_version_whose_files_change_loads_again(
    polled: tuple[RunningServer, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A served version folder's model replaced in place, or a new folder moved over it, was never loaded
    again: the old model served for good, with nothing logged (outside attack rt25 F4; a flat version's
    file was already reloaded). Now the poll loads it again as a replaced load: the old one serves until
    the new one is ready, and a replacement that fails to load leaves the old one serving."""
    server, repo, _ = polled
    model_file = repo / "m" / "1" / "model.onnx"
    with (
        caplog.at_level(logging.INFO, logger="onnxserve.core.manager"),
        Load(f"{server.http_url}/v2/models/m/infer") as load,
    ):
        wait_until(lambda: len(load.results) > 10, what="traffic")
        # (a) in place
        model_file.write_bytes(models.offset_model(150.0).SerializeToString())
        wait_until(lambda: load.results[-1][1] == 150.0, what="the file replaced in place")
        # (b) a new folder moved over the version's (as a deploy tool swaps a folder)
        staging = repo / ".staging"
        models.write_version(staging, "m", 1, models.offset_model(200.0))
        shutil.rmtree(repo / "m" / "1")
        (staging / "m" / "1").rename(repo / "m" / "1")
        wait_until(lambda: load.results[-1][1] == 200.0, what="the folder moved over the version")
        # (c) a replacement that cannot load: the version serves as it was, until its files change again
        model_file.write_bytes(b"\x08\x07 this is not a protobuf")
        wait_until(lambda: "version 1 failed to load" in caplog.text, what="the failed load")
        count = len(load.results)
        wait_until(lambda: len(load.results) > count + 10, what="traffic after the failed load")
        assert load.results[-1][1] == 200.0
        model_file.write_bytes(models.offset_model(250.0).SerializeToString())
        wait_until(lambda: load.results[-1][1] == 250.0, what="the mended file")
    assert load.failures == []
    assert {offset for _, offset in load.results} == {100.0, 150.0, 200.0, 250.0}
    said = [r.getMessage() for r in caplog.records if r.name == "onnxserve.core.manager"]
    assert sum("files changed; it loads again" in m for m in said) >= 4, said  # (a), (b), (c), the mended file


def test_an_explicit_load_loads_a_version_whose_files_changed(explicit: tuple[RunningServer, Path, Path]) -> None:
    """``POST /v2/repository/models/a/load`` after a's files changed answered 200 and kept the old model
    (outside attack rt25 F4); "load (or reload)" now loads the changed version again, and one that fails
    to load is said to have failed while the old one keeps serving."""
    server, repo, _ = explicit
    load = f"{server.http_url}/v2/repository/models/a/load"
    assert answer(server, "a") == 2.0
    model_file = repo / "a" / "1" / "model.onnx"
    model_file.write_bytes(models.offset_model(5.0).SerializeToString())
    assert answer(server, "a") == 2.0  # nothing changes before the load
    assert httpx.post(load, timeout=30).status_code == 200
    assert answer(server, "a") == 6.0
    assert httpx.post(load, timeout=30).status_code == 200  # unchanged: nothing to do
    assert answer(server, "a") == 6.0
    model_file.write_bytes(b"\x08\x07 this is not a protobuf")
    refused = httpx.post(load, timeout=30)
    assert refused.status_code == 400
    message = refused.json()["error"]
    assert "failed to load again: version 1: <path>: not an ONNX model" in message, message
    assert "keep serving" in message
    assert answer(server, "a") == 6.0
    assert ("a", "READY") in {(e["name"], e["state"]) for e in index(server)}


@pytest.fixture
def explicit(tmp_path: Path) -> Iterator[tuple[RunningServer, Path, Path]]:
    repo = tmp_path / "repo"
    models.write_version(repo, "a", 1, models.offset_model(1.0))
    models.write_version(repo, "b", 1, models.offset_model(2.0))
    outside = tmp_path / "outside"
    models.write_version(outside, "evil", 1, models.offset_model(666.0))
    (repo / "evil").symlink_to(outside / "evil", target_is_directory=True)
    settings = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="explicit", load_models=("a",)
    )
    catalog = Catalog(repository=repo)
    server = start_in_background(catalog.read(), settings, catalog)
    yield server, repo, outside
    server.stop()


def test_an_explicit_load_of_a_model_with_a_version_symlink_loop_says_why(
    explicit: tuple[RunningServer, Path, Path],
) -> None:
    """A version-named symlink loop (``8 -> 9``, ``9 -> 8``) in a model's folder made its load answer 500
    (outside attack rt43 F1); now the looping versions are refused with their reason, as a version folder
    that leads outside is, and the versions the policy can serve load."""
    server, repo, _ = explicit
    models.write_version(repo, "vloop", 1, models.offset_model(3.0))
    (repo / "vloop" / "8").symlink_to("9")
    (repo / "vloop" / "9").symlink_to("8")
    refused = httpx.post(f"{server.http_url}/v2/repository/models/vloop/load", timeout=30)
    assert refused.status_code == 400, refused.text
    assert "version 9: " in refused.json()["error"]
    assert "is a symbolic link that cannot be resolved (a loop); refused" in refused.json()["error"]
    reasons = {e["version"]: e.get("reason", "") for e in index(server) if e["name"] == "vloop"}
    assert "cannot be resolved (a loop)" in reasons["9"]
    (repo / "vloop" / "8").unlink()
    (repo / "vloop" / "9").unlink()
    assert httpx.post(f"{server.http_url}/v2/repository/models/vloop/load", timeout=30).status_code == 200
    assert answer(server, "vloop") == 4.0


def test_explicit_load_and_unload(explicit: tuple[RunningServer, Path, Path]) -> None:
    server, _, _ = explicit
    url = server.http_url
    states = {(e["name"], e["state"]) for e in index(server)}
    assert ("a", "READY") in states
    assert ("b", "UNAVAILABLE") in states
    assert httpx.post(f"{url}/v2/models/b/infer", json=infer_body()).status_code == 404
    assert httpx.post(f"{url}/v2/repository/models/b/load").status_code == 200
    assert httpx.post(f"{url}/v2/models/b/infer", json=infer_body()).json()["outputs"][0]["data"] == [2.0]
    assert httpx.post(f"{url}/v2/repository/models/a/unload").status_code == 200
    response = httpx.post(f"{url}/v2/models/a/infer", json=infer_body())
    assert response.status_code == 404
    assert "unknown model 'a'" in response.json()["error"]
    assert httpx.post(f"{url}/v2/repository/models/a/unload").status_code == 404
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


@pytest.mark.parametrize("name", ["..%2Foutside%2Fevil", "%2Ftmp", "evil", "a%2F..%2F..%2Fx", "no_such"])
def test_load_refuses_names_that_leave_the_repository(explicit: tuple[RunningServer, Path, Path], name: str) -> None:
    server, _, _ = explicit
    response = httpx.post(f"{server.http_url}/v2/repository/models/{name}/load")
    assert response.status_code in (400, 404), response.text
    assert "error" in response.json()
    assert "evil" not in [e["name"] for e in index(server) if e["state"] == "READY"]
    assert httpx.post(f"{server.http_url}/v2/models/a/infer", json=infer_body()).status_code == 200


@pytest.mark.usefixtures("collect_tritonclients")  # it drops a tritonclient.http client
def test_load_refuses_triton_config_and_file_overrides(explicit: tuple[RunningServer, Path, Path]) -> None:
    """Triton's load takes a ``config`` and ``file:`` overrides; onnxserve loads the folder as it is, so
    they are refused with a clear 400 rather than ignored (an outside review found them ignored)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server, _, _ = explicit
    url = f"{server.http_url}/v2/repository/models/b/load"
    for parameters in ({"config": '{"backend": "nope"}'}, {"file:1/model.onnx": "AAAA"}):
        response = httpx.post(url, json={"parameters": parameters})
        assert response.status_code == 400, response.text
        assert "load parameters are not supported" in response.json()["error"]
        assert next(iter(parameters)) in response.json()["error"]
    assert httpx.post(url, content=b"[1]").status_code == 400
    assert "b" not in [e["name"] for e in index(server) if e["state"] == "READY"]
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        with pytest.raises(InferenceServerException, match="load parameters are not supported"):
            client.load_model("b", config='{"max_batch_size": 4}')
    finally:
        client.close()
    assert httpx.post(url).status_code == 200  # no parameters: loaded from its folder
    assert httpx.post(f"{server.http_url}/v2/models/b/infer", json=infer_body()).status_code == 200


def test_model_control_is_refused_when_off(numeric_server: RunningServer) -> None:
    response = httpx.post(f"{numeric_server.http_url}/v2/repository/models/add/load")
    assert response.status_code == 400
    assert "--model-control-mode explicit" in response.json()["error"]
    assert httpx.post(f"{numeric_server.http_url}/v2/repository/models/add/unload").status_code == 400


def start_cli(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([*ONNXSERVE, "serve", *args], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        match = LISTENING.search(line)
        if match:
            return process, f"http://{match.group(1)}:{match.group(2)}"
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("the server did not start")


def queue_depth(url: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "onnxserve_queue_depth" and sample.labels.get("model") == model:
                return float(sample.value)
    return 0.0


def test_sigterm_drains_accepted_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    models.write_version(tmp_path, "slowb", 1, models.slow_batch_model(50000))
    config_file = tmp_path / "config.json"  # one instance, no batching: one request runs, the others wait
    entry = {"name": "slowb", "base_path": "slowb", "instance_count": 1, "max_batch_size": 0}
    config_file.write_text(json.dumps({"model_config_list": [entry]}))
    process, url = start_cli(
        "--config", str(config_file), "--http-port", "0", "--grpc-port", "0", "--drain-timeout", "30"
    )
    assert process.stderr is not None
    try:
        body = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [1.0] * 256}]}
        results: list[int] = []

        def send() -> None:
            results.append(httpx.post(f"{url}/v2/models/slowb/infer", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
        # one request runs (about 0.3 s each, one at a time) and two wait for the instance
        wait_until(lambda: queue_depth(url, "slowb") == 2, what="two requests waiting")
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 503, what="not ready")
        late = httpx.post(f"{url}/v2/models/slowb/infer", json=body)
        assert late.status_code == 503
        assert "shutting down" in late.json()["error"]
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        for t in threads:
            t.join()
        assert results == [200, 200, 200]
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_the_whole_shutdown_stays_within_the_drain_timeout(tmp_path: Path) -> None:
    """Requests still open when the drain times out get what is left of it, not a second drain timeout."""
    models.write_version(tmp_path, "slowb", 1, models.slow_batch_model(50000))
    config_file = tmp_path / "config.json"  # one instance, no batching: about 0.3 s per request, one at a time
    entry = {"name": "slowb", "base_path": "slowb", "instance_count": 1, "max_batch_size": 0}
    config_file.write_text(json.dumps({"model_config_list": [entry]}))
    drain = 4.0
    process, url = start_cli(
        "--config", str(config_file), "--http-port", "0", "--grpc-port", "0", "--drain-timeout", str(drain)
    )
    assert process.stderr is not None
    try:
        body = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [1.0] * 256}]}

        answers: list[tuple[int, str]] = []

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.post(f"{url}/v2/models/slowb/infer", json=body, timeout=60)
                answers.append((response.status_code, response.text))

        threads = [threading.Thread(target=send, daemon=True) for _ in range(60)]  # ~18 s of runs queued
        for t in threads:
            t.start()
        wait_until(lambda: queue_depth(url, "slowb") >= 40, what="requests waiting")
        log: list[str] = []  # read the log, so that a full pipe cannot hold the server
        reader = threading.Thread(target=lambda: log.extend(process.stderr or []), daemon=True)
        reader.start()
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        took = time.monotonic() - signalled
        # the drain times out at 4 s; uvicorn's own wait then gets what is left (1 s at least), not 4 s more
        reader.join(timeout=10)
        assert took < 2 * drain - 0.5, f"shutdown took {took:.1f} s with --drain-timeout {drain}: {log[-5:]}"
        # those still queued when the drain ended were answered 503 in JSON, not cut or answered 500
        for t in threads:
            t.join(timeout=10)
        statuses = sorted({status for status, _ in answers})
        assert statuses == [200, 503], statuses
        refused = [text for status, text in answers if status == 503]
        assert len(refused) >= 30  # the late ones were refused on arrival ("shutting down" too)
        assert all("shutting down" in json.loads(text)["error"] for text in refused), set(refused)
        assert sum("drain ended" in json.loads(text)["error"] for text in refused) >= 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_sighup_reloads_the_config_file(tmp_path: Path) -> None:
    models.write_version(tmp_path, "m", 1, models.offset_model(100.0))
    models.write_version(tmp_path, "n", 1, models.offset_model(7.0))
    config_file = tmp_path / "config.json"
    write_config(config_file)
    process, url = start_cli("--config", str(config_file), "--http-port", "0", "--grpc-port", "0")
    assert process.stderr is not None
    try:
        assert httpx.post(f"{url}/v2/models/n/infer", json=infer_body()).status_code == 404
        write_config(config_file, extra=[{"name": "n", "base_path": "n"}])
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: httpx.post(f"{url}/v2/models/n/infer", json=infer_body()).status_code == 200, what="n")
        config_file.write_text("{not json")
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert httpx.post(f"{url}/v2/models/m/infer", json=infer_body()).status_code == 200
        assert httpx.post(f"{url}/v2/models/n/infer", json=infer_body()).status_code == 200
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        process.stderr.close()


def test_sighup_under_explicit_control_reloads_only_the_loaded_models(tmp_path: Path) -> None:
    """SIGHUP in explicit mode loaded every model of the catalog, undoing the control API's unloads and
    --load-model's choice (outside attack rt25 F5). Now it applies the config to the models loaded only:
    their changed files (or entries) load again; the others stay as the control API left them."""
    for name, offset in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        models.write_version(tmp_path, name, 1, models.offset_model(offset))
    config_file = tmp_path / "config.json"  # a last: once it serves its new file, the reload has been applied
    entries = [{"name": n, "base_path": n} for n in ("c", "b", "a")]
    config_file.write_text(json.dumps({"model_config_list": entries}))
    process, url = start_cli(
        "--config",
        str(config_file),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--model-control-mode",
        "explicit",
        "--load-model",
        "a",
        "--load-model",
        "b",
    )
    assert process.stderr is not None
    try:
        assert httpx.post(f"{url}/v2/repository/models/b/unload", timeout=30).status_code == 200
        (tmp_path / "a" / "1" / "model.onnx").write_bytes(models.offset_model(10.0).SerializeToString())
        process.send_signal(signal.SIGHUP)

        def a_answers() -> float:
            return float(httpx.post(f"{url}/v2/models/a/infer", json=infer_body(1.0)).json()["outputs"][0]["data"][0])

        wait_until(lambda: a_answers() == 11.0, what="a's new file, loaded by the SIGHUP")
        for name in ("b", "c"):  # unloaded by the control API, never loaded: as they were
            assert httpx.post(f"{url}/v2/models/{name}/infer", json=infer_body()).status_code == 404, name
        states = {e["name"]: e["state"] for e in httpx.post(f"{url}/v2/repository/index", json={}).json()}
        assert states == {"a": "READY", "b": "UNAVAILABLE", "c": "UNAVAILABLE"}, states
        for _ in range(20):  # a burst of signals: one reload after another, nothing kept per signal
            process.send_signal(signal.SIGHUP)
        assert a_answers() == 11.0
        assert httpx.post(f"{url}/v2/repository/models/b/load", timeout=30).status_code == 200
        assert httpx.post(f"{url}/v2/models/b/infer", json=infer_body(1.0)).json()["outputs"][0]["data"] == [3.0]
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        process.stderr.close()


def test_grpc_model_control(explicit: tuple[RunningServer, Path, Path]) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server, _, _ = explicit
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        before = {m["name"]: m["state"] for m in client.get_model_repository_index(as_json=True)["models"]}
        assert before["b"] == "UNAVAILABLE"
        client.load_model("b")
        assert client.is_model_ready("b")
        names = {m["name"]: m.get("state") for m in client.get_model_repository_index(as_json=True)["models"]}
        assert names["b"] == "READY"
        client.unload_model("b")
        with pytest.raises(InferenceServerException, match="unknown model 'b'"):
            client.get_model_metadata("b")
        with pytest.raises(InferenceServerException, match="invalid model name"):
            client.load_model("../evil")
        with pytest.raises(InferenceServerException, match="load parameters are not supported"):
            client.load_model("b", config='{"max_batch_size": 4}')
        assert client.is_model_ready("a")
    finally:
        client.close()


def _endless_paced_request(url: str) -> tuple[str, str, bytes]:
    """The host and port of ``url``, and the raw bytes of a request that keeps the "paced" model
    (``models.value_paced_model``) running until its client leaves."""
    import raw_http

    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1e9]}]}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    return host, port, raw_http.request_bytes("POST", "/v2/models/paced/infer", headers, body)


def test_every_status_route_answers_while_a_version_drains(tmp_path: Path) -> None:
    """A version that drains its in-flight requests (UNLOADING) is reported, never a 500: TF Serving's
    status says UNLOADING, V2 and the index say so too (an outside attack saw 500 + KeyError)."""

    models.write_version(tmp_path, "paced", 1, models.value_paced_model("paced", 64))
    config_file = tmp_path / "config.json"
    entry = {"name": "paced", "base_path": "paced", "instance_count": 1, "max_batch_size": 0}
    config_file.write_text(json.dumps({"model_config_list": [entry]}))
    settings = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="explicit", load_models=("paced",)
    )
    server = start_in_background(load_config(config_file), settings, Catalog(config_file=config_file))
    url = server.http_url
    host, port, request = _endless_paced_request(url)
    # two endless runs on one instance: one runs, one waits; both keep the version draining until they leave
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]
    unload = threading.Thread(target=lambda: httpx.post(f"{url}/v2/repository/models/paced/unload", timeout=60))
    try:
        for sock in held:
            sock.sendall(request)
        wait_until(lambda: queue_depth(url, "paced") == 1, what="one request running, one waiting")
        unload.start()
        wait_until(lambda: ("paced", "UNLOADING") in {(e["name"], e["state"]) for e in index(server)}, what="drain")
        for path in ("/v1/models/paced", "/v1/models/paced/versions/1"):
            response = httpx.get(f"{url}{path}")
            assert response.status_code == 200, response.text
            (status,) = response.json()["model_version_status"]
            assert (status["version"], status["state"]) == ("1", "UNLOADING"), status
            assert status["status"]["error_code"] == "OK"
        for path in ("/v2/models/paced/ready", "/v2/models/paced/versions/1/ready"):
            assert httpx.get(f"{url}{path}").status_code == 503, path  # not ready: strict readiness
        assert httpx.get(f"{url}/v2/models/paced").status_code in (200, 503)
    finally:
        for sock in held:
            sock.close()  # the clients leave: their runs are stopped, the drain ends
        if unload.ident is not None:
            unload.join(timeout=60)
        server.stop()


def test_unloading_a_busy_model_holds_up_no_other_model_nor_readiness(tmp_path: Path) -> None:
    """While a busy model drains for its unload, other models load and unload at once, and the server
    stays ready (strict readiness leaves out a model being unloaded on purpose); a load of the draining
    model itself waits for the drain to end, then loads it again. Before (outside attack rt21): the
    unload held the manager's lock through the drain, so an unrelated load waited up to --drain-timeout,
    and /v2/health/ready answered 503 for the whole drain."""

    models.write_version(tmp_path, "paced", 1, models.value_paced_model("paced", 64))
    for name, offset in (("other", 1.0), ("late", 2.0)):
        models.write_version(tmp_path, name, 1, models.offset_model(offset))
    config_file = tmp_path / "config.json"
    entries = [
        {"name": "paced", "base_path": "paced", "instance_count": 1, "max_batch_size": 0},
        {"name": "other", "base_path": "other", "max_batch_size": 4},
        {"name": "late", "base_path": "late", "max_batch_size": 4},
    ]
    config_file.write_text(json.dumps({"model_config_list": entries}))
    settings = ServerSettings(
        http_port=0,
        grpc_port=0,
        log_level="warning",
        model_control_mode="explicit",
        load_models=("paced", "other"),
        drain_timeout=60,
    )
    server = start_in_background(load_config(config_file), settings, Catalog(config_file=config_file))
    url = server.http_url
    host, port, request = _endless_paced_request(url)
    answered: dict[str, tuple[int, float]] = {}  # what -> (status, time.monotonic() of the answer)

    def control(what: str, path: str) -> None:
        status = httpx.post(f"{url}/v2/repository/models/{path}", timeout=120).status_code
        answered[what] = (status, time.monotonic())

    # two endless runs on one instance: one runs, one waits; both keep the version draining until they leave
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]
    unload = threading.Thread(target=control, args=("unload paced", "paced/unload"))
    reload = threading.Thread(target=control, args=("load paced", "paced/load"))
    try:
        for sock in held:
            sock.sendall(request)
        wait_until(lambda: queue_depth(url, "paced") == 1, what="one request running, one waiting")
        unload.start()
        wait_until(lambda: ("paced", "UNLOADING") in {(e["name"], e["state"]) for e in index(server)}, what="drain")
        reload.start()  # waits for the drain
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200  # before: 503 for the whole drain
        assert httpx.post(f"{url}/v2/repository/models/late/load", timeout=10).status_code == 200  # before: waited
        assert httpx.post(f"{url}/v2/models/late/infer", json=infer_body()).json()["outputs"][0]["data"] == [2.0]
        assert httpx.post(f"{url}/v2/repository/models/other/unload", timeout=10).status_code == 200
        assert httpx.post(f"{url}/v2/models/other/infer", json=infer_body()).status_code == 404
        assert ("paced", "UNLOADING") in {(e["name"], e["state"]) for e in index(server)}  # still draining
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{url}/v2/models/paced/ready").status_code == 503  # the model itself is not ready
        assert not answered
    finally:
        for sock in held:
            sock.close()  # the clients leave: their runs are stopped, the drain ends
        for thread in (unload, reload):
            if thread.ident is not None:
                thread.join(timeout=60)
    try:
        assert answered["unload paced"][0] == 200
        assert answered["load paced"][0] == 200
        assert answered["unload paced"][1] <= answered["load paced"][1]  # the load waited for the drain
        assert ("paced", "READY") in {(e["name"], e["state"]) for e in index(server)}
        small = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
        assert httpx.post(f"{url}/v2/models/paced/infer", json=small).json()["outputs"][0]["data"] == [1.0]
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    finally:
        server.stop()


def test_a_model_removed_from_the_config_drains_without_holding_up_the_rest_of_the_config(tmp_path: Path) -> None:
    """In poll mode (and on SIGHUP), a model removed from the config drained inside the reload, under the
    manager's lock: every other change waited for it, up to --drain-timeout per removed model (outside
    attack rt25 F6: 4 busy clients of the removed model delayed a new version by 24 s). Now the rest of
    the config is applied at once; a removed model that comes back while it drains loads again once its
    drain has ended."""
    models.write_version(tmp_path, "paced", 1, models.value_paced_model("paced", 64))
    for name, offset in (("other", 1.0), ("late", 2.0), ("later", 3.0)):
        models.write_version(tmp_path, name, 1, models.offset_model(offset))
    config_file = tmp_path / "config.json"
    paced = {"name": "paced", "base_path": "paced", "instance_count": 1, "max_batch_size": 0}
    other = {"name": "other", "base_path": "other"}

    def configure(*entries: dict[str, Any]) -> None:
        partial = config_file.with_suffix(".tmp")
        partial.write_text(json.dumps({"model_config_list": list(entries)}))
        partial.replace(config_file)

    def states() -> set[tuple[str, str]]:
        return {(e["name"], e["state"]) for e in index(server)}

    def ready(name: str) -> bool:
        return httpx.get(f"{url}/v2/models/{name}/ready").status_code == 200

    configure(paced, other)
    settings = ServerSettings(
        http_port=0,
        grpc_port=0,
        log_level="warning",
        model_control_mode="poll",
        repository_poll_secs=0.1,
        drain_timeout=120,
    )
    server = start_in_background(load_config(config_file), settings, Catalog(config_file=config_file))
    url = server.http_url
    host, port, request = _endless_paced_request(url)
    # two endless runs on one instance: one runs, one waits; both keep the version draining until they leave
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(request)
        wait_until(lambda: queue_depth(url, "paced") == 1, what="one request running, one waiting")
        configure(other, {"name": "late", "base_path": "late"})  # paced removed, a new model added
        wait_until(lambda: ("paced", "UNLOADING") in states(), what="the removed model draining")
        wait_until(lambda: ready("late"), what="the new model, while the removed one drains")  # before: after it
        assert ("paced", "UNLOADING") in states()
        assert httpx.post(f"{url}/v2/models/late/infer", json=infer_body()).json()["outputs"][0]["data"] == [2.0]
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        # it comes back while it drains: it waits for its own drain; the other changes go on
        configure(paced, other, {"name": "late", "base_path": "late"}, {"name": "later", "base_path": "later"})
        wait_until(lambda: ready("later"), what="another new model, while the returning one drains")
        assert ("paced", "UNLOADING") in states()
        assert not ready("paced")
    finally:
        for sock in held:
            sock.close()  # the clients leave: their runs are stopped, the drain ends
    try:
        wait_until(lambda: ready("paced"), what="the returning model, loaded again after its drain")
        small = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
        assert httpx.post(f"{url}/v2/models/paced/infer", json=small).json()["outputs"][0]["data"] == [1.0]
        assert {("paced", "READY"), ("other", "READY"), ("late", "READY"), ("later", "READY")} <= states()
    finally:
        server.stop()


def test_a_failed_load_says_why_every_time_logs_once_and_tf_status_agrees_with_the_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A retried failed load answered only "no version to serve", each failure logged an ERROR (a control
    client could repeat it at will), and TF Serving's status said "unknown model" while the index showed
    the version UNAVAILABLE with its reason (outside attack rt7 F9)."""
    repo = tmp_path / "repo"
    models.write_version(repo, "a", 1, models.offset_model(1.0))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf")
    settings = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="explicit", load_models=("a",)
    )
    catalog = Catalog(repository=repo)
    server = start_in_background(catalog.read(), settings, catalog)
    url = server.http_url
    try:
        with caplog.at_level(logging.INFO, logger="onnxserve.core.manager"):
            for _ in range(3):
                response = httpx.post(f"{url}/v2/repository/models/broken/load", timeout=30)
                assert response.status_code == 400, response.text
                message = response.json()["error"]
                assert "failed to load: version 1: <path>: not an ONNX model" in message, message
                assert str(tmp_path) not in message
        failures = [r for r in caplog.records if r.name == "onnxserve.core.manager" and "failed to" in r.getMessage()]
        assert [r.levelno for r in failures] == [logging.ERROR, logging.INFO, logging.INFO]
        (entry,) = [e for e in index(server) if e["name"] == "broken"]
        assert (entry["version"], entry["state"]) == ("1", "UNAVAILABLE")
        for path in ("/v1/models/broken", "/v1/models/broken/versions/1"):
            response = httpx.get(f"{url}{path}")
            assert response.status_code == 200, response.text
            (status,) = response.json()["model_version_status"]
            assert (status["version"], status["state"]) == ("1", "END")
            assert status["status"] == {"error_code": "UNAVAILABLE", "error_message": entry["reason"]}
            assert "not an ONNX model" in entry["reason"]
            assert str(tmp_path) not in entry["reason"]
        assert httpx.get(f"{url}/v1/models/broken/versions/2").status_code == 404
        assert httpx.get(f"{url}/v1/models/nothing").status_code == 404
        assert httpx.post(f"{url}/v2/models/a/infer", json=infer_body()).status_code == 200
    finally:
        server.stop()
