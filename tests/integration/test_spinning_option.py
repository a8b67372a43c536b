"""``session_options.intra_op_allow_spinning`` / ``inter_op_allow_spinning``: ONNX Runtime's thread-pool
spin-waiting, set as session config entries; read back from the live session of a served model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import models
from onnxserve.config import parse_config
from onnxserve.core.runtime import session_options
from onnxserve.errors import ConfigError
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

INTRA = "session.intra_op.allow_spinning"
INTER = "session.inter_op.allow_spinning"


def document(**options: Any) -> dict[str, Any]:
    return {"model_config_list": [{"name": "add", "base_path": "add", "session_options": options}]}


@pytest.mark.parametrize(("intra", "inter"), [(False, None), (True, False), (None, True)])
def test_the_config_accepts_it_and_sets_the_entries(tmp_path: Path, intra: bool | None, inter: bool | None) -> None:
    options: dict[str, Any] = {}
    if intra is not None:
        options["intra_op_allow_spinning"] = intra
    if inter is not None:
        options["inter_op_allow_spinning"] = inter
    config = parse_config(document(**options), "test", tmp_path)
    built = session_options(config.model_config_list[0].session_options)
    for key, value in ((INTRA, intra), (INTER, inter)):
        if value is None:  # unset: ONNX Runtime's default, no entry at all
            with pytest.raises(RuntimeError):
                built.get_session_config_entry(key)
        else:
            assert built.get_session_config_entry(key) == ("1" if value else "0")


@pytest.mark.parametrize("value", ["sometimes", 2, "0", 1.5, [True]])
@pytest.mark.parametrize("field", ["intra_op_allow_spinning", "inter_op_allow_spinning"])
def test_a_bad_value_is_refused_naming_the_field(tmp_path: Path, field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document(**{field: value}), "config.json", tmp_path)
    message = caught.value.message
    assert f"config.json: model_config_list[0].session_options.{field}:" in message
    assert message.endswith("must be true or false")


def test_an_unknown_session_option_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document(allow_spinning=False), "config.json", tmp_path)
    assert "session_options.allow_spinning: unknown key" in caught.value.message


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningServer]:
    models.write_version(tmp_path, "add", 1, models.add_model())
    options = {"intra_op_num_threads": 2, "intra_op_allow_spinning": False, "inter_op_allow_spinning": True}
    config = parse_config(document(**options), "test", tmp_path)
    server = start_in_background(
        config, ServerSettings(http_port=0, grpc_port=0, inference_threads=4, log_level="warning")
    )
    yield server
    server.stop()


def test_a_model_loads_and_serves_with_spinning_off(served: RunningServer) -> None:
    version = served.service.registry.resolve("add", None)
    for session in version.scheduler.pool.sessions:
        assert session.ort_options.get_session_config_entry(INTRA) == "0"
        assert session.ort_options.get_session_config_entry(INTER) == "1"
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 0.5, dtype=np.float32)
    body = {
        "inputs": [
            {"name": name, "shape": [1, 16], "datatype": "FP32", "data": array.ravel().tolist()}
            for name, array in (("a", a), ("b", b))
        ]
    }
    response = httpx.post(f"{served.http_url}/v2/models/add/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    got = {o["name"]: o["data"] for o in response.json()["outputs"]}
    np.testing.assert_allclose(got["sum"], (a + b).ravel())
