// A run's checkpoints: publish / unpublish, delete, TTL, signed download links, copy of the path.

import { api, ApiError, checkpointRoute } from "./api.js";
import { reportError, showMessage } from "./app.js";
import { bytes, el, time } from "./format.js";

const DOWNLOADABLE = new Set(["sampler_weights", "external_weights"]); // PEFT adapters (weights/ also holds optimizer state)

// Another client (or the TTL janitor) may delete a checkpoint while its row is on screen:
// the server's 404 then becomes a message naming the checkpoint.
function explained(err, path) {
  if (err instanceof ApiError && err.status === 404) {
    return new ApiError(404, `${path} no longer exists: it was deleted or expired after this list was shown.`);
  }
  return err;
}

export async function renderCheckpoints(box, runId) {
  let shown = "";

  async function act(path, work, done) {
    try {
      await work();
      if (done) showMessage(done, "info");
      await refresh();
    } catch (err) {
      reportError(explained(err, path));
      await refresh().catch(() => {});
    }
  }

  function row(c) {
    const path = c.tinker_path;
    const kind = path.split("/")[3];
    const route = checkpointRoute(path);
    const ttl = el("input", { type: "number", min: 1, placeholder: "seconds", "aria-label": `TTL of ${c.checkpoint_id}`, class: "ttl" });
    const links = el("span", { class: "links" });
    const actions = el("td", { class: "actions" },
      el("button", { type: "button", onclick: () => act(path, () => api(`${route}/publish`, { method: c.public ? "DELETE" : "POST" })) },
        c.public ? "Unpublish" : "Publish"),
      el("button", { type: "button", class: "danger", onclick: () => {
        if (confirm(`Delete ${path}? Its files are removed from the server.`)) act(path, () => api(route, { method: "DELETE" }), `Deleted ${path}.`);
      } }, "Delete"),
      ttl,
      el("button", { type: "button", onclick: () => {
        const seconds = Number(ttl.value);
        if (!Number.isInteger(seconds) || seconds < 1) { showMessage("A TTL is a whole number of seconds, at least 1."); return; }
        act(path, () => api(`${route}/ttl`, { method: "PUT", json: { ttl_seconds: seconds } }));
      } }, "Set TTL"),
      c.expires_at ? el("button", { type: "button", onclick: () => act(path, () => api(`${route}/ttl`, { method: "PUT", json: { ttl_seconds: null } })) }, "Remove TTL") : null,
      DOWNLOADABLE.has(kind) ? el("button", { type: "button", onclick: async () => {
        try {
          const { urls } = await api(`${route}/external_weights_urls`);
          links.replaceChildren(...Object.entries(urls).map(([name, url]) => el("a", { href: url, download: name }, name)));
        } catch (err) { reportError(explained(err, path)); }
      } }, "Download") : null,
      el("button", { type: "button", onclick: async () => {
        try {
          await navigator.clipboard.writeText(path);
          showMessage(`Copied ${path}`, "info");
        } catch {
          showMessage(`Copy this path: ${path}`, "info");
        }
      } }, "Copy path"),
      links);
    return el("tr", { "data-checkpoint": path },
      el("td", {}, c.checkpoint_type),
      el("td", {}, el("code", {}, c.checkpoint_id)),
      el("td", { class: "num" }, bytes(c.size_bytes)),
      el("td", {}, time(c.time)),
      el("td", { class: "expires" }, c.expires_at ? time(c.expires_at) : "never"),
      el("td", { class: "public" }, c.public ? "public" : "private"),
      actions);
  }

  async function refresh() {
    const { checkpoints } = await api(`/api/v1/training_runs/${encodeURIComponent(runId)}/checkpoints`);
    const fingerprint = JSON.stringify(checkpoints);
    if (fingerprint === shown) return; // keep what the user is typing in a TTL box
    shown = fingerprint;
    const head = el("tr", {}, ["Kind", "Name", "Size", "Created", "Expires", "Public", ""].map((h) => el("th", {}, h)));
    box.replaceChildren(el("table", { class: "checkpoints" }, el("thead", {}, head),
      el("tbody", {}, checkpoints.length ? checkpoints.map(row) : el("tr", {}, el("td", { colspan: 7 }, "No checkpoints saved yet.")))));
  }

  await refresh();
  return refresh;
}
