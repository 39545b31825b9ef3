// beowulf dashboard: polls /api/state once a second and draws the run (README.md, "Dashboard").
//
// Every string that came from a host or a web server (host names, errors, titles, URLs,
// run parameters) goes into the page through textContent (HTML and SVG alike), after
// shown() below has made control and bidi characters visible: never innerHTML, never
// an attribute that can load or run anything. Colours and sizes are computed here.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf"];
  const MARKS = { lost: "#000", quarantine: "#000", failure: "#dc143c", invalid: "#ff8c00", mismatch: "#800080",
    up: "#2ca02c", "left-out": "#999" };
  const POLL_MS = 1000;
  const params = new URLSearchParams(window.location.search);
  const token = params.get("token");
  let wanted = null; // the run chosen in the list; null follows the current run
  let lastGood = 0;

  // Control characters, DEL, C1, bidi marks/overrides/isolates, line separators and lone
  // surrogates as visible escapes, as cluster/shown.py does on a terminal.
  const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]/g;
  function shown(value) {
    if (value === null || value === undefined) return "";
    return String(value).replace(UNSAFE, function (c) {
      const code = c.charCodeAt(0);
      if (c === "\n") return "\\n";
      if (c === "\r") return "\\r";
      if (c === "\t") return "\\t";
      return code < 0x100 ? "\\x" + code.toString(16).padStart(2, "0") : "\\u" + code.toString(16).padStart(4, "0");
    });
  }

  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = shown(text);
    if (cls) node.className = cls;
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const key in attrs) node.setAttribute(key, String(attrs[key]));
    if (text !== undefined) node.textContent = shown(text);
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  // -- numbers, as cluster/report.py's human_rate / human_seconds
  function rate(value, unit) {
    if (value === null || value === undefined) return "";
    const v = value * unit.scale;
    if (v >= 100) return Math.round(v).toLocaleString("en-US");
    return Number(v.toPrecision(3)).toString();
  }
  function seconds(s) {
    if (s === null || s === undefined) return "";
    if (s < 1) return s.toFixed(2) + " s";
    if (s < 60) return s.toFixed(1) + " s";
    let m = Math.round(s);
    const sec = m % 60; m = (m - sec) / 60;
    if (m < 60) return m + "m" + String(sec).padStart(2, "0") + "s";
    const min = m % 60; const h = (m - min) / 60;
    if (h < 24) return h + "h" + String(min).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d" + String(h % 24).padStart(2, "0") + "h";
  }
  function pct(v) { return v === null || v === undefined ? "" : (v * 100).toFixed(1) + "%"; }
  function count(n) { return n === null || n === undefined ? "" : Number(n).toLocaleString("en-US"); }
  function clock(epoch) {
    if (!epoch) return "";
    const d = new Date(epoch * 1000);
    return d.toTimeString().slice(0, 8);
  }
  function params_text(p) {
    if (!p || typeof p !== "object") return "";
    return Object.keys(p).sort().map(function (k) {
      const v = p[k];
      const text = typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
      return k + "=" + (text.length > 40 ? text.slice(0, 37) + "..." : text);
    }).join(" ");
  }

  let colours = {};
  function colourOf(name, index) {
    if (!(name in colours)) {
      colours[name] = index < PALETTE.length ? PALETTE[index] : "hsl(" + ((index * 137) % 360) + ",55%,50%)";
    }
    return colours[name];
  }

  // -- fetching
  function apiUrl() {
    const q = new URLSearchParams();
    if (wanted !== null) q.set("run", String(wanted));
    if (token) q.set("token", token);
    return "/api/state?" + q.toString();
  }

  function poll() {
    fetch(apiUrl(), { cache: "no-store", credentials: "omit" })
      .then(function (r) {
        if (r.status === 404 && wanted !== null) {
          // A run the store does not have (#run=N of another store): say so, follow the current one.
          return r.json().then(function (body) {
            wanted = null;
            history.replaceState(null, "", window.location.pathname + window.location.search);
            throw new Error(body && body.error ? body.error : "HTTP 404");
          });
        }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (state) {
        lastGood = Date.now();
        const began = performance.now();
        render(state);
        document.body.setAttribute("data-render-ms", (performance.now() - began).toFixed(1));
        $("status").textContent = "updated " + new Date().toTimeString().slice(0, 8);
        document.body.setAttribute("data-updates", String(Number(document.body.getAttribute("data-updates") || 0) + 1));
      })
      .catch(function (err) {
        $("status").textContent = "no answer from the dashboard (" + shown(err.message) + ")" +
          (lastGood ? ", last update " + new Date(lastGood).toTimeString().slice(0, 8) : "");
      })
      .finally(function () { window.setTimeout(poll, POLL_MS); });
  }

  // -- drawing
  function render(state) {
    const error = $("error");
    if (state.error) { error.hidden = false; error.textContent = shown(state.error); } else { error.hidden = true; }
    renderRuns(state.runs || [], state.run_id);
    const view = state.run;
    if (!view) { $("run-title").textContent = "no runs yet"; return; }
    const report = view.report;
    const unit = report.unit;
    const names = report.hosts.map(function (h) { return h.host; });
    names.forEach(function (n, i) { colourOf(n, i); });
    renderSummary(report);
    renderHosts(report, view.hosts);
    renderRates(view.series, report, names);
    renderSum(report, names);
    renderTimeline(view.timeline, report, names);
    renderNotes(report.notes);
    renderEvents(view.events);
    renderPages(view.pages, report.run.job);
    $("rates-caption").textContent = "each host's rate over the run's time (" + unit.label + ")";
  }

  function renderRuns(runs, chosen) {
    const select = $("run-select");
    const focused = document.activeElement === select;
    if (!focused) {
      clear(select);
      const follow = el("option", "current run (follow)");
      follow.value = "";
      select.appendChild(follow);
      runs.slice().reverse().forEach(function (r) {
        const o = el("option", "run " + r.id + ": " + r.job + " (" + r.state + ")");
        o.value = String(r.id);
        select.appendChild(o);
      });
      select.value = wanted === null ? "" : String(wanted);
    }
    $("follow").textContent = wanted === null ? "showing run " + chosen + " (the current one)" : "";
    const table = $("runs");
    fillHead(table, ["run", "job", "parameters", "state", "started", "wall time", "items", "progress", "throughput"]);
    const body = table.tBodies[0];
    clear(body);
    runs.slice().reverse().forEach(function (r) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-run", String(r.id));
      if (r.id === chosen) tr.className = "selected";
      [String(r.id), r.job, params_text(r.params), r.state + (r.state === "running" && !r.live ? " (no coordinator)" : ""),
        clock(r.started), seconds(r.wall_seconds), count(r.items) + " of " + count(r.total), pct(r.progress),
        rate(r.throughput, r.unit) + " " + r.unit.label].forEach(function (text, i) {
        tr.appendChild(el("td", text, i === 2 ? "text wrap" : i === 1 ? "text" : ""));
      });
      body.appendChild(tr);
    });
  }

  function fillHead(table, headers) {
    const head = table.tHead;
    const shown = head.rows.length ? Array.from(head.rows[0].cells).map(function (c) { return c.textContent; }) : [];
    if (shown.length === headers.length && shown.every(function (t, i) { return t === headers[i]; })) return;
    clear(head);
    const tr = document.createElement("tr");
    headers.forEach(function (h) { tr.appendChild(el("th", h)); });
    head.appendChild(tr);
  }

  function figure(list, label, value, key, raw) {
    const div = document.createElement("div");
    div.appendChild(el("dt", label));
    const dd = el("dd", value);
    dd.id = "fig-" + key;
    if (raw !== undefined && raw !== null) dd.setAttribute("data-value", String(raw));
    div.appendChild(dd);
    list.appendChild(div);
  }

  function renderSummary(report) {
    const run = report.run;
    const unit = report.unit;
    $("run-title").textContent = shown("run " + run.id + ": " + run.job + ", " + run.state +
      (run.state === "running" && !report.live ? " (no coordinator)" : ""));
    $("run-params").textContent = shown(params_text(run.params));
    const progress = report.progress === null ? 0 : report.progress;
    $("progress-bar").style.width = (Math.min(1, progress) * 100).toFixed(2) + "%";
    const list = $("figures");
    clear(list);
    figure(list, "progress", pct(report.progress), "progress", report.progress);
    figure(list, "ETA", report.eta_seconds === null ? (run.state === "running" ? "?" : "") : seconds(report.eta_seconds),
      "eta", report.eta_seconds);
    figure(list, report.unit.item, count(report.items) + " of " + count(run.total), "items", report.items);
    figure(list, "throughput", rate(report.throughput, unit) + " " + unit.label, "throughput", report.throughput);
    figure(list, "sum of parts", report.sum_standalone === null ? "none" : rate(report.sum_standalone, unit) + " " +
      unit.label, "sum", report.sum_standalone);
    figure(list, "efficiency", report.efficiency === null ? "none" : pct(report.efficiency), "efficiency",
      report.efficiency);
    figure(list, "wall time", seconds(report.wall_seconds), "wall", report.wall_seconds);
    figure(list, "blocks", count(report.blocks), "blocks", report.blocks);
    figure(list, "start-up", seconds(report.startup_seconds), "startup", report.startup_seconds);
    if (report.tail) figure(list, "tail", seconds(report.tail.seconds), "tail", report.tail.seconds);
    if (report.politeness_bound !== null) {
      figure(list, "politeness bound", rate(report.politeness_bound, unit) + " " + unit.label, "politeness",
        report.politeness_bound);
    }
  }

  const HOST_COLUMNS = [
    ["host", "host"], ["state", "state"], ["slots", "slots"], ["engine", "engine"], ["blocks", "blocks"],
    ["items", "items"], ["throughput", "throughput"], ["speed while busy", "speed_busy"],
    ["per slot", "speed_busy_per_slot"], ["share", "share"], ["alone", "standalone_rate"], ["retries", "retries"],
    ["failures", "failures"], ["idle", "idle_seconds"], ["last seen", "last_seen"], ["python", "python"],
    ["load", "load"], ["temp", "temp"], ["did nothing", "idle_reason"]];

  function renderHosts(report, hosts) {
    const unit = report.unit;
    const table = $("hosts");
    fillHead(table, HOST_COLUMNS.map(function (c) {
      return c[0] === "items" ? unit.item : ["throughput", "speed while busy", "per slot", "alone"].indexOf(c[0]) >= 0 ?
        c[0] + " " + unit.label : c[0];
    }));
    const extra = {};
    hosts.forEach(function (h) { extra[h.host] = h; });
    const body = table.tBodies[0];
    clear(body);
    report.hosts.forEach(function (h, index) {
      const more = extra[h.host] || { state: "", facts: {} };
      const facts = more.facts || {};
      const tr = document.createElement("tr");
      tr.className = more.state.replace(/[^a-z]/g, "");
      tr.setAttribute("data-index", String(index));
      const load = Array.isArray(facts.load) ? facts.load.slice(0, 3).join(" ") : facts.load;
      const values = {
        host: h.host, state: more.state, slots: h.slots, engine: h.engine || "", blocks: h.blocks,
        items: h.items, throughput: h.throughput, speed_busy: h.speed_busy, speed_busy_per_slot: h.speed_busy_per_slot,
        share: h.share, standalone_rate: h.standalone_rate, retries: h.retries, failures: h.failures,
        idle_seconds: h.idle_seconds, last_seen: h.last_seen, python: h.python || facts.python || "",
        load: load === undefined ? "" : load, temp: facts.temp === undefined || facts.temp === null ? "" : facts.temp,
        idle_reason: h.idle_reason || ""
      };
      HOST_COLUMNS.forEach(function (c) {
        const key = c[1];
        const v = values[key];
        let text;
        if (["throughput", "speed_busy", "speed_busy_per_slot", "standalone_rate"].indexOf(key) >= 0) text = rate(v, unit);
        else if (key === "share") text = pct(v);
        else if (key === "idle_seconds") text = seconds(v);
        else if (key === "last_seen") text = clock(v);
        else if (key === "items" || key === "blocks") text = count(v);
        else text = v === null || v === undefined ? "" : String(v);
        const td = el("td", text, ["host", "state", "engine", "idle_reason", "python"].indexOf(key) >= 0 ?
          (key === "idle_reason" ? "text wrap" : "text") : "");
        td.setAttribute("data-field", key);
        if (typeof v === "number") td.setAttribute("data-value", String(v));
        if (key === "host") {
          const sw = el("span", null, "swatch");
          sw.style.background = colourOf(h.host, index);
          td.insertBefore(sw, td.firstChild);
        }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  // -- charts: hand-drawn SVG
  function frame(node, width, height) {
    clear(node);
    node.setAttribute("viewBox", "0 0 " + width + " " + height);
  }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function short(v) {
    if (v >= 1e9) return (v / 1e9).toPrecision(3) + "G";
    if (v >= 1e6) return (v / 1e6).toPrecision(3) + "M";
    if (v >= 1e3) return (v / 1e3).toPrecision(3) + "k";
    return Number(v.toPrecision(3)).toString();
  }
  function yAxis(node, x0, x1, y0, y1, max) {
    for (let i = 0; i <= 4; i++) {
      const y = y1 - (y1 - y0) * i / 4;
      node.appendChild(svg("line", { x1: x0, x2: x1, y1: y, y2: y, class: i ? "grid" : "axis" }));
      node.appendChild(svg("text", { x: x0 - 4, y: y + 4, "text-anchor": "end" }, short(max * i / 4)));
    }
  }
  function xAxis(node, x0, x1, y, wall) {
    for (let i = 0; i <= 4; i++) {
      const x = x0 + (x1 - x0) * i / 4;
      node.appendChild(svg("text", { x: x, y: y + 14, "text-anchor": "middle" }, seconds(wall * i / 4)));
    }
  }

  function renderRates(series, report, names) {
    const node = $("rates-chart");
    const W = 640, H = 260, L = 56, R = 10, T = 10, B = 24;
    frame(node, W, H);
    const scale = report.unit.scale;
    let max = 0;
    names.forEach(function (n) {
      (series.hosts[n] || []).forEach(function (v) { if (v !== null) max = Math.max(max, v * scale); });
    });
    max = niceMax(max);
    yAxis(node, L, W - R, T, H - B, max);
    const wall = report.wall_seconds;
    xAxis(node, L, W - R, H - B, wall);
    names.forEach(function (n, index) {
      const line = series.hosts[n] || [];
      if (!line.length || !series.step) return;
      const pts = [];
      line.forEach(function (v, i) {
        if (v === null) return;
        const x = L + (W - L - R) * ((i + 0.5) * series.step) / wall;
        const y = (H - B) - (H - B - T) * (v * scale) / max;
        pts.push(x.toFixed(1) + "," + y.toFixed(1));
      });
      const poly = svg("polyline", { points: pts.join(" "), fill: "none", stroke: colourOf(n, index), "stroke-width": 1.6 });
      poly.appendChild(svg("title", {}, n));
      node.appendChild(poly);
    });
  }

  function renderSum(report, names) {
    const node = $("sum-chart");
    const W = 320, H = 260, L = 56, R = 10, T = 10, B = 24;
    frame(node, W, H);
    const scale = report.unit.scale;
    const actual = (report.throughput || 0) * scale;
    const parts = report.sum_standalone === null ? 0 : report.sum_standalone * scale;
    const max = niceMax(Math.max(actual, parts));
    yAxis(node, L, W - R, T, H - B, max);
    const bw = (W - L - R) / 5;
    [["sum of parts", 1, "standalone_rate"], ["actual", 3, "throughput"]].forEach(function (bar) {
      const x = L + bw * bar[1];
      let y = H - B;
      report.hosts.forEach(function (h, index) {
        const v = (h[bar[2]] || 0) * scale;
        const hgt = (H - B - T) * v / max;
        if (hgt <= 0) return;
        y -= hgt;
        const rect = svg("rect", { x: x, y: y, width: bw, height: hgt, fill: colourOf(h.host, index) });
        rect.appendChild(svg("title", {}, h.host + ": " + rate(h[bar[2]], report.unit) + " " + report.unit.label));
        node.appendChild(rect);
      });
      node.appendChild(svg("text", { x: x + bw / 2, y: H - B + 14, "text-anchor": "middle" }, bar[0]));
    });
    const label = report.efficiency === null ? "no comparable calibration" : "efficiency " + pct(report.efficiency);
    node.appendChild(svg("text", { x: W - R, y: T + 10, "text-anchor": "end" }, label));
  }

  function renderTimeline(timeline, report, names) {
    const node = $("timeline-chart");
    const L = 130, R = 10, T = 6, B = 24, W = 1000, LANE = 7, GAP = 5;
    const rows = names.map(function (n) {
      const bars = timeline.bars[n] || [];
      let lanes = 1;
      bars.forEach(function (b) { lanes = Math.max(lanes, b[0] + 1); });
      return { name: n, bars: bars, lanes: lanes };
    });
    let H = T + B;
    rows.forEach(function (r) { H += r.lanes * LANE + GAP; });
    frame(node, W, Math.max(H, 60));
    const wall = timeline.wall || 1;
    const xOf = function (x) { return L + (W - L - R) * Math.min(1, x / wall); };
    let y = T;
    const rowY = {};
    rows.forEach(function (r, index) {
      rowY[r.name] = [y, r.lanes * LANE];
      const label = svg("text", { x: L - 6, y: y + Math.min(r.lanes * LANE, 14) - 2, "text-anchor": "end" },
        r.name.length > 20 ? r.name.slice(0, 19) + "\u2026" : r.name);
      label.appendChild(svg("title", {}, r.name));
      node.appendChild(label);
      const colour = colourOf(r.name, index);
      r.bars.forEach(function (b) {
        node.appendChild(svg("rect", { x: xOf(b[1]).toFixed(1), y: y + b[0] * LANE, height: LANE - 1,
          width: Math.max(0.8, xOf(b[2]) - xOf(b[1])).toFixed(1), fill: colour }));
      });
      y += r.lanes * LANE + GAP;
    });
    node.appendChild(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "axis" }));
    xAxis(node, L, W - R, y, wall);
    if (report.tail) {
      const start = wall - report.tail.seconds;
      node.insertBefore(svg("rect", { x: xOf(start), y: T, width: Math.max(0, xOf(wall) - xOf(start)), height: y - T,
        fill: "#f3e9c6" }), node.firstChild);
    }
    timeline.marks.forEach(function (m) {
      const colour = MARKS[m.kind];
      if (!colour || !m.host || !(m.host in rowY)) return;
      const x = xOf(m.x);
      const ry = rowY[m.host];
      const mark = svg("path", { d: "M" + (x - 4) + "," + ry[0] + " L" + (x + 4) + "," + ry[0] + " L" + x + "," +
        (ry[0] + Math.max(7, ry[1])) + " Z", fill: colour, stroke: "#fff", "stroke-width": 0.5 });
      mark.appendChild(svg("title", {}, m.host + ": " + m.kind));
      node.appendChild(mark);
    });
    const shownBlocks = timeline.shown_blocks < timeline.blocks ?
      " (the latest " + count(timeline.shown_blocks) + " of " + count(timeline.blocks) + " blocks)" : "";
    $("timeline-caption").textContent = "slot timeline: blocks as bars per host slot; \u25bc lost/quarantined " +
      "(black), rejoined (green), failures (red); the tail shaded" + shownBlocks;
  }

  function renderNotes(notes) {
    const list = $("notes");
    clear(list);
    (notes || []).forEach(function (n) { list.appendChild(el("li", n)); });
  }

  function renderEvents(events) {
    const table = $("events");
    fillHead(table, ["time", "host", "kind", "detail"]);
    const body = table.tBodies[0];
    clear(body);
    events.slice().reverse().forEach(function (e) {
      const tr = document.createElement("tr");
      tr.appendChild(el("td", clock(e.time)));
      tr.appendChild(el("td", e.host || "", "text"));
      tr.appendChild(el("td", e.kind, "text"));
      tr.appendChild(el("td", e.detail, "text wrap"));
      body.appendChild(tr);
    });
  }

  // The latest items of the run (Job.recent_items): scrape's pages, map's items. Any other job's
  // rows are shown by their own keys. Every cell goes in as text.
  const ITEM_COLUMNS = {
    scrape: { title: "latest pages", head: ["#", "host", "status", "title", "URL", "error"],
      cells: function (p) { return [String(p.lo), p.host, p.status === null ? "" : String(p.status), p.title || "",
        p.final_url || p.url, p.error || ""]; } },
    map: { title: "latest items", head: ["item #", "status", "host", "seconds", "error"],
      cells: function (p) { return [String(p.seq), p.status || "", p.host || "",
        typeof p.seconds === "number" ? p.seconds.toFixed(3) : "", p.error || ""]; } },
  };

  function renderPages(pages, job) {
    const rows = pages || [];
    const known = ITEM_COLUMNS[job];
    const keys = known ? null : (rows.length ? Object.keys(rows[0]).slice(0, 8) : []);
    $("pages-section").hidden = !known && !rows.length;
    $("pages-title").textContent = known ? known.title : "latest items";
    const table = $("pages");
    fillHead(table, known ? known.head : keys);
    const body = table.tBodies[0];
    clear(body);
    rows.forEach(function (p) {
      const tr = document.createElement("tr");
      const cells = known ? known.cells(p) : keys.map(function (k) { return p[k] === null || p[k] === undefined ? "" : String(p[k]); });
      cells.forEach(function (text, i) { tr.appendChild(el("td", text, i > 1 ? "text wrap" : i ? "text" : "")); });
      body.appendChild(tr);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const m = /^#run=(\d{1,11})$/.exec(window.location.hash);
    if (m) wanted = Number(m[1]);
    $("run-select").addEventListener("change", function (ev) {
      wanted = ev.target.value === "" ? null : Number(ev.target.value);
      history.replaceState(null, "", window.location.pathname + window.location.search + (wanted === null ? "" : "#run=" + wanted));
      ev.target.blur();
      poll_now();
    });
    poll();
  });

  let pending = null;
  function poll_now() {
    if (pending) return;
    pending = fetch(apiUrl(), { cache: "no-store", credentials: "omit" }).then(function (r) { return r.json(); })
      .then(render).catch(function () {}).finally(function () { pending = null; });
  }
})();
