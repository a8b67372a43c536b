"""A layered (Sugiyama-style) layout for the static SVG view, top to bottom.

1. Layers: the longest path from the graph's inputs; a node without inputs (a constant) sits just
   above its first consumer.
2. Long edges: an edge that crosses layers runs through invisible waypoints, one per layer crossed,
   shared by all the long edges leaving the same box (one lane per source, not one per edge), so that
   edges go around boxes instead of through them.
3. Order: each layer sorted by the barycenter of its neighbours, in a few down and up sweeps.
4. Place: each box as near its neighbours' mean x as the boxes before it in its layer allow.

The HTML viewer runs the same steps in its JavaScript so that it can lay out again when module
groups collapse or expand.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

from onnxserve.toolkit.graph import INPUT_PREFIX, OUTPUT_PREFIX, GraphDocument

NODE_HEIGHT = 36
LAYER_GAP = 34
NODE_GAP = 18
WAYPOINT_WIDTH = 2.0
LANE_GAP = 6
CHAR_WIDTH = 7.2
MIN_WIDTH = 72
SWEEPS = 8

Point = tuple[float, float]


@dataclass(frozen=True)
class Box:
    id: str
    label: str
    kind: str
    """``node``, ``input`` or ``output``."""
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Route:
    source: str
    target: str
    tensor: str
    points: list[Point]
    """From the bottom of the source box, through the waypoints, to the top of the target box."""


@dataclass(frozen=True)
class Layout:
    boxes: dict[str, Box]
    routes: list[Route]
    width: float
    height: float


def layout_graph(doc: GraphDocument) -> Layout:
    vertices = [INPUT_PREFIX + v.name for v in doc.inputs] + [n.name for n in doc.nodes]
    vertices += [OUTPUT_PREFIX + v.name for v in doc.outputs]
    op_types = {n.name: n.op_type for n in doc.nodes}
    labels = {v: _label(v, op_types) for v in vertices}
    edges = [(e.source, e.target) for e in doc.edges]
    layer = _layers(vertices, edges)
    paths, waypoint_layer = _waypoints(edges, layer)
    layer.update(waypoint_layer)
    widths = {v: max(MIN_WIDTH, CHAR_WIDTH * len(labels[v][0]) + 20) for v in vertices}
    widths.update(dict.fromkeys(waypoint_layer, WAYPOINT_WIDTH))
    links: set[tuple[str, str]] = set()
    for path in paths.values():
        links.update(itertools.pairwise(path))
    rows: dict[int, list[str]] = defaultdict(list)
    for v in layer:
        rows[layer[v]].append(v)
    order = [rows[i] for i in sorted(rows)]
    x = _order_and_place(order, sorted(links), widths)
    row_of = {v: i for i, row in enumerate(order) for v in row}
    left = min((x[v] - widths[v] / 2 for v in x), default=0.0) - NODE_GAP

    def top(v: str) -> float:
        return NODE_GAP + row_of[v] * (NODE_HEIGHT + LAYER_GAP)

    boxes = {
        v: Box(v, labels[v][0], labels[v][1], x[v] - widths[v] / 2 - left, top(v), widths[v], NODE_HEIGHT)
        for v in vertices
    }
    routes = []
    for e in doc.edges:
        path = paths[(e.source, e.target)]
        points = [(x[path[0]] - left, top(path[0]) + NODE_HEIGHT)]
        points += [(x[w] - left, top(w) + NODE_HEIGHT / 2) for w in path[1:-1]]
        points.append((x[path[-1]] - left, top(path[-1])))
        routes.append(Route(e.source, e.target, e.tensor, points))
    width = max((x[v] + widths[v] / 2 - left for v in x), default=0.0) + NODE_GAP
    height = NODE_GAP * 2 + len(order) * (NODE_HEIGHT + LAYER_GAP) - LAYER_GAP
    return Layout(boxes, routes, width, height)


def _label(vertex: str, op_types: dict[str, str]) -> tuple[str, str]:
    if vertex.startswith(INPUT_PREFIX):
        return vertex[len(INPUT_PREFIX) :], "input"
    if vertex.startswith(OUTPUT_PREFIX):
        return vertex[len(OUTPUT_PREFIX) :], "output"
    return op_types[vertex], "node"


def _layers(vertices: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    preds: dict[str, list[str]] = defaultdict(list)
    succs: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    indegree = {v: len(preds[v]) for v in vertices}
    ready = [v for v in vertices if indegree[v] == 0]
    topo: list[str] = []
    while ready:
        v = ready.pop()
        topo.append(v)
        for s in succs[v]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    topo += [v for v in vertices if indegree[v] > 0]  # a cycle (not valid ONNX): put it last
    layer: dict[str, int] = {}
    for v in topo:
        layer[v] = max((layer[p] + 1 for p in preds[v] if p in layer), default=0)
    for v in reversed(topo):  # sources that are not graph inputs (constants) sit above their first consumer
        if not preds[v] and not v.startswith(INPUT_PREFIX) and succs[v]:
            layer[v] = max(0, min(layer[s] for s in succs[v]) - 1)
    return {v: layer[v] for v in vertices}


def _waypoints(
    edges: list[tuple[str, str]], layer: dict[str, int]
) -> tuple[dict[tuple[str, str], list[str]], dict[str, int]]:
    """Each edge's path (source, waypoints..., target); long edges from one source share one lane."""
    reach: dict[str, int] = {}
    for a, b in edges:
        if layer[b] - layer[a] > 1:
            reach[a] = max(reach.get(a, 0), layer[b])
    waypoint_layer: dict[str, int] = {}
    lanes: dict[str, list[str]] = {}
    for a, last in reach.items():
        lane = [f"\x00{a}\x00{i}" for i in range(layer[a] + 1, last)]
        lanes[a] = lane
        waypoint_layer.update({w: layer[a] + 1 + i for i, w in enumerate(lane)})
    paths: dict[tuple[str, str], list[str]] = {}
    for a, b in edges:
        span = layer[b] - layer[a]
        paths[(a, b)] = [a, *lanes[a][: span - 1], b] if span > 1 else [a, b]
    return paths, waypoint_layer


