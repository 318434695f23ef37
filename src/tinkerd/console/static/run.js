// One run: its metric curves (live, several runs overlaid) and its checkpoints.

import { api } from "./api.js";
import { reportError, showMessage } from "./app.js";
import { MetricChart } from "./chart.js";
import { renderCheckpoints } from "./checkpoints.js";
import { el, number, time } from "./format.js";

const POLL_MS = 1500;

// Each run's metrics by key, fetched incrementally: only points after the last one seen.
class MetricFeed {
  constructor(runId) {
    this.runId = runId;
    this.lastId = 0;
    this.byKey = new Map();
  }

  async poll() {
    const answer = await api(`/api/v1/training_runs/${encodeURIComponent(this.runId)}/metrics?after_id=${this.lastId}`);
    for (const m of answer.metrics) {
      if (!this.byKey.has(m.key)) this.byKey.set(m.key, []);
      this.byKey.get(m.key).push(m.value);
    }
    this.lastId = answer.last_id;
    return answer.metrics.length;
  }
}

function defaultKeys(keys) {
  const losses = keys.filter((k) => k.startsWith("loss"));
  return new Set(losses.length ? losses.slice(0, 1) : keys.slice(0, 1));
}

export async function renderRun(box, runId, query) {
  const run = await api(`/api/v1/training_runs/${encodeURIComponent(runId)}`);
  const feeds = [new MetricFeed(runId), ...(query.get("overlay") || "").split(",").filter(Boolean).map((id) => new MetricFeed(id))];
  let chosen = null;

  const summary = el("p", { class: "summary" });
  const picker = el("fieldset", { class: "metrics" }, el("legend", {}, "Metrics"));
  const overlayPick = el("select", { "aria-label": "Overlay another run" }, el("option", { value: "" }, "Overlay another run…"));
  const overlays = el("span", { class: "overlays" });
  const chartBox = el("div", { class: "chart", "data-testid": "chart" });
  const legend = el("ul", { class: "series", "data-testid": "series" });
  const checkpoints = el("div", { class: "checkpoints" });
  box.append(
    el("h1", {}, "Run ", el("code", {}, runId)),
    summary,
    el("section", { class: "card" }, el("h2", {}, "Metrics"), picker, el("div", { class: "toolbar" }, overlayPick, overlays), chartBox, legend),
    el("section", { class: "card" }, el("h2", {}, "Checkpoints"), checkpoints),
  );
  const chart = new MetricChart(chartBox);

  function showSummary(r) {
    summary.replaceChildren(
      `${r.base_model} · LoRA rank ${r.lora_rank} · created ${time(r.created_at)} · last activity ${time(r.last_request_time)} · `,
      `${r.steps} steps · latest loss ${number(r.latest_loss)} · `,
      el("span", { class: r.connected ? "badge on" : "badge" }, r.connected ? "client connected" : "client disconnected"));
  }

  function redraw() {
    const keys = [...new Set(feeds.flatMap((f) => [...f.byKey.keys()]))].sort();
    if (chosen === null && keys.length) chosen = defaultKeys(keys);
    const shown = chosen || new Set();
    picker.replaceChildren(el("legend", {}, "Metrics"), ...keys.map((key) =>
      el("label", {}, el("input", { type: "checkbox", value: key, checked: shown.has(key), onchange: (e) => {
        if (e.target.checked) shown.add(key); else shown.delete(key);
        redraw();
      } }), key)));
    const series = [];
    for (const feed of feeds) {
      for (const key of keys) {
        if (!shown.has(key) || !feed.byKey.has(key)) continue;
        series.push({ label: feeds.length > 1 ? `${feed.runId} ${key}` : key, values: feed.byKey.get(key) });
      }
    }
    chart.draw(series);
    legend.replaceChildren(...series.map((s) => el("li", { "data-series": s.label }, `${s.label}: ${s.values.length} points, last ${number(s.values[s.values.length - 1])}`)));
    if (!series.length) legend.append(el("li", {}, "No metrics reported yet."));
    overlays.replaceChildren(...feeds.slice(1).map((f) => el("button", { type: "button", class: "chip", title: "Remove from chart", onclick: () => {
      feeds.splice(feeds.indexOf(f), 1);
      redraw();
    } }, `${f.runId} ✕`)));
  }

  const others = await api("/api/v1/training_runs?limit=100");
  for (const other of others.training_runs) {
    if (other.training_run_id !== runId) overlayPick.append(el("option", { value: other.training_run_id }, `${other.training_run_id} (${other.base_model})`));
  }
  overlayPick.addEventListener("change", async () => {
    const id = overlayPick.value;
    overlayPick.value = "";
    if (!id || feeds.some((f) => f.runId === id)) return;
    const feed = new MetricFeed(id);
    feeds.push(feed);
    try { await feed.poll(); } catch (err) { reportError(err); }
    redraw();
  });

  showSummary(run);
  await Promise.all(feeds.map((f) => f.poll()));
  redraw();
  const refreshCheckpoints = await renderCheckpoints(checkpoints, runId);

  // Live: new points are appended as the run reports them; a failed poll is reported once
  // and retried, so a restarted server brings the page back without a reload.
  let stopped = false;
  let failing = false;
  let timer = null;
  async function tick() {
    try {
      const counts = await Promise.all(feeds.map((f) => f.poll()));
      if (counts.some((n) => n > 0)) {
        redraw();
        showSummary(await api(`/api/v1/training_runs/${encodeURIComponent(runId)}`));
        await refreshCheckpoints();
      }
      if (failing) showMessage("");
      failing = false;
    } catch (err) {
      if (!failing) reportError(err);
      failing = true;
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }
  timer = setTimeout(tick, POLL_MS);
  const onResize = () => chart.resize();
  window.addEventListener("resize", onResize);
  return () => {
    stopped = true;
    clearTimeout(timer);
    window.removeEventListener("resize", onResize);
    chart.destroy();
  };
}
