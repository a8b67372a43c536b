// onnxserve web page: the try-it form, the graph views and the diff tables.
// Everything that comes from a model or a response is set as text (textContent), never as HTML.
"use strict";

(function () {
  const MAX_VALUES = 64;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  async function getJson(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    const text = await response.text();
    let doc = null;
    try {
      doc = JSON.parse(text);
    } catch (_) {
      doc = null;
    }
    if (!response.ok) {
      const message = doc && typeof doc.error === "string" ? doc.error : text;
      throw new Error(`${response.status}: ${message}`);
    }
    return doc;
  }

  // ---- try it ----------------------------------------------------------------------------------

  function formatValue(value) {
    if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(6).replace(/\.?0+$/, "");
    return typeof value === "string" ? JSON.stringify(value) : String(value);
  }

  function flatten(data) {
    return Array.isArray(data) ? data.flat(Infinity) : [data];
  }

  function showOutputs(target, doc, millis) {
    target.replaceChildren();
    const outputs = (doc && doc.outputs) || [];
    target.append(el("p", { class: "muted" }, `${outputs.length} output(s) in ${millis.toFixed(0)} ms`));
    for (const output of outputs) {
      const values = flatten(output.data);
      const shown = values.slice(0, MAX_VALUES).map(formatValue).join(", ");
      const more = values.length > MAX_VALUES ? ` … (${values.length} values)` : "";
      target.append(
        el(
          "div",
          { class: "output", "data-output": output.name },
          el("div", { class: "output-head" }, `${output.name} · ${output.datatype} · [${(output.shape || []).join(", ")}]`),
          el("pre", { class: "output-values" }, shown + more),
        ),
      );
    }
    target.append(
      el("details", {}, el("summary", {}, "response JSON"), el("pre", { class: "json" }, JSON.stringify(doc, null, 2))),
    );
  }

  function showError(target, message) {
    target.replaceChildren(el("div", { class: "error", role: "alert" }, message));
  }

  function lines(value) {
    return value.split("\n").map((s) => s.trim()).filter((s) => s);
  }

  // The V2 text request: BYTES inputs named as the text interface says (null: nothing to send).
  function v2TextRequest(form) {
    const inputs = [];
    const ranking = form.dataset.task === "text-ranking";
    const texts = form.elements.text ? lines(form.elements.text.value) : [];
    for (const area of form.querySelectorAll("textarea")) {
      // "text": one text per line; question-answering's question and context: one each;
      // text-ranking's query: paired with each text.
      let data = area.name === "text" ? texts : [area.value];
      if (ranking && area.name === "query") data = texts.map(() => area.value);
      if (!data.length || !data[0]) return null;
      inputs.push({ name: area.name, datatype: "BYTES", shape: [data.length], data });
    }
    return { inputs };
  }

  // Every text in the form, for /tokenize: each line of "text", each other box whole.
  function allTexts(form) {
    const texts = [];
    for (const area of form.querySelectorAll("textarea")) {
      if (area.name === "text") texts.push(...lines(area.value));
      else if (area.value.trim()) texts.push(area.value.trim());
    }
    return texts;
  }

  function oneOrMany(texts) {
    return texts.length === 1 ? texts[0] : texts;
  }

  // Each route: how its body is built from the form, whether it names the model in a header, and
  // how its answer is summed up (the whole JSON answer is shown below the summary).
  const ROUTES = {
    v2: { body: (form) => (form.dataset.mode === "text" ? v2TextRequest(form) : form.elements.body.value) },
    "openai-embeddings": {
      body: (form) => ({ model: form.dataset.model, input: oneOrMany(lines(form.elements.text.value)) }),
      summary: (doc) => `${doc.data.length} embedding(s) of ${doc.data[0].embedding.length} values, ${doc.usage.prompt_tokens} tokens`,
    },
    "tei-embed": {
      header: true,
      body: (form) => ({ inputs: oneOrMany(lines(form.elements.text.value)) }),
      summary: (doc) => `${doc.length} embedding(s) of ${doc[0].length} values`,
    },
    "tei-rerank": {
      header: true,
      body: (form) => ({ query: form.elements.query.value.trim(), texts: lines(form.elements.text.value), return_text: true }),
      summary: (doc) => doc.map((r) => `${formatValue(r.score)}  #${r.index}  ${r.text}`).join("\n"),
    },
    "tei-predict": {
      header: true,
      body: (form) => ({ inputs: oneOrMany(lines(form.elements.text.value)) }),
      summary: (doc) => (Array.isArray(doc[0]) ? doc : [doc]).map((p) => `${p[0].label} (${formatValue(p[0].score)})`).join("\n"),
    },
    "tei-tokenize": {
      header: true,
      body: (form) => ({ inputs: oneOrMany(allTexts(form)) }),
      summary: (doc) => doc.map((tokens) => tokens.map((t) => t.text).join(" ")).join("\n"),
    },
  };

  function shellQuote(text) {
    return "'" + text.replace(/'/g, "'\\''") + "'";
  }

  // The request the form sends now: method, URL, headers, body text (body null: nothing to send).
  function currentRequest(form) {
    const option = form.elements.route.selectedOptions[0];
    const route = ROUTES[option.value];
    const headers = { "Content-Type": "application/json" };
    if (route.header) headers["X-Model"] = form.dataset.model;
    const built = route.body(form);
    const body = built === null ? null : typeof built === "string" ? built : JSON.stringify(built);
    return { key: option.value, route, path: option.dataset.path, headers, body };
  }

  function curlLine(request) {
    const parts = ["curl", "-s", "-X", "POST", shellQuote(window.location.origin + request.path)];
    for (const [name, value] of Object.entries(request.headers)) parts.push("-H", shellQuote(`${name}: ${value}`));
    parts.push("-d", shellQuote(request.body === null ? "" : request.body));
    return parts.join(" ");
  }

  // The message of an error answer in any of the shapes: V2 and TEI {"error": "..."}, OpenAI {"error": {"message"}}.
  function errorMessage(doc, text) {
    if (doc && typeof doc.error === "string") return doc.error;
    if (doc && doc.error && typeof doc.error.message === "string") return doc.error.message;
    return text;
  }

  function showAnswer(target, route, doc, millis) {
    target.replaceChildren(el("p", { class: "muted" }, `answered in ${millis.toFixed(0)} ms`));
    let summary = "";
    try {
      summary = route.summary(doc);
    } catch (_) {
      summary = "";
    }
    if (summary) target.append(el("pre", { class: "summary" }, summary));
    target.append(el("pre", { class: "json", "data-answer": "" }, JSON.stringify(doc, null, 2)));
  }

  function setUpTryIt(form) {
    const result = document.getElementById("try-result");
    const status = document.getElementById("try-status");
    const curl = document.getElementById("try-curl");
    const hint = document.getElementById("try-hint");
    const button = form.querySelector("button[type=submit]");
    const refresh = () => {
      const request = currentRequest(form);
      hint.textContent = `POST ${request.path}`;
      curl.textContent = request.body === null ? "(enter a text to send)" : curlLine(request);
    };
    form.addEventListener("input", refresh);
    form.addEventListener("change", refresh);
    refresh();
    document.getElementById("try-copy").addEventListener("click", () => {
      if (navigator.clipboard) navigator.clipboard.writeText(curl.textContent).catch(() => {});
      window.getSelection().selectAllChildren(curl);
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const request = currentRequest(form);
      if (request.body === null) {
        showError(result, "enter a text to send");
        status.textContent = "";
        return;
      }
      button.disabled = true;
      status.textContent = "running…";
      const started = performance.now();
      try {
        const response = await fetch(request.path, {
          method: "POST",
          headers: { ...request.headers, Accept: "application/json" },
          body: request.body,
        });
        const text = await response.text();
        let doc = null;
        try {
          doc = JSON.parse(text);
        } catch (_) {
          doc = null;
        }
        if (response.ok && doc !== null) {
          if (request.key === "v2") showOutputs(result, doc, performance.now() - started);
          else showAnswer(result, request.route, doc, performance.now() - started);
          status.textContent = `${response.status} OK`;
        } else {
          showError(result, `${response.status}: ${errorMessage(doc, text)}`);
          if (request.key !== "v2" && doc !== null) {
            result.append(el("pre", { class: "json", "data-answer": "" }, JSON.stringify(doc, null, 2)));
          }
          status.textContent = `${response.status} error`;
        }
      } catch (error) {
        showError(result, `the request did not reach the server: ${error.message}`);
        status.textContent = "failed";
      } finally {
        button.disabled = false;
      }
    });
  }

  // ---- graphs ----------------------------------------------------------------------------------

  // The shared graph viewer (toolkit/visualize/assets/viewer.js), fed the graph document and a
  // pager that fetches a weight's values from the server on demand.
  function drawGraph(container, graph, marks) {
    const viewer = window.OnnxServeViewer;
    container.replaceChildren();
    if (!viewer) {
      container.append(el("p", { class: "error" }, "the graph viewer did not load"));
      return;
    }
    const weightsUrl = container.dataset.weightsUrl;
    const payload = { title: container.dataset.title, graph, weights: {}, intermediates: {}, highlight: marks || {} };
    const fetchValues = async (name, offset, limit) => {
      const query = new URLSearchParams({ name, offset: String(offset), limit: String(limit) });
      const page = await getJson(`${weightsUrl}?${query}`);
      return { values: page.values, total: page.total };
    };
    viewer.mount(container, payload, { fetchValues });
    container.dataset.nodes = String(graph.nodes.length);
  }

  async function loadGraph(container, marks) {
    try {
      const graph = await getJson(container.dataset.graphUrl);
      drawGraph(container, graph, marks);
    } catch (error) {
      container.replaceChildren(el("p", { class: "error", role: "alert" }, `cannot show the graph: ${error.message}`));
    }
  }

  // ---- diff ------------------------------------------------------------------------------------

  const DIFF_ORDER = [
    "summary", "node_counts", "versions", "signature", "nodes_added", "nodes_removed", "nodes_changed",
    "nodes_renamed", "replacements", "initializers", "numeric",
  ];

  function title(key) {
    return key.replace(/_/g, " ");
  }

  function isPlainObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  // Short forms for the diff's small records: a node reference, a tensor type.
  function shortForm(value) {
    if (typeof value.id === "string" && typeof value.op_type === "string") {
      return `${value.id} (${value.domain ? value.domain + "::" : ""}${value.op_type})`;
    }
    if (typeof value.dtype === "string" && Array.isArray(value.shape) && Object.keys(value).length === 2) {
      return `${value.dtype}[${value.shape.map((d) => (d === null ? "?" : d)).join(", ")}]`;
    }
    return null;
  }

  function renderValue(value) {
    if (Array.isArray(value)) {
      if (value.length === 0) return el("span", { class: "none" }, "none");
      if (value.every((v) => isPlainObject(v) && shortForm(v) === null)) return renderRows(value);
      const text = (v) => (isPlainObject(v) ? shortForm(v) || JSON.stringify(v) : Array.isArray(v) ? JSON.stringify(v) : typeof v === "string" ? v : formatValue(v));
      return el("span", {}, value.map(text).join(", "));
    }
    if (isPlainObject(value)) {
      const short = shortForm(value);
      if (short !== null) return el("span", {}, short);
      const rows = Object.entries(value).map(([k, v]) => el("tr", {}, el("th", {}, title(k)), el("td", {}, renderValue(v))));
      return rows.length ? el("table", {}, el("tbody", {}, ...rows)) : el("span", { class: "none" }, "none");
    }
    if (value === null || value === undefined) return el("span", { class: "none" }, "—");
    return el("span", {}, typeof value === "string" ? value : formatValue(value));
  }

  function renderRows(items) {
    const columns = [];
    for (const item of items) for (const key of Object.keys(item)) if (!columns.includes(key)) columns.push(key);
    const head = el("tr", {}, ...columns.map((c) => el("th", {}, title(c))));
    const body = items.map((item) => {
      const row = el("tr", {}, ...columns.map((c) => el("td", {}, renderValue(item[c]))));
      if (["added", "removed", "changed"].includes(item.change)) row.classList.add(item.change);
      return row;
    });
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
  }

  function renderDiff(target, diff) {
    target.replaceChildren(
      el("p", { class: "legend" }, "in the graphs: ", el("span", { class: "added" }, "added"), el("span", { class: "removed" }, "removed"), el("span", { class: "changed" }, "changed")),
    );
    const keys = DIFF_ORDER.filter((k) => k in diff).concat(Object.keys(diff).filter((k) => !DIFF_ORDER.includes(k)));
    const empty = (v) => (Array.isArray(v) ? v.length === 0 : isPlainObject(v) ? Object.keys(v).length === 0 : v === null);
    const unchanged = keys.filter((k) => empty(diff[k]));
    for (const key of keys.filter((k) => !empty(diff[k]))) {
      const section = el("section", { "data-part": key }, el("h3", {}, title(key)), renderValue(diff[key]));
      if (key.startsWith("nodes_") && Array.isArray(diff[key])) section.classList.add(key.slice(6));
      target.append(section);
    }
    if (unchanged.length) target.append(el("p", { class: "none", "data-part": "empty" }, `none: ${unchanged.map(title).join(", ")}`));
    target.append(
      el("details", {}, el("summary", {}, "diff JSON"), el("pre", { class: "json" }, JSON.stringify(diff, null, 2))),
    );
  }

  async function setUpDiff(target) {
    let marks = { a: {}, b: {} };
    try {
      const doc = await getJson(target.dataset.diffUrl);
      renderDiff(target, doc.diff);
      marks = doc.highlight;
    } catch (error) {
      target.replaceChildren(el("p", { class: "error", role: "alert" }, `cannot compare: ${error.message}`));
    }
    for (const container of document.querySelectorAll(".graph-view[data-side]")) {
      loadGraph(container, marks[container.dataset.side]);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const form = document.getElementById("try-it");
    if (form) setUpTryIt(form);
    const diff = document.getElementById("diff");
    if (diff) setUpDiff(diff);
    for (const container of document.querySelectorAll(".graph-view:not([data-side])")) loadGraph(container, null);
  });
})();
