// Small charts from the server's own Prometheus metrics (GET /metrics), sampled while this page is open:
// live sandboxes by state, mean create latency per interval, and processes started per second.
import uPlot from "../vendor/uPlot.esm.js";
import { request } from "../api.js";
import { h, replace } from "../dom.js";
import { messages } from "./common.js";

const EVERY = 5000;
const KEEP = 120;

// Prometheus text format: name{labels} value, one sample a line.
export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const part of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[part[1]] = part[2];
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

const sum = (samples, name, pred = () => true) =>
  samples.filter((s) => s.name === name && pred(s.labels)).reduce((a, s) => a + s.value, 0);

export function metricsView(main) {
  const msg = messages();
  const boxes = { states: h("div", { class: "chart", id: "chart-states" }), latency: h("div", { class: "chart", id: "chart-latency" }), execs: h("div", { class: "chart", id: "chart-execs" }) };
  const totals = h("div", { class: "muted", id: "metric-totals" });
  replace(main, h("h1", {}, "Metrics"), msg.el,
    h("div", { class: "grid3" },
      h("div", { class: "panel" }, h("h2", {}, "Sandboxes by state"), boxes.states),
      h("div", { class: "panel" }, h("h2", {}, "Create latency (s, mean per interval)"), boxes.latency),
      h("div", { class: "panel" }, h("h2", {}, "Processes started per second"), boxes.execs)),
    h("div", { class: "panel" }, totals));

  const t = [], running = [], paused = [], creating = [], latency = [], execRate = [];
  let last = null;
  const width = () => Math.max(260, boxes.states.clientWidth || 360);
  const axis = { stroke: "#687185", grid: { stroke: "#eef0f4" } };
  const make = (el, series) => new uPlot({ width: width(), height: 190, series: [{}, ...series], axes: [axis, axis], legend: { live: false } }, [[]].concat(series.map(() => [])), el);
  const charts = {
    states: make(boxes.states, [{ label: "running", stroke: "#1f8f4e", width: 2 }, { label: "paused", stroke: "#b7791f", width: 2 }, { label: "creating", stroke: "#2f6fde", width: 2 }]),
    latency: make(boxes.latency, [{ label: "create s", stroke: "#2f6fde", width: 2, spanGaps: true }]),
    execs: make(boxes.execs, [{ label: "execs/s", stroke: "#7b4fd6", width: 2, fill: "rgba(123,79,214,.1)" }]),
  };

  async function sample() {
    let text;
    try { text = await (await request("GET", "/metrics")).text(); } catch (error) { msg.error(error); return; }
    const s = parseMetrics(text);
    const at = Date.now() / 1000;
    const state = (name) => sum(s, "corral_sandboxes", (l) => l.state === name);
    const cur = { at, count: sum(s, "corral_sandbox_create_seconds_count"), total: sum(s, "corral_sandbox_create_seconds_sum"), execs: sum(s, "corral_process_starts_total") };
    t.push(at); running.push(state("running")); paused.push(state("paused")); creating.push(state("creating"));
    if (last) {
      const n = cur.count - last.count;
      latency.push(n > 0 ? (cur.total - last.total) / n : null);
      execRate.push(Math.max(0, (cur.execs - last.execs) / (at - last.at)));
    } else { latency.push(cur.count ? cur.total / cur.count : null); execRate.push(0); }
    last = cur;
    for (const arr of [t, running, paused, creating, latency, execRate]) if (arr.length > KEEP) arr.shift();
    charts.states.setData([t, running, paused, creating]);
    charts.latency.setData([t, latency]);
    charts.execs.setData([t, execRate]);
    replace(totals, `${cur.count} sandboxes created (mean ${(cur.count ? cur.total / cur.count : 0).toFixed(3)} s), ${cur.execs} processes started, `
      + `${sum(s, "corral_http_requests_total")} API requests since the server started. Sampled every ${EVERY / 1000} s while this page is open.`);
  }
  sample();
  const timer = setInterval(sample, EVERY);
  const onResize = () => { for (const c of Object.values(charts)) c.setSize({ width: width(), height: 190 }); };
  window.addEventListener("resize", onResize);
  return () => { clearInterval(timer); window.removeEventListener("resize", onResize); for (const c of Object.values(charts)) c.destroy(); };
}
