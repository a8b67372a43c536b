"""The embedding servers users pick instead of onnxserve (Infinity, MLServer), run at their best for the
text workload of ``make bench``, each from its own virtual environment under bench/ (see peer.py)."""
