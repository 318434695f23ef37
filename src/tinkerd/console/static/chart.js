// Metric curves on uPlot: one series per (run, metric), x = the n-th report of that metric.

import uPlot from "./vendor/uPlot.esm.js";

const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"];

export class MetricChart {
  constructor(box) {
    this.box = box;
    this.plot = null;
    this.labels = [];
  }

  // series: [{label, values}]
  draw(series) {
    const labels = series.map((s) => s.label);
    const length = Math.max(0, ...series.map((s) => s.values.length));
    const xs = Array.from({ length }, (_, i) => i + 1);
    const data = [xs, ...series.map((s) => xs.map((_, i) => (i < s.values.length ? s.values[i] : null)))];
    if (this.plot && labels.join("\n") === this.labels.join("\n")) {
      this.plot.setData(data);
      return;
    }
    this.destroy();
    this.labels = labels;
    if (!series.length) return;
    const width = Math.max(320, this.box.clientWidth || 640);
    this.plot = new uPlot({
      width,
      height: 320,
      scales: { x: { time: false } },
      axes: [{ label: "step (n-th report of the metric)", incrs: STEP_INCREMENTS }, {}],
      series: [{ label: "step" }, ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2, points: { show: length < 60 } }))],
    }, data, this.box);
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: Math.max(320, this.box.clientWidth), height: 320 });
  }

  destroy() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
    this.labels = [];
  }
}
