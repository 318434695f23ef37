// The console's shell: sign-in, the hash routes (#/runs, #/runs/ID, #/playground,
// #/server) and the one place errors are shown.

import { api, apiKey, ApiError } from "./api.js";
import { renderPlayground } from "./playground.js";
import { renderRun } from "./run.js";
import { renderRuns } from "./runs.js";
import { renderServer } from "./server.js";

const main = document.getElementById("page");
const signIn = document.getElementById("sign-in");
const keyInput = document.getElementById("api-key");
const signOut = document.getElementById("sign-out");
const message = document.getElementById("message");
let view = null;
let stopPage = null;

export function showMessage(text, kind = "error") {
  message.textContent = text;
  message.className = kind;
  message.hidden = !text;
}

// Every page reports failures here: a refused key sends the user back to sign-in,
// anything else becomes a message above the page. A key refused after it was accepted
// (the sign-in form is hidden) was revoked, or the server restarted with other keys.
export function reportError(err) {
  if (err && err.name === "AbortError") return;
  if (err instanceof ApiError && err.status === 401) {
    const wasSignedIn = signIn.hidden;
    apiKey.clear();
    showSignIn(wasSignedIn
      ? `The server no longer accepts this API key (it was revoked, or the server restarted with other keys); sign in again. The server said: ${err.message}`
      : `The server refused this API key: ${err.message}`);
    return;
  }
  showMessage(err instanceof Error ? err.message : String(err));
}

function showSignIn(why = "") {
  if (stopPage) stopPage();
  stopPage = null;
  if (view) view.remove();
  view = null;
  signOut.hidden = true;
  signIn.hidden = false;
  showMessage(why);
  keyInput.focus();
}

signIn.addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey.set(keyInput.value.trim());
  try {
    await api("/api/v1/server_status");
  } catch (err) {
    reportError(err);
    return;
  }
  keyInput.value = "";
  showMessage("");
  if (!location.hash || location.hash === "#/") location.hash = "#/runs";
  else show();
});

signOut.addEventListener("click", () => {
  apiKey.clear();
  showSignIn();
});

function parseHash() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || "runs", id: parts[1], query: new URLSearchParams(query) };
}

const PAGES = {
  runs: ({ query }, box) => renderRuns(box, query),
  run: ({ id, query }, box) => renderRun(box, id, query),
  playground: ({ query }, box) => renderPlayground(box, query),
  server: (_, box) => renderServer(box),
};

async function show() {
  if (!apiKey.get()) {
    showSignIn();
    return;
  }
  const route = parseHash();
  const page = route.page === "runs" && route.id ? "run" : route.page;
  if (stopPage) stopPage();
  stopPage = null;
  signIn.hidden = true;
  signOut.hidden = false;
  showMessage("");
  for (const link of document.querySelectorAll("nav a")) {
    link.setAttribute("aria-current", link.dataset.page === route.page ? "page" : "false");
  }
  if (view) view.remove();
  view = document.createElement("section");
  view.className = `view view-${page}`;
  main.append(view);
  const render = PAGES[page];
  if (!render) {
    showMessage(`No page called "${route.page}".`);
    return;
  }
  try {
    stopPage = (await render(route, view)) || null;
  } catch (err) {
    reportError(err);
  }
}

window.addEventListener("hashchange", show);
show();
