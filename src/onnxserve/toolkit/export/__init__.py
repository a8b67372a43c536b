"""Exporters from training frameworks to ONNX; each validates before it hands a model over."""
