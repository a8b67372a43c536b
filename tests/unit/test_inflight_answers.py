"""Answers in the in-flight budget: what one request's Hold counts, and when it refuses."""

from __future__ import annotations

import pytest

from onnxserve.errors import ResourceExhaustedError
from onnxserve.protocols.inflight import SMALL_ANSWER_BYTES, Hold, InflightBytes

MiB = 1024 * 1024


def test_answers_leave_one_grpc_message_free_for_requests() -> None:
    budget = InflightBytes(256 * MiB, keep_free=64 * MiB)
    assert budget.answer_room == 176 * MiB  # a message of 64 MiB, and small requests' 16 MiB
    holds = []
    for _ in range(5):
        assert budget.reserve(100)  # each request's message, received
        holds.append(Hold(budget, body=100))
    for hold in holds[:3]:
        assert hold.hold_answer(55 * MiB) is None
    refused = holds[3].hold_answer(55 * MiB)
    assert isinstance(refused, ResourceExhaustedError)
    assert "this answer of 57671680 bytes does not fit now; retry later" in refused.message
    assert holds[4].hold_answer(20 * 1024) is None  # a small answer still fits, past the answers' room
    holds[4].release_answer()
    assert budget.reserve(64 * MiB - 500)  # a gRPC message still fits beside the answers
    budget.release(64 * MiB - 500)
    holds[0].release_answer()  # sent: its message stays held until the call ends
    assert budget.held == 2 * 55 * MiB + 5 * 100
    assert holds[3].hold_answer(55 * MiB) is None
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


def test_large_requests_leave_the_last_sixteenth_of_the_budget_to_small_ones() -> None:
    """Eight addresses each sending 64 MiB messages kept the budget full and small honest calls were refused
    (outside attack rt57): large requests do not take the last 1/16, unless nothing else is held."""
    budget = InflightBytes(256 * MiB)
    assert budget.large_room == 240 * MiB
    assert budget.reserve(64 * MiB)
    assert budget.reserve(64 * MiB)
    assert budget.reserve(64 * MiB)
    assert not budget.reserve(60 * MiB)  # into the small requests' part
    assert budget.reserve(48 * MiB)  # up to it
    assert not budget.reserve(2 * MiB)  # a large request's piece: what it holds in all counts
    assert not budget.reserve(MiB, whole=3 * MiB)
    assert budget.reserve(MiB)  # a small request
    hold = Hold(budget)
    with pytest.raises(ResourceExhaustedError, match="--max-inflight-bytes"):
        hold.grow_to(2 * MiB)
    budget.release(budget.held)
    assert budget.reserve(256 * MiB)  # alone, a request may still take the whole budget
