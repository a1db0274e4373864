// KOALA Edge dashboard: plain JS, no build step, no CDN (the operator's machine may be offline).
// Data: REST /api/v1 for history, and the SSE stream /api/v1/live/stream for live state. The stream
// is read with fetch() rather than EventSource so the bearer token can travel in a header instead
// of a URL (URLs end up in logs). It reconnects with backoff; while it is down the page polls.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "koala.token";
const S = { token: localStorage.getItem(TOKEN_KEY) || "", roundKey: null, live: false, rejections: [] };
const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

function authHeaders() { return S.token ? { Authorization: "Bearer " + S.token } : {}; }

async function api(path, opts = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, { method: opts.method || "GET", headers, body: opts.body === undefined ? undefined : JSON.stringify(opts.body) });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  return r.json();
}

// ---- small DOM helpers (textContent only: device ids and reasons are untrusted) -------------------
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}
function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(iso).toLocaleString();
}
function fmtBytes(n) {
  if (n == null) return "–";
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + u[i];
}
function pct(x) { return x == null ? "–" : (100 * x).toFixed(1) + "%"; }
function say(msg, bad = false) { const m = $("#action-msg"); m.textContent = msg; m.className = bad ? "bad" : "muted"; }

// ---- fleet + current round (from snapshots) -------------------------------------------------------
function renderFleet(devices) {
  const body = $("#fleet tbody");
  body.replaceChildren(...devices.map((d) => el("tr", { "data-device": d.id, "data-status": d.status },
    el("td", { text: d.id }),
    el("td", {}, el("span", { class: "pill st-" + d.status, text: d.status })),
    el("td", { text: d.arch || "–" }),
    el("td", { text: d.num_samples == null ? "–" : String(d.num_samples) }),
    el("td", { class: "muted", text: ago(d.last_seen), title: d.last_seen || "" }))));
  const online = devices.filter((d) => d.online).length;
  $("#fleet-summary").textContent = `${online} online / ${devices.length}`;
}

function renderRound(r) {
  $("#round-empty").hidden = !!r;
  $("#round-body").hidden = !r;
  if (!r) return;
  $("#round-id").textContent = r.id;
  const st = $("#round-state");
  st.textContent = r.state; st.className = "pill st-" + r.state; st.dataset.state = r.state;
  $("#round-strategy").textContent = r.strategy || "";
  const n = r.participants.length || Math.max(r.counts.assigned + r.counts.received + r.counts.dropped, 0);
  $("#round-received").textContent = r.counts.received;
  $("#round-participants").textContent = n;
  $("#round-accepted").textContent = r.counts.accepted;
  $("#round-rejected").textContent = r.counts.rejected;
  const done = ["completed", "failed", "aborted"].includes(r.state);
  $("#round-bar").style.width = (done ? 100 : n ? Math.min(100, (100 * r.counts.received) / n) : 0) + "%";
  const dl = r.deadline && !done ? Math.round((Date.parse(r.deadline) - Date.now()) / 1000) : null;
  $("#round-deadline").textContent = dl == null ? "" : dl > 0 ? `deadline in ${dl} s` : "deadline passed";
  const m = r.metrics || {};
  const acc = m.large_test_acc ?? m.large_acc;
  $("#round-metrics").textContent = acc != null ? `large acc ${pct(acc)}` : "";
  const err = $("#round-error"); err.hidden = !r.error; err.textContent = r.error || "";
  $("#btn-stop").disabled = done;
}

function onSnapshot(snap) {
  renderFleet(snap.devices);
  renderRound(snap.current_round);
  const r = snap.current_round;
  const key = r ? `${r.id}:${r.state}:${r.counts.received}` : "none";
  if (key !== S.roundKey) { S.roundKey = key; loadHistory(); }
}

