"""The JSON decoding workers are bounded (issue 14, outside attack rt4, findings 3 and 4).

A large JSON body is decoded in a worker process (``offload``). The attack found: a worker that ran out
of memory answered 500 (its error came back without a message); a 60 MB body of 20 million empty lists
made a worker crawl at its memory cap for minutes, past ``--request-timeout`` and after its client had
gone, so two such bodies kept honest large bodies waiting; workers outlived a killed server; V2 REST took
a million inputs and millions of parameter keys. Asserted against real servers under memory caps: each
of these is refused with its documented status and message, the worker concerned is stopped, and the
server keeps serving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import psutil
import pytest
import requests
from harness import CappedServer, alive, cpu_seconds, held_stream, serve_capped

import models
from onnxserve.protocols.entry_count import MAX_ENTRIES
from onnxserve.protocols.offload import PROCESS_BYTES, WATCHDOG_NAME
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from waiting import wait_until

MIB = 1024 * 1024
V2 = "/v2/models/total/infer"
TFS = "/v1/models/total:predict"
TOO_MANY = f"at most {MAX_ENTRIES} in any list or object"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root: Path = tmp_path_factory.mktemp("json-workers")
    models.write_version(root, "total", 1, models.total_model())
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[CappedServer]:
    with serve_capped(repo) as running:
        yield running


def post(server: CappedServer, path: str, body: bytes) -> requests.Response:
    return requests.post(server.http_url + path, data=body, headers={"Content-Type": "application/json"}, timeout=300)


def small_sum(server: CappedServer) -> float:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.5]}]}
    response = requests.post(server.http_url + V2, json=doc, timeout=60)
    assert response.status_code == 200, response.text
    return float(response.json()["outputs"][0]["data"][0])


def flat_v2_body(count: int, value: bytes = b"0.1234567") -> bytes:
    data = b",".join([value] * count)
    return b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d],"data":[%s]}]}' % (count, data)


def tfs_nan_body(mib: float) -> bytes:
    count = int(mib * MIB) // 11
    return b'{"inputs": [NaN' + b", 0.1234567" * (count - 1) + b"]}"


# --- finding 3a: a worker's refusal keeps its kind and message ------------------------------------------


def test_a_worker_out_of_memory_answers_503_with_its_message(repo: Path) -> None:
    # the server's data segment capped at 1 GiB caps its workers there too (offload.WORKER_DATA_BYTES)
    with serve_capped(repo, "--max-request-bytes", str(200 * MIB), data_cap_bytes=1024 * MIB) as server:
        body = flat_v2_body(30_000_000, b"1e1")  # 120 MB: 30 M floats, over a gigabyte as Python objects
        refused = post(server, V2, body)
        assert refused.status_code == 503, refused.text[:300]
        assert "the worker decoding this large JSON body ran out of memory" in refused.json()["error"]
        assert refused.headers["Retry-After"] == "1"
        assert "AttributeError" not in server.log()
        assert small_sum(server) == 6.5
        ok = post(server, V2, flat_v2_body(PROCESS_BYTES // 10 + 1000))
        assert ok.status_code == 200, ok.text[:300]


# --- finding 3b: the decode is bounded in time, by its client and in size ------------------------------


def test_the_request_timeout_covers_the_decode_and_stops_its_worker(repo: Path) -> None:
    with serve_capped(repo, "--request-timeout", "0.5") as server:
        late = post(server, TFS, tfs_nan_body(60))  # seconds of parsing (NaN: the standard parser)
        assert late.status_code == 504, late.text[:300]
        assert "passed while its large JSON body waited for a decoding worker or was being decoded" in late.text
        wait_until(lambda: server.workers() == [], timeout=60, what="the timed-out body's worker to be stopped")
        assert small_sum(server) == 6.5
        assert server.alive()


def test_a_client_that_leaves_has_its_worker_stopped(server: CappedServer) -> None:
    body = tfs_nan_body(60)
    head = (
        f"POST {TFS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    before = {p.pid for p in server.workers()}
    with socket.create_connection((server.host, server.http_port), timeout=60) as sock:
        sock.sendall(head.encode("ascii") + body)
        wait_until(lambda: {p.pid for p in server.workers()} - before != set(), timeout=60, what="a worker")
        busy = [p for p in server.workers() if p.pid not in before]
    # gone, not merely idle: a finished worker would stay for the next body
    wait_until(lambda: not any(alive(p) for p in busy), timeout=60, what="the left body's worker to be stopped")
    assert small_sum(server) == 6.5
    assert server.alive()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (V2, b'{"inputs":[{"name":"x","datatype":"FP32","shape":[0],"data":[' + b"[]," * 5_000_000 + b"[]]}]}"),
        (TFS, b'{"instances":[NaN' + b",{}" * 5_000_000 + b"]}"),
    ],
    ids=["v2-empty-lists", "tfs-empty-objects"],
)
def test_a_body_of_millions_of_empty_containers_is_refused_before_parsing(
    server: CappedServer, path: str, body: bytes
) -> None:
    refused = post(server, path, body)
    assert refused.status_code == 400, refused.text[:300]
    assert "arrays and objects ('[' and '{'); at most 4194304 are decoded" in refused.json()["error"]
    assert small_sum(server) == 6.5


# --- finding 3c: workers die with the server -------------------------------------------------------------


def test_workers_die_with_a_killed_server_even_when_they_cannot_run(repo: Path) -> None:
    with serve_capped(repo) as server:
        served = post(server, V2, flat_v2_body(PROCESS_BYTES // 10 + 1000))
        assert served.status_code == 200, served.text[:300]
        started = server.descendants()  # the fork server, the resource tracker, a worker and its watchdog
        decoding = [p for p in server.workers() if p.name() != WATCHDOG_NAME]
        assert decoding
        for process in decoding:
            os.kill(process.pid, signal.SIGSTOP)  # like a parse in C: no Python thread of the worker runs
        server.process.kill()
        server.process.wait(timeout=30)
        try:
            wait_until(lambda: not any(alive(p) for p in started), timeout=60, what="the workers to exit")
        finally:
            for process in started:
                if alive(process):
                    process.kill()


def test_a_sigterm_with_stopped_workers_exits_promptly(repo: Path) -> None:
    """Outside attack: JSON workers stopped with SIGSTOP while their clients stayed connected made a
    SIGTERM take 30 s (uvicorn's graceful wait, for an answer that could never come). A worker that is
    stopped when the server stops is killed, its body refused, and the server exits at once."""
    server = serve_capped(repo)
    started: list[psutil.Process] = []
    try:
        body = tfs_nan_body(16)  # a second of parsing (NaN: the standard parser); stopped long before
        head = (
            f"POST {TFS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection((server.host, server.http_port), timeout=60) as sock:
            sock.sendall(head.encode("ascii") + body)
            wait_until(lambda: server.workers() != [], timeout=60, what="a busy worker")
            started = server.descendants()
            for process in server.workers():
                if process.name() != WATCHDOG_NAME:
                    os.kill(process.pid, signal.SIGSTOP)
            code, seconds = server.terminated()
            answer = sock.recv(65536)
        print(f"SIGTERM to exit: {seconds:.2f} s")
        assert code == 0, server.log()[-2000:]
        assert seconds < 10, f"the server took {seconds:.1f} s to exit (30 s before)"
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
        assert b"the server is shutting down; this large JSON body was not decoded" in answer
        wait_until(lambda: not any(alive(p) for p in started), timeout=30, what="the workers to exit")
    finally:
        for process in started:
            if alive(process):
                process.kill()
        server.stop()


# --- finding 4: entries per list or object ---------------------------------------------------------------


def _v2_inputs(count: int) -> bytes:
    item = b'{"name":"x%d","datatype":"FP32","shape":[1],"data":[1]}'
    return b'{"inputs":[' + b",".join(item % i for i in range(count)) + b"]}"


def _v2_with(**extra: object) -> bytes:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], **extra}
    return orjson.dumps(doc)


MANY = {f"k{i}": 1 for i in range(MAX_ENTRIES + 1)}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (V2, _v2_inputs(MAX_ENTRIES + 1), "'inputs' of the inference request holds 65537 entries"),
        (V2, _v2_inputs(1_000_000), "'inputs' of the inference request holds 1000000 entries"),
        (V2, _v2_with(parameters=MANY), "'parameters' of the inference request holds 65537 entries"),
        (V2, _v2_with(outputs=[{"name": "total"}] * (MAX_ENTRIES + 1)), "'outputs' of the inference request"),
        (
            V2,
            orjson.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": MANY}]}
            ),
            "'parameters' of input 'x' holds 65537 entries",
        ),
        (V2, _v2_with(outputs=[{"name": "total", "parameters": MANY}]), "'parameters' of output 'total' holds"),
        (TFS, orjson.dumps({"inputs": {f"x{i}": [1.0] for i in range(MAX_ENTRIES + 1)}}), "'inputs' holds 65537"),
        (TFS, orjson.dumps({"instances": [{f"x{i}": 1.0 for i in range(MAX_ENTRIES + 1)}]}), "instance 0 holds"),
    ],
    ids=[
        "v2-inputs",
        "v2-million-inputs",
        "v2-parameters",
        "v2-outputs",
        "v2-input-parameters",
        "v2-output-parameters",
        "tfs-inputs",
        "tfs-instance-keys",
    ],
)
def test_more_than_max_entries_in_a_list_or_object_is_refused(
    server: CappedServer, path: str, body: bytes, message: str
) -> None:
    refused = post(server, path, body)
    assert refused.status_code == 400, refused.text[:300]
    error = refused.json()["error"]
    assert message in error, error[:300]
    assert TOO_MANY in error
    assert small_sum(server) == 6.5


def test_max_entries_inputs_are_not_refused_for_their_count(server: CappedServer) -> None:
    answer = post(server, V2, _v2_inputs(MAX_ENTRIES))
    assert answer.status_code == 400, answer.text[:300]
    assert "unknown input 'x0'" in answer.json()["error"]  # decoded: the model names its only input 'x'


# --- exit hang: a worker killed while it sends its result ------------------------------------------------


def _sending(worker: psutil.Process) -> bool:
    """Whether ``worker`` is blocked writing to a pipe (its result, which nobody reads)."""
    try:
        return "pipe_write" in Path(f"/proc/{worker.pid}/wchan").read_text()
    except OSError:
        return False


def test_a_worker_killed_while_decoding_is_refused_503_and_the_next_body_served(server: CappedServer) -> None:
    """A worker killed in the middle of a parse (``kill -9``, the OOM killer): its body is refused with 503
    + Retry-After, a new worker decodes the next body, and the server keeps serving."""
    body = flat_v2_body(8_000_000, b"1")  # 16 MB of short numbers: about a second of parsing
    answers: list[requests.Response] = []
    sender = threading.Thread(target=lambda: answers.append(post(server, V2, body)), daemon=True)
    before = {p.pid: cpu_seconds(p) for p in server.workers()}  # idle workers of earlier tests
    sender.start()
    decoding: list[psutil.Process] = []

    def decoding_started() -> bool:  # a worker that has parsed for 50 ms more than before
        grown = [p for p in server.workers() if cpu_seconds(p) - before.get(p.pid, 0.0) > 0.05]
        decoding[:] = [p for p in grown if p.name() != WATCHDOG_NAME]
        return bool(decoding)

    wait_until(decoding_started, timeout=60, what="a worker decoding the body")
    for process in decoding:
        process.kill()
    sender.join(timeout=60)
    assert answers, "the request got no answer"
    refused = answers[0]
    assert refused.status_code == 503, refused.text[:300]
    assert "the worker decoding this large JSON body stopped (killed, or out of memory)" in refused.json()["error"]
    assert refused.headers["Retry-After"] == "1"
    served = post(server, V2, flat_v2_body(PROCESS_BYTES // 10 + 1000))
    assert served.status_code == 200, served.text[:300]
    assert small_sum(server) == 6.5
    assert server.alive()


def test_a_worker_killed_while_idle_is_not_handed_the_next_body(server: CappedServer) -> None:
    """An idle worker killed between bodies (the OOM killer picks the largest process, often a worker that
    holds its last body's memory) made the next, unrelated body fail with 503 (outside attack rt14 F5)."""
    body = flat_v2_body(PROCESS_BYTES // 10 + 1000)
    assert post(server, V2, body).status_code == 200
    idle = [p for p in server.workers() if p.name() != WATCHDOG_NAME]
    assert idle
    for process in idle:
        process.kill()
    psutil.wait_procs(idle, timeout=10)
    for _ in range(3):
        served = post(server, V2, body)
        assert served.status_code == 200, served.text[:300]
    assert server.alive()


def test_a_worker_killed_while_sending_its_result_is_refused_and_the_server_exits(repo: Path) -> None:
    """A session saw the server hang at exit under load: a worker killed (by the drain, a timed-out
    body, or the OOM killer) while it sent its decoded arrays left the pool's manager thread waiting
    forever for the rest of the message (the pipe's writing end was still open in the server), so that
    body's request got no answer until its time limit (504) and the interpreter waited forever at exit to
    join that thread. Made deterministic: the server is stopped (SIGSTOP) so that the worker blocks in the
    middle of sending its result, the worker is killed, the server continued."""
    server = serve_capped(repo, "--request-timeout", "30")
    started: list[psutil.Process] = []
    try:
        body = flat_v2_body(8_000_000, b"1")  # 16 MB of short numbers: 32 MB of FP32 arrays to send back
        answers: list[requests.Response] = []
        sender = threading.Thread(target=lambda: answers.append(post(server, V2, body)), daemon=True)
        sender.start()
        decoding: list[psutil.Process] = []

        def decoding_started() -> bool:
            decoding[:] = [p for p in server.workers() if p.name() != WATCHDOG_NAME and cpu_seconds(p) > 0.1]
            return bool(decoding)

        wait_until(decoding_started, timeout=60, what="a worker decoding the body")
        worker = decoding[0]
        started = server.descendants()
        server.process.send_signal(signal.SIGSTOP)  # nothing in the server reads the worker's result now
        try:
            wait_until(lambda: _sending(worker), timeout=60, what="the worker to block sending its result")
            worker.kill()
            worker.wait(timeout=30)
        finally:
            server.process.send_signal(signal.SIGCONT)
        sender.join(timeout=60)
        assert answers, "the request got no answer"
        refused = answers[0]
        assert refused.status_code == 503, refused.text[:300]  # was 504 after the 30 s time limit
        assert "the worker decoding this large JSON body stopped" in refused.json()["error"]
        assert small_sum(server) == 6.5
        served = post(server, V2, flat_v2_body(PROCESS_BYTES // 10 + 1000))
        assert served.status_code == 200, served.text[:300]
        code, seconds = server.terminated(30, " (it waited forever)")
        print(f"SIGTERM to exit: {seconds:.2f} s")
        assert code == 0, server.log()[-2000:]
    finally:
        for process in started:
            if alive(process):
                process.kill()
        server.stop()


def _open_stream(server: CappedServer, opened: threading.Event, stop: threading.Event) -> None:
    """A ModelStreamInfer stream that sends one small request, reads its answer, and stays open."""
    request = pb.ModelInferRequest(model_name="total")
    request.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1, 2, 3.5])
    with contextlib.suppress(grpc.RpcError):
        for _ in held_stream(server.grpc_target, request, stop):
            opened.set()


def test_sigterm_while_dense_bodies_are_decoded_exits_within_the_drain(repo: Path) -> None:
    """SIGTERM while clients keep sending number-dense bodies (decoded in the workers) and a gRPC stream
    is open: the process exits within its drain timeout (plus a few seconds of stopping), every request
    is answered 200 or 503 (never 500), and the workers are gone. Before, bodies arriving during the drain
    started new workers, were cut when the listeners closed (500) and gRPC's stop waited 10 s more for the
    open stream (12 s with a 2 s drain; a worker killed while it sent its result: forever)."""
    drain = 2.0
    server = serve_capped(repo, "--drain-timeout", str(drain))
    started: list[psutil.Process] = []
    stop = threading.Event()
    opened = threading.Event()
    statuses: list[int] = []
    errors: list[str] = []
    body = flat_v2_body(PROCESS_BYTES // 2 - 64, b"1")  # just under 4 MiB, two million values: to a worker

    def flood() -> None:
        for _ in range(40):
            if stop.is_set():
                return
            try:
                answer = post(server, V2, body)
            except requests.ConnectionError:
                return  # the listener closed
            statuses.append(answer.status_code)
            if answer.status_code != 200:
                errors.append(answer.text[:200])

    stream = threading.Thread(target=_open_stream, args=(server, opened, stop), daemon=True)
    threads = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
    try:
        stream.start()
        assert opened.wait(60), "the gRPC stream did not open"
        for thread in threads:
            thread.start()
        wait_until(lambda: statuses.count(200) >= 2 and server.workers() != [], timeout=120, what="bodies decoded")
        started = server.descendants()
        code, seconds = server.terminated()
        print(f"SIGTERM to exit: {seconds:.2f} s with a {drain} s drain; answers {sorted(set(statuses))}")
        assert code == 0, server.log()[-2000:]
        assert seconds < drain + 8, f"the server took {seconds:.1f} s to exit (12 s before)"
        for thread in threads:
            thread.join(timeout=60)
        assert set(statuses) <= {200, 503}, errors
        assert all("shutting down" in error for error in errors), errors
        assert "Exception in ASGI application" not in server.log()
        wait_until(lambda: not any(alive(p) for p in started), timeout=30, what="the workers to exit")
    finally:
        stop.set()
        for process in started:
            if alive(process):
                process.kill()
        server.stop()


def _decoded_in_workers(server: CappedServer) -> int:
    metrics = requests.get(server.http_url + "/metrics", timeout=30).text
    for line in metrics.splitlines():
        if line.startswith('onnxserve_json_bodies_decoded_total{where="worker"}'):
            return int(float(line.split()[-1]))
    return 0


def test_a_sigterm_while_a_worker_is_being_started_exits_promptly(repo: Path) -> None:
    """A stress run saw a drain wait 19 s before the listeners closed: it stopped the workers, and one was
    still being started (the fork server's first start imports the codecs, slow on a loaded machine).
    Made deterministic with the fork server stopped (SIGSTOP): before, the drain waited for that start
    forever and the server never exited. Now the fork server is killed, the body being handed over and
    the one in a (stopped) worker are answered 503, and the server exits within its drain."""
    drain = 2.0
    server = serve_capped(repo, "--drain-timeout", str(drain))
    started: list[psutil.Process] = []
    try:
        body = flat_v2_body(PROCESS_BYTES // 10 + 1000)
        assert post(server, V2, body).status_code == 200  # starts the fork server and one worker (kept idle)
        started = server.descendants()
        fork_server = [p for p in started if p.ppid() == server.process.pid and "forkserver" in " ".join(p.cmdline())]
        assert len(fork_server) == 1, [p.cmdline() for p in started]
        for process in server.workers():
            process.suspend()  # the idle worker takes a body and never answers
        fork_server[0].suspend()  # and a second body waits for a new worker's start
        answers: list[requests.Response] = []
        senders = [
            threading.Thread(target=lambda: answers.append(post(server, V2, body)), daemon=True) for _ in range(2)
        ]
        for sender in senders:
            sender.start()
        wait_until(lambda: _decoded_in_workers(server) >= 3, timeout=60, what="both bodies handed to the workers")
        code, seconds = server.terminated(60, " (it waited forever)")
        print(f"SIGTERM to exit: {seconds:.2f} s with a {drain} s drain")
        assert code == 0, server.log()[-2000:]
        assert seconds < drain + 8, f"the server took {seconds:.1f} s to exit"
        for sender in senders:
            sender.join(timeout=30)
        assert [a.status_code for a in answers] == [503, 503], [a.text[:200] for a in answers]
        # refused as the drain's, or (killed with the fork server while the drain began) as a lost worker's
        said = [a.text[:300] for a in answers]
        reasons = ("the server is shutting down; this large JSON body was not decoded", "the worker decoding this")
        assert all(any(reason in a.text for reason in reasons) for a in answers), said
    finally:
        for process in started:
            if alive(process):
                process.kill()
        server.stop()
