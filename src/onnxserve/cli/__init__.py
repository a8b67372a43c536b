"""The ``onnxserve`` command: argument parsing only; the work lives in toolkit/ and server/."""
