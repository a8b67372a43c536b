"""The server: the ASGI app, listeners and process lifecycle (the composition root)."""
