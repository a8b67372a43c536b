"""Verbs over ONNX models: export, validate (and, later, optimize, inspect, diff)."""
