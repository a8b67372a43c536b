"""Hugging Face text-embeddings-inference's routes: ``/embed``, ``/rerank``, ``/predict``, ``/tokenize``,
``/info`` (docs/embeddings-api.md)."""
