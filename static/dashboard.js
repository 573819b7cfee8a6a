// xrates dashboard: plain JS and SVG, no library. One EventSource (browsers allow ~6 per host).
"use strict";

const rates = new Map();      // "USDEUR" -> rate object
const points = new Map();     // "USDEUR" -> [{t: Date, rate: number}] seen since the page opened
const MAX_POINTS = 500;
let historyAvailable = false; // set from /v1/instance: the server has /v1/rates/{b}/{q}/history
let selected = "";

const $ = (sel) => document.querySelector(sel);
const text = (value) => document.createTextNode(value == null ? "" : String(value));

function cell(row, value) {
  const td = document.createElement("td");
  td.appendChild(text(value));
  row.appendChild(td);
}

// ---------------------------------------------------------------- live rates (the stream)
function record(rate) {
  const key = rate.base + rate.quote;
  let list = points.get(key);
  if (!list) { list = []; points.set(key, list); }
  list.push({ t: new Date(rate.updated_at), rate: rate.rate });
  if (list.length > MAX_POINTS) list.shift();
}

function renderRates(changedKey) {
  const body = $("#rates tbody");
  const keys = [...rates.keys()].sort();
  body.replaceChildren();
  for (const key of keys) {
    const r = rates.get(key);
    const row = document.createElement("tr");
    row.id = "rate-" + key;
    if (key === changedKey) row.className = "changed";
    cell(row, r.base + "/" + r.quote);
    cell(row, r.rate);
    cell(row, r.source);
    cell(row, r.as_of.replace("T", " ").slice(0, 19));
    cell(row, r.version);
    body.appendChild(row);
  }
  $("#rates-count").textContent = "(" + keys.length + ")";
  renderPairs(keys);
}

function renderPairs(keys) {
  const select = $("#pair");
  if (select.options.length === keys.length &&
      [...select.options].every((o, i) => o.value === keys[i])) return;
  if (!selected && keys.length) selected = keys[0];
  select.replaceChildren(...keys.map((key) => {
    const option = document.createElement("option");
    option.value = key;
    option.textContent = key.slice(0, 3) + "/" + key.slice(3);
    option.selected = key === selected;
    return option;
  }));
}

function setStreamState(label, ok) {
  const pill = $("#stream-state");
  pill.textContent = label;
  pill.className = "pill " + (ok ? "ok" : "bad");
}

function connect() {
  const source = new EventSource("/v1/stream");
  source.addEventListener("snapshot", (event) => {
    rates.clear();
    for (const r of JSON.parse(event.data).rates) { rates.set(r.base + r.quote, r); record(r); }
    setStreamState("live", true);
    renderRates(null);
    renderChart();
  });
  source.addEventListener("rate", (event) => {
    const r = JSON.parse(event.data);
    rates.set(r.base + r.quote, r);
    record(r);
    renderRates(r.base + r.quote);
    if (r.base + r.quote === selected) renderChart();
  });
  source.addEventListener("delete", (event) => {
    const d = JSON.parse(event.data);
    rates.delete(d.base + d.quote);
    renderRates(null);
  });
  source.addEventListener("resync", (event) => {
    // The server ends the stream; EventSource reconnects (retry:) and gets a new snapshot.
    setStreamState("resync: " + JSON.parse(event.data).reason, false);
  });
  source.onerror = () => setStreamState("reconnecting…", false);
}

// ---------------------------------------------------------------- chart (SVG)
// The seam for stored history: when the server has /v1/rates/{b}/{q}/history (features.history
// in /v1/instance), its points come first; otherwise only the values seen on the stream.
async function loadHistory(key) {
  if (!historyAvailable) return [];
  const response = await fetch("/v1/rates/" + key.slice(0, 3) + "/" + key.slice(3) + "/history");
  if (!response.ok) return [];
  const data = await response.json();
  const items = data.history || data.rates || data.points || [];
  return items.map((p) => ({ t: new Date(p.changed_at || p.updated_at || p.as_of || p.day),
                             rate: Number(p.rate) }));
}

let historyPoints = [];

