"""How a request's rows are cut into chunks within a token budget (core.chunking)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxserve.core.chunking import _concatenate, _Limits, chunk_bounds, joined_bytes
from onnxserve.core.types import payload_bytes
from onnxserve.errors import TooLargeError


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


def test_a_short_chunks_token_level_output_is_counted_at_the_joined_length() -> None:
    # Outside attack: 10,000 empty texts then one long one, asking for last_hidden_state. The first chunk's
    # rows are 2 tokens long, but the join pads them to the long row's 256: 10,001 x 256 x 384 x 4 bytes
    # (3.9 GB) were built before the size check. The first chunk must show it.
    limits = _Limits("m", 64 * 1024**2, rows=10_001, widest=256)
    first = {"last_hidden_state": np.zeros((4096, 2, 384), np.float32), "embedding": np.zeros((4096, 384), np.float32)}
    with pytest.raises(TooLargeError, match="--max-response-bytes"):
        limits.count(first, 4096, longest=2)


def test_outputs_that_are_not_token_level_are_counted_at_their_size() -> None:
    limits = _Limits("m", 64 * 1024**2, rows=10_001, widest=256)
    limits.count({"embedding": np.zeros((4096, 384), np.float32)}, 4096, longest=2)
    assert limits.bytes == 4096 * 384 * 4


def test_the_joined_size_is_computed_from_the_shapes_before_joining() -> None:
    parts = [np.zeros((3, 2, 5), np.float32), np.zeros((1, 7, 5), np.float32)]
    assert joined_bytes(parts) == _concatenate(parts).nbytes == 4 * 7 * 5 * 4
    strings = [np.array([[b"ab", b"c"]], dtype=object), np.array([[b"x", b"y", b"zz"]], dtype=object)]
    assert joined_bytes(strings) == payload_bytes(_concatenate(strings))


def test_padding_of_a_bytes_output_is_counted_as_empty_elements() -> None:
    limits = _Limits("m", 10**9, rows=2, widest=4)
    limits.count({"tokens": np.array([[b"abcdef"]], dtype=object)}, 1, longest=1)
    joined = _concatenate([np.array([[b"abcdef"]], dtype=object), np.array([[b"", b"", b"", b""]], dtype=object)])
    assert limits.bytes == payload_bytes(joined[:1])
    assert limits.elements == joined[:1].size
