// /admin: live charts from /metrics and /admin/api/status, workers, models, caches and logs.
"use strict";

const POLL_MS = 2000;
const LOG_POLL_MS = 1000;
const WINDOW = 150; // points kept per chart

const $ = (id) => document.getElementById(id);

// Prometheus text format: [{name, labels, value}], comments skipped.
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function total(samples, name) {
  return samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);
}

// Cumulative bucket counts of a histogram summed over every label set: Map(le -> count).
function buckets(samples, name) {
  const out = new Map();
  for (const s of samples) {
    if (s.name !== `${name}_bucket`) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    out.set(le, (out.get(le) || 0) + s.value);
  }
  return out;
}

// histogram_quantile over the observations between two scrapes; null when there were none.
function quantile(q, now, before) {
  const bounds = [...now.keys()].sort((a, b) => a - b);
  const delta = bounds.map((le) => (now.get(le) || 0) - ((before && before.get(le)) || 0));
  const count = delta[delta.length - 1];
  if (!count) return null;
  const rank = q * count;
  let lower = 0;
  let below = 0;
  for (let i = 0; i < bounds.length; i++) {
    if (delta[i] >= rank) {
      if (bounds[i] === Infinity) return lower;
      return lower + ((bounds[i] - lower) * (rank - below)) / Math.max(delta[i] - below, 1e-12);
    }
    lower = bounds[i];
    below = delta[i];
  }
  return lower;
}

function makeChart(id, series) {
  const node = $(id);
  const opts = {
    width: Math.max(node.clientWidth, 300),
    height: 180,
    series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, spanGaps: true }))],
    axes: [{}, { size: 60 }],
    scales: { x: { time: true } },
  };
  return new uPlot(opts, [[], ...series.map(() => [])], node);
}

const charts = {
  tokens: makeChart("chart-tokens", [["tokens/s", "#2b6cb0"]]),
  latency: makeChart("chart-latency", [["TTFT p50", "#c05621"], ["ITL p50", "#2f855a"]]),
  memory: makeChart("chart-memory", [["used", "#9b2c2c"], ["available", "#2b6cb0"]]),
};
window.charts = charts; // for the browser tests and the curious

function push(chart, t, values) {
  const data = chart.data.map((column) => column.slice(-(WINDOW - 1)));
  data[0].push(t);
  values.forEach((v, i) => data[i + 1].push(v));
  chart.setData(data);
}

let previous = null; // {t, tokens, ttft, itl}

async function json(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(`${path}: ${await errorText(response)}`);
  return response.json();
}

async function pollMetrics() {
  const response = await api("/metrics");
  if (!response.ok) throw new Error(`/metrics: ${await errorText(response)}`);
  const samples = parseMetrics(await response.text());
  const now = {
    t: Date.now() / 1000,
    tokens: total(samples, "mlx_flash_generation_tokens_total"),
    ttft: buckets(samples, "mlx_flash_time_to_first_token_seconds"),
    itl: buckets(samples, "mlx_flash_inter_token_latency_seconds"),
  };
  if (previous) {
    const rate = Math.max(0, now.tokens - previous.tokens) / (now.t - previous.t);
    push(charts.tokens, now.t, [rate]);
    const ms = (v) => (v === null ? null : v * 1000);
    push(charts.latency, now.t, [ms(quantile(0.5, now.ttft, previous.ttft)), ms(quantile(0.5, now.itl, previous.itl))]);
  }
  previous = now;
  return samples;
}

function button(label, action) {
  return el("button", {
    type: "button",
    onclick: async (event) => {
      const b = event.currentTarget;
      b.disabled = true;
      try {
        await action();
        $("error").textContent = "";
      } catch (error) {
        $("error").textContent = error.message;
      } finally {
        b.disabled = false;
        refresh();
      }
    },
  }, label);
}

async function post(path) {
  const response = await api(path, { method: "POST" });
  if (!response.ok) throw new Error(`${path}: ${await errorText(response)}`);
}

function renderWorkers(workers) {
  $("workers").tBodies[0].replaceChildren(
    ...workers.map((w) =>
      el("tr", { "data-worker": w.id },
        el("td", {}, w.id),
        el("td", { class: `state ${w.state}` }, w.state),
        el("td", {}, w.pid === null || w.pid === undefined ? "–" : String(w.pid)),
        el("td", {}, (w.loaded || []).join(", ") || "–"),
        el("td", {}, String(w.in_flight)),
        el("td", { class: "restarts" }, String(w.restarts)),
        el("td", {}, w.last_error || ""),
        el("td", {}, w.kind === "local" ? button("Restart", () => post(`/admin/api/workers/${encodeURIComponent(w.id)}/restart`)) : ""),
      ),
    ),
  );
}

