// The console's only way to reach tinkerd: the same routes as the SDK, CLI and OpenAI
// clients, with the API key from sessionStorage in the X-API-Key header.

const KEY_ITEM = "tinkerd.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_ITEM),
  set: (key) => sessionStorage.setItem(KEY_ITEM, key),
  clear: () => sessionStorage.removeItem(KEY_ITEM),
};

function errorMessage(status, body) {
  const detail = body && (body.detail || (body.error && body.error.message));
  if (detail) return typeof detail === "string" ? detail : JSON.stringify(detail);
  return `the server answered HTTP ${status}`;
}

async function send(path, options = {}) {
  const headers = { "X-API-Key": apiKey.get() || "", ...(options.headers || {}) };
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method: options.method || "GET",
      headers,
      body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
      signal: options.signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "cannot reach the tinkerd server (is it still running?)");
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch { /* not JSON */ }
    throw new ApiError(response.status, errorMessage(response.status, body));
  }
  return response;
}

export async function api(path, options = {}) {
  const response = await send(path, options);
  const text = await response.text();
  return text ? JSON.parse(text) : {};
}

// POST with "stream": true and call onEvent with each server-sent event's JSON, through the
// response body's reader (EventSource cannot POST).
export async function streamEvents(path, body, onEvent, signal) {
  const response = await send(path, { method: "POST", json: { ...body, stream: true }, signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(400, parsed.error.message || "the stream failed");
        onEvent(parsed);
      }
    }
  }
}

export function checkpointRoute(tinkerPath) {
  // tinker://RUN/KIND/NAME -> /api/v1/training_runs/RUN/checkpoints/KIND/NAME
  const [run, kind, ...name] = tinkerPath.replace("tinker://", "").split("/");
  return `/api/v1/training_runs/${encodeURIComponent(run)}/checkpoints/${kind}/${name.map(encodeURIComponent).join("/")}`;
}
