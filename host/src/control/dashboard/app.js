// The Weir dashboard: the host's jobs and plugins, and a page per job
// (graph with rates and back-pressure, checkpoints, savepoints, restarts,
// upgrades, and the savepoint / stop / cancel actions). Plain JavaScript
// against the host's JSON API, refreshed every second; served from the
// binary, no network beyond the host.
"use strict";

const REFRESH_MS = 1000;
const main = document.getElementById("main");
// The previous sample of each job's operator counters, for rates.
const previous = new Map();
let timer = null;
let message = { text: "", error: false };

function token() {
  return sessionStorage.getItem("weir-token") || "";
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) throw new Unauthorized("the host wants a token");
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((body && body.error) || response.statusText);
  return body;
}

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function time(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : "";
}

function bytes(n) {
  const units = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [unit, size] of units) if (n >= size) return (n / size).toFixed(1) + " " + unit;
  return n + " bytes";
}

function ms(value) {
  if (value == null) return "";
  return value >= 1000 ? (value / 1000).toFixed(1) + " s" : Math.round(value) + " ms";
}

function rate(perSecond) {
  if (perSecond >= 1e6) return (perSecond / 1e6).toFixed(2) + "M/s";
  if (perSecond >= 1e3) return (perSecond / 1e3).toFixed(1) + "k/s";
  return Math.round(perSecond) + "/s";
}

function status(s) {
  return `<span class="status ${esc(s)}">${esc(s)}</span>`;
}

