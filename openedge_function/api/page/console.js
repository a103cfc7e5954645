// openedge-function console: polls the daemon's /console/api/* and draws what it says.
// Everything the daemon sends is shown as text (textContent), never as markup.
"use strict";

const POLL_MS = 2000;        // state and failures, while the page is visible
const LOG_POLL_MS = 1000;    // the followed function's log lines
const SERIES_MAX = 300;      // samples kept per function (one a second: five minutes)
const LOG_MAX = 500;         // log lines kept on the page
const FAILURES_MAX = 50;     // failures kept on the page

const series = new Map();    // function -> [{t, rate, errors, p50_ms, p99_ms}]
let lastSample = 0;          // time of the newest sample the page has
let lastFailure = 0;         // sequence number of the newest failure shown
let logFunction = "";
let lastLog = 0;
let functionNames = [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

async function getJson(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.assign("/console");   // signed out (or the token changed): sign in again
    throw new Error("signed out");
  }
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

function number(value, digits) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits === undefined ? 2 : digits });
}

function count(n, noun) {
  return `${number(n, 0)} ${noun}${n === 1 ? "" : "s"}`;
}

function when(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min`;
  if (s < 172800) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} days`;
}

function facts(pairs) {
  const list = el("dl", { class: "facts" });
  for (const [term, value, cls] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    list.append(el("dt", { text: term }), el("dd", { class: cls, text: value }));
  }
  return list;
}

// -- functions --------------------------------------------------------------------------------------

function chart(name) {
  const points = series.get(name) || [];
  const width = 300, height = 70, pad = 2;
  const box = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
                           role: "img", "data-function": name });
  const peakRate = Math.max(0, ...points.map((p) => p.rate));
  const peakLatency = Math.max(0, ...points.map((p) => p.p99_ms || 0));
  box.setAttribute("data-peak-rate", String(peakRate));
  box.setAttribute("data-points", String(points.length));
  box.append(svg("title", {}));
  box.firstChild.textContent = `${name}: messages per second and p99 run time, last ${points.length} s`;
  if (points.length >= 2) {
    const t0 = points[0].t, t1 = points[points.length - 1].t;
    const x = (t) => pad + (width - 2 * pad) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
    const yRate = (v) => height - pad - (height - 2 * pad) * (peakRate ? v / peakRate : 0);
    const yLat = (v) => height - pad - (height - 2 * pad) * (peakLatency ? v / peakLatency : 0);
    const rate = points.map((p) => `${x(p.t).toFixed(1)},${yRate(p.rate).toFixed(1)}`);
    box.append(svg("polygon", { class: "rate",
      points: `${x(t0).toFixed(1)},${height - pad} ${rate.join(" ")} ${x(t1).toFixed(1)},${height - pad}` }));
    // p99 where something ran: a line for each stretch of seconds with runs, a dot for a lone one.
    let stretch = [];
    for (const p of points.concat([{ p99_ms: null }])) {
      if (p.p99_ms !== null && p.p99_ms !== undefined) {
        stretch.push(`${x(p.t).toFixed(1)},${yLat(p.p99_ms).toFixed(1)}`);
        continue;
      }
      if (stretch.length === 1) {
        const [cx, cy] = stretch[0].split(",");
        box.append(svg("circle", { class: "lat", cx, cy, r: 1.5 }));
      } else if (stretch.length > 1) {
        box.append(svg("polyline", { class: "lat", points: stretch.join(" ") }));
      }
      stretch = [];
    }
  }
  const legend = el("div", { class: "legend" },
    el("span", { class: "rate", text: `■ ${number(peakRate, 1)} msg/s at most` }),
    el("span", { class: "lat", text: `■ p99 ${number(peakLatency, 2)} ms at most` }),
    el("span", { text: `last ${duration(points.length)}` }));
  return [box, legend];
}

function functionCard(f) {
  const stateClass = f.state.replace(/ /g, "-");
  const code = f.code || {};
  const minute = f.last_minute || {};
  const errors = Object.entries(f.outcomes || {}).filter(([k]) => k !== "ok" && k !== "none")
    .map(([k, v]) => `${k} ${v}`).join(", ");
  const version = code.last_good ? `${code.last_good.version} (kept ${code.last_good.saved})` : "not kept yet";
  const users = (f.instance_list || []).map((i) => `${i.id} (pid ${i.pid}, ${i.state})`).join(", ");
  const card = el("article", { class: "card function", id: `function-${f.name}`, "data-function": f.name,
                               "data-state": f.state },
    el("h3", {}, el("span", { class: "name", text: f.name }), el("span", { class: `badge ${stateClass}`, text: f.state }),
       f.type === "http" ? el("span", { class: "badge", text: "http" }) : null),
    facts([
      ["instances", `${f.instances} now (${f.states.busy || 0} busy) · min ${f.min} · max ${f.max}` +
                    (f.queued ? ` · ${f.queued} queued` : "") + (f.spare ? " · spare ready" : "")],
      ["runs as", f.user],
      ["code", `${code.serving === "last good" ? "last good version" : "current"} · watch ${code.watch}` +
               (code.replacing ? " · new code proving itself" : "")],
      ["version", version],
      ["code error", code.error, "error"],
      ["failing", f.failing, "error"],
      ["packages", f.packages === null ? "no requirements.txt" : f.packages],
      ["last minute", `${count(minute.messages, "message")} · ${count(minute.errors, "error")} · ` +
                      `p50 ${number(minute.p50_ms, 3)} ms · p99 ${number(minute.p99_ms, 3)} ms`],
      ["errors", errors || "none"],
      ["limits", `timeout ${f.limits.timeout_s} s · memory ${f.limits.memory_mb ? f.limits.memory_mb + " MB" : "unlimited"}` +
                 ` · ${f.limits.pids} processes`],
      ["instance list", users],
    ]),
    ...chart(f.name));
  return card;
}

