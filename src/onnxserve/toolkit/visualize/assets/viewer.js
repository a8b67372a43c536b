/* onnxserve graph viewer: no dependencies, no network.
 *
 * OnnxServeViewer.mount(element, payload, options) draws the graph of an onnxserve viewer payload
 * ({graph, weights, intermediates, highlight, values_embedded}, see toolkit/visualize/html.py) into
 * element. options.fetchValues(name, offset, limit) -> Promise<{values, total}> pages through a
 * weight's values beyond those embedded (the server's web page provides it; a file has none).
 */
(function (global) {
  "use strict";

  var NODE_H = 36, LAYER_GAP = 34, NODE_GAP = 18, LANE_GAP = 6, WAYPOINT_W = 2, CHAR_W = 7.2, MIN_W = 72, SWEEPS = 8;
  var PAGE = 100;
  var HEAVY = { MatMul: 1, Gemm: 1, Conv: 1, ConvTranspose: 1, Attention: 1, MultiHeadAttention: 1 };
  var AUTO_COLLAPSE_ABOVE = 400, VISIBLE_TARGET = 300;
  var SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function sel(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") {
      if (Number.isInteger(v)) return String(v);
      var a = Math.abs(v);
      return (a !== 0 && (a < 1e-3 || a >= 1e5)) ? v.toExponential(4) : v.toPrecision(5);
    }
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function shapeText(info) {
    if (!info) return "?";
    var s = info.shape === null || info.shape === undefined ? "?" : "[" + info.shape.map(function (d) { return d === null ? "?" : d; }).join(", ") + "]";
    return info.dtype + " " + s;
  }
  function prefixes(module) {
    if (!module) return [];
    var parts = module.split("/"), out = [];
    for (var i = 1; i <= parts.length; i++) out.push(parts.slice(0, i).join("/"));
    return out;
  }

  /* ---------- layout: the same steps as toolkit/visualize/layout.py ----------
   * layers by longest path; long edges through shared per-source lanes of waypoints; barycenter
   * ordering sweeps; each row placed by the mean of a rightward and a leftward packing. */
  function layout(vertices, edges, widthOf) {
    var preds = {}, succs = {}, indeg = {};
    vertices.forEach(function (v) { preds[v] = []; succs[v] = []; indeg[v] = 0; });
    edges.forEach(function (e) { preds[e[1]].push(e[0]); succs[e[0]].push(e[1]); indeg[e[1]]++; });
    var ready = vertices.filter(function (v) { return indeg[v] === 0; }), topo = [];
    while (ready.length) {
      var v = ready.pop(); topo.push(v);
      succs[v].forEach(function (s) { if (--indeg[s] === 0) ready.push(s); });
    }
    vertices.forEach(function (v) { if (indeg[v] > 0) topo.push(v); });
    var layer = {};
    topo.forEach(function (v) {
      var l = 0;
      preds[v].forEach(function (p) { if (p in layer) l = Math.max(l, layer[p] + 1); });
      layer[v] = l;
    });
    for (var i = topo.length - 1; i >= 0; i--) {
      var u = topo[i];
      if (!preds[u].length && u.indexOf("input:") !== 0 && succs[u].length) {
        var m = Infinity;
        succs[u].forEach(function (s) { m = Math.min(m, layer[s]); });
        layer[u] = Math.max(0, m - 1);
      }
    }
    // lanes of waypoints for long edges, one lane per source
    var reach = {}, lanes = {}, w = {};
    vertices.forEach(function (v) { w[v] = widthOf(v); });
    edges.forEach(function (e) {
      if (layer[e[1]] - layer[e[0]] > 1) reach[e[0]] = Math.max(reach[e[0]] || 0, layer[e[1]]);
    });
    Object.keys(reach).forEach(function (a) {
      var lane = [];
      for (var l = layer[a] + 1; l < reach[a]; l++) {
        var id = "\u0000" + a + "\u0000" + l;
        layer[id] = l; w[id] = WAYPOINT_W; lane.push(id);
      }
      lanes[a] = lane;
    });
    var paths = edges.map(function (e) {
      var span = layer[e[1]] - layer[e[0]];
      return span > 1 ? [e[0]].concat(lanes[e[0]].slice(0, span - 1), [e[1]]) : [e[0], e[1]];
    });
    var lp = {}, ls = {};
    Object.keys(layer).forEach(function (v) { lp[v] = []; ls[v] = []; });
    var linkSeen = {};
    paths.forEach(function (path) {
      for (var k = 0; k + 1 < path.length; k++) {
        var key = path[k] + "\u0001" + path[k + 1];
        if (linkSeen[key]) continue;
        linkSeen[key] = 1; ls[path[k]].push(path[k + 1]); lp[path[k + 1]].push(path[k]);
      }
    });
    var rows = [];
    Object.keys(layer).forEach(function (v) { (rows[layer[v]] = rows[layer[v]] || []).push(v); });
    rows = rows.filter(function (r) { return r; });
    var x = {};
    function gap(a, b) {
      var thin = w[a] <= WAYPOINT_W || w[b] <= WAYPOINT_W;
      return (w[a] + w[b]) / 2 + (thin ? LANE_GAP : NODE_GAP);
    }
    function pack(row, wanted) {
      if (!row.length) return;
      var n = row.length, right = new Array(n), left = new Array(n);
      right[0] = wanted[row[0]];
      for (var k = 1; k < n; k++) right[k] = Math.max(wanted[row[k]], right[k - 1] + gap(row[k - 1], row[k]));
      left[n - 1] = wanted[row[n - 1]];
      for (k = n - 2; k >= 0; k--) left[k] = Math.min(wanted[row[k]], left[k + 1] - gap(row[k], row[k + 1]));
      for (k = 0; k < n; k++) x[row[k]] = (right[k] + left[k]) / 2;
    }
    rows.forEach(function (row) { var wanted = {}; row.forEach(function (v, k) { wanted[v] = k; }); pack(row, wanted); });
    for (var s = 0; s < SWEEPS; s++) {
      var order = s % 2 === 0 ? rows : rows.slice().reverse(), nb = s % 2 === 0 ? lp : ls;
      for (var r = 1; r < order.length; r++) {
        var row = order[r], wanted = {};
        row.forEach(function (v) {
          var sum = 0, n = 0;
          nb[v].forEach(function (p) { if (p in x) { sum += x[p]; n++; } });
          wanted[v] = n ? sum / n : x[v];
        });
        row.sort(function (a, b) { return wanted[a] - wanted[b]; });
        pack(row, wanted);
      }
    }
    var rowOf = {}, minX = Infinity, maxX = -Infinity;
    rows.forEach(function (row, k) { row.forEach(function (v) { rowOf[v] = k; }); });
    Object.keys(x).forEach(function (v) { minX = Math.min(minX, x[v] - w[v] / 2); maxX = Math.max(maxX, x[v] + w[v] / 2); });
    var shift = NODE_GAP - minX;
    function top(v) { return NODE_GAP + rowOf[v] * (NODE_H + LAYER_GAP); }
    var boxes = {};
    vertices.forEach(function (v) { boxes[v] = { x: x[v] - w[v] / 2 + shift, y: top(v), w: w[v], h: NODE_H }; });
    var routes = paths.map(function (path) {
      var pts = [[x[path[0]] + shift, top(path[0]) + NODE_H]];
      for (var k = 1; k + 1 < path.length; k++) pts.push([x[path[k]] + shift, top(path[k]) + NODE_H / 2]);
      pts.push([x[path[path.length - 1]] + shift, top(path[path.length - 1])]);
      return pts;
    });
    return { boxes: boxes, routes: routes, width: maxX - minX + 2 * NODE_GAP, height: NODE_GAP * 2 + rows.length * (NODE_H + LAYER_GAP) - LAYER_GAP };
  }

  function pathData(pts) {
    var d = "M" + pts[0][0].toFixed(1) + "," + pts[0][1].toFixed(1);
    for (var k = 1; k < pts.length; k++) {
      var a = pts[k - 1], b = pts[k], mid = ((a[1] + b[1]) / 2).toFixed(1);
      d += " C" + a[0].toFixed(1) + "," + mid + " " + b[0].toFixed(1) + "," + mid + " " + b[0].toFixed(1) + "," + b[1].toFixed(1);
    }
    return d;
  }

  /* ---------- the viewer ---------- */
  function Viewer(root, payload, options) {
    this.root = root;
    this.payload = payload;
    this.graph = payload.graph;
    this.options = options || {};
    this.highlight = payload.highlight || this.options.highlight || {};
    this.intermediates = payload.intermediates || {};
    this.weights = payload.weights || {};
    this.collapsed = {};
    this.selected = null;
    this.dragged = false;
    this.matches = {};
    this.view = { x: 0, y: 0, k: 1 };
    var g = this.graph, self = this;
    this.nodeByName = {};
    g.nodes.forEach(function (n) { self.nodeByName[n.name] = n; });
    this.modules = {};
    g.nodes.forEach(function (n) {
      prefixes(n.module).forEach(function (p) { self.modules[p] = (self.modules[p] || 0) + 1; });
    });
    this.build();
    if (g.nodes.length > AUTO_COLLAPSE_ABOVE) this.autoCollapse();
    this.redraw();
    this.fit();
  }

  Viewer.prototype.build = function () {
    var self = this;
    this.root.innerHTML = "";
    this.root.classList.add("osv-root");
    var main = el("div", { "class": "osv-main" });
    var bar = el("div", { "class": "osv-toolbar" });
    this.search = el("input", { type: "search", placeholder: "Search nodes, ops, tensors…", "class": "osv-search" });
    this.search.addEventListener("input", function () { self.runSearch(self.search.value); });
    this.search.addEventListener("keydown", function (e) {
      if (e.key === "Enter") { var first = Object.keys(self.matches)[0]; if (first) self.select(first, true); }
    });
    bar.appendChild(this.search);
    [["Fit", function () { self.fit(); }],
     ["Expand all", function () { self.collapsed = {}; self.redraw(); self.fit(); }],
     ["Collapse modules", function () { self.autoCollapse(true); self.redraw(); self.fit(); }]].forEach(function (b) {
      var button = el("button", { type: "button" }, b[0]);
      button.addEventListener("click", b[1]);
      bar.appendChild(button);
    });
    this.count = el("span", { "class": "osv-count" });
    bar.appendChild(this.count);
    main.appendChild(bar);
    this.canvas = el("div", { "class": "osv-canvas" });
    this.svg = sel("svg");
    this.scene = sel("g", { "class": "osv-scene" });
    this.svg.appendChild(this.scene);
    this.canvas.appendChild(this.svg);
    main.appendChild(this.canvas);
    this.side = el("div", { "class": "osv-side" });
    this.root.appendChild(main);
    this.root.appendChild(this.side);
    this.bindPanZoom();
    this.showSummary();
  };

  Viewer.prototype.autoCollapse = function (force) {
    // The deepest module depth whose collapsing leaves at most VISIBLE_TARGET boxes (depth 1 at least).
    var names = Object.keys(this.modules), depths = {};
    names.forEach(function (m) { depths[m.split("/").length] = 1; });
    var levels = Object.keys(depths).map(Number).sort(function (a, b) { return a - b; });
    if (!levels.length) return;
    var chosen = levels[0];
    for (var i = 0; i < levels.length; i++) {
      var trial = this.collapseAt(levels[i]);
      if (this.visibleCount(trial) <= VISIBLE_TARGET) chosen = levels[i]; else break;
    }
    this.collapsed = this.collapseAt(chosen);
    if (!force && this.visibleCount(this.collapsed) >= this.graph.nodes.length) this.collapsed = {};
  };

  Viewer.prototype.collapseAt = function (depth) {
    var out = {};
    for (var m in this.modules) if (m.split("/").length === depth && this.modules[m] > 1) out[m] = true;
    return out;
  };

  Viewer.prototype.repOf = function (node, collapsed) {
    var ps = prefixes(node.module);
    for (var i = 0; i < ps.length; i++) if (collapsed[ps[i]]) return "group:" + ps[i];
    return node.name;
  };

  Viewer.prototype.visibleCount = function (collapsed) {
    var seen = {}, self = this;
    this.graph.nodes.forEach(function (n) { seen[self.repOf(n, collapsed)] = 1; });
    return Object.keys(seen).length;
  };

  Viewer.prototype.redraw = function () {
    var self = this, g = this.graph, rep = {}, vertices = [], seen = {}, groupSize = {};
    function add(v) { if (!seen[v]) { seen[v] = 1; vertices.push(v); } }
    g.inputs.forEach(function (v) { add("input:" + v.name); rep["input:" + v.name] = "input:" + v.name; });
    g.nodes.forEach(function (n) {
      var r = self.repOf(n, self.collapsed);
      rep[n.name] = r; add(r);
      if (r !== n.name) groupSize[r] = (groupSize[r] || 0) + 1;
    });
    g.outputs.forEach(function (v) { add("output:" + v.name); rep["output:" + v.name] = "output:" + v.name; });
    this.rep = rep;
    var edges = [], edgeSeen = {};
    g.edges.forEach(function (e) {
      var a = rep[e.source], b = rep[e.target];
      if (a === undefined || b === undefined || a === b) return;
      var key = a + "\u0000" + b;
      if (edgeSeen[key]) { edgeSeen[key].push(e.tensor); return; }
      edgeSeen[key] = [e.tensor];
      edges.push([a, b, edgeSeen[key]]);
    });
    function label(v) {
      if (v.indexOf("input:") === 0) return v.slice(6);
      if (v.indexOf("output:") === 0) return v.slice(7);
      if (v.indexOf("group:") === 0) { var p = v.slice(6).split("/"); return "▸ " + p.slice(-2).join("/") + " (" + groupSize[v] + ")"; }
      return self.nodeByName[v].op_type;
    }
    var labels = {};
    vertices.forEach(function (v) { labels[v] = label(v); });
    var lay = layout(vertices, edges, function (v) { return Math.max(MIN_W, CHAR_W * labels[v].length + 20); });
    this.lay = lay;
    var scene = this.scene;
    while (scene.firstChild) scene.removeChild(scene.firstChild);
    var edgeLayer = sel("g"), nodeLayer = sel("g");
    scene.appendChild(edgeLayer); scene.appendChild(nodeLayer);
    edges.forEach(function (e, k) {
      var probed = e[2].some(function (t) { return t in self.intermediates; });
      var path = sel("path", { "class": "osv-edge" + (probed ? " probed" : ""), d: pathData(lay.routes[k]) });
      var title = sel("title");
      title.textContent = e[2].map(function (t) { return t + "  " + shapeText(g.values[t]); }).join("\n");
      path.appendChild(title);
      edgeLayer.appendChild(path);
    });
    this.boxEls = {};
    vertices.forEach(function (v) {
      var b = lay.boxes[v], classes = ["osv-node"];
      if (v.indexOf("input:") === 0) classes.push("input");
      else if (v.indexOf("output:") === 0) classes.push("output");
      else if (v.indexOf("group:") === 0) classes.push("group");
      else {
        var n = self.nodeByName[v];
        if (HEAVY[n.op_type]) classes.push("heavy");
        if (self.highlight[v]) classes.push(self.highlight[v]);
        if (n.outputs.some(function (t) { return t in self.intermediates; })) classes.push("probed");
      }
      var grp = sel("g", { "class": classes.join(" "), "data-name": v, transform: "translate(" + b.x + "," + b.y + ")" });
      grp.appendChild(sel("rect", { width: b.w, height: b.h, rx: 5 }));
      var text = sel("text", { x: b.w / 2, y: b.h / 2 });
      text.textContent = labels[v];
      grp.appendChild(text);
      var title = sel("title");
      title.textContent = v.indexOf("group:") === 0 ? v.slice(6) + " — click to expand" : v;
      grp.appendChild(title);
      grp.addEventListener("click", function (ev) {
        ev.stopPropagation();
        if (!self.dragged) self.onBox(v);  // the end of a pan is not a click
      });
      nodeLayer.appendChild(grp);
      self.boxEls[v] = grp;
    });
    this.count.textContent = g.nodes.length + " nodes, " + vertices.length + " boxes shown";
    this.applyMarks();
  };

  Viewer.prototype.applyMarks = function () {
    for (var v in this.boxEls) {
      var c = this.boxEls[v].classList;
      c.toggle("match", !!this.matches[v]);
      c.toggle("selected", this.selected !== null && this.rep[this.selected] === v);
    }
  };

  Viewer.prototype.onBox = function (v) {
    if (v.indexOf("group:") === 0) {
      var module = v.slice(6);
      delete this.collapsed[module];
      // open one level: the module's children that hold several nodes stay collapsed
      for (var m in this.modules) {
        if (m.indexOf(module + "/") === 0 && m.slice(module.length + 1).indexOf("/") < 0 && this.modules[m] > 1) this.collapsed[m] = true;
      }
      this.redraw();
      return;
    }
    this.select(v, false);
  };

  Viewer.prototype.select = function (name, center) {
    var n = this.nodeByName[name];
    if (n) {
      var changed = false, self = this;
      prefixes(n.module).forEach(function (p) { if (self.collapsed[p]) { delete self.collapsed[p]; changed = true; } });
      if (changed) this.redraw();
    }
    this.selected = name;
    this.applyMarks();
    this.showDetails(name);
    if (center && this.lay.boxes[name]) this.centerOn(this.lay.boxes[name]);
  };

  /* ---------- search ---------- */
  Viewer.prototype.runSearch = function (text) {
    var q = text.trim().toLowerCase(), self = this;
    this.matches = {};
    var found = [];
    if (q) {
      this.graph.nodes.forEach(function (n) {
        var hit = n.name.toLowerCase().indexOf(q) >= 0 || n.op_type.toLowerCase().indexOf(q) >= 0 ||
          n.inputs.concat(n.outputs).some(function (t) { return t.toLowerCase().indexOf(q) >= 0; });
        if (hit) { found.push(n); self.matches[self.rep[n.name]] = true; }
      });
    }
    this.applyMarks();
    if (!q) { this.showSummary(); return; }
    this.side.innerHTML = "";
    this.side.appendChild(el("h2", null, found.length + " match" + (found.length === 1 ? "" : "es") + " for “" + text.trim() + "”"));
    var list = el("div", { "class": "osv-results" });
    found.slice(0, 500).forEach(function (n) {
      var row = el("div", { "data-name": n.name }, n.op_type + " — " + n.name);
      row.addEventListener("click", function () { self.select(n.name, true); });
      list.appendChild(row);
    });
    if (found.length > 500) list.appendChild(el("p", { "class": "osv-muted" }, "first 500 shown"));
    this.side.appendChild(list);
  };

  /* ---------- side panel ---------- */
  Viewer.prototype.showSummary = function () {
    var g = this.graph, side = this.side;
    side.innerHTML = "";
    side.appendChild(el("h2", null, this.payload.title || g.name || "graph"));
    var t = el("table");
    function row(k, v) { var tr = el("tr"); tr.appendChild(el("th", null, k)); tr.appendChild(el("td", null, v)); t.appendChild(tr); }
    row("producer", g.producer || "–");
    row("IR version", String(g.ir_version));
    row("opsets", Object.keys(g.opsets).map(function (d) { return d + " " + g.opsets[d]; }).join(", "));
    row("nodes", String(g.nodes.length));
    row("initializers", String(Object.keys(g.initializers).length));
    side.appendChild(t);
    side.appendChild(el("h3", null, "Inputs"));
    side.appendChild(this.tensorTable(g.inputs.map(function (v) { return v.name; })));
    side.appendChild(el("h3", null, "Outputs"));
    side.appendChild(this.tensorTable(g.outputs.map(function (v) { return v.name; })));
    var probes = Object.keys(this.intermediates);
    if (probes.length) {
      side.appendChild(el("h3", null, "Intermediate tensors"));
      var self = this;
      probes.forEach(function (name) { side.appendChild(self.statsBlock(name, self.intermediates[name], false)); });
    }
    side.appendChild(el("p", { "class": "osv-muted" }, "Click a node for its attributes, shapes and weights; click a ▸ group to expand it. Drag to pan, wheel to zoom."));
  };

  Viewer.prototype.tensorTable = function (names) {
    var t = el("table"), g = this.graph;
    names.forEach(function (name) {
      var tr = el("tr");
      tr.appendChild(el("th", null, name));
      tr.appendChild(el("td", null, shapeText(g.values[name])));
      t.appendChild(tr);
    });
    return t;
  };

  Viewer.prototype.showDetails = function (name) {
    var side = this.side, g = this.graph, self = this;
    side.innerHTML = "";
    if (name.indexOf("input:") === 0 || name.indexOf("output:") === 0) {
      var tensor = name.slice(name.indexOf(":") + 1);
      side.appendChild(el("h2", null, (name.indexOf("input:") === 0 ? "Input " : "Output ") + tensor));
      side.appendChild(this.tensorTable([tensor]));
      if (this.intermediates[tensor]) side.appendChild(this.statsBlock(tensor, this.intermediates[tensor], false));
      return;
    }
    var n = this.nodeByName[name];
    side.appendChild(el("h2", { "class": "osv-node-title" }, n.op_type + " — " + n.name));
    var t = el("table");
    function row(k, v) { var tr = el("tr"); tr.appendChild(el("th", null, k)); tr.appendChild(el("td", null, v)); t.appendChild(tr); }
    row("op", (n.domain ? n.domain + "::" : "") + n.op_type);
    row("module", n.module || "–");
    side.appendChild(t);
    if (n.module) {
      var tools = el("div");
      prefixes(n.module).forEach(function (p) {
        var b = el("button", { type: "button" }, "collapse " + p.split("/").pop());
        b.addEventListener("click", function () { self.collapsed[p] = true; self.selected = null; self.redraw(); self.showSummary(); });
        tools.appendChild(b);
      });
      side.appendChild(tools);
    }
    var attrs = Object.keys(n.attributes);
    side.appendChild(el("h3", null, "Attributes"));
    if (!attrs.length) side.appendChild(el("p", { "class": "osv-muted" }, "none"));
    else {
      var at = el("table", { "class": "osv-attributes" });
      attrs.forEach(function (k) { var tr = el("tr"); tr.appendChild(el("th", null, k)); tr.appendChild(el("td", null, fmt(n.attributes[k]))); at.appendChild(tr); });
      side.appendChild(at);
    }
    side.appendChild(el("h3", null, "Inputs"));
    side.appendChild(this.tensorTable(n.inputs.filter(function (x) { return x && !(x in g.initializers); })));
    side.appendChild(el("h3", null, "Outputs"));
    side.appendChild(this.tensorTable(n.outputs.filter(function (x) { return x; })));
    n.outputs.forEach(function (o) { if (self.intermediates[o]) side.appendChild(self.statsBlock(o, self.intermediates[o], false)); });
    var weights = n.inputs.filter(function (x) { return x in g.initializers; });
    if (weights.length) {
      side.appendChild(el("h3", null, "Weights"));
      weights.forEach(function (w) { side.appendChild(self.statsBlock(w, g.initializers[w], true)); });
    }
  };

  Viewer.prototype.statsBlock = function (name, s, isWeight) {
    var box = el("div", { "class": "osv-weight", "data-tensor": name });
    box.appendChild(el("div", null, name));
    var t = el("table", { "class": "osv-stats" });
    function row(k, v) { var tr = el("tr"); tr.appendChild(el("th", null, k)); tr.appendChild(el("td", null, v)); t.appendChild(tr); }
    row("type", s.dtype + " [" + s.shape.join(", ") + "]");
    row("count", fmt(s.count) + (isWeight ? " (" + fmt(s.bytes) + " bytes" + (s.external ? ", external data" : "") + ")" : ""));
    ["min", "max", "mean", "std"].forEach(function (k) { row(k, fmt(s[k])); });
    row("sparsity", s.sparsity === null || s.sparsity === undefined ? "–" : (100 * s.sparsity).toFixed(2) + "% zeros");
    box.appendChild(t);
    if (s.histogram) box.appendChild(this.histogram(s.histogram));
    if (isWeight) box.appendChild(this.pager(name, s));
    return box;
  };

  Viewer.prototype.histogram = function (h) {
    var W = 340, H = 70, n = h.counts.length, max = Math.max.apply(null, h.counts.concat([1]));
    var svg = sel("svg", { "class": "osv-hist", width: W, height: H + 14, viewBox: "0 0 " + W + " " + (H + 14) });
    h.counts.forEach(function (c, i) {
      var bh = c ? Math.max(1, H * c / max) : 0;
      var r = sel("rect", { x: i * W / n + 0.5, y: H - bh, width: W / n - 1, height: bh });
      var title = sel("title");
      title.textContent = "[" + fmt(h.edges[i]) + ", " + fmt(h.edges[i + 1]) + "): " + c;
      r.appendChild(title);
      svg.appendChild(r);
    });
    var lo = sel("text", { x: 0, y: H + 12, "font-size": 10 }); lo.textContent = fmt(h.edges[0]);
    var hi = sel("text", { x: W, y: H + 12, "font-size": 10, "text-anchor": "end" }); hi.textContent = fmt(h.edges[n]);
    svg.appendChild(lo); svg.appendChild(hi);
    return svg;
  };

  Viewer.prototype.pager = function (name, s) {
    var self = this, wrap = el("div", { "class": "osv-pager" }), embedded = this.weights[name];
    var values = el("div", { "class": "osv-values" }), info = el("div", { "class": "osv-muted" });
    var prev = el("button", { type: "button" }, "◀ prev"), next = el("button", { type: "button" }, "next ▶");
    var offset = 0, total = s.count;
    function show(vals, from) {
      values.textContent = vals.map(function (v, i) { return "[" + (from + i) + "] " + String(v); }).join("\n");
      var shown = from + vals.length;
      info.textContent = "values " + from + "–" + Math.max(from, shown - 1) + " of " + total + (embedded && !self.options.fetchValues && embedded.values.length < total ? " (this file embeds the first " + embedded.values.length + ")" : "");
    }
    function load() {
      var limit = PAGE;
      if (embedded && offset < embedded.values.length) {
        show(embedded.values.slice(offset, offset + limit), offset);
      } else if (self.options.fetchValues) {
        self.options.fetchValues(name, offset, limit).then(function (page) { total = page.total; show(page.values, offset); });
      } else {
        values.textContent = "";
        info.textContent = embedded ? "only the first " + embedded.values.length + " values are embedded in this file" : "values not embedded";
      }
    }
    prev.addEventListener("click", function () { offset = Math.max(0, offset - PAGE); load(); });
    next.addEventListener("click", function () { if (offset + PAGE < total) { offset += PAGE; load(); } });
    wrap.appendChild(prev); wrap.appendChild(next); wrap.appendChild(info); wrap.appendChild(values);
    load();
    return wrap;
  };

  /* ---------- pan and zoom ---------- */
  Viewer.prototype.applyView = function () {
    this.scene.setAttribute("transform", "translate(" + this.view.x + "," + this.view.y + ") scale(" + this.view.k + ")");
  };
  Viewer.prototype.fit = function () {
    var r = this.canvas.getBoundingClientRect(), W = r.width || 800, H = r.height || 600;
    var k = Math.min(W / this.lay.width, H / this.lay.height, 1.5);
    k = Math.max(k, 0.02);
    if (this.lay.height * k < H * 0.25 || this.graph.nodes.length > 60) k = Math.max(k, Math.min(1, W / this.lay.width));
    this.view = { k: k, x: (W - this.lay.width * k) / 2, y: 10 };
    this.applyView();
  };
  Viewer.prototype.centerOn = function (b) {
    var r = this.canvas.getBoundingClientRect(), k = Math.max(this.view.k, 0.8);
    this.view = { k: k, x: r.width / 2 - (b.x + b.w / 2) * k, y: r.height / 2 - (b.y + b.h / 2) * k };
    this.applyView();
  };
  Viewer.prototype.bindPanZoom = function () {
    var self = this, drag = null;
    this.canvas.addEventListener("mousedown", function (e) {
      drag = { x: e.clientX, y: e.clientY, vx: self.view.x, vy: self.view.y };
      self.dragged = false;
      self.canvas.classList.add("osv-dragging");
    });
    window.addEventListener("mousemove", function (e) {
      if (!drag) return;
      if (Math.abs(e.clientX - drag.x) + Math.abs(e.clientY - drag.y) > 4) self.dragged = true;
      self.view.x = drag.vx + e.clientX - drag.x; self.view.y = drag.vy + e.clientY - drag.y;
      self.applyView();
    });
    window.addEventListener("mouseup", function () { drag = null; self.canvas.classList.remove("osv-dragging"); });
    this.canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      var r = self.canvas.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
      var k = Math.min(4, Math.max(0.02, self.view.k * Math.exp(-e.deltaY * 0.0015)));
      self.view.x = mx - (mx - self.view.x) * k / self.view.k;
      self.view.y = my - (my - self.view.y) * k / self.view.k;
      self.view.k = k;
      self.applyView();
    }, { passive: false });
  };

  global.OnnxServeViewer = {
    mount: function (element, payload, options) { return new Viewer(element, payload, options); },
    layout: layout
  };
})(window);
