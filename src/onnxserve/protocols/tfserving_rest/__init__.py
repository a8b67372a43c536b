"""TensorFlow Serving REST (v1): model status, metadata and predict, over the one InferenceService."""
