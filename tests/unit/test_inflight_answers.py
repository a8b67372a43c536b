"""Answers in the in-flight budget: what one request's Hold counts, and when it refuses."""

from __future__ import annotations

from onnxserve.errors import ResourceExhaustedError
from onnxserve.protocols.inflight import SMALL_ANSWER_BYTES, Hold, InflightBytes

MiB = 1024 * 1024


def test_answers_leave_one_grpc_message_free_for_requests() -> None:
    budget = InflightBytes(256 * MiB, keep_free=64 * MiB)
    assert budget.answer_room == 192 * MiB
    holds = []
    for _ in range(4):
        assert budget.reserve(100)  # each request's message, received
        holds.append(Hold(budget, body=100))
    for hold in holds[:3]:
        assert hold.hold_answer(60 * MiB) is None
    refused = holds[3].hold_answer(60 * MiB)
    assert isinstance(refused, ResourceExhaustedError)
    assert "this answer of 62914560 bytes does not fit now; retry later" in refused.message
    assert budget.reserve(64 * MiB - 400)  # a gRPC message still fits beside the answers
    budget.release(64 * MiB - 400)
    holds[0].release_answer()  # sent: its message stays held until the call ends
    assert budget.held == 2 * 60 * MiB + 4 * 100
    assert holds[3].hold_answer(60 * MiB) is None
    for hold in holds:
        hold.release()
    assert budget.held == 0


def test_the_answer_is_counted_again_at_its_encoded_size() -> None:
    budget = InflightBytes(256 * MiB, keep_free=64 * MiB)
    hold = Hold(budget)
    hold.hold_answer(16 * MiB)  # its tensors, before encoding
    hold.hold_answer(40 * MiB)  # the JSON it became
    assert budget.held == 40 * MiB
    hold.hold_answer(8 * MiB)
    assert budget.held == 8 * MiB
    hold.release()
    assert budget.held == 0


def test_small_answers_are_not_counted_and_a_large_one_alone_may_take_the_whole_budget() -> None:
    budget = InflightBytes(8 * MiB, keep_free=64 * MiB)
    assert budget.answer_room == 0
    hold = Hold(budget, body=10)
    budget.held += 10
    hold.hold_answer(SMALL_ANSWER_BYTES - 1)
    assert budget.held == 10
    hold.hold_answer(100 * MiB)  # alone in the budget: sent, counted as the whole budget
    assert budget.held == 8 * MiB
    other = Hold(budget)
    assert isinstance(other.hold_answer(SMALL_ANSWER_BYTES), ResourceExhaustedError)
    assert other.hold_answer(1024) is None  # small answers are still served
    hold.release()
    assert budget.held == 0


def test_without_a_budget_nothing_is_counted() -> None:
    budget = InflightBytes(0)
    hold = Hold(budget)
    hold.hold_answer(10**12)
    assert budget.held == 0
    Hold(None).hold_answer(10**12)
