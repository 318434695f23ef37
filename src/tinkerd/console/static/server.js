// The server page: engines, memory, disk, uptime and version (GET /api/v1/server_status).

import { api } from "./api.js";
import { reportError } from "./app.js";
import { bytes, duration, el } from "./format.js";

const REFRESH_MS = 3000;

export async function renderServer(box) {
  const facts = el("dl", { class: "facts" });
  const engines = el("table", { class: "engines" });
  box.append(el("h1", {}, "Server"), facts, el("h2", {}, "Engines"), engines);

  async function load() {
    const s = await api("/api/v1/server_status");
    const fact = (name, value) => [el("dt", {}, name), el("dd", {}, value)];
    facts.replaceChildren(
      ...fact("Version", s.version),
      ...fact("Uptime", duration(s.uptime_seconds)),
      ...fact("Process memory (resident)", bytes(s.process_resident_bytes)),
      ...fact("Data dir", s.data_dir),
      ...fact("Disk used by the data dir", bytes(s.disk.data_dir_bytes)),
      ...fact("Disk free", `${bytes(s.disk.free_bytes)} of ${bytes(s.disk.total_bytes)}`),
      ...fact("Connected clients", s.sessions_connected));
    const head = ["Base model", "Device", "Dtype", "Context", "Queued jobs", "Samples waiting", "Rows decoding", "Trainable adapters", "Cached adapters", "Memory in use"];
    engines.replaceChildren(el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, s.engines.map((e) =>
      el("tr", { "data-engine": e.base_model },
        el("td", {}, e.base_model), el("td", {}, e.device), el("td", {}, e.dtype), el("td", { class: "num" }, e.max_context),
        el("td", { class: "num" }, e.queued_jobs), el("td", { class: "num" }, e.samples_waiting), el("td", { class: "num" }, e.sample_rows_running),
        el("td", { class: "num" }, e.adapters_trainable), el("td", { class: "num" }, e.adapters_cached), el("td", { class: "num" }, bytes(e.memory_bytes))))));
  }

  await load();
  const timer = setInterval(() => load().catch(reportError), REFRESH_MS);
  return () => clearInterval(timer);
}
