"""A served version's external data file overwritten in place changes nothing the server serves.

Outside attack rt25 F1: ONNX Runtime mapped a served model's external data file and read the weights from
the mapping for as long as the version served. The operator's ``cp`` over it (which truncates first) killed
the whole server with SIGBUS at the next request that read a page past the new end, no log line; a
same-size overwrite (``rsync --inplace``) made the version answer with the new weights under the old graph.
The server now maps a private copy of the external data, made at load and removed once the session exists
(``core.external_data``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
from harness import serve_capped
from onnx import TensorProto, helper, numpy_helper

ELEMENTS = 4 * 1024 * 1024  # 16 MiB of float32 weights: the last ones lie far past a 1 MB cut
CUT_BYTES = 1_000_000


def gather_model(folder: Path, guarded: bool) -> None:
    """``y = Gather(W, idx)``, W = arange(ELEMENTS) in ``w.bin``; ``guarded`` adds an integer division, so the
    server serves a guarded copy in memory (``core.division_guard``) that reads the same external data."""
    nodes = [helper.make_node("Gather", ["W", "idx"], ["y"], axis=0)]
    inputs = [helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])]
    if guarded:
        nodes.append(helper.make_node("Div", ["idx", "d"], ["q"]))
        inputs.append(helper.make_tensor_value_info("d", TensorProto.INT64, ["k"]))
        outputs.append(helper.make_tensor_value_info("q", TensorProto.INT64, ["k"]))
    weights = numpy_helper.from_array(np.arange(ELEMENTS, dtype=np.float32), "W")
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, [weights]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save_model(model, folder / "model.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)


def infer(url: str, indices: list[int], guarded: bool) -> requests.Response:
    inputs = [{"name": "idx", "shape": [len(indices)], "datatype": "INT64", "data": indices}]
    if guarded:
        inputs.append({"name": "d", "shape": [len(indices)], "datatype": "INT64", "data": [1] * len(indices)})
    return requests.post(f"{url}/v2/models/eg/infer", json={"inputs": inputs}, timeout=60)


def y_values(answer: requests.Response) -> list[float]:
    assert answer.status_code == 200, answer.text
    return next(o["data"] for o in answer.json()["outputs"] if o["name"] == "y")


@pytest.mark.parametrize("guarded", [False, True], ids=["from-file", "guarded-copy"])
def test_an_external_data_file_overwritten_in_place_changes_nothing_served(tmp_path: Path, guarded: bool) -> None:
    repository = tmp_path / "repository"
    data = repository / "eg" / "1" / "w.bin"
    gather_model(data.parent, guarded)
    last = ELEMENTS - 1
    with serve_capped(repository) as server:
        assert y_values(infer(server.http_url, [3, last], guarded)) == [3.0, float(last)]
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        assert str(data) not in maps  # before: the file was mapped for as long as the version served

        # rsync --inplace: new weights of the same size written over the old ones
        with data.open("r+b") as file:
            file.write((np.arange(ELEMENTS, dtype=np.float32) * 2 + 1).tobytes())
        assert y_values(infer(server.http_url, [3, last], guarded)) == [3.0, float(last)]  # before: 7.0, ...

        # cp's first step: the file cut short; the last element's page is past its end
        data.write_bytes(b"")
        assert y_values(infer(server.http_url, [5, last], guarded)) == [5.0, float(last)]  # before: SIGBUS
        with data.open("r+b") as file:
            file.truncate(CUT_BYTES)
        assert y_values(infer(server.http_url, [last], guarded)) == [float(last)]
        assert server.alive()
        assert requests.get(f"{server.http_url}/v2/health/ready", timeout=60).status_code == 200
