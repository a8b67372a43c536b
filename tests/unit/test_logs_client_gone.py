"""grpc's ERROR for an answer it could not send because the client had gone is one DEBUG line, not a
traceback a client could flood the log with; grpc's other errors still show."""

from __future__ import annotations

import io
import logging

from onnxserve.server.logs import configure_logging


def test_a_gone_grpc_client_is_no_error_traceback() -> None:
    stream = io.StringIO()
    handler = configure_logging("text", "info", stream)
    try:
        cygrpc = logging.getLogger("grpc._cython.cygrpc")
        try:
            raise RuntimeError('Failed "execute_batch"')
        except RuntimeError:
            cygrpc.exception("ExecuteBatchError raised in core by servicer method [%s]", "/x/ModelInfer")
        cygrpc.error("something else went wrong")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "ExecuteBatchError" not in text
    assert "Traceback" not in text
    assert "execute_batch" not in text
    assert "something else went wrong" in text
