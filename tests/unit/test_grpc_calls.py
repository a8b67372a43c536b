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


def test_a_call_is_sending_until_its_client_ends_it_or_its_answer_begins() -> None:
    calls = Calls()
    assert not calls.sending  # no call: idle, not sending
    calls.open(1)
    calls.open(3)
    assert calls.sending  # both requests still coming
    calls.client_ended(1)
    assert not calls.sending  # call 1's request is in: its handler runs
    calls.end(1)
    assert calls.sending
    calls.server_headers(3, end_stream=False)  # a stream answered before its client ended it
    assert not calls.sending
