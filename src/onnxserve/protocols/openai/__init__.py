"""The OpenAI-compatible embeddings API: ``POST /v1/embeddings``, ``GET /v1/models`` (docs/embeddings-api.md)."""
