"""TorchServe serving the same Hugging Face model, started and stopped by the benchmark (runner.py)."""
