"""Cheap runs on the event loop (``core.inline_runs``): which graphs qualify, which requests run inline,
and that an inline run answers, fails and counts exactly as a run on the instance thread does."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from onnxserve.config import ModelConfig
from onnxserve.core import inline_runs
from onnxserve.core.datatypes import from_v2 as dt
from onnxserve.core.inline_runs import InlineRuns, why_not_shape_bounded
from onnxserve.core.registry import ModelRegistry, ModelVersion, ServedModel, load_version
from onnxserve.core.repository import VersionFolder
from onnxserve.core.service import InferenceService
from onnxserve.core.types import InferenceRequest, InferenceResponse, Tensor
from onnxserve.errors import DeadlineExceededError, InvalidInputError


def _range_model() -> onnx.ModelProto:
    """A Range whose length is an input value: a client picks its size."""
    return models.parse(
        """
        ranged (float[1] x) => (float[n] y) {
            top = ReduceMax <keepdims = 0> (x)
            zero = Constant <value = float {0.0}> ()
            one = Constant <value = float {1.0}> ()
            y = Range(zero, top, one)
        }
        """
    )


def _reshape_model(shape_from_values: bool) -> onnx.ModelProto:
    if shape_from_values:
        return models.parse("flat (float[n, 4] x, int64[2] s) => (float[a, b] y) { y = Reshape(x, s) }")
    return models.parse(
        """
        flat (float[n, 4] x) => (float[m] y) {
            dims = Shape(x)
            zero = Constant <value = int64 {0}> ()
            rows = Gather <axis = 0> (dims, zero)
            four = Constant <value = int64[1] {4}> ()
            axes = Constant <value = int64[1] {0}> ()
            rows1 = Unsqueeze(rows, axes)
            size = Mul(rows1, four)
            y = Reshape(x, size)
        }
        """
    )


def _gather_model() -> onnx.ModelProto:
    """Picks elements of a constant table by index: an index out of range fails on its value."""
    return models.parse(
        """
        pick (int64[n] i) => (float[n] y) {
            table = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
            y = Gather <axis = 0> (table, i)
        }
        """
    )


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (models.add_model(), None),
        (_reshape_model(False), None),
        (models.value_paced_model("paced", 8), "operator Loop"),
        (_range_model(), "operator Range"),
        (_reshape_model(True), "operator Reshape"),
        (models.parse("up (string[n] s) => (string[n] t) { t = Identity(s) }"), "BYTES"),
    ],
    ids=["add", "reshape-from-shape", "loop", "range-from-values", "reshape-from-values", "strings"],
)
def test_only_graphs_whose_cost_their_input_shapes_bound_may_run_inline(
    model: onnx.ModelProto, reason: str | None
) -> None:
    found = why_not_shape_bounded(model)
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert reason in found


def test_a_shape_set_runs_inline_only_while_its_recent_runs_were_fast() -> None:
    runs = InlineRuns(100, "m")
    fast, slow, outlier = 40_000, 250_000, 100_000 * inline_runs.OUTLIER + 1
    assert not runs.allows("a")  # never run: the thread first
    runs.observed("a", fast)
    assert runs.allows("a")
    assert not runs.allows("b")
    # Runs that got slower: back to the thread once most recent runs are over the limit ...
    for _ in range(inline_runs.WINDOW // 2 + 1):
        runs.ran_inline("a", slow)
    assert not runs.allows("a")
    # ... until most are fast again.
    for _ in range(inline_runs.WINDOW // 2 + 1):
        runs.observed("a", fast)
    assert runs.allows("a")
    # One run far over the limit keeps the shapes on the thread while it is remembered.
    runs.observed("a", outlier)
    for _ in range(inline_runs.WINDOW - 1):
        runs.observed("a", fast)
        assert not runs.allows("a")
    runs.observed("a", fast)
    assert runs.allows("a")
    assert not runs.off
    # Three such runs on the loop itself: never inline again.
    for _ in range(inline_runs.STRIKES):
        runs.ran_inline("a", outlier)
    assert runs.off
    for _ in range(inline_runs.WINDOW):
        runs.observed("a", fast)
    assert not runs.allows("a")


def test_strikes_far_apart_do_not_turn_inline_runs_off() -> None:
    runs = InlineRuns(100, "m")
    for _ in range(inline_runs.STRIKES):
        runs.ran_inline("a", 100_000 * inline_runs.OUTLIER + 1)
        for _ in range(inline_runs.STRIKE_SPAN):
            runs.ran_inline("a", 1_000)
    assert not runs.off


def test_the_shape_sets_remembered_are_bounded() -> None:
    runs = InlineRuns(100, "m")
    for key in range(inline_runs.SHAPE_SETS + 10):
        runs.observed(key, 1_000)
    assert not runs.allows(0)  # forgotten: runs on the thread first again
    assert runs.allows(inline_runs.SHAPE_SETS + 9)
    assert len(runs._runs) == inline_runs.SHAPE_SETS


def _service(
    tmp_path: Path, name: str, model: onnx.ModelProto, **config: object
) -> tuple[InferenceService, ModelVersion]:
    models.write_version(tmp_path, name, 1, model)
    model_config = ModelConfig.model_validate({"name": name, "base_path": tmp_path / name, **config})
    version = load_version(model_config, VersionFolder(1, tmp_path / name / "1"))
    registry = ModelRegistry({name: ServedModel(model_config, {1: version})})
    return InferenceService(registry, threads=1), version


def _add_request(rows: int = 1, **parameters: int) -> InferenceRequest:
    a = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    return InferenceRequest(
        model_name="add",
        inputs=[Tensor("a", dt("FP32"), a), Tensor("b", dt("FP32"), a * 2)],
        parameters=dict(parameters),
    )


def _inline_count(version: ModelVersion) -> int:
    inline = getattr(version.scheduler, "inline", None)
    assert inline is not None
    return int(inline.executions)


GENEROUS_US = 1000
"""The limit used where a test needs runs to go inline: this machine is loaded, and a run on the instance
thread is timed by the wall clock."""

TRIES = 30


async def _requests_until_inline(
    service: InferenceService, version: ModelVersion, request: InferenceRequest
) -> InferenceResponse | None:
    """Send ``request`` until it runs inline (at most ``TRIES`` times): the answer of the one that did."""
    before = _inline_count(version)
    for _ in range(TRIES):
        response = await service.infer(request)
        if _inline_count(version) > before:
            assert _inline_count(version) == before + 1
            return response
    return None


def test_a_tiny_model_runs_inline_once_its_shapes_ran_on_the_thread(tmp_path: Path) -> None:
    service, add = _service(tmp_path, "add", models.add_model(), inline_run_us=GENEROUS_US)

    async def scenario() -> None:
        first = await service.infer(_add_request())
        assert _inline_count(add) == 0  # a shape set not seen yet: on the thread
        inline = await _requests_until_inline(service, add, _add_request())
        assert inline is not None
        for response in (first, inline):
            assert response.outputs[0].data.tolist() == (np.arange(16) * 3).reshape(1, 16).tolist()
        # Other shapes: the thread first.
        await service.infer(_add_request(rows=3))
        assert _inline_count(add) == 1
        assert (await _requests_until_inline(service, add, _add_request(rows=3))) is not None
        counted = _inline_count(add)
        # Another execution of the model running: this one waits its turn on the thread.
        await asyncio.gather(service.infer(_add_request(rows=5000)), service.infer(_add_request()))
        assert _inline_count(add) == counted
        # A request whose time limit is about to pass runs where the deadline can interrupt its wait.
        with contextlib.suppress(DeadlineExceededError):  # the loaded machine may let 0.5 ms pass
            await service.infer(_add_request(timeout=500))
        assert _inline_count(add) == counted

    try:
        asyncio.run(scenario())
        stats = add.stats.snapshot()  # inline runs are counted as executions and requests, as others
        assert stats.execution_count >= stats.success.count >= 6
    finally:
        service.close()


@pytest.mark.parametrize("config", [{"inline_run_us": 0}, {"inline_run_us": 1}], ids=["off", "limit-1us"])
def test_a_model_never_runs_inline_when_turned_off_or_its_runs_take_longer(
    tmp_path: Path, config: dict[str, int]
) -> None:
    service, add = _service(tmp_path, "add", models.add_model(), **config)

    async def scenario() -> None:
        for _ in range(5):
            await service.infer(_add_request())

    try:
        asyncio.run(scenario())
        inline = getattr(add.scheduler, "inline", None)
        assert inline is None if config["inline_run_us"] == 0 else inline.executions == 0
        assert add.stats.snapshot().execution_count == 5
    finally:
        service.close()


def test_a_model_with_a_loop_never_runs_inline(tmp_path: Path) -> None:
    service, paced = _service(tmp_path, "paced", models.value_paced_model("paced", 8))
    request = InferenceRequest(model_name="paced", inputs=[Tensor("x", dt("FP32"), np.zeros((1, 1), dtype=np.float32))])

    async def scenario() -> None:
        for _ in range(5):
            await service.infer(request)

    try:
        asyncio.run(scenario())
        assert getattr(paced.scheduler, "inline", "absent") is None
        assert paced.session.why_not_inline is not None
        assert "Loop" in paced.session.why_not_inline
    finally:
        service.close()


def _pick(*indices: int) -> InferenceRequest:
    return InferenceRequest(model_name="pick", inputs=[Tensor("i", dt("INT64"), np.array(indices, dtype=np.int64))])


def _refusal(service: InferenceService, version: ModelVersion) -> str:
    """Good requests until one runs inline (where allowed), then one with an index out of range."""

    async def scenario() -> str:
        await service.infer(_pick(0, 1))
        if getattr(version.scheduler, "inline", None) is not None:
            assert (await _requests_until_inline(service, version, _pick(0, 1))) is not None
        with pytest.raises(InvalidInputError) as caught:
            await service.infer(_pick(0, 7))
        return caught.value.message

    return asyncio.run(scenario())


def test_a_run_that_fails_inline_fails_as_on_the_thread(tmp_path: Path) -> None:
    inline_service, inline_version = _service(tmp_path / "on", "pick", _gather_model(), inline_run_us=GENEROUS_US)
    thread_service, thread_version = _service(tmp_path / "off", "pick", _gather_model(), inline_run_us=0)
    try:
        inline_message = _refusal(inline_service, inline_version)
        thread_message = _refusal(thread_service, thread_version)
        assert _inline_count(inline_version) == 2  # a good request and the bad one
        assert inline_message == thread_message
        assert "could not run on these input values" in inline_message
        for version in (inline_version, thread_version):
            stats = version.stats.snapshot()
            assert stats.fail.count == 1
            assert stats.execution_count == stats.success.count  # the failed run is not an execution
        # The model keeps answering inline after the failure.
        asyncio.run(inline_service.infer(_pick(0, 3)))
        assert _inline_count(inline_version) == 3
    finally:
        inline_service.close()
        thread_service.close()
