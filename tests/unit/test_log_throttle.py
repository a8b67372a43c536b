"""The one throttle of repeated warnings (server.log_throttle)."""

from __future__ import annotations

from onnxserve.server.log_throttle import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_event_is_reported_at_once() -> None:
    assert LogThrottle(10, Clock()).due() == 1


def test_events_within_the_interval_are_counted_into_the_next_report() -> None:
    clock = Clock()
    throttle = LogThrottle(10, clock)
    assert throttle.due() == 1
    for _ in range(5):
        clock.now += 1
        assert throttle.due() == 0
    clock.now += 5  # 10 s after the first report: this event and the 5 before it
    assert throttle.due() == 6
    assert throttle.due() == 0
    clock.now += 9.9
    assert throttle.due() == 0
    clock.now += 0.1
    assert throttle.due() == 3


def test_a_quiet_spell_reports_the_next_event_alone() -> None:
    clock = Clock()
    throttle = LogThrottle(10, clock)
    throttle.due()
    clock.now += 3600
    assert throttle.due() == 1
