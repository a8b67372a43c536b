"""The one throttle of repeated log lines (onnxserve.log_throttle), used by every layer."""

from __future__ import annotations

import pytest

from onnxserve.log_throttle import EVERY_SECONDS, LogThrottle, LogThrottles, log_unexpected, set_every


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


def test_a_report_of_several_events_says_how_many() -> None:
    throttle = LogThrottle(10, Clock())
    assert throttle.note(1) == ""
    assert throttle.note(20338) == " (20,338 such since the last line; reported every 10 s at most)"


def test_each_key_has_its_throttle_and_the_least_recently_used_key_leaves_past_the_bound() -> None:
    clock = Clock()
    throttles = LogThrottles(keys=2, every=10, clock=clock)
    assert throttles.of("a").due() == 1
    assert throttles.of("b").due() == 1  # a key of its own: reported at once
    assert throttles.of("a").due() == 0
    assert throttles.of("c").due() == 1  # "b" leaves (least recently used)
    assert throttles.of("a").due() == 0
    assert throttles.of("b").due() == 1  # a fresh throttle: reported at once again


def test_throttles_without_an_interval_of_their_own_follow_the_servers_setting() -> None:
    clock = Clock()
    made_before = LogThrottle(clock=clock)
    own = LogThrottle(10, clock)
    keyed = LogThrottles(clock=clock)
    try:
        set_every(2)  # --log-repeat-seconds 2
        for throttle in (made_before, own, keyed.of("a")):
            assert throttle.due() == 1
        clock.now += 2
        assert made_before.due() == 1
        assert keyed.of("a").due() == 1
        assert own.due() == 0  # its own 10 s
        assert made_before.note(5) == " (5 such since the last line; reported every 2 s at most)"
        with pytest.raises(ValueError, match="positive"):
            set_every(0)
    finally:
        set_every(EVERY_SECONDS)
    assert made_before.every == EVERY_SECONDS


def test_unexpected_errors_log_their_traceback_once_an_interval_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outside attack rt35: a request that met a bug logged 42 lines of traceback each time, 1.76 MB of log a
    second from one client. The traceback is logged once an interval per error type and place."""
    import logging
    import time

    logger = logging.getLogger("test_unexpected")
    try:
        set_every(0.2)
        with caplog.at_level(logging.ERROR, logger="test_unexpected"):
            for _ in range(50):
                try:
                    {}["sentence_embedding"]
                except KeyError:
                    log_unexpected(logger, "http", "unexpected error while handling %s", "POST /v2/models/m/infer")
            try:
                raise ValueError("another kind")
            except ValueError:
                log_unexpected(logger, "http", "unexpected error while handling %s", "POST /x")
            time.sleep(0.25)
            try:
                {}["sentence_embedding"]
            except KeyError:
                log_unexpected(logger, "http", "unexpected error while handling %s", "POST /v2/models/m/infer")
    finally:
        set_every(EVERY_SECONDS)
    records = caplog.records
    assert len(records) == 3  # before: 51
    assert all(r.exc_info is not None for r in records)  # each with its traceback
    assert records[0].getMessage() == "unexpected error while handling POST /v2/models/m/infer"
    assert records[1].getMessage() == "unexpected error while handling POST /x"  # a kind of its own
    assert "(50 such since the last line; reported every 0.2 s at most)" in records[2].getMessage()