function table(id, headers, rows, empty) {
  if (!rows.length) return `<p class="muted" id="${id}">${esc(empty)}</p>`;
  const head = headers.map(([label, cls]) => `<th class="${cls || ""}">${esc(label)}</th>`).join("");
  return `<table id="${id}"><thead><tr>${head}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

// ---- the jobs and plugins page ----

async function jobsPage() {
  const [jobs, plugins, hosts] = await Promise.all([api("/api/jobs"), api("/api/plugins"), api("/api/hosts")]);
  // In a cluster: which host runs each job (a staged job's tasks are jobs
  // of their own, each on its host; the staged job itself on none).
  const clustered = Boolean(hosts.cluster);
  const hostCell = (j) => (clustered ? `<td class="host">${esc(j.host || (j.stages && j.stages.length ? `${j.stages.length} tasks` : ""))}</td>` : "");
  const jobRows = jobs.map((j) => `<tr data-job="${esc(j.id)}">
      <td><a href="#/jobs/${esc(j.id)}">${esc(j.name)}</a></td>
      <td><code>${esc(j.id)}</code></td><td>${status(j.status)}</td>
      <td>${esc(time(j.since_ms))}</td><td>${esc((j.plugins || []).join(", "))}</td>${hostCell(j)}</tr>`);
  const jobHeaders = [["name"], ["id"], ["status"], ["since"], ["plugins"]].concat(clustered ? [["host"]] : []);
  const pluginRows = plugins.map((p) => `<tr data-plugin="${esc(p.name + "@" + p.version)}">
      <td>${esc(p.name)}@${esc(p.version)}</td><td><code>${esc(p.digest.slice(0, 12))}</code></td>
      <td class="num">${esc(bytes(p.size))}</td>
      <td>${esc(p.states.map((s) => `${s.name} (${s.kind} v${s.schema_version})`).join(", "))}</td>
      <td class="num">${esc(ms(p.compile_ms))}</td><td>${esc(p.jobs.join(", "))}</td></tr>`);
  main.innerHTML = `<h1>Jobs</h1>
    ${table("jobs", jobHeaders, jobRows, "No jobs yet: weir run JOB.toml --host …")}
    <h2>Plugin store</h2>
    ${table("plugins", [["plugin"], ["digest"], ["size", "num"], ["states"], ["compile", "num"], ["used by"]], pluginRows, "No plugins yet: weir plugin add FILE")}
    ${clusterSection(hosts)}`;
}

// The cluster's members, when the host is in one.
function clusterSection(hosts) {
  if (!hosts.cluster) return "";
  const rows = hosts.hosts.map((h) => `<tr data-host="${esc(h.id)}">
      <td>${esc(h.id)}${h.this ? " (this host)" : ""}</td><td><a href="${esc(h.api)}/">${esc(h.api)}</a></td>
      <td>${esc(h.version)}</td><td class="num">${esc(h.jobs)} (${esc(h.running)} running)</td>
      <td>${h.coordinator ? "coordinator" : ""}</td><td>${esc(time(h.started_ms))}</td></tr>`);
  const c = hosts.coordinator;
  const lead = c ? `coordinator ${esc(c.host)}, term ${esc(c.term)}` : "no coordinator right now";
  return `<h2>Cluster ${esc(hosts.cluster)}</h2><p class="muted">${lead}</p>
    ${table("hosts", [["host"], ["API"], ["version"], ["jobs", "num"], ["role"], ["up since"]], rows, "No live hosts")}`;
}

// ---- a job's page ----

// Columns by the longest path from a source; rows in declaration order.
function layout(operators) {
  const byUid = new Map(operators.map((o) => [o.uid, o]));
  const depth = new Map();
  const depthOf = (uid, seen = new Set()) => {
    if (depth.has(uid)) return depth.get(uid);
    if (seen.has(uid)) return 0;
    seen.add(uid);
    const op = byUid.get(uid);
    const d = op && op.inputs.length ? 1 + Math.max(...op.inputs.map((i) => depthOf(i, seen))) : 0;
    depth.set(uid, d);
    return d;
  };
  operators.forEach((o) => depthOf(o.uid));
  const rows = new Map();
  const place = new Map();
  for (const o of operators) {
    const d = depth.get(o.uid);
    const row = rows.get(d) || 0;
    rows.set(d, row + 1);
    place.set(o.uid, { x: 20 + d * 230, y: 20 + row * 110 });
  }
  const height = 40 + Math.max(1, ...rows.values()) * 110;
  const width = 40 + (Math.max(0, ...depth.values()) + 1) * 230;
  return { place, width, height };
}

function graph(detail, rates) {
  const ops = detail.operators;
  if (!ops.length) return `<p class="muted" id="graph">The job is not running.</p>`;
  const { place, width, height } = layout(ops);
  const W = 180, H = 82;
  const edges = ops.flatMap((o) => o.inputs.map((from) => {
    const a = place.get(from), b = place.get(o.uid);
    if (!a || !b) return "";
    return `<line class="edge" x1="${a.x + W}" y1="${a.y + H / 2}" x2="${b.x}" y2="${b.y + H / 2}" marker-end="url(#arrow)"/>`;
  }));
  const nodes = ops.map((o) => {
    const p = place.get(o.uid);
    const r = rates.get(o.uid) || { in: 0, out: 0, backpressure: 0, busy: 0 };
    const pressured = r.backpressure >= 0.5 ? " backpressured" : "";
    const plugin = o.plugin ? o.plugin.plugin : o.role;
    return `<g class="operator${pressured}" data-uid="${esc(o.uid)}" transform="translate(${p.x},${p.y})">
      <rect width="${W}" height="${H}" rx="6"/>
      <text class="uid" x="10" y="18">${esc(o.uid)} ×${o.parallelism}</text>
      <text x="10" y="34">${esc(plugin)}</text>
      <text class="rate" x="10" y="52">in ${esc(rate(r.in))} · out ${esc(rate(r.out))}</text>
      <text class="pressure" x="10" y="70">busy ${Math.round(r.busy * 100)}% · back-pressured ${Math.round(r.backpressure * 100)}%</text>
    </g>`;
  });
  return `<svg id="graph" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto">
      <path d="M0,0 L10,5 L0,10 z" fill="#94a3b8"/></marker></defs>
    ${edges.join("")}${nodes.join("")}</svg>`;
}

// Duration as bars, size as a line, over the recent checkpoints.
function checkpointChart(checkpoints) {
  if (checkpoints.length < 2) return "";
  const recent = checkpoints.slice(-40);
  const width = 600, height = 120, pad = 24;
  const step = (width - 2 * pad) / recent.length;
  const maxDuration = Math.max(...recent.map((c) => c.duration_ms), 1);
  const maxSize = Math.max(...recent.map((c) => c.bytes), 1);
  const bars = recent.map((c, i) => {
    const h = (c.duration_ms / maxDuration) * (height - 2 * pad);
    return `<rect class="bar" x="${pad + i * step}" y="${height - pad - h}" width="${Math.max(1, step - 2)}" height="${h}"/>`;
  });
  const points = recent.map((c, i) =>
    `${pad + i * step + step / 2},${height - pad - (c.bytes / maxSize) * (height - 2 * pad)}`);
  return `<svg id="checkpoint-chart" width="${width}" height="${height}">
    ${bars.join("")}<polyline class="size" points="${points.join(" ")}"/>
    <text class="axis" x="${pad}" y="14">duration (bars, max ${esc(ms(maxDuration))}) · size (line, max ${esc(bytes(maxSize))})</text>
  </svg>`;
}

// Rates and back-pressure from the change since the previous sample.
function sampleRates(id, detail) {
  const now = performance.now();
  const before = previous.get(id);
  const rates = new Map();
  for (const o of detail.operators) {
    const last = before && before.ops.get(o.uid);
    if (!last) continue;
    const seconds = (now - before.at) / 1000;
    if (seconds <= 0) continue;
    const wall = seconds * 1000 * o.parallelism;
    rates.set(o.uid, {
      in: Math.max(0, o.records_in - last.records_in) / seconds,
      out: Math.max(0, o.records_out - last.records_out) / seconds,
      busy: Math.min(1, Math.max(0, o.busy_ms - last.busy_ms) / wall),
      backpressure: Math.min(1, Math.max(0, o.backpressured_ms - last.backpressured_ms) / wall),
    });
  }
  previous.set(id, { at: now, ops: new Map(detail.operators.map((o) => [o.uid, o])) });
  return rates;
}

// Where a job was forked from, and its forks (`weir fork`).
function lineage(job) {
  const link = (f) => `<a href="#/jobs/${esc(f.job)}"><code>${esc(f.job)}</code></a>`;
  const parts = [];
  if (job.forked_from) {
    parts.push(`forked from ${link(job.forked_from)} at savepoint <code>${esc(job.forked_from.savepoint)}</code>`);
  }
  if (job.forks && job.forks.length) {
    parts.push(`forks: ${job.forks.map(link).join(", ")}`);
  }
  return parts.length ? `<p id="lineage" class="muted">${parts.join(" · ")}</p>` : "";
}

// A staged cluster job's tasks: which stage, which of its subtasks, on
// which host.
function tasksSection(stages) {
  if (!stages.length) return "";
  const rows = stages.map((t) => `<tr data-task="${esc(t.job)}">
      <td>${esc(t.name)}</td><td class="num">${esc(t.task)} of ${esc(t.tasks)}</td>
      <td><a href="#/jobs/${esc(t.job)}"><code>${esc(t.job)}</code></a></td>
      <td class="host">${esc(t.host || "not placed yet")}</td><td>${status(t.status || "unknown")}</td>
      <td class="num">${esc(t.checkpoints_completed)}</td><td>${esc(t.uids.join(", "))}</td></tr>`);
  return `<h2>Tasks</h2>
    ${table("tasks", [["stage"], ["task", "num"], ["job"], ["host"], ["status"], ["checkpoints", "num"], ["runs"]], rows, "")}`;
}

async function jobPage(id) {
  const detail = await api(`/api/jobs/${encodeURIComponent(id)}`);
  const job = detail.job;
  const rates = sampleRates(id, detail);
  const live = !["finished", "cancelled", "failed", "stopped"].includes(job.lifecycle.status);
  const checkpointRows = detail.checkpoints.slice().reverse().slice(0, 20).map((c) => `<tr>
      <td class="num">${c.id}</td><td>${esc(time(c.completed_ms))}</td>
      <td class="num">${esc(ms(c.duration_ms))}</td><td class="num">${esc(ms(c.alignment_ms))}</td>
      <td class="num">${esc(bytes(c.bytes))}</td><td class="num">${esc(bytes(c.new_bytes))}</td></tr>`);
  const savepointRows = job.savepoints.slice().reverse().map((s) => `<tr>
      <td><code>${esc(s.path)}</code></td><td class="num">${s.checkpoint}</td>
      <td>${esc(time(s.time_ms))}</td><td>${esc(s.operation || "")}</td></tr>`);
  const restartRows = job.restarts.slice().reverse().slice(0, 20).map((r) => `<tr>
      <td>${esc(time(r.time_ms))}</td><td class="num">${r.attempt}</td>
      <td><code>${esc(r.uid)}</code></td><td>${esc(r.error)}</td></tr>`);
  const upgradeRows = job.upgrades.slice().reverse().map((u) => `<tr>
      <td>${esc(time(u.time_ms))}</td><td>${esc(u.change)}</td><td>${status(u.outcome)}</td>
      <td class="num">${esc(ms(u.downtime_ms))}</td><td>${esc(u.error || "")}</td></tr>`);
  main.innerHTML = `<p><a href="#/">← jobs</a></p>
    <h1>${esc(job.name)} ${status(job.lifecycle.status)}</h1>
    <p class="muted"><code>${esc(job.id)}</code> · submitted ${esc(time(job.submitted_ms))}</p>
    ${lineage(job)}
    <div class="actions">
      <button id="savepoint" ${live ? "" : "disabled"}>Savepoint</button>
      <button id="stop" ${live ? "" : "disabled"}>Stop with savepoint</button>
      <button id="cancel" class="danger" ${live ? "" : "disabled"}>Cancel</button>
    </div>
    <p id="message" class="${message.error ? "error" : ""}">${esc(message.text)}</p>
    ${job.last_error ? `<p class="error" id="last-error"><b>Last error:</b> ${esc(job.last_error)}</p>` : ""}
    <div class="cards">
      <div class="card"><div class="muted">checkpoints completed</div><div class="value" id="checkpoint-count">${detail.checkpoints_completed}</div></div>
      <div class="card"><div class="muted">checkpoints failed</div><div class="value" id="checkpoint-failures">${detail.checkpoints_failed}</div></div>
      <div class="card"><div class="muted">restarts</div><div class="value">${job.restarts.length}</div></div>
      <div class="card"><div class="muted">savepoints</div><div class="value">${job.savepoints.length}</div></div>
    </div>
    ${tasksSection(detail.stages || [])}
    <h2>Graph</h2>${graph(detail, rates)}
    <h2>Checkpoints</h2>${checkpointChart(detail.checkpoints)}
    ${table("checkpoints", [["id", "num"], ["completed"], ["duration", "num"], ["alignment", "num"], ["size", "num"], ["incremental", "num"]], checkpointRows, "No checkpoint yet.")}
    <h2>Savepoints</h2>
    ${table("savepoints", [["path"], ["checkpoint", "num"], ["taken"], ["operation"]], savepointRows, "No savepoint yet.")}
    <h2>Restarts</h2>
    ${table("restarts", [["time"], ["attempt", "num"], ["operator"], ["error"]], restartRows, "No restarts.")}
    <h2>Upgrades</h2>
    ${table("upgrades", [["time"], ["change"], ["outcome"], ["downtime", "num"], ["error"]], upgradeRows, "No upgrades.")}`;
  const act = (button, path, body, what) => {
    document.getElementById(button).onclick = async () => {
      if (button === "cancel" && !confirm(`Cancel job ${job.name}?`)) return;
      try {
        const operation = await api(`/api/jobs/${encodeURIComponent(id)}/${path}`, { method: "POST", body });
        message = { text: `${what} requested (operation ${operation.id})`, error: false };
      } catch (error) {
        message = { text: `${what} failed: ${error.message}`, error: true };
      }
      render();
    };
  };
  act("savepoint", "savepoints", "{}", "Savepoint");
  act("stop", "stop", "{}", "Stop with savepoint");
  act("cancel", "cancel", "", "Cancel");
}

// ---- routing and refresh ----

async function render() {
  clearTimeout(timer);
  const route = location.hash.replace(/^#/, "") || "/";
  try {
    const health = await api("/api/health");
    document.getElementById("host").textContent =
      `host ${health.version} · ${health.jobs} jobs · ${health.plugins} plugins`;
    document.getElementById("token-form").hidden = true;
    const job = route.match(/^\/jobs\/([^/]+)$/);
    if (job) await jobPage(decodeURIComponent(job[1]));
    else await jobsPage();
  } catch (error) {
    if (error instanceof Unauthorized) {
      document.getElementById("token-form").hidden = false;
      main.innerHTML = `<p class="error">This host needs its token: enter it above.</p>`;
    } else {
      main.innerHTML = `<p class="error">${esc(error.message)}</p>`;
    }
  }
  timer = setTimeout(render, REFRESH_MS);
}

document.getElementById("token-form").onsubmit = (event) => {
  event.preventDefault();
  sessionStorage.setItem("weir-token", document.getElementById("token").value.trim());
  render();
};
window.addEventListener("hashchange", () => {
  message = { text: "", error: false };
  render();
});
render();
