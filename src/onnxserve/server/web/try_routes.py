"""The routes the try-it form offers for a model version: KServe V2 for every model, and for a text model
the OpenAI- and TEI-compatible routes that answer it (the same rules the routes themselves apply).

Each route has a key that ``static/page.js`` knows how to build a request body for.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxserve.server.web.overview import TextInterface


@dataclass(frozen=True)
class TryRoute:
    key: str  # what page.js builds the body by
    api: str  # the API it belongs to, as the select shows it
    path: str


def try_routes(text: TextInterface | None, v2_url: str) -> list[TryRoute]:
    """V2 first; then embeddings (pooled feature-extraction), /rerank, /predict as the task fits; /tokenize."""
    routes = [TryRoute("v2", "KServe V2", v2_url)]
    if text is None:
        return routes
    if text.embeds:
        routes += [TryRoute("openai-embeddings", "OpenAI", "/v1/embeddings"), TryRoute("tei-embed", "TEI", "/embed")]
    if text.task == "text-ranking":
        routes.append(TryRoute("tei-rerank", "TEI", "/rerank"))
    if text.task == "text-classification":
        routes.append(TryRoute("tei-predict", "TEI", "/predict"))
    routes.append(TryRoute("tei-tokenize", "TEI", "/tokenize"))
    return routes
