"""The budget of calls each client address may leave unanswered in grpc-core (server.abandoned_calls)."""

from __future__ import annotations

import pytest

from onnxserve.server import abandoned_calls
from onnxserve.server.abandoned_calls import AbandonedCalls


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_barred_past_its_burst_until_the_bucket_refills() -> None:
    clock = Clock()
    budget = AbandonedCalls(rate=500, burst=500, clock=clock)
    assert not budget.charge("10.0.0.1", 300)
    assert not budget.charge("10.0.0.1", 200)  # the whole burst, not past it
    assert budget.charge("10.0.0.1", 100)
    assert budget.barred("10.0.0.1")
    assert not budget.barred("10.0.0.2")  # another address keeps its own budget
    clock.now += 0.1  # 50 back: still 50 in debt
    assert budget.barred("10.0.0.1")
    clock.now += 0.2  # 100 back: above zero
    assert not budget.barred("10.0.0.1")
    clock.now += 10
    assert not budget.barred("10.0.0.1")
    assert len(budget) == 0  # refilled: forgotten


def test_an_address_abandoning_at_the_rate_stays_served() -> None:
    clock = Clock()
    budget = AbandonedCalls(rate=500, burst=500, clock=clock)
    for _ in range(100):
        clock.now += 0.1
        assert not budget.charge("10.0.0.1", 50)  # 500 a second
    assert budget.charge("10.0.0.1", 600)


def test_nothing_abandoned_costs_nothing() -> None:
    budget = AbandonedCalls(rate=500, burst=500, clock=Clock())
    assert not budget.charge("10.0.0.1", 0)
    assert len(budget) == 0


def test_the_addresses_followed_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many addresses each abandoning a few calls: those refilled are forgotten; when all are in debt, the
    one counted longest ago goes."""
    monkeypatch.setattr(abandoned_calls, "MOST_ADDRESSES", 8)
    clock = Clock()
    budget = AbandonedCalls(rate=500, burst=500, clock=clock)
    for k in range(20):
        clock.now += 0.01
        budget.charge(f"10.0.0.{k}", 10)
    assert len(budget) <= 8
    for k in range(20):
        clock.now += 0.001
        budget.charge(f"10.0.1.{k}", 1000)
    assert len(budget) == 8
    assert budget.barred("10.0.1.19")
    assert not budget.barred("10.0.1.0")  # forgotten


def test_a_rate_of_zero_is_no_limit() -> None:
    """``--grpc-max-abandoned-calls 0``: nothing is counted, nobody barred."""
    budget = AbandonedCalls(rate=0, burst=0, clock=Clock())
    assert not budget.charge("10.0.0.1", 10**6)
    assert not budget.barred("10.0.0.1")
    assert len(budget) == 0
