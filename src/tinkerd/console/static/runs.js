// The runs page: every training run, newest first, filtered by base model or text, in pages.

import { api } from "./api.js";
import { reportError } from "./app.js";
import { el, number, time } from "./format.js";

const PAGE_SIZE = 20;

export async function renderRuns(box, query) {
  let offset = Number(query.get("offset") || 0);
  const baseModel = el("select", { "aria-label": "Base model" }, el("option", { value: "" }, "All base models"));
  const search = el("input", { type: "search", placeholder: "Search run id or model", "aria-label": "Search runs" });
  const table = el("table", { class: "runs" });
  const pager = el("div", { class: "pager" });
  box.append(el("h1", {}, "Training runs"), el("div", { class: "toolbar" }, baseModel, search), table, pager);

  const status = await api("/api/v1/server_status");
  for (const engine of status.engines) baseModel.append(el("option", { value: engine.base_model }, engine.base_model));

  async function load() {
    const params = new URLSearchParams({ limit: PAGE_SIZE, offset });
    if (baseModel.value) params.set("base_model", baseModel.value);
    if (search.value.trim()) params.set("search", search.value.trim());
    const { training_runs: runs, cursor } = await api(`/api/v1/training_runs?${params}`);
    const head = el("tr", {}, ["Run", "Base model", "Rank", "Created", "Last activity", "Steps", "Latest loss", "Client"].map((h) => el("th", {}, h)));
    const rows = runs.map((run) =>
      el("tr", { "data-run": run.training_run_id },
        el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(run.training_run_id)}` }, run.training_run_id)),
        el("td", {}, run.base_model),
        el("td", { class: "num" }, run.lora_rank),
        el("td", {}, time(run.created_at)),
        el("td", {}, time(run.last_request_time)),
        el("td", { class: "num" }, run.steps),
        el("td", { class: "num" }, number(run.latest_loss)),
        el("td", {}, el("span", { class: run.connected ? "badge on" : "badge" }, run.connected ? "connected" : "disconnected"))));
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 8 }, "No training runs yet."))));
    const last = Math.min(offset + runs.length, cursor.total_count);
    pager.replaceChildren(
      el("button", { type: "button", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE_SIZE); load().catch(reportError); } }, "Previous"),
      el("span", {}, cursor.total_count ? `${offset + 1}–${last} of ${cursor.total_count}` : "0 runs"),
      el("button", { type: "button", disabled: last >= cursor.total_count, onclick: () => { offset += PAGE_SIZE; load().catch(reportError); } }, "Next"));
  }

  let typing = null;
  baseModel.addEventListener("change", () => { offset = 0; load().catch(reportError); });
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { offset = 0; load().catch(reportError); }, 250);
  });
  await load();
  return () => clearTimeout(typing);
}
