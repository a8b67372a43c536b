"""The server: the ASGI app, listeners and process lifecycle (the composition root)."""

from onnxserve.server.logs import quiet_grpc_core

quiet_grpc_core()  # before any module of the server imports grpc, which reads its log level once
