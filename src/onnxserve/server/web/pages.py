"""The web page's HTML: the model list, a page per model and per version, the diff view, error pages.

Pages are rendered on the server with every model-provided value escaped (see :mod:`markup`); the
graph view, the try-it form and the diff tables are filled in by ``static/page.js`` from the JSON
endpoints, with text set as text (never as HTML).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from urllib.parse import quote, urlencode

from onnxserve.core.types import TensorSpec
from onnxserve.server.web import examples
from onnxserve.server.web.markup import Markup, join, render
from onnxserve.server.web.overview import ModelRow, OnnxHeader, TextInterface, VersionDetail, VersionRow, dims
from onnxserve.server.web.try_routes import try_routes
from onnxserve.version import __version__

STATIC = "/web/static"
API = "/web/api"


def model_url(name: str) -> str:
    return f"/models/{quote(name, safe='')}"


def version_url(name: str, version: str) -> str:
    return f"{model_url(name)}/versions/{quote(version, safe='')}"


def diff_url(name: str, a: str | None = None, b: str | None = None) -> str:
    query = urlencode({"a": a, "b": b}) if a is not None and b is not None else ""
    return f"{model_url(name)}/diff" + (f"?{query}" if query else "")


def graph_api_url(name: str, version: str) -> str:
    return f"{API}/models/{quote(name, safe='')}/versions/{quote(version, safe='')}/graph"


def weights_api_url(name: str, version: str) -> str:
    return f"{API}/models/{quote(name, safe='')}/versions/{quote(version, safe='')}/weights"


def diff_api_url(name: str, a: str, b: str) -> str:
    return f"{API}/models/{quote(name, safe='')}/diff?{urlencode({'a': a, 'b': b})}"


def infer_url(name: str, version: str) -> str:
    return f"/v2/models/{quote(name, safe='')}/versions/{quote(version, safe='')}/infer"


def layout(title: str, body: Markup, *, crumbs: Sequence[tuple[str, str]] = (), viewer: bool = False) -> str:
    """A whole page: header with breadcrumbs, ``body``, and the page script (plus the graph viewer's)."""
    trail = join(
        [render('<a href="{url}">{label}</a>', url=url, label=label) for label, url in crumbs],
        ' <span class="sep">/</span> ',
    )
    viewer_css = render('<link rel="stylesheet" href="{url}">', url=f"{STATIC}/viewer.css") if viewer else Markup()
    viewer_js = render('<script src="{url}" defer></script>', url=f"{STATIC}/viewer.js") if viewer else Markup()
    return render(
        """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · onnxserve</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{css}">
{viewer_css}
{viewer_js}
<script src="{js}" defer></script>
</head>
<body>
<header class="top">
  <a class="brand" href="/">onnxserve</a>
  <nav class="crumbs">{trail}</nav>
  <span class="server">server {version} · <a href="/v2">/v2</a> · <a href="/metrics">/metrics</a></span>
</header>
<main>
{body}
</main>
</body>
</html>
""",
        title=title,
        css=f"{STATIC}/page.css",
        js=f"{STATIC}/page.js",
        viewer_css=viewer_css,
        viewer_js=viewer_js,
        trail=trail,
        version=__version__,
        body=body,
    )


def _state(state: str, reason: str = "") -> Markup:
    return render(
        '<span class="state state-{cls}" title="{reason}">{state}</span>', cls=state.lower(), state=state, reason=reason
    )


def _labels(labels: Sequence[str]) -> Markup:
    return join([render('<span class="label">{label}</span>', label=label) for label in labels], " ")


def _version_cell(name: str, row: VersionRow) -> Markup:
    if row.browsable:
        return render('<a href="{url}">{version}</a>', url=version_url(name, row.version), version=row.version)
    return render("{version}", version=row.version or "—")


def _model_table(models: Sequence[ModelRow], *, with_names: bool) -> Markup:
    rows = []
    for model in models:
        for i, v in enumerate(model.versions):
            name_cell = Markup()
            if with_names:
                link = (
                    render('<a href="{url}">{name}</a>', url=model_url(model.name), name=model.name)
                    if model.served
                    else render("{name}", name=model.name)
                )
                name_cell = (
                    render('<td class="model" rowspan="{n}">{link}</td>', n=len(model.versions), link=link)
                    if i == 0
                    else Markup()
                )
            rows.append(
                render(
                    '<tr data-model="{name}" data-version="{version}">{name_cell}<td>{version_cell}</td>'
                    '<td>{state}</td><td>{labels}</td><td>{task}</td><td class="reason">{reason}</td></tr>',
                    name=model.name,
                    version=v.version,
                    name_cell=name_cell,
                    version_cell=_version_cell(model.name, v),
                    state=_state(v.state, v.reason),
                    labels=_labels(v.labels),
                    task=f"text · {v.task}" if v.task else "tensors",
                    reason=v.reason,
                )
            )
    head = "<th>model</th>" if with_names else ""
    return render(
        '<table class="models"><thead><tr>{head}<th>version</th><th>state</th><th>labels</th><th>inputs</th>'
        "<th>note</th></tr></thead><tbody>{rows}</tbody></table>",
        head=Markup(head),
        rows=join(rows, "\n"),
    )


def index_page(models: Sequence[ModelRow]) -> str:
    if not models:
        body = render('<h1>Models</h1><p class="muted">This server serves no model.</p>')
    else:
        body = render(
            '<h1>Models</h1><p class="muted">{count} served; pick a version to see its signature and graph and to '
            "try it.</p>{table}",
            count=f"{len(models)} model{'s' if len(models) != 1 else ''}",
            table=_model_table(models, with_names=True),
        )
    return layout("Models", body)


def _diff_form(name: str, versions: Sequence[str], a: str, b: str) -> Markup:
    def options(selected: str) -> Markup:
        return join(
            [
                render('<option value="{v}"{sel}>{v}</option>', v=v, sel=Markup(" selected" if v == selected else ""))
                for v in versions
            ]
        )

    return render(
        '<form class="diff-form" method="get" action="{action}">Compare version <select name="a">{a}</select> '
        'with version <select name="b">{b}</select> <button type="submit">Compare</button></form>',
        action=diff_url(name),
        a=options(a),
        b=options(b),
    )


def model_page(model: ModelRow) -> str:
    versions = model.browsable_versions
    compare = Markup()
    if len(versions) >= 2:
        compare = render(
            "<h2>Compare two versions</h2>{form}", form=_diff_form(model.name, versions, versions[1], versions[0])
        )
    body = render(
        "<h1>{name}</h1>{table}{compare}",
        name=model.name,
        table=_model_table([model], with_names=False),
        compare=compare,
    )
    return layout(model.name, body, crumbs=[(model.name, model_url(model.name))])


def _signature_table(specs: Sequence[TensorSpec]) -> Markup:
    rows = [
        render(
            '<tr><td class="name">{name}</td><td>{datatype}</td><td class="shape">[{shape}]</td></tr>',
            name=spec.name,
            datatype=spec.datatype.v2,
            shape=", ".join(dims(spec)),
        )
        for spec in specs
    ]
    return render(
        '<table class="signature"><thead><tr><th>name</th><th>datatype</th><th>shape</th></tr></thead>'
        "<tbody>{rows}</tbody></table>",
        rows=join(rows),
    )


def _facts(pairs: Sequence[tuple[str, object]]) -> Markup:
    return render(
        '<dl class="facts">{items}</dl>',
        items=join([render("<dt>{k}</dt><dd>{v}</dd>", k=k, v=v) for k, v in pairs]),
    )


def _header_section(header: OnnxHeader | None) -> Markup:
    if header is None:
        return Markup()
    facts: list[tuple[str, object]] = [
        ("IR version", header.ir_version),
        ("opsets", ", ".join(f"{d} {v}" for d, v in header.opsets)),
        ("producer", header.producer or "—"),
        ("graph", header.graph_name or "—"),
        ("nodes", header.nodes),
    ]
    doc = render('<p class="doc">{doc}</p>', doc=header.doc_string) if header.doc_string else Markup()
    props = Markup()
    if header.properties:
        props = render(
            '<h3>Metadata properties</h3><table class="props"><tbody>{rows}</tbody></table>',
            rows=join([render("<tr><th>{k}</th><td>{v}</td></tr>", k=k, v=v) for k, v in header.properties]),
        )
        props = join([props, _more(header.properties_total - len(header.properties), "properties")])
    return render("<h2>ONNX model</h2>{facts}{doc}{props}", facts=_facts(facts), doc=doc, props=props)


def _more(left: int, what: str) -> Markup:
    """A line saying how many of ``what`` the page leaves out, if any."""
    return render('<p class="more">and {left} more {what}</p>', left=f"{left:,}", what=what) if left > 0 else Markup()


def _text_section(text: TextInterface | None) -> Markup:
    if text is None:
        return Markup()
    classes = Markup()
    if text.class_labels:
        classes = render(
            '<h3>Labels</h3><table class="class-labels"><thead><tr><th>id</th><th>label</th></tr></thead>'
            "<tbody>{rows}</tbody></table>",
            rows=join(
                [render("<tr><td>{i}</td><td>{label}</td></tr>", i=i, label=label) for i, label in text.class_labels]
            ),
        )
        classes = join([classes, _more(text.labels_total - len(text.class_labels), "labels")])
    return render(
        "<h2>Text interface</h2>{facts}{classes}",
        facts=_facts(
            [
                ("task", text.task),
                ("send", ", ".join(f"{name} (BYTES)" for name in text.inputs)),
                ("answers", ", ".join(text.outputs)),
                ("on request", ", ".join(text.optional_outputs) or "—"),
                ("max tokens", text.max_length),
            ]
        ),
        classes=classes,
    )


def _try_it(detail: VersionDetail) -> Markup:
    url = infer_url(detail.name, detail.version)
    task = ""
    if detail.text is not None:
        task = detail.text.task
        if task == "question-answering":
            fields = render(
                '<label>question <textarea name="question" rows="2">{q}</textarea></label>'
                '<label>context <textarea name="context" rows="4">{c}</textarea></label>',
                q=examples.EXAMPLE_QUESTION,
                c=examples.EXAMPLE_CONTEXT,
            )
        elif task == "text-ranking":
            fields = render(
                '<label>query <textarea name="query" rows="2">{q}</textarea></label>'
                '<label>texts to rank, one per line <textarea name="text" rows="4">{t}</textarea></label>',
                q=examples.EXAMPLE_QUESTION,
                t="\n".join((examples.EXAMPLE_CONTEXT, examples.EXAMPLE_TEXT)),
            )
        else:
            fields = render(
                '<label>text, one per line <textarea name="text" rows="4">{t}</textarea></label>',
                t=examples.example_text(task, detail.text.mask_token),
            )
        mode = "text"
    else:
        body = examples.request_text(examples.example_request(detail.inputs))
        fields = render(
            '<label>request body (KServe V2 JSON) <textarea name="body" rows="12" spellcheck="false">{body}</textarea>'
            "</label>",
            body=body,
        )
        mode = "tensors"
    options = join(
        [
            render('<option value="{key}" data-path="{path}">{api} · POST {path}</option>', **asdict(route))
            for route in try_routes(detail.text, url)
        ]
    )
    return render(
        '<h2>Try it</h2><form id="try-it" class="try-it" data-mode="{mode}" data-task="{task}" data-url="{url}" '
        'data-model="{model}"><label>route <select name="route" id="try-route">{options}</select></label>{fields}'
        '<div class="actions"><button type="submit">Run</button> <span class="hint" id="try-hint">POST {url}</span> '
        '<span id="try-status" class="status" role="status"></span></div>'
        '<div class="request"><span class="hint">the request, as curl</span> '
        '<button type="button" id="try-copy" class="copy">copy</button><pre id="try-curl" class="curl"></pre></div>'
        "</form>"
        '<div id="try-result" class="try-result" aria-live="polite"></div>',
        mode=mode,
        task=task,
        url=url,
        model=f"{detail.name}:{detail.version}",
        options=options,
        fields=fields,
    )


def _ordered(a: str, b: str) -> tuple[str, str]:
    """Two versions, older first."""
    return (a, b) if int(a) < int(b) else (b, a)


def _graph_view(element_id: str, name: str, version: str, title: str, side: str = "") -> Markup:
    """The element the graph viewer fills (page.js fetches the graph; weight values are paged in on demand)."""
    return render(
        '<div id="{id}" class="graph-view" data-graph-url="{graph}" data-weights-url="{weights}" data-title="{title}"'
        '{side}><p class="muted">Loading the graph…</p></div>',
        id=element_id,
        graph=graph_api_url(name, version),
        weights=weights_api_url(name, version),
        title=title,
        side=render(' data-side="{s}"', s=side) if side else Markup(),
    )


def version_page(detail: VersionDetail, netron: bool = False) -> str:
    compare = Markup()
    others = [v for v in detail.versions if v != detail.version]
    if others:
        compare = render(
            "<p>Compare with version {links}</p>",
            links=join(
                [
                    render(
                        '<a class="compare" href="{url}">{v}</a>',
                        url=diff_url(detail.name, *_ordered(v, detail.version)),
                        v=v,
                    )
                    for v in others
                ],
                ", ",
            ),
        )
    hint = Markup()
    if netron and detail.on_disk:
        hint = render(
            '<p class="hint netron">Netron is installed here: open this version with <code>netron …/{path}</code> '
            "(the path under the model's base folder).</p>",
            path="/".join(detail.model_file.parts[-3:]),
        )
    summary = _facts(
        [
            ("state", _state(detail.state)),
            ("labels", _labels(detail.labels) or "—"),
            ("platform", detail.platform),
            ("max batch size", detail.max_batch_size or "0 (no batching)"),
            ("load time", f"{detail.load_seconds:.2f} s"),
        ]
    )
    body = render(
        '<h1>{name} <span class="version-no">version {version}</span></h1>{summary}{compare}'
        '<div class="columns"><section class="signature-section"><h2>Inputs</h2>{inputs}<h2>Outputs</h2>{outputs}'
        "</section><section>{text}{header}</section></div>"
        "{try_it}"
        "<h2>Graph</h2>{hint}{graph}",
        name=detail.name,
        version=detail.version,
        summary=summary,
        compare=compare,
        inputs=_signature_table(detail.inputs),
        outputs=_signature_table(detail.outputs),
        text=_text_section(detail.text),
        header=_header_section(detail.header),
        try_it=_try_it(detail),
        hint=hint,
        graph=_graph_view("graph", detail.name, detail.version, f"{detail.name} version {detail.version}")
        if detail.on_disk
        else render(
            '<p class="muted file-gone">This version is served from memory, but its model file is no longer on '
            "disk: its graph and weights cannot be shown until the version is loaded again.</p>"
        ),
    )
    crumbs = [
        (detail.name, model_url(detail.name)),
        (f"version {detail.version}", version_url(detail.name, detail.version)),
    ]
    return layout(f"{detail.name} version {detail.version}", body, crumbs=crumbs, viewer=True)


def diff_page(name: str, versions: Sequence[str], a: str, b: str) -> str:
    body = render(
        "<h1>{name}: version {a} → version {b}</h1>{form}"
        '<div id="diff" class="diff" data-diff-url="{diff_url}"><p class="muted">Comparing…</p></div>'
        '<h2>Graphs</h2><div class="side-by-side">'
        "<section><h3>version {a}</h3>{graph_a}</section><section><h3>version {b}</h3>{graph_b}</section></div>",
        name=name,
        a=a,
        b=b,
        form=_diff_form(name, versions, a, b),
        diff_url=diff_api_url(name, a, b),
        graph_a=_graph_view("graph-a", name, a, f"{name} version {a}", side="a"),
        graph_b=_graph_view("graph-b", name, b, f"{name} version {b}", side="b"),
    )
    crumbs = [(name, model_url(name)), (f"diff {a} → {b}", diff_url(name, a, b))]
    return layout(f"{name}: diff {a} → {b}", body, crumbs=crumbs, viewer=True)


def error_page(status: int, message: str) -> str:
    titles = {400: "Bad request", 404: "Not found", 503: "Unavailable"}
    title = titles.get(status, "Error")
    body = render(
        '<h1>{title}</h1><p class="error-message">{message}</p><p><a href="/">Back to the model list</a></p>',
        title=title,
        message=message,
    )
    return layout(title, body)