function renderChart() {
  const svg = $("#chart");
  const ns = "http://www.w3.org/2000/svg";
  const data = historyPoints.concat(points.get(selected) || []);
  svg.replaceChildren();
  $("#chart-note").textContent = historyAvailable ? "(stored history + live)" :
    "(values seen since this page opened)";
  if (!data.length) return;
  const W = 600, H = 260, L = 60, R = 10, T = 10, B = 30;
  const ts = data.map((p) => p.t.getTime()), vs = data.map((p) => p.rate);
  let t0 = Math.min(...ts), t1 = Math.max(...ts), v0 = Math.min(...vs), v1 = Math.max(...vs);
  if (t1 === t0) { t0 -= 1000; t1 += 1000; }
  if (v1 === v0) { v0 -= Math.abs(v0) * 0.01 || 1; v1 += Math.abs(v1) * 0.01 || 1; }
  const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = (v) => T + (v1 - v) / (v1 - v0) * (H - T - B);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("class", "line");
  line.setAttribute("points", data.map((p) => x(p.t.getTime()) + "," + y(p.rate)).join(" "));
  svg.appendChild(line);
  for (const p of data) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("class", "dot");
    dot.setAttribute("cx", x(p.t.getTime()));
    dot.setAttribute("cy", y(p.rate));
    dot.setAttribute("r", 3);
    svg.appendChild(dot);
  }
  const label = (value, lx, ly) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", lx); t.setAttribute("y", ly); t.textContent = value;
    svg.appendChild(t);
  };
  label(v1.toPrecision(6), 2, T + 10);
  label(v0.toPrecision(6), 2, H - B);
  label(new Date(t0).toLocaleTimeString(), L, H - 8);
  label(new Date(t1).toLocaleTimeString(), W - R - 60, H - 8);
}

$("#pair").addEventListener("change", async (event) => {
  selected = event.target.value;
  historyPoints = await loadHistory(selected);
  renderChart();
});

// ---------------------------------------------------------------- update runs, instance state
async function refreshUpdates() {
  const response = await fetch("/v1/updates?limit=10");
  if (!response.ok) return;
  const body = $("#updates tbody");
  body.replaceChildren();
  for (const run of (await response.json()).updates) {
    const row = document.createElement("tr");
    cell(row, run.id);
    cell(row, run.status);
    cell(row, run.trigger);
    const td = document.createElement("td");
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    const total = run.progress.total || 0;
    fill.style.width = (total ? Math.round(100 * run.progress.done / total) : 0) + "%";
    bar.appendChild(fill);
    td.appendChild(bar);
    td.appendChild(text(" " + run.progress.done + "/" + total));
    row.appendChild(td);
    cell(row, run.created_at.replace("T", " ").slice(0, 19));
    body.appendChild(row);
  }
}

async function refreshInstance() {
  const state = await (await fetch("/v1/instance")).json();
  historyAvailable = state.features.history;
  const rows = {
    "worker pid": state.pid,
    "listener": state.listener.connected ? "connected" : "DOWN",
    "listener lag": state.listener.lag_s + " s",
    "reconnects": state.listener.reconnects,
    "cache": (state.cache.enabled ? "on" : "bypassed") + ", " + state.cache.size + " / " +
      state.cache.max_size + " entries",
    "hits / misses / bypasses": state.cache.hits + " / " + state.cache.misses + " / " +
      state.cache.bypasses,
    "streams": state.stream.subscribers + " open (max " + state.stream.max + "), " +
      state.stream.dropped + " dropped",
  };
  const dl = $("#instance");
  dl.replaceChildren();
  for (const [name, value] of Object.entries(rows)) {
    const dt = document.createElement("dt"); dt.textContent = name;
    const dd = document.createElement("dd"); dd.textContent = value; dd.id = "instance-" +
      name.split(" ")[0];
    dl.append(dt, dd);
  }
  const pill = $("#instance-state");
  pill.textContent = state.listener.connected ? "cache live" : "cache bypassed";
  pill.className = "pill " + (state.listener.connected ? "ok" : "bad");
}

async function poll() {
  try { await Promise.all([refreshUpdates(), refreshInstance()]); } catch (e) { /* next time */ }
  setTimeout(poll, 2000);
}

connect();
poll();
