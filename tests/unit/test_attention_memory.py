"""A text model's executions bounded in memory (core.attention_memory): the attention shape read from the
graph, the estimate, the server-wide room, and the batcher and chunking cutting within one execution's bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from onnxserve.core.attention_memory import (
    HEAP_SLACK,
    SCORE_COPIES,
    TOKEN_COPIES,
    ExecutionBound,
    ExecutionMemory,
    ExecutionRoom,
    attention_shape,
)
from onnxserve.core.chunking import chunk_bounds
from onnxserve.core.runtime import ModelSession


def test_the_exported_tiny_berts_heads_and_widest_layer_are_read_from_its_graph(tiny_text_version: Path) -> None:
    # tests/tiny_text_models.py: 2 heads, hidden size 32, feed-forward 64; a real export, its attention
    # reshaped from shapes computed in the graph (Shape, Concat), not constants.
    session = ModelSession(tiny_text_version / "model.onnx")
    assert session.attention == (2, 64)


def _fused_attention(heads: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 24], [0.0] * 192)
    node = helper.make_node("Attention", ["x", "w"], ["y"], domain="com.microsoft", num_heads=heads)
    graph = helper.make_graph([node], "g", [x], [y], [w])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_a_fused_attention_op_tells_its_heads() -> None:
    found = attention_shape(_fused_attention(6))
    assert found is not None
    assert found[0] == 6
    # ONNX's shape inference knows nothing after the contrib op; its packed QKV weight tells the width.
    assert found[1] == 24


def test_the_widest_layer_after_a_contrib_op_is_read() -> None:
    # ``optimize --fuse``: a feed-forward layer after ONNX Runtime's SkipLayerNormalization, whose output
    # ONNX's own shape inference cannot tell; on main the widest layer was read as the input's 8.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])
    weights = [
        helper.make_tensor("gamma", TensorProto.FLOAT, [8], [1.0] * 8),
        helper.make_tensor("up", TensorProto.FLOAT, [8, 32], [0.0] * 256),
        helper.make_tensor("down", TensorProto.FLOAT, [32, 8], [0.0] * 256),
    ]
    nodes = [
        helper.make_node("Attention", ["x", "up_qkv"], ["a"], domain="com.microsoft", num_heads=2),
        helper.make_node("SkipLayerNormalization", ["a", "x", "gamma"], ["n"], domain="com.microsoft"),
        helper.make_node("MatMul", ["n", "up"], ["wide"]),
        helper.make_node("Relu", ["wide"], ["r"]),
        helper.make_node("MatMul", ["r", "down"], ["y"]),
    ]
    weights.append(helper.make_tensor("up_qkv", TensorProto.FLOAT, [8, 24], [0.0] * 192))
    graph = helper.make_graph(nodes, "g", [x], [y], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    assert attention_shape(helper.make_model(graph, opset_imports=opsets)) == (2, 32)


def test_a_graph_without_attention_has_no_estimate() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    assert attention_shape(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])) is None
    # A Softmax that is not over token pairs (a classifier's) tells no heads either.
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
    assert attention_shape(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])) is None


def test_the_estimate_grows_with_the_square_of_the_tokens() -> None:
    memory = ExecutionMemory(heads=12, widest=1536)
    live = 4 * 32 * 256 * (TOKEN_COPIES * 1536 + SCORE_COPIES * 12 * 256)
    assert memory.bytes(32, 256) == live + HEAP_SLACK
    # A small execution counts three times its live tensors (the heaps' blocks), a large one HEAP_SLACK more.
    small = 4 * 8 * 32 * (TOKEN_COPIES * 1536 + SCORE_COPIES * 12 * 32)
    assert memory.bytes(8, 32) == 3 * small
    # The same tokens (rows x tokens) in longer rows take more: 32 x 256 against 64 x 128.
    assert memory.bytes(32, 256) > memory.bytes(64, 128)
    # A fixed sequence length pads every row to it.
    assert ExecutionMemory(12, 1536, fixed_length=128).bytes(4, 3) == memory.bytes(4, 128)


def test_chunks_of_long_rows_are_cut_smaller_than_the_token_budget_alone_would() -> None:
    bound = ExecutionBound(ExecutionMemory(heads=12, widest=1536), 256 * 1024**2, ExecutionRoom())
    rows_fitting = max(r for r in range(1, 33) if bound.fits(r, 256))
    assert rows_fitting < 32  # the token budget alone would run the 32 rows of 256 as one
    assert chunk_bounds([256] * 32, 8192) == [(0, 32)]
    chunks = chunk_bounds([256] * 32, 8192, bound)
    assert all(stop - start <= rows_fitting for start, stop in chunks)
    assert chunks[0] == (0, rows_fitting)
    assert chunks[-1][1] == 32
    # Short rows still go by the token budget: 64 rows of 128 tokens fit.
    assert chunk_bounds([16] * 256, 8192, bound) == [(0, 256)]
    # A single row above the bound is never cut.
    assert chunk_bounds([100_000, 5], 10**9, bound) == [(0, 1), (1, 2)]


async def _settle() -> None:
    """Let the tasks that were woken run (a few turns of the event loop, no time)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_room_lets_executions_in_order_and_an_oversized_one_alone() -> None:
    async def scenario() -> list[str]:
        room = ExecutionRoom(100)
        order: list[str] = []

        async def run(name: str, size: int, hold: asyncio.Event) -> None:
            await room.take(size)
            order.append(name)
            await hold.wait()
            room.give(size)

        first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
        await room.take(0)  # nothing to hold: never waits
        tasks = [asyncio.create_task(run("a", 60, first))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(run("huge", 500, second)))  # more than the room: waits until it is empty
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(run("small", 10, third)))  # fits, but waits its turn behind "huge"
        await asyncio.sleep(0)
        assert order == ["a"]
        assert room.used == 60
        first.set()
        await _settle()
        assert order == ["a", "huge"]
        assert room.used == 500
        second.set()
        await _settle()
        third.set()
        await asyncio.gather(*tasks)
        assert room.used == 0
        return order

    assert asyncio.run(scenario()) == ["a", "huge", "small"]


def test_a_caller_that_leaves_while_waiting_for_room_frees_its_place() -> None:
    async def scenario() -> None:
        room = ExecutionRoom(100)
        await room.take(80)
        waiting = asyncio.create_task(room.take(50))
        await asyncio.sleep(0)
        behind = asyncio.create_task(room.take(20))
        await asyncio.sleep(0)
        assert not behind.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.wait_for(behind, 1)  # the 20 fit beside the 80 once the 50 left the line
        assert room.used == 100
        room.give(100)
        assert room.used == 0

    asyncio.run(scenario())
