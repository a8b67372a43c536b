"""A :class:`~onnxserve.toolkit.diff.ModelDiff` for people: rich tables, or one self-contained HTML page.

The HTML page shows both graphs side by side (static SVGs from
:func:`onnxserve.toolkit.visualize.svg.render_svg`: A with removed and changed nodes highlighted, B
with added and changed ones), with zoom buttons and a link from every node named in the tables to
its box in the graphs, followed by the same tables as the text report. It loads nothing from the
network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

import onnx
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from onnxserve.errors import InvalidInputError
from onnxserve.toolkit.atomic_file import write_atomically
from onnxserve.toolkit.diff import ModelDiff, NodeRef, Remeasured, WeightStats
from onnxserve.toolkit.graph import build_graph
from onnxserve.toolkit.visualize.svg import render_svg

Rows = list[list[str]]


@dataclass(frozen=True)
class Section:
    title: str
    headers: list[str]
    rows: Rows
    sides: str = ""  # per column: "a" / "b" where its cells name nodes of that model, "." otherwise


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _node(ref: NodeRef) -> str:
    return f"{ref.id} ({ref.op_type})"


def _stats(stats: WeightStats | None) -> list[str]:
    if stats is None:
        return ["-", "-", "-", "-"]
    return [
        _fmt(stats.max_abs_diff),
        _fmt(stats.mean_abs_diff),
        _fmt(stats.relative_l2),
        f"{stats.changed}/{stats.size}",
    ]


def _accuracy_section(acc: Remeasured) -> Section:
    """B's accuracy as optimize measures it: re-measured here, beside what B's metadata recorded."""
    measured, recorded = acc.measured, acc.recorded or {}
    rows: Rows = []
    for label, key in (("cosine (worst)", "cosine"), ("agreement", "agreement"), ("max |diff|", "max_abs_diff")):
        if measured.get(key) is not None or recorded.get(key) is not None:
            rows.append([label, _fmt(recorded.get(key), 6), _fmt(measured.get(key), 6)])
    for name, value in (measured.get("cosine_percentiles") or {}).items():
        rows.append([f"cosine {name}", _fmt((recorded.get("cosine_percentiles") or {}).get(name), 6), _fmt(value, 6)])
    worst = measured.get("worst_inputs") or []
    if worst:
        rows.append(["worst input", "", str(worst[0]["input"])[:60]])
    return Section(
        f"Accuracy of B against A on {measured.get('samples')} (as optimize measures it)",
        ["measure", "recorded in B", "re-measured"],
        rows,
    )


def sections(diff: ModelDiff) -> list[Section]:
    """The report as tables; empty sections are left out."""
    out: list[Section] = []
    mapped = sum(1 for r in diff.replacements if r.replaces or r.rewrites)
    out.append(
        Section(
            "Summary",
            ["nodes", "A", "B"],
            [
                ["all", str(diff.node_counts[0]), str(diff.node_counts[1])],
                ["matched (same node in both)", str(diff.nodes_matched), str(diff.nodes_matched)],
                ["… of which changed", str(len(diff.nodes_changed)), str(len(diff.nodes_changed))],
                ["only here (A: removed, B: added)", str(len(diff.nodes_removed)), str(len(diff.nodes_added))],
                ["… of which mapped (A: replaced by B's, B: mapped to A's)", str(len(diff.replaced)), str(mapped)],
            ],
        )
    )
    if diff.versions:
        out.append(Section("Versions", ["what", "A", "B"], [[v.what, v.a or "-", v.b or "-"] for v in diff.versions]))
    if diff.signature:
        out.append(
            Section(
                "Signature",
                ["", "name", "change", "A", "B"],
                [[s.kind, s.name, s.change, str(s.a or "-"), str(s.b or "-")] for s in diff.signature],
            )
        )
    if diff.numeric is not None:
        if diff.numeric.ran:
            source = "generated" if diff.numeric.generated else "given"
            shapes = ", ".join(f"{n}{v}" for n, v in diff.numeric.inputs.items())
            out.append(
                Section(
                    f"Outputs on {source} inputs ({shapes})",
                    ["output", "shape A", "shape B", "max |diff|", "mean |diff|", "cosine"],
                    [
                        [
                            o.name,
                            str(o.shape_a),
                            str(o.shape_b),
                            _fmt(o.max_abs_diff),
                            _fmt(o.mean_abs_diff),
                            _fmt(o.cosine, 8),
                        ]
                        for o in diff.numeric.outputs
                    ],
                )
            )
        else:
            out.append(Section("Outputs", ["not compared"], [[diff.numeric.reason or ""]]))
    if diff.accuracy is not None:
        out.append(_accuracy_section(diff.accuracy))
    if diff.nodes_changed:
        rows: Rows = []
        for c in diff.nodes_changed:
            attrs = "; ".join(f"{x.name}: {x.a or '-'} -> {x.b or '-'}" for x in c.attributes)
            rows.append([_node(c.a), _node(c.b), c.matched_by, ", ".join(c.reasons), attrs])
        out.append(Section("Changed nodes", ["A", "B", "matched by", "what changed", "attributes"], rows, "ab..."))
    mapped_rows = [r for r in diff.replacements if r.replaces or r.rewrites]
    if mapped_rows:
        rows = []
        for r in mapped_rows:
            if r.replaces:
                rows.append([_node(r.b), "replaces", ", ".join(_node(x) for x in r.replaces)])
            else:
                rows.append([_node(r.b), "rewrites", ", ".join(_node(x) for x in r.rewrites)])
        out.append(Section("B's new nodes mapped to A", ["B node", "", "A nodes"], rows, "b.a"))
    if diff.unmapped:
        out.append(Section("Added in B (not mapped to A)", ["B node"], [[_node(n)] for n in diff.unmapped], "b"))
    gone = [n for n in diff.nodes_removed if n.id not in diff.replaced]
    if gone:
        out.append(Section("Removed from A (not replaced)", ["A node"], [[_node(n)] for n in gone], "a"))
    if diff.nodes_renamed:
        out.append(
            Section("Renamed (identical)", ["A", "B"], [[_node(a), _node(b)] for a, b in diff.nodes_renamed], "ab")
        )
    if diff.initializers:
        rows = []
        for i in diff.initializers:
            b_name = ", ".join(i.b_names) if i.b_names else ""
            rows.append([i.name, i.change, str(i.a or "-"), str(i.b or "-"), *_stats(i.stats), b_name])
        out.append(
            Section(
                "Initializers",
                ["name", "change", "A", "B", "max |diff|", "mean |diff|", "rel. L2", "changed", "B names"],
                rows,
            )
        )
    return out


def print_text(diff: ModelDiff, console: Console, a_label: str, b_label: str) -> None:
    """The report as rich tables."""
    console.print(f"[bold]A[/]: {escape_markup(a_label)}\n[bold]B[/]: {escape_markup(b_label)}", soft_wrap=True)
    if diff.identical:
        console.print("The models are identical in structure, signature and weights.")
    for section in sections(diff):
        table = Table(title=section.title, title_justify="left", title_style="bold")
        for header in section.headers:
            table.add_column(header, overflow="fold")
        for row in section.rows:
            table.add_row(*(escape_markup(c) for c in row))
        console.print(table)


_CSS = """
body { font: 14px system-ui, sans-serif; margin: 0; color: #1d2430; }
header { padding: 12px 20px; background: #1d2430; color: #fff; }
header h1 { font-size: 18px; margin: 0 0 4px 0; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 8px; border-radius: 4px; color: #1d2430; }
.legend .added { background: #dcf5dc; } .legend .removed { background: #fbe0e0; }
.legend .changed { background: #fff0d0; }
#selection { color: #fff; font-family: monospace; }
.node { cursor: pointer; }
.graphs { display: flex; gap: 8px; padding: 8px; height: 62vh; }
.pane { flex: 1; display: flex; flex-direction: column; border: 1px solid #c8d0da; min-width: 0; }
.pane h2 { font-size: 14px; margin: 0; padding: 6px 10px; background: #eef2f7; display: flex; gap: 8px; }
.pane h2 .file { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.pane h2 button { font-size: 12px; }
.view { flex: 1; overflow: auto; }
.view svg { transform-origin: 0 0; }
.node.focus rect { stroke: #1a56db !important; stroke-width: 4 !important; }
section { padding: 4px 20px; }
table { border-collapse: collapse; margin: 6px 0 16px 0; }
th, td { border: 1px solid #d5dbe3; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f7; }
a.node-link { color: #1a56db; cursor: pointer; text-decoration: none; }
"""

_JS = """
const counterparts = JSON.parse(document.getElementById('counterparts').textContent);
const panes = {a: document.getElementById('pane-a'), b: document.getElementById('pane-b')};
for (const pane of Object.values(panes)) {
  const svg = pane.querySelector('svg');
  let scale = 1;
  const apply = () => { svg.style.transform = 'scale(' + scale + ')'; };
  pane.querySelector('.zoom-in').onclick = () => { scale *= 1.25; apply(); };
  pane.querySelector('.zoom-out').onclick = () => { scale /= 1.25; apply(); };
  pane.querySelector('.zoom-fit').onclick = () => {
    const view = pane.querySelector('.view');
    scale = Math.min(1, view.clientWidth / svg.width.baseVal.value); apply();
  };
}
function mark(side, names) {
  const pane = panes[side];
  for (const old of pane.querySelectorAll('.node.focus')) old.classList.remove('focus');
  const box = {top: Infinity, bottom: -Infinity, left: Infinity, right: -Infinity};
  for (const g of pane.querySelectorAll('.node')) {
    if (!names.includes(g.dataset.name)) continue;
    g.classList.add('focus');
    const r = g.getBoundingClientRect();
    box.top = Math.min(box.top, r.top); box.bottom = Math.max(box.bottom, r.bottom);
    box.left = Math.min(box.left, r.left); box.right = Math.max(box.right, r.right);
  }
  if (box.top === Infinity) return;
  const view = pane.querySelector('.view');
  const v = view.getBoundingClientRect();
  view.scrollBy({
    top: (box.top + box.bottom - v.top - v.bottom) / 2,
    left: (box.left + box.right - v.left - v.right) / 2,
  });
}
function focusNode(side, name) {
  const other = side === 'a' ? 'b' : 'a';
  mark(side, [name]);
  mark(other, counterparts[side + ':' + name] || []);
  document.getElementById('selection').textContent = side.toUpperCase() + ': ' + name + (
    counterparts[side + ':' + name] ? '  \u2194  ' + other.toUpperCase() + ': ' +
    counterparts[side + ':' + name].join(', ') : '');
}
for (const link of document.querySelectorAll('a.node-link')) {
  link.onclick = () => focusNode(link.dataset.side, link.dataset.name);
}
for (const side of ['a', 'b']) {
  for (const g of panes[side].querySelectorAll('.node')) {
    g.addEventListener('click', () => focusNode(side, g.dataset.name));
  }
}
"""


def render_html(diff: ModelDiff, a: onnx.ModelProto, b: onnx.ModelProto, a_label: str, b_label: str) -> str:
    """One self-contained HTML page: both graphs side by side with the changes highlighted, and the tables."""
    svg_a = _strip_xml_declaration(render_svg(build_graph(a), highlight=diff.highlight_a()))
    svg_b = _strip_xml_declaration(render_svg(build_graph(b), highlight=diff.highlight_b()))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>onnxserve diff: {escape(a_label)} vs {escape(b_label)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>onnxserve diff</h1>",
        '<div class="legend"><span class="removed">removed (A)</span><span class="added">added (B)</span>'
        '<span class="changed">changed</span><span id="selection"></span></div></header>',
        '<div class="graphs">',
        _pane("a", "A", a_label, svg_a),
        _pane("b", "B", b_label, svg_b),
        "</div>",
    ]
    for section in sections(diff):
        parts.append(f"<section><h3>{escape(section.title)}</h3>{_table(section)}</section>")
    counterparts = json.dumps(_counterparts(diff)).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="counterparts">{counterparts}</script>')
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _counterparts(diff: ModelDiff) -> dict[str, list[str]]:
    """``"a:ID"`` / ``"b:ID"`` -> the node ids on the other side that correspond to it."""
    links: dict[str, list[str]] = {}

    def link(a_id: str, b_id: str) -> None:
        links.setdefault(f"a:{a_id}", []).append(b_id)
        links.setdefault(f"b:{b_id}", []).append(a_id)

    for a_id, b_id, _ in diff.matched:
        link(a_id, b_id)
    for replacement in diff.replacements:
        for a_ref in replacement.replaces or replacement.rewrites:
            link(a_ref.id, replacement.b.id)
    return links


def _strip_xml_declaration(svg: str) -> str:
    return svg.split("?>", 1)[1].lstrip() if svg.startswith("<?xml") else svg


def _pane(side: str, letter: str, label: str, svg: str) -> str:
    return (
        f'<div class="pane" id="pane-{side}"><h2><span class="file">{letter}: {escape(label)}</span>'
        '<button class="zoom-out" title="zoom out">&minus;</button>'
        '<button class="zoom-fit" title="fit width">fit</button>'
        f'<button class="zoom-in" title="zoom in">+</button></h2><div class="view">{svg}</div></div>'
    )


def _table(section: Section) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in section.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(c, section.sides[k : k + 1])}</td>" for k, c in enumerate(row)) + "</tr>"
        for row in section.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(text: str, side: str) -> str:
    """A cell; in a column of node references (``id (OpType)``), each links to its box in that model's graph."""
    if side not in ("a", "b"):
        return escape(text)
    linked: list[str] = []
    for item in text.split(", "):
        node, _, rest = item.partition(" (")
        linked.append(
            f'<a class="node-link" data-side="{side}" data-name="{escape(node)}">{escape(node)}</a> ({escape(rest)}'
            if rest
            else escape(item)
        )
    return ", ".join(linked)


def write_report(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary sibling renamed into place)."""
    if not path.parent.is_dir():
        raise InvalidInputError(f"{path}: its folder {path.parent} does not exist")
    if path.is_dir():
        raise InvalidInputError(f"{path}: is a folder; give a file name for the report")
    write_atomically(path, text)
