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

  function textRequest(form) {
    const inputs = [];
    for (const area of form.querySelectorAll("textarea")) {
      // "text": one text per line; question-answering's question and context: one each.
      const texts = area.name === "text" ? area.value.split("\n").map((s) => s.trim()).filter((s) => s) : [area.value];
      if (!texts.length || !texts[0]) return null;
      inputs.push({ name: area.name, datatype: "BYTES", shape: [texts.length], data: texts });
    }
    return JSON.stringify({ inputs });
  }

  function setUpTryIt(form) {
    const result = document.getElementById("try-result");
    const status = document.getElementById("try-status");
    const button = form.querySelector("button[type=submit]");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = form.dataset.mode === "text" ? textRequest(form) : form.elements.body.value;
      if (body === null) {
        showError(result, "enter a text to send");
        status.textContent = "";
        return;
      }
      button.disabled = true;
      status.textContent = "running…";
      const started = performance.now();
      try {
        const response = await fetch(form.dataset.url, {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "application/json" },
          body,
        });
        const text = await response.text();
        let doc = null;
        try {
          doc = JSON.parse(text);
        } catch (_) {
          doc = null;
        }
        if (response.ok && doc) {
          showOutputs(result, doc, performance.now() - started);
          status.textContent = `${response.status} OK`;
        } else {
          const message = doc && typeof doc.error === "string" ? doc.error : text;
          showError(result, `${response.status}: ${message}`);
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
