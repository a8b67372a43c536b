"""A text model version's measured time per token and which requests in flight keep their place (core.pace)."""

from __future__ import annotations

import pytest

from onnxserve.core.pace import (
    ADMISSION_MARGIN,
    MEASURED_RUNS,
    MEASURED_TOKENS,
    MEASUREMENT_SECONDS,
    Pace,
    _finishes,
    bucket,
)

TOKEN_S = 1e-4  # seconds per token measured below: a chunk of 32 x 256 tokens takes 0.8192 s


def _measured() -> Pace:
    pace = Pace()
    for seconds in (0.8192, 0.8192, 5.0):  # the median decides: one slow run does not
        pace.observed(32, 256, seconds)
    return pace


def test_length_buckets_double_from_16_tokens() -> None:
    assert [bucket(n) for n in (0, 1, 16, 17, 32, 33, 256, 512)] == [0, 0, 0, 1, 1, 2, 4, 5]


def test_nothing_is_refused_before_a_measurement_exists() -> None:
    pace = Pace()
    pace.observed(1, MEASURED_TOKENS - 1, 10.0)  # too small to measure: its fixed costs would make a token look dear
    shares = [pace.admit([(32, 256)] * 64, deadline=1.0) for _ in range(24)]
    assert all(pace.fits(share, now=0.0) == (True, 0.0) for share in shares)
    for _ in range(MEASURED_RUNS - 1):  # nor after fewer runs than that: one slow first run decides nothing
        pace.observed(32, 256, 0.8192)
    assert all(pace.fits(share, now=0.0) == (True, 0.0) for share in shares)
    pace.observed(32, 256, 0.8192)
    assert not pace.fits(shares[0], now=0.0)[0]


def test_the_median_time_per_token_of_a_length_is_kept_and_shorter_lengths_lend_theirs() -> None:
    pace = _measured()
    assert pace.per_token(bucket(256)) == pytest.approx(TOKEN_S)
    assert pace.per_token(bucket(512)) == pytest.approx(TOKEN_S)  # a longer row borrows the cheaper token
    assert pace.per_token(bucket(16)) == 0.0  # a shorter one has nothing cheaper to borrow: counts as nothing


def test_executions_beside_each_other_count_as_the_versions_throughput() -> None:
    pace = Pace()
    pace.observed(32, 256, 2 * 0.8192, beside=2)  # two at once, each twice as long
    assert pace.per_token(bucket(256)) == pytest.approx(TOKEN_S)


def test_requests_taking_turns_finish_as_under_processor_sharing() -> None:
    assert _finishes([1.0, 1.0, 1.0]) == [3.0, 3.0, 3.0]
    assert _finishes([2.0, 1.0]) == [3.0, 2.0]  # the short one is done after 1 s of each


def test_the_oldest_requests_that_fit_keep_their_place_and_the_newest_give_way() -> None:
    # rt11's shape: many equal requests at once, each 8 chunks (6.55 s of work), a limit of 20 s.
    pace = _measured()
    shares = [pace.admit([(32, 256)] * 8, deadline=20.0) for _ in range(6)]
    kept = [pace.fits(share, now=0.0)[0] for share in shares]
    assert kept == [True, True, True, False, False, False]  # 3 x 6.55 s fit 20 s, 4 do not
    assert pace.fits(shares[2], now=0.0)[1] == pytest.approx(3 * 8 * 32 * 256 * TOKEN_S)


def test_a_request_that_cannot_finish_even_alone_does_not_keep_its_place() -> None:
    pace = _measured()
    share = pace.admit([(32, 256)] * 8, deadline=5.0)
    assert pace.fits(share, now=0.0) == (False, pytest.approx(8 * 0.8192))


def test_a_newer_request_that_would_make_an_older_one_late_gives_way() -> None:
    pace = _measured()
    older = pace.admit([(32, 256)] * 8, deadline=14.0)  # 6.55 s of work: fits beside one other, not two
    middle = pace.admit([(32, 256)] * 8, deadline=100.0)
    newer = pace.admit([(32, 256)] * 8, deadline=100.0)  # fits its own limit easily
    assert pace.fits(older, now=0.0)[0]
    assert pace.fits(middle, now=0.0)[0]
    assert not pace.fits(newer, now=0.0)[0]
    pace.leave(older)
    assert pace.fits(newer, now=0.0)[0]


