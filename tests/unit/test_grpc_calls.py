"""The calls of one gRPC connection and their flow-control windows, as the front follows them (server.grpc_calls)."""

from __future__ import annotations

from onnxserve.server.grpc_calls import DEFAULT_WINDOW, Calls


def settings(initial_window: int) -> bytes:
    """A SETTINGS payload: a stream limit (ignored here), then an initial window."""
    limit = (0x3).to_bytes(2, "big") + (100).to_bytes(4, "big")
    return limit + (0x4).to_bytes(2, "big") + initial_window.to_bytes(4, "big")


def test_a_call_whose_answer_waits_for_its_window_is_stalled() -> None:
    calls = Calls()
    calls.client_settings(settings(0))  # a client that grants no window
    calls.open(1)
    assert not calls.stalled  # its handler runs: nothing to send yet
    calls.server_headers(1, end_stream=False)
    assert calls.stalled  # the answer has begun and not a byte of it may go
    calls.client_window_update(1, (10).to_bytes(4, "big"))
    assert not calls.stalled
    calls.server_data(1, 10)
    assert calls.stalled
    calls.server_headers(1, end_stream=True)  # trailers: the call ended
    assert not calls
    assert not calls.stalled


def test_every_open_call_must_wait_for_the_connection_to_be_stalled() -> None:
    calls = Calls()
    calls.client_settings(settings(1000))
    calls.open(1)
    calls.open(3)
    calls.server_headers(1, end_stream=False)
    calls.server_data(1, 1000)  # call 1's window spent, call 3's handler still running
    assert not calls.stalled
    calls.server_headers(3, end_stream=False)
    assert not calls.stalled  # call 3's answer may still go
    calls.server_data(3, 1000)
    assert calls.stalled


def test_a_spent_connection_window_stalls_every_call() -> None:
    calls = Calls()
    calls.client_settings(settings(1 << 30))  # every call may take a gigabyte, the connection 64 KiB
    calls.open(1)
    calls.server_headers(1, end_stream=False)
    calls.server_data(1, DEFAULT_WINDOW)
    assert calls.connection_window == 0
    assert calls.stalled
    calls.client_window_update(0, (DEFAULT_WINDOW).to_bytes(4, "big"))
    assert not calls.stalled


def test_a_new_initial_window_moves_every_open_call() -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE changes the window of the calls already open by the difference (RFC
    9113, 6.9.2), whatever the order in which grpc-core's DATA and the client's SETTINGS are seen."""
    calls = Calls()
    calls.open(1)
    calls.server_headers(1, end_stream=False)
    calls.server_data(1, 1000)
    assert not calls.stalled
    calls.client_settings(settings(1000))
    assert calls.stalled
    calls.client_settings(settings(1001))
    assert not calls.stalled


def test_frames_for_unknown_calls_change_only_the_connection() -> None:
    calls = Calls()
    calls.server_data(5, 100)  # a call the front never saw opened (or one already ended)
    calls.client_window_update(7, (100).to_bytes(4, "big"))
    calls.client_window_update(0, b"\x00\x01")  # not 4 bytes: grpc-core closes the connection, nothing here
    assert calls.connection_window == DEFAULT_WINDOW - 100
    assert 5 not in calls
    assert not calls.stalled


def message(size: int) -> bytes:
    return b"\x00" + size.to_bytes(4, "big") + b"m" * size


def test_a_call_waits_for_its_request_until_every_message_sent_is_answered() -> None:
    """A call whose every request message the server has answered, its client not done, waits for its
    client: a unary call's message still coming, a stream between two messages. Messages are counted as
    their bytes pass, in pieces of any size."""
    calls = Calls()
    assert not calls.sending  # no call: idle, not sending
    calls.open(1)
    assert calls.sending  # nothing sent yet
    requests = calls.client_data(1, padded=False)
    assert requests is not None
    first = message(300)
    requests.take(memoryview(first[:3]))  # a prefix cut short
    requests.take(memoryview(first[3:100]))
    assert calls.sending  # the message is still coming
    requests.take(memoryview(first[100:] + message(0)[:2]))
    assert not calls.sending  # a whole message in: the server's turn
    calls.server_headers(1, end_stream=False)
    answers = calls.server_data(1, 305)
    assert answers is not None
    answers.take(memoryview(message(300)))
    assert calls.sending  # the first answered, and the next one's prefix is half in: the client's turn
    requests.take(memoryview(message(0)[2:]))
    assert not calls.sending  # the next (empty) one is in
    answers.take(memoryview(message(7)))
    assert calls.sending  # a stream between two messages
    calls.client_ended(1)
    assert not calls.sending  # its client is done: the server's turn to end it


def test_a_padded_data_frame_makes_its_call_busy_for_good() -> None:
    calls = Calls()
    calls.open(1)
    assert calls.client_data(1, padded=True) is None  # its padding is not stripped: messages not followed
    assert not calls.sending
    assert calls.client_data(1, padded=False) is None
    assert calls.client_data(9, padded=False) is None  # not a call that is open


def test_calls_waiting_for_their_client_in_both_ways_are_waiting() -> None:
    """One call whose answer waits for a window its client never opens, another without its message: the
    connection waits for its client (outside attack rt42: it counted as busy, kept its place past the cap
    and was never cut). With a call whose handler runs, it does not."""
    calls = Calls()
    calls.client_settings(settings(0))
    calls.open(1)
    calls.client_ended(1)
    calls.server_headers(1, end_stream=False)  # answered, not a byte of it may go
    calls.open(3)  # no message yet
    assert not calls.stalled
    assert not calls.sending
    assert calls.waiting
    calls.open(5)
    calls.client_ended(5)  # a whole request: its handler runs
    assert not calls.waiting
    calls.end(5)
    calls.end(1)
    assert not calls.waiting  # only waiting for a request: sending, not stalled
    assert calls.sending