function drawFunctions(functions) {
  const list = document.getElementById("function-list");
  list.replaceChildren(...functions.map(functionCard));
  if (!functions.length) list.append(el("p", { class: "empty", text: "No functions configured." }));
}

// -- rules -------------------------------------------------------------------------------------------

function drawRules(rules) {
  const body = document.querySelector("#rule-table tbody");
  body.replaceChildren(...rules.map((r) => {
    let flow = "flowing", cls = "flow";
    if (r.connected === false) { flow = "disconnected"; cls = "flow down"; }
    else if (r.paused && r.paused.length) { flow = `paused (${r.paused.join(", ")} full)`; cls = "flow paused"; }
    return el("tr", { "data-rule": r.name },
      el("td", { text: r.name }), el("td", { text: r.in }), el("td", { text: r.function }),
      el("td", { text: (r.out || "–") + (r.error && r.error !== r.out ? ` · errors to ${r.error}` : "") }),
      el("td", { class: cls, text: flow }),
      ...["received", "published", "failed", "dropped", "undeliverable", "pending"].map(
        (key) => el("td", { class: "n", text: number(r[key], 0) })));
  }));
  if (!rules.length) body.append(el("tr", {}, el("td", { colspan: 11, class: "empty", text: "No rules." })));
}

// -- health ------------------------------------------------------------------------------------------

function drawHealth(state) {
  const pill = document.getElementById("health-pill");
  pill.className = "pill " + (state.healthy ? (state.warnings.length ? "warn" : "ok") : "bad");
  pill.textContent = state.healthy ? (state.warnings.length ? "serving, with warnings" : "healthy") : "unhealthy";
  document.getElementById("meta").textContent =
    `version ${state.version} · pid ${state.pid} · up ${duration(state.uptime_s)}`;
  const h = state.health;
  const connections = el("ul", { class: "plain" }, ...h.connections.map((c) =>
    el("li", { class: c.connected ? "" : "error", text: `${c.name}: ${c.connected ? "connected" : "not connected"} (${c.address})` })));
  const problems = el("ul", { class: "plain" },
    ...state.reasons.map((r) => el("li", { class: "error", text: r })),
    ...state.warnings.map((w) => el("li", { text: w })));
  document.getElementById("health-body").replaceChildren(el("div", { class: "health-grid" },
    el("div", { class: "card" }, el("h3", { text: "Broker connections" }), connections),
    el("div", { class: "card" }, el("h3", { text: "Daemon" }), facts([
      ["memory", `${number(h.daemon.rss_mb, 1)} MB resident`],
      ["CPU", `${number(h.daemon.cpu_percent, 1)} % of a core`],
      ["threads", String(h.daemon.threads)]])),
    el("div", { class: "card" }, el("h3", { text: "Kernel limits" }), el("p", { text: h.limits })),
    el("div", { class: "card", id: "health-problems" }, el("h3", { text: "Reasons and warnings" }),
       state.reasons.length || state.warnings.length ? problems : el("p", { class: "empty", text: "None." }))));
}

// -- failures ----------------------------------------------------------------------------------------

function failureEntry(f) {
  const packet = f.packet;
  let payload = "";
  if (packet) payload = packet.text !== undefined ? packet.text : `(base64) ${packet.base64}`;
  return el("details", { class: "failure" + (f.poison ? " poison" : ""), "data-seq": f.seq,
                         "data-type": f.errorType, "data-function": f.function },
    el("summary", {}, el("span", { class: "type", text: f.poison ? `☠ ${f.errorType}` : f.errorType }), " ",
       el("span", { text: `${f.function}: ${f.errorMessage}` }), " ",
       el("span", { class: "meta", text: `${when(f.time)} · ${f.source}${f.topic ? " · " + f.topic : ""}` })),
    facts([["request", f.requestId],
           ["packet", packet ? `topic ${packet.topic || "–"} · QoS ${packet.qos} · ${packet.size} bytes` +
                               (packet.truncated ? " (shown in part)" : "") : null]]),
    f.stackTrace.length ? el("pre", { class: "trace", text: f.stackTrace.join("\n") }) : null,
    packet ? el("pre", { class: "payload", text: payload }) : null);
}