// ---- history: charts, rounds table, rejections ------------------------------------------------------
function lineChart(node, rows, series, yMax) {
  const W = 600, H = 220, L = 40, R = 10, T = 10, B = 28;
  node.replaceChildren();
  const x = (i) => L + (rows.length <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (rows.length - 1));
  const y = (v) => T + (H - T - B) * (1 - v / yMax);
  for (let k = 0; k <= 4; k++) {
    const v = (yMax * k) / 4;
    node.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    node.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, yMax === 1 ? `${Math.round(100 * v)}%` : fmtBytes(v)));
  }
  const step = Math.max(1, Math.ceil(rows.length / 12));
  rows.forEach((r, i) => { if (i % step === 0) node.append(svg("text", { x: x(i), y: H - 8, "text-anchor": "middle" }, String(r.round_id))); });
  if (!rows.length) node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no rounds yet"));
  for (const { key, cls } of series) {
    const pts = rows.map((r, i) => [i, r[key]]).filter(([, v]) => v != null);
    if (pts.length > 1) node.append(svg("polyline", { class: "l-" + cls, points: pts.map(([i, v]) => `${x(i)},${y(v)}`).join(" ") }));
    for (const [i, v] of pts) {
      const c = svg("circle", { class: "p-" + cls, cx: x(i), cy: y(v), r: 3.5, "data-round": rows[i].round_id });
      c.append(svg("title", {}, `round ${rows[i].round_id}: ${pct(v)}`));
      node.append(c);
    }
  }
}

function barChart(node, rows) {
  const W = 600, H = 220, L = 56, R = 10, T = 10, B = 28;
  node.replaceChildren();
  const max = Math.max(1, ...rows.map((r) => Math.max(r.bytes_up, r.bytes_down)));
  const y = (v) => T + (H - T - B) * (1 - v / max);
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    node.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    node.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, fmtBytes(v)));
  }
  if (!rows.length) { node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no rounds yet")); return; }
  const slot = (W - L - R) / rows.length, bw = Math.max(1, Math.min(24, slot / 2 - 2));
  const step = Math.max(1, Math.ceil(rows.length / 12));
  rows.forEach((r, i) => {
    const cx = L + slot * (i + 0.5);
    for (const [key, cls, dx] of [["bytes_up", "b-up", -bw], ["bytes_down", "b-down", 0]]) {
      const b = svg("rect", { class: cls, x: cx + dx, y: y(r[key]), width: bw, height: Math.max(0, H - B - y(r[key])), "data-round": r.round_id });
      b.append(svg("title", {}, `round ${r.round_id} ${key.replace("bytes_", "")}: ${fmtBytes(r[key])}`));
      node.append(b);
    }
    if (i % step === 0) node.append(svg("text", { x: cx, y: H - 8, "text-anchor": "middle" }, String(r.round_id)));
  });
}

function renderRounds(page) {
  $("#rounds tbody").replaceChildren(...page.items.map((r) => el("tr", { "data-round": r.id, "data-state": r.state },
    el("td", { text: String(r.id) }),
    el("td", {}, el("span", { class: "pill st-" + r.state, text: r.state })),
    el("td", { text: r.strategy }),
    el("td", { class: "ok", text: String(r.counts.accepted) }),
    el("td", { class: "bad", text: String(r.counts.rejected) }),
    el("td", { text: pct(r.metrics.large_test_acc ?? r.metrics.large_acc) }),
    el("td", { class: "muted", text: r.finished ? ago(r.finished) : "–" }))));
}

function rejectionItem(e) {
  const d = e.detail || {};
  return el("li", { "data-event": e.id },
    el("span", { class: "muted", text: new Date(e.ts).toLocaleTimeString() + " " }),
    el("span", { class: "reason", text: d.reason || e.kind }),
    el("span", { text: ` ${e.device_id || "?"} round ${e.round_id ?? "?"}${d.bytes ? " · " + fmtBytes(d.bytes) : ""}` }),
    el("span", { class: "muted", text: d.detail ? " — " + (typeof d.detail === "string" ? d.detail : JSON.stringify(d.detail)).slice(0, 160) : "" }));
}
function renderRejections() {
  const ul = $("#rejections");
  ul.replaceChildren(...S.rejections.slice(0, 100).map(rejectionItem));
  if (!S.rejections.length) ul.append(el("li", { class: "muted", text: "none" }));
}