def test_finished_chunks_leave_the_estimate_and_requests_without_a_limit_always_fit() -> None:
    pace = _measured()
    share = pace.admit([(32, 256)] * 8, deadline=4.0)
    assert not pace.fits(share, now=0.0)[0]
    for _ in range(4):
        share.add(32, 256, -1)  # four chunks done
    assert pace.fits(share, now=0.0) == (True, pytest.approx(4 * 0.8192))
    assert pace.fits(pace.admit([(32, 256)] * 1000, deadline=None), now=0.0)[0]


def test_admission_keeps_a_margin_beside_others_but_a_request_alone_may_use_all_its_time() -> None:
    pace = _measured()
    alone = pace.admit([(32, 256)] * 8, deadline=7.0)  # 6.55 s of work
    assert pace.fits(alone, now=0.0, margin=ADMISSION_MARGIN)[0]
    pace.leave(alone)
    older = pace.admit([(32, 256)] * 4, deadline=100.0)
    newer = pace.admit([(32, 256)] * 4, deadline=7.0)  # 6.55 s beside the older one: within 7 s, not 5.25 s
    assert pace.fits(newer, now=0.0)[0]
    assert not pace.fits(newer, now=0.0, margin=ADMISSION_MARGIN)[0]
    assert pace.fits(older, now=0.0, margin=ADMISSION_MARGIN)[0]


def test_measurements_age_so_a_slow_phase_does_not_refuse_for_good() -> None:
    """Measured while the machine was loaded, a time per token refused requests that fit for as long as no
    new execution ran, and a refused request runs none: for good (outside attack rt14 F1)."""
    now = [0.0]
    pace = Pace(clock=lambda: now[0])
    for _ in range(MEASURED_RUNS):
        pace.observed(32, 256, 10 * 0.8192)  # ten times slower than the machine at rest
    share = pace.admit([(32, 256)] * 4, deadline=5.0)  # 3.3 s of work at rest, 33 s as measured
    assert not pace.fits(share, now=0.0)[0]
    now[0] = MEASUREMENT_SECONDS + 1  # no execution since: the measurements are too old to decide
    assert pace.measured() == 0
    assert pace.fits(share, now=0.0) == (True, 0.0)


def test_each_clients_oldest_request_keeps_its_place_before_anyones_second() -> None:
    """A client retrying each refusal at once took almost every admission from a client sending the same
    requests now and then (outside attack rt14 F2)."""
    pace = _measured()
    greedy = [pace.admit([(32, 256)] * 4, deadline=12.0, client="greedy") for _ in range(4)]  # 3.3 s each
    other = pace.admit([(32, 256)] * 4, deadline=12.0, client="other")
    assert pace.shares() == [greedy[0], other, greedy[1], greedy[2], greedy[3]]
    assert pace.fits(other, now=0.0, margin=ADMISSION_MARGIN)[0]  # 6.6 s beside greedy's first (fifth: 16.4 s)
    assert pace.fits(greedy[1], now=0.0)[0]  # 9.8 s
    assert not any(pace.fits(share, now=0.0)[0] for share in greedy[2:])  # the greedy client's last give way


def test_an_older_request_with_a_limit_too_tight_to_share_does_not_keep_newer_ones_out() -> None:
    """One client sending one request at a time with a limit of 1.4 times its work kept every other
    client's large requests out: each would have made it late (outside attack rt14 F7)."""
    pace = _measured()
    tight = pace.admit([(32, 256)] * 2, deadline=1.4 * 2 * 0.8192, client="tight")  # 1.64 s of work
    honest = pace.admit([(32, 256)] * 4, deadline=60.0, client="honest")
    assert pace.fits(honest, now=0.0, margin=ADMISSION_MARGIN)[0]  # the tight one may end in its time-out
    roomy = pace.admit([(32, 256)] * 2, deadline=3 * 2 * 0.8192, client="roomy")  # three times its work
    later = pace.admit([(32, 256)] * 8, deadline=60.0, client="later")
    pace.leave(tight)
    assert pace.fits(roomy, now=0.0)[0]
    assert not pace.fits(later, now=0.0, margin=ADMISSION_MARGIN)[0]  # it would make the roomy one late