function addFailures(failures) {
  if (!failures.length) return;
  const list = document.getElementById("failure-list");
  for (const f of failures) {
    list.prepend(failureEntry(f));
    lastFailure = Math.max(lastFailure, f.seq);
  }
  while (list.children.length > FAILURES_MAX) list.lastChild.remove();
  document.getElementById("no-failures").hidden = true;
}

// -- logs ----------------------------------------------------------------------------------------------

async function pollLogs() {
  if (!logFunction) return;
  const wanted = logFunction;
  const data = await getJson(`/console/api/logs?function=${encodeURIComponent(wanted)}&after=${lastLog}`);
  if (wanted !== logFunction) return;
  const pre = document.getElementById("log-lines");
  const follow = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  for (const line of data.lines) {
    const text = `${when(line.time)} ${line.level.padEnd(7)} ${line.requestId || "-"} ${line.line}\n`;
    pre.append(el("span", { class: `level-${line.level}`, text }));
    lastLog = Math.max(lastLog, line.seq);
  }
  while (pre.childNodes.length > LOG_MAX) pre.firstChild.remove();
  if (follow && data.lines.length) pre.scrollTop = pre.scrollHeight;
}

function chooseLogFunction(name) {
  logFunction = name;
  lastLog = 0;
  document.getElementById("log-lines").replaceChildren();
  pollLogs().catch(showOffline);
}

// -- invoke ------------------------------------------------------------------------------------------

async function invoke(event) {
  event.preventDefault();
  const name = document.getElementById("invoke-function").value;
  const type = document.getElementById("invoke-type").value;
  const body = document.getElementById("invoke-body").value;
  const status = document.getElementById("invoke-status");
  const output = document.getElementById("invoke-output");
  document.getElementById("invoke-result").hidden = false;
  status.className = "status";
  status.textContent = "sending…";
  output.textContent = "";
  const started = performance.now();
  try {
    const response = await fetch(`/invoke/${encodeURIComponent(name)}`, {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: { "Content-Type": type, "X-Console": "1" }, body });
    const text = await response.text();
    const took = performance.now() - started;
    status.className = "status " + (response.ok ? "ok" : "bad");
    status.textContent = `${response.status} ${response.ok ? "result" : "error envelope"}`;
    document.getElementById("invoke-time").textContent = `${took.toFixed(1)} ms`;
    document.getElementById("invoke-request").textContent = `request ${response.headers.get("X-Request-Id") || "–"}`;
    let shown = text;
    try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (ignored) { /* not JSON: as it came */ }
    output.textContent = response.status === 204 ? "(no result)" : shown;
  } catch (error) {
    status.className = "status bad";
    status.textContent = `not sent: ${error.message}`;
  }
}

// -- polling ------------------------------------------------------------------------------------------

function fillChoices(select, names) {
  const current = select.value;
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  if (names.includes(current)) select.value = current;
}

function showOffline(error) {
  if (error && error.message === "signed out") return;
  document.getElementById("offline").hidden = false;
}

async function pollState() {
  const state = await getJson(`/console/api/state?since=${lastSample}`);
  document.getElementById("offline").hidden = true;
  const names = state.functions.map((f) => f.name);
  for (const f of state.functions) {
    const points = (series.get(f.name) || []).concat(f.series);
    series.set(f.name, points.slice(-SERIES_MAX));
    for (const p of f.series) lastSample = Math.max(lastSample, p.t);
  }
  for (const name of [...series.keys()]) if (!names.includes(name)) series.delete(name);
  drawFunctions(state.functions);
  drawRules(state.rules);
  drawHealth(state);
  if (names.join("\n") !== functionNames.join("\n")) {
    functionNames = names;
    fillChoices(document.getElementById("invoke-function"),
                state.functions.filter((f) => f.type !== "http").map((f) => f.name));
    fillChoices(document.getElementById("log-function"), names);
    if (!names.includes(logFunction)) chooseLogFunction(names[0] || "");
  }
  const failures = await getJson(`/console/api/failures?after=${lastFailure}`);
  addFailures(failures.failures);
}

function every(ms, task) {
  let running = false;
  const tick = async () => {
    if (running || document.hidden) return;
    running = true;
    try { await task(); } catch (error) { showOffline(error); } finally { running = false; }
  };
  tick();
  setInterval(tick, ms);
  document.addEventListener("visibilitychange", tick);
}

document.getElementById("invoke-form").addEventListener("submit", invoke);
document.getElementById("log-function").addEventListener("change", (e) => chooseLogFunction(e.target.value));
every(POLL_MS, pollState);
every(LOG_POLL_MS, () => (document.getElementById("log-follow").checked ? pollLogs() : Promise.resolve()));
