"""The graph as one self-contained HTML file: the viewer's JavaScript and CSS inline, the graph as JSON.

The file makes no network request. It shows the whole graph with pan and zoom, search, module
groups that collapse and expand, and for a clicked node its attributes, input and output shapes, and
its weights' statistics, histogram and first values (``GraphDocument.samples``; the file says how many
it embeds). The server's web page embeds the same viewer: :func:`viewer_assets` and
:func:`viewer_payload` give it the script, the style and the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from importlib import resources
from typing import Any

import orjson

from onnxserve.toolkit.graph import GraphDocument, WeightSummary, summary_json

_ASSETS = "onnxserve.toolkit.visualize.assets"
MAX_EMBEDDED_VALUES = 500_000
"""Weight values one HTML file embeds at most, all weights together (about 5 MB of JSON)."""


def viewer_assets() -> tuple[str, str]:
    """The viewer's JavaScript and CSS (``window.OnnxServeViewer.mount(element, payload, options)``)."""
    folder = resources.files(_ASSETS)
    return (folder / "viewer.js").read_text(encoding="utf-8"), (folder / "viewer.css").read_text(encoding="utf-8")


def viewer_payload(
    doc: GraphDocument,
    *,
    title: str = "",
    intermediates: Mapping[str, WeightSummary] | None = None,
    highlight: Mapping[str, str] | None = None,
    max_values: int = MAX_EMBEDDED_VALUES,
) -> dict[str, Any]:
    """What ``OnnxServeViewer.mount`` draws: the graph JSON plus embedded values, intermediates, highlights.

    Each weight brings its first values (``doc.samples``), fewer per weight when there are so many
    weights that all of them would pass ``max_values``.
    """
    per_weight = max_values // max(1, len(doc.samples))
    return {
        "title": title,
        "graph": doc.to_json(),
        "weights": {name: {"offset": 0, "values": values[:per_weight]} for name, values in doc.samples.items()},
        "intermediates": {name: summary_json(s) for name, s in (intermediates or {}).items()},
        "highlight": dict(highlight or {}),
    }


def render_html(
    doc: GraphDocument,
    *,
    title: str,
    intermediates: Mapping[str, WeightSummary] | None = None,
    highlight: Mapping[str, str] | None = None,
) -> str:
    """One HTML document holding the viewer and the graph; ``intermediates`` are shown on their edges."""
    js, css = viewer_assets()
    payload = viewer_payload(doc, title=title, intermediates=intermediates, highlight=highlight)
    data = orjson.dumps(payload).decode().replace("</", "<\\/").replace("<!--", "<\\!--")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>
html, body {{ margin: 0; height: 100%; }}
#onnxserve-viewer {{ height: 100vh; }}
{css}
</style>
</head>
<body>
<div id="onnxserve-viewer"></div>
<script type="application/json" id="onnxserve-graph">{data}</script>
<script>
{js}
</script>
<script>
OnnxServeViewer.mount(document.getElementById("onnxserve-viewer"),
  JSON.parse(document.getElementById("onnxserve-graph").textContent));
</script>
</body>
</html>
"""
