"""The server's web page at ``/``: models, versions, signatures, graphs, a try-it form and version diffs."""

from onnxserve.server.web.routes import routes

__all__ = ["routes"]