function modelPath(name) {
  return name.split("/").map(encodeURIComponent).join("/");
}

function renderModels(listed, table) {
  // Per model, what each worker's scheduler says about it.
  const perModel = new Map();
  for (const w of table.workers) {
    for (const m of (w.models && w.models.models) || []) {
      if (!perModel.has(m.id)) perModel.set(m.id, []);
      perModel.get(m.id).push({ worker: w.id, ...m });
    }
  }
  $("models").tBodies[0].replaceChildren(
    ...listed.data.map((m) => {
      const entries = perModel.get(m.id) || [];
      const loading = entries.find((e) => e.load_progress !== null && e.load_progress !== undefined);
      const progress = loading
        ? el("progress", { max: "1", value: String(loading.load_progress) }, `${Math.round(loading.load_progress * 100)}%`)
        : "";
      const weights = entries.find((e) => e.weight_bytes);
      return el("tr", { "data-model": m.id },
        el("td", {}, m.id),
        el("td", { class: `status ${m.status}` }, m.status),
        el("td", {}, entries.filter((e) => e.status === "loaded").map((e) => e.worker).join(", ") || "–"),
        el("td", {}, weights ? bytes(weights.weight_bytes) : "–"),
        el("td", {}, String(entries.reduce((n, e) => n + (e.active_requests || 0), 0))),
        el("td", {}, progress),
        el("td", {},
          button("Load", () => post(`/admin/api/models/${modelPath(m.id)}/load`)),
          button("Unload", () => post(`/admin/api/models/${modelPath(m.id)}/unload`)),
        ),
      );
    }),
  );
  return perModel;
}

function renderCaches(samples, perModel) {
  const sum = (name, model) => samples.filter((s) => s.name === name && s.labels.model === model).reduce((n, s) => n + s.value, 0);
  $("caches").tBodies[0].replaceChildren(
    ...[...perModel.entries()].map(([model, entries]) => {
      const experts = entries.map((e) => e.experts).filter(Boolean);
      const add = (k) => experts.reduce((n, x) => n + (x[k] || 0), 0);
      return el("tr", {},
        el("td", {}, model),
        el("td", {}, `${sum("mlx_flash_prefix_cache_hits_total", model)} / ${sum("mlx_flash_prefix_cache_misses_total", model)}`),
        el("td", {}, String(sum("mlx_flash_prefix_cache_tokens_reused_total", model))),
        el("td", {}, bytes(sum("mlx_flash_prefix_cache_bytes", model))),
        el("td", {}, experts.length ? `${add("hits")} / ${add("misses")}` : "–"),
        el("td", {}, experts.length ? `${bytes(add("resident_bytes"))} / ${bytes(add("budget_bytes"))}` : "–"),
      );
    }),
  );
}

async function refresh() {
  try {
    const [samples, status, workers, listed, table] = await Promise.all([
      pollMetrics(),
      json("/admin/api/status"),
      json("/admin/api/workers"),
      json("/v1/models"),
      json("/admin/api/models"),
    ]);
    const mem = status.memory;
    const gb = (n) => n / 1e9;
    push(charts.memory, Date.now() / 1000, [gb(mem.effective_total_bytes - mem.effective_available_bytes), gb(mem.effective_available_bytes)]);
    $("pressure").textContent = `pressure: ${mem.pressure}`;
    $("pressure").className = `pressure ${mem.pressure}`;
    $("summary").textContent = `v${status.version} · ${status.workers.ready}/${status.workers.total} workers ready · ${status.in_flight} in flight · policy ${status.policy}`;
    renderWorkers(workers.workers);
    renderCaches(samples, renderModels(listed, table));
    $("error").textContent = "";
  } catch (error) {
    $("error").textContent = error.message;
  }
}

let logSeq = 0;

async function pollLogs() {
  try {
    const response = await api(`/admin/api/logs?since=${logSeq}&limit=200`);
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    const box = $("logs");
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    for (const line of body.lines) {
      const { seq, ts, level, component, msg, ...rest } = line;
      const fields = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
      box.append(el("div", { class: `log ${level}` }, `${ts} ${level} ${component || ""} ${msg} ${fields}`));
    }
    while (box.childElementCount > 1000) box.firstElementChild.remove();
    if (atBottom) box.scrollTop = box.scrollHeight;
    logSeq = body.next;
  } catch (error) {
    $("error").textContent = `logs: ${error.message}`;
  }
}

window.addEventListener("resize", () => {
  for (const chart of Object.values(charts)) chart.setSize({ width: Math.max(chart.root.parentElement.clientWidth, 300), height: 180 });
});

refresh();
pollLogs();
setInterval(refresh, POLL_MS);
setInterval(pollLogs, LOG_POLL_MS);