let historyBusy = false, historyAgain = false;
async function loadHistory() {
  if (historyBusy) { historyAgain = true; return; }
  historyBusy = true;
  try {
    const [hist, rounds, rej] = await Promise.all([
      api("/metrics/rounds?last=100"), api("/rounds?limit=20"), api("/events?kind=rejected&limit=100")]);
    lineChart($("#acc-chart"), hist, [{ key: "large_acc", cls: "large" }, { key: "small_acc", cls: "small" }], 1);
    barChart($("#bytes-chart"), hist);
    renderRounds(rounds);
    S.rejections = rej.items; renderRejections();
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) say("Reading needs the API token: " + e.message, true);
  } finally {
    historyBusy = false;
    if (historyAgain) { historyAgain = false; loadHistory(); }
  }
}

// ---- live stream ----------------------------------------------------------------------------------
function setLive(on, text) {
  S.live = on;
  const c = $("#conn"); c.textContent = text || (on ? "live" : "offline"); c.className = "pill " + (on ? "pill-on" : "pill-off");
}

async function streamOnce() {
  const ctrl = new AbortController();
  const r = await fetch(API + "/live/stream", { headers: { Accept: "text/event-stream", ...authHeaders() }, signal: ctrl.signal });
  if (!r.ok) throw new ApiError(r.status, r.statusText);
  setLive(true);
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i); buf = buf.slice(i + 2);
      let ev = "message"; const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) ev = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      const msg = JSON.parse(data.join("\n"));
      if (ev === "snapshot") onSnapshot(msg);
      else if (ev === "events") onEvents(msg);
    }
  }
}

function onEvents(list) {
  const rej = list.filter((e) => e.kind === "rejected").reverse();
  if (rej.length) { S.rejections = rej.concat(S.rejections).slice(0, 200); renderRejections(); }
}

async function liveLoop() {
  let backoff = 1000;
  for (;;) {
    try { await streamOnce(); backoff = 250; }  // the server ends streams every ~25 s: resume at once
    catch (e) {
      setLive(false, e instanceof ApiError && (e.status === 401 || e.status === 403) ? "token needed" : "offline");
      try { onSnapshot(await api("/live/snapshot")); } catch (_) { /* server down: keep last view */ }
      backoff = Math.min(Math.max(backoff, 500) * 2, 15000);
    }
    await new Promise((res) => setTimeout(res, backoff));
  }
}

// ---- actions ----------------------------------------------------------------------------------------
async function action(path, label) {
  if (!S.token) { say("Enter the API token first (top right).", true); $("#token").focus(); return; }
  for (const b of document.querySelectorAll(".actions button")) b.disabled = true;
  try {
    const r = await api(path, { method: "POST", body: {} });
    say(r.detail || `${label}: ok`);
  } catch (e) {
    say(`${label} failed (${e.status || "network"}): ${e.message}`, true);
  } finally {
    $("#btn-start").disabled = false; $("#btn-stop").disabled = false;
    loadHistory();
  }
}

// `koala demo` prints the dashboard URL as /dashboard/#token=...: the fragment never reaches the
// server (nor its logs); take the token from it, keep it like a typed one, and clear the address bar.
function tokenFromFragment() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!m) return;
  S.token = decodeURIComponent(m[1]);
  localStorage.setItem(TOKEN_KEY, S.token);
  history.replaceState(null, "", location.pathname + location.search);
}

function init() {
  tokenFromFragment();
  $("#token").value = S.token;
  $("#token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    S.token = $("#token").value.trim();
    if (S.token) localStorage.setItem(TOKEN_KEY, S.token); else localStorage.removeItem(TOKEN_KEY);
    say(S.token ? "Token saved in this browser." : "Token cleared.");
    loadHistory();
  });
  $("#btn-start").addEventListener("click", () => action("/rounds/start", "Start"));
  $("#btn-stop").addEventListener("click", () => action("/rounds/stop", "Stop"));
  setInterval(() => { for (const td of document.querySelectorAll("#fleet td[title]")) if (td.title) td.textContent = ago(td.title); }, 5000);
  loadHistory();
  liveLoop();
}

document.addEventListener("DOMContentLoaded", init);