def _order_and_place(
    order: list[list[str]], links: list[tuple[str, str]], widths: dict[str, float]
) -> dict[str, float]:
    preds: dict[str, list[str]] = defaultdict(list)
    succs: dict[str, list[str]] = defaultdict(list)
    for a, b in links:
        preds[b].append(a)
        succs[a].append(b)
    x: dict[str, float] = {}
    for row in order:
        _pack(row, {v: float(i) for i, v in enumerate(row)}, widths, x)
    for sweep in range(SWEEPS):
        rows = order if sweep % 2 == 0 else list(reversed(order))
        neighbours = preds if sweep % 2 == 0 else succs
        for row in rows[1:]:
            wanted = {v: _barycenter(v, neighbours, x) for v in row}
            row.sort(key=lambda v: wanted[v])
            _pack(row, wanted, widths, x)
    return x


def _barycenter(v: str, neighbours: dict[str, list[str]], x: dict[str, float]) -> float:
    known = [x[n] for n in neighbours[v] if n in x]
    return sum(known) / len(known) if known else x.get(v, 0.0)


def _pack(row: list[str], wanted: dict[str, float], widths: dict[str, float], x: dict[str, float]) -> None:
    """Place ``row`` in its order, each box as near its wanted x as its neighbours in the row allow.

    The mean of two packings, one pushing overlapping boxes right and one pushing them left: both keep
    the order and the gaps, so their mean does too, and it drifts to neither side.
    """
    if not row:
        return
    gaps = [_gap(a, b, widths) for a, b in itertools.pairwise(row)]
    rightward = [wanted[row[0]]]
    for i, v in enumerate(row[1:]):
        rightward.append(max(wanted[v], rightward[-1] + gaps[i]))
    leftward = [wanted[row[-1]]]
    for i, v in enumerate(reversed(row[:-1])):
        leftward.append(min(wanted[v], leftward[-1] - gaps[len(gaps) - 1 - i]))
    leftward.reverse()
    for v, r, lft in zip(row, rightward, leftward, strict=True):
        x[v] = (r + lft) / 2


def _gap(a: str, b: str, widths: dict[str, float]) -> float:
    """The distance between the centres of neighbours ``a`` and ``b``: lanes of edges pack closer."""
    thin = widths[a] <= WAYPOINT_WIDTH or widths[b] <= WAYPOINT_WIDTH
    return (widths[a] + widths[b]) / 2 + (LANE_GAP if thin else NODE_GAP)
