"""How a request's rows are cut into chunks within a token budget (core.chunking)."""

from __future__ import annotations

from onnxserve.core.chunking import chunk_bounds


def test_rows_within_the_budget_are_one_chunk() -> None:
    assert chunk_bounds([512] * 16, 8192) == [(0, 16)]


def test_equal_rows_are_cut_into_chunks_of_the_budget_in_order() -> None:
    assert chunk_bounds([512] * 64, 8192) == [(0, 16), (16, 32), (32, 48), (48, 64)]


def test_a_chunk_is_counted_at_its_longest_row() -> None:
    # 3 rows of 10 fit 40; a row of 30 makes the chunk 4 x 30 = 120 > 40 at once, so it starts its own.
    assert chunk_bounds([10, 10, 10, 30, 5], 40) == [(0, 3), (3, 4), (4, 5)]


def test_a_single_row_above_the_budget_is_never_cut() -> None:
    assert chunk_bounds([100, 100], 50) == [(0, 1), (1, 2)]
    assert chunk_bounds([], 50) == []
