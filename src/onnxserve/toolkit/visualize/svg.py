"""A static SVG of a graph: boxes in layers, top to bottom, with the tensors' shapes as tooltips.

``highlight`` maps node names to ``added``, ``removed`` or ``changed`` (``onnxserve diff`` colours
the nodes it found); every node is a ``<g class="node ...">`` with ``data-name`` set to its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from xml.sax.saxutils import escape, quoteattr

from onnxserve.errors import InvalidInputError
from onnxserve.toolkit.graph import GraphDocument
from onnxserve.toolkit.visualize.layout import Box, Point, Route, layout_graph

HIGHLIGHTS = ("added", "removed", "changed")

_STYLE = """
.node rect { fill: #eef2f7; stroke: #5b6b7f; stroke-width: 1; }
.node.input rect, .node.output rect { fill: #fff8e1; stroke: #b08a2e; }
.node.heavy rect { fill: #dfe9fb; stroke: #3e64a8; }
.node.added rect { fill: #dcf5dc; stroke: #2f8f2f; stroke-width: 2; }
.node.removed rect { fill: #fbe0e0; stroke: #c03030; stroke-width: 2; }
.node.changed rect { fill: #fff0d0; stroke: #d08a00; stroke-width: 2; }
.node text { font: 12px sans-serif; fill: #1d2430; text-anchor: middle; dominant-baseline: central; }
.edge { fill: none; stroke: #8c96a3; stroke-width: 1; }
"""

HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "MultiHeadAttention"})


def render_svg(doc: GraphDocument, *, highlight: Mapping[str, str] | None = None) -> str:
    """The graph as one SVG document (UTF-8 text)."""
    highlight = highlight or {}
    bad = sorted({c for c in highlight.values() if c not in HIGHLIGHTS})
    if bad:
        raise InvalidInputError(f"unknown highlight {', '.join(bad)}; use {', '.join(HIGHLIGHTS)}")
    layout = layout_graph(doc)
    op_types = {n.name: n.op_type for n in doc.nodes}
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{layout.width:.0f}" height="{layout.height:.0f}" '
        f'viewBox="0 0 {layout.width:.0f} {layout.height:.0f}">',
        f"<title>{escape(doc.name or 'graph')}</title>",
        f"<style>{_STYLE}</style>",
        '<g class="edges">',
    ]
    for route in layout.routes:
        parts.append(_edge(route, doc))
    parts.append('</g><g class="nodes">')
    for box in layout.boxes.values():
        classes = ["node", box.kind]
        if box.kind == "node":
            if op_types[box.id] in HEAVY_OPS:
                classes.append("heavy")
            if box.id in highlight:
                classes.append(highlight[box.id])
        parts.append(_box(box, " ".join(classes)))
    parts.append("</g></svg>")
    return "\n".join(parts) + "\n"


def _edge(route: Route, doc: GraphDocument) -> str:
    value = doc.values.get(route.tensor)
    shape = "" if value is None or value.shape is None else " [" + ", ".join(str(d) for d in value.shape) + "]"
    title = escape(f"{route.tensor}{shape}")
    return f'<path class="edge" d="{path_data(route.points)}"><title>{title}</title></path>'


def path_data(points: list[Point]) -> str:
    """A smooth path through ``points``, leaving and entering each one vertically."""
    (x0, y0), *rest = points
    data = [f"M{x0:.1f},{y0:.1f}"]
    for x1, y1 in rest:
        mid = (y0 + y1) / 2
        data.append(f"C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}")
        x0, y0 = x1, y1
    return " ".join(data)


def _box(box: Box, classes: str) -> str:
    return (
        f'<g class="{classes}" data-name={quoteattr(box.id)}>'
        f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" rx="5"/>'
        f'<text x="{box.x + box.width / 2:.1f}" y="{box.y + box.height / 2:.1f}">{escape(box.label)}</text>'
        f"<title>{escape(box.id)}</title></g>"
    )
